//! `oxtune rlhf` end to end on tiny-qwen3 (DPO, KTO, CPO, SimPO, ORPO,
//! GRPO), the GRPO objective's reward plumbing (built-in, native and wasm
//! rewards; failures), and the errors bad input gets before training.

use std::path::Path;

use oxtune_data::text::TextAssets;
use oxtune_engine::model::checkpoint::Trainable;
use oxtune_engine::model::{LoadOptions, LoadedModel};
use oxtune_plugin_api::RewardSample;
use oxtune_registry::{Registry, SandboxConfig};
use oxtune_tests::cli::{self, fails_with, fresh_dir, metrics, scratch, succeeded};
use oxtune_tests::{build_cdylib, build_rust_wasm_reward, build_wasm_reward_component, fixtures};
use oxtune_train::align::grpo::{GrpoConfig, GrpoLossType, GrpoObjective, RewardOnError, ScaleRewards};
use oxtune_train::align::objective::Reference;
use oxtune_train::Objective;
use serde_json::json;

const PAIRS: &str = concat!(
    "{\"messages\": [{\"role\": \"user\", \"content\": \"Sky colour?\"}, {\"role\": \"assistant\", \"content\": \"Blue.\"}], \"rejected_response\": \"Green.\"}\n",
    "{\"prompt\": \"Two plus two?\", \"chosen\": \"Four.\", \"rejected\": \"Five.\"}\n",
    "{\"instruction\": \"Name a fruit.\", \"input\": \"\", \"chosen\": \"Apple.\", \"rejected\": \"Chair.\"}\n",
    "{\"chosen\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}], \"rejected\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Go away.\"}]}\n",
);

/// `oxtune rlhf` with a rank-4 LoRA.
fn rlhf(algo: &str, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    cli::rlhf(algo, data, out, &[&["--lora-rank", "4"], extra].concat())
}

#[test]
fn dpo_starts_at_ln_2_with_the_adapter_at_its_initialisation() {
    let data = scratch("pairs.jsonl", PAIRS);
    let out = fresh_dir("dpo");
    let run = rlhf(
        "dpo",
        &data,
        &out,
        &["--max-steps", "3", "--per-device-train-batch-size", "2", "--learning-rate", "5e-3", "--beta", "0.5"]
            .into_iter()
            .chain(["--sample-prompt", "Sky colour?"])
            .collect::<Vec<_>>(),
    );
    succeeded(&run);
    assert!(String::from_utf8_lossy(&run.stdout).contains("after:"), "--sample-prompt answers before and after");
    let m = metrics(&out);
    // B = 0: the policy is the reference, every margin is 0.
    assert!((m[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{}", m[0]);
    assert_eq!(m[0]["rewards/accuracies"], 0.0);
    assert_eq!(m[0]["rewards/margins"], 0.0);
    for key in ["rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"] {
        assert!(m[2][key].as_f64().is_some(), "{key} logged");
    }
    assert!(m[2]["rewards/margins"].as_f64().unwrap() > 0.0, "training separates chosen from rejected: {}", m[2]);
    assert!(out.join("checkpoint-3/adapter_model.safetensors").is_file());
}

#[test]
fn a_plugin_tuner_that_trains_base_weights_gets_a_frozen_reference() {
    // `ln-tuning` (the example plugin) trains the norm weights in place.
    // Switching its "adapter" off would give the model being trained, so
    // the policy would always equal the reference and every DPO reward
    // would stay 0; a frozen copy lets them move after the first update.
    let plugin = build_cdylib("oxtune-example-plugin", &["cdylib"]);
    let data = scratch("pairs-ln.jsonl", PAIRS);
    let out = fresh_dir("dpo-ln-tuning");
    let extra = [
        "--plugin",
        plugin.to_str().unwrap(),
        "--tuner",
        "ln-tuning",
        "--max-steps",
        "2",
        "--per-device-train-batch-size",
        "4",
        "--learning-rate",
        "0.05",
    ];
    succeeded(&rlhf("dpo", &data, &out, &extra));
    let m = metrics(&out);
    assert!((m[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{}", m[0]);
    let moved = m[1]["rewards/chosen"].as_f64().unwrap();
    assert!(moved.abs() > 1e-6, "the step-2 policy must differ from the frozen reference: {}", m[1]);
    assert!(out.join("checkpoint-2/config.json").is_file(), "an in-place tuner saves the whole model");
}

/// `-log σ(x)`, computed independently of the trainer.
fn neg_log_sigmoid(x: f64) -> f64 {
    (1.0 + (-x).exp()).ln()
}

#[test]
fn every_preference_method_starts_at_its_formula_and_separates_the_pair() {
    // One pair, one per step: step 1 sees policy = reference (B = 0), so
    // each loss is its formula over the logged log-probabilities; step 2
    // trains on the same pair, so the chosen-over-rejected margin grows.
    let data = scratch("one-pair.jsonl", PAIRS.lines().next().unwrap());
    type Expected = fn(&serde_json::Value) -> f64;
    let cases: [(&str, Vec<&str>, Expected); 5] = [
        // (0 − 1/(2β))² at β 0.1.
        ("dpo", vec!["--loss-type", "ipo", "--beta", "0.1"], |_| 25.0),
        // relu(1 − β·0) + rpo_alpha · NLL(chosen).
        ("dpo", vec!["--loss-type", "hinge", "--rpo-alpha", "1", "--beta", "0.1"], |m| 1.0 + f(m, "nll_loss")),
        // −log σ(β(log π(c) − log π(r))) + NLL(chosen), β 0.1, sums of log-probs.
        ("cpo", vec![], |m| neg_log_sigmoid(0.1 * (f(m, "logps/chosen") - f(m, "logps/rejected"))) + f(m, "nll_loss")),
        // −log σ(β(mean log π(c) − mean log π(r)) − γ), β 2, γ 0.5.
        ("simpo", vec!["--simpo-gamma", "0.5"], |m| {
            neg_log_sigmoid(2.0 * (f(m, "logps/chosen") - f(m, "logps/rejected")) - 0.5)
        }),
        // NLL − λ log σ(log odds(c) − log odds(r)), λ 0.2, mean log-probs.
        ("orpo", vec!["--orpo-lambda", "0.2"], |m| {
            let log_odds = |lp: f64| lp - (-lp.exp()).ln_1p();
            f(m, "nll_loss") + 0.2 * neg_log_sigmoid(log_odds(f(m, "logps/chosen")) - log_odds(f(m, "logps/rejected")))
        }),
    ];
    for (algo, extra, expected) in cases {
        let case = format!("{algo} {}", extra.join(" "));
        let out = fresh_dir(&format!("pref-{algo}-{}", extra.len()));
        let mut args = vec!["--max-steps", "2", "--per-device-train-batch-size", "1", "--learning-rate", "5e-3"];
        args.extend(extra.iter().copied());
        succeeded(&rlhf(algo, &data, &out, &args));
        let m = metrics(&out);
        assert_eq!(m.len(), 2, "{case}");
        let (loss, want) = (f(&m[0], "loss"), expected(&m[0]));
        assert!((loss - want).abs() < 1e-4 * want.abs().max(1.0), "{case}: step-1 loss {loss}, formula {want}");
        let (before, after) = (f(&m[0], "rewards/margins"), f(&m[1], "rewards/margins"));
        assert!(after > before, "{case}: the margin must grow on the trained pair: {before} -> {after}");
        assert!(f(&m[1], "loss") < loss, "{case}: the loss must fall on the trained pair: {}", m[1]);
    }
}

#[test]
fn kto_starts_at_one_half_and_needs_two_rows_per_batch() {
    let kto = scratch(
        "kto.jsonl",
        concat!(
            "{\"prompt\": \"Sky colour?\", \"completion\": \"Blue.\", \"label\": true}\n",
            "{\"prompt\": \"Sky colour?\", \"completion\": \"Green.\", \"label\": false}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}], \"label\": true}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Go away.\"}], \"label\": false}\n",
        ),
    );
    let out = fresh_dir("kto");
    succeeded(&rlhf("kto", &kto, &out, &["--max-steps", "2", "--per-device-train-batch-size", "4"]));
    let m = metrics(&out);
    assert_eq!(f(&m[0], "kl"), 0.0, "policy = reference: {}", m[0]);
    assert_eq!(f(&m[0], "rewards/chosen"), 0.0, "policy = reference: {}", m[0]);
    // At initialisation policy = reference: each loss term is 1 − σ(0) = 0.5.
    assert!((m[0]["loss"].as_f64().unwrap() - 0.5).abs() < 1e-6, "{}", m[0]);
    fails_with(&rlhf("kto", &kto, &fresh_dir("kto-1"), &["--max-steps", "1"]), &["at least 2"]);
}

#[test]
fn bad_preference_rows_and_reward_settings_fail_before_training() {
    let missing = scratch("missing.jsonl", "{\"prompt\": \"Q\", \"chosen\": \"A\"}\n");
    fails_with(&rlhf("dpo", &missing, &fresh_dir("dpo-missing"), &[]), &["missing.jsonl:1", "no `rejected`"]);
    let empty = scratch("empty.jsonl", "{\"prompt\": \"Q\", \"chosen\": \"A\", \"rejected\": \" \"}\n");
    fails_with(&rlhf("dpo", &empty, &fresh_dir("dpo-empty"), &[]), &["empty.jsonl:1", "rejected completion is empty"]);
    let prompts = scratch("prompts.jsonl", "{\"prompt\": \"Say hi\"}\n");
    fails_with(
        &rlhf("grpo", &prompts, &fresh_dir("grpo-unknown"), &["--reward-funcs", "accuracy,exactness"]),
        &["exactness", "accuracy", "format", "length", "repetition"],
    );
    fails_with(
        &rlhf(
            "grpo",
            &prompts,
            &fresh_dir("grpo-weights"),
            &["--reward-funcs", "format,length", "--reward-weights", "1"],
        ),
        &["--reward-weights has 1 value(s) for 2 reward function(s)"],
    );
    fails_with(&rlhf("grpo", &prompts, &fresh_dir("grpo-none"), &[]), &["at least one --reward-funcs"]);
}

#[test]
fn grpo_rolls_out_scores_and_updates() {
    // The example plugin's `keyword` reward scores a completion 1 when it
    // contains "e": the tiny model's random text hits it about half the
    // time, so advantages are non-zero and the policy must move.
    let plugin = build_cdylib("oxtune-example-plugin", &["cdylib"]);
    let prompts = scratch(
        "grpo.jsonl",
        concat!(
            "{\"problem\": \"One plus one?\", \"solution\": \"2\", \"keyword\": \"e\"}\n",
            "{\"problem\": \"Two plus two?\", \"solution\": \"4\", \"keyword\": \"e\"}\n",
        ),
    );
    let out = fresh_dir("grpo");
    let mut args = vec!["--plugin", plugin.to_str().unwrap()];
    args.extend([
        "--reward-funcs",
        "keyword,repetition",
        "--reward-weights",
        "1,0.5",
        "--num-generations",
        "4",
        "--max-completion-length",
        "6",
        "--max-steps",
        "2",
        "--per-device-train-batch-size",
        "2",
        "--learning-rate",
        "0.01",
    ]);
    succeeded(&rlhf("grpo", &prompts, &out, &args));
    let m = metrics(&out);
    assert_eq!(m.len(), 2);
    for step in &m {
        for key in ["clip_ratio", "rewards/repetition/std", "rollout_s", "rollout_tokens_per_s", "seconds"] {
            f(step, key);
        }
        let weighted = f(step, "rewards/keyword/mean") + 0.5 * f(step, "rewards/repetition/mean");
        assert!((f(step, "reward") - weighted).abs() < 1e-9, "reward is the weighted sum: {step}");
        assert!(f(step, "completions/mean_length") <= 6.0, "{step}");
    }
    assert!(f(&m[0], "reward_std") > 0.0, "the keyword must split the group for this test to mean anything: {}", m[0]);
    // Step 1: policy = reference and = the rollout policy, with
    // zero-mean advantages in each group: no KL and a zero loss, but a
    // gradient that makes the rewarded completions likelier.
    assert_eq!(f(&m[0], "kl"), 0.0, "{}", m[0]);
    assert!(f(&m[0], "loss").abs() < 1e-6, "{}", m[0]);
    assert!(f(&m[0], "grad_norm") > 0.0, "{}", m[0]);
    assert!(f(&m[1], "kl") > 0.0, "the update moved the policy away from the reference: {}", m[1]);
}

/// Metric `key` of a logged step.
fn f(step: &serde_json::Value, key: &str) -> f64 {
    step[key].as_f64().unwrap_or_else(|| panic!("{key} missing from {step}"))
}

/// A GRPO objective over tiny-qwen3 with `registry`'s reward `funcs`.
fn objective<'a>(
    registry: &'a Registry,
    assets: &'a TextAssets,
    funcs: &[&str],
    beta: f64,
    on_error: RewardOnError,
) -> Result<GrpoObjective<'a>, String> {
    let config = GrpoConfig {
        num_generations: 2,
        max_completion_length: 3,
        temperature: 1.0,
        top_p: 1.0,
        epsilon: 0.2,
        epsilon_high: 0.2,
        beta,
        loss_type: GrpoLossType::Grpo,
        scale_rewards: ScaleRewards::Group,
        num_iterations: 1,
        reward_funcs: funcs.iter().map(|s| s.to_string()).collect(),
        reward_weights: vec![1.0; funcs.len()],
        on_error,
        seed: 1,
    };
    GrpoObjective::new(config, registry, &assets.tokenizer, assets.eos_token_ids.clone(), Reference::AdapterOff)
}

#[test]
fn with_beta_zero_the_reference_is_not_run_and_the_kl_term_is_dropped() {
    // PEFT's reference adapter (B ≠ 0) makes the policy differ from the
    // reference (adapter off); the rollouts are seeded alike, so the two
    // losses differ by exactly β times the logged KL.
    let registry = Registry::with_builtins().unwrap();
    let assets = TextAssets::load(&fixtures().join("models/tiny-qwen3")).unwrap();
    let mut model =
        LoadedModel::load(&registry, &fixtures().join("models/tiny-qwen3"), &LoadOptions::default()).unwrap();
    model.attach_adapter(&registry, &fixtures().join("peft/tiny-qwen3-lora"), Trainable::All).unwrap();
    let prompt = oxtune_data::PromptRow { ids: vec![5, 9, 14], text: "abc".into(), columns: Default::default() };
    let run = |beta: f64| {
        let mut objective = objective(&registry, &assets, &["repetition"], beta, RewardOnError::Fail).unwrap();
        // Token-mean aggregation, like the logged KL.
        objective.config.loss_type = GrpoLossType::Bnpo;
        let out = objective.loss(&model, &[&prompt], Some(1), 1).unwrap();
        (out.loss.to_scalar::<f32>().unwrap() as f64, out.logged.get("kl").copied(), objective.reference_passes())
    };
    let (without, kl_without, passes_without) = run(0.0);
    let (with, kl, passes) = run(0.5);
    assert_eq!((passes_without, passes), (0, 1));
    let kl = kl.expect("kl logged when β > 0");
    assert!(kl > 1e-4, "the adapter moves the policy away from the reference: kl {kl}");
    assert_eq!(kl_without, Some(0.0), "no KL is computed without a reference");
    assert!(
        (with - without - 0.5 * kl).abs() < 1e-5,
        "loss(β 0.5) − loss(β 0) = {} ≠ 0.5 · kl = {}",
        with - without,
        0.5 * kl
    );
}

fn samples(completions: &[&str]) -> Vec<RewardSample> {
    completions
        .iter()
        .map(|c| RewardSample { prompt: "p".into(), completion: c.to_string(), columns: Default::default() })
        .collect()
}

#[test]
fn native_wasm_and_builtin_rewards_score_alike_through_grpo() {
    let assets = TextAssets::load(&fixtures().join("models/tiny-qwen3")).unwrap();
    let batch = samples(&["a b c a b c a b c", "all different words here", "x y z x y z"]);
    let builtin = Registry::with_builtins().unwrap();
    let mut native = Registry::empty();
    native.load_path(&build_cdylib("oxtune-plugin-rewards", &["cdylib"]), &SandboxConfig::default()).unwrap();
    let mut wasm = Registry::empty();
    wasm.load_path(&build_rust_wasm_reward(), &SandboxConfig::default()).unwrap();
    let score = |registry: &Registry, name: &str| {
        objective(registry, &assets, &[name], 0.0, RewardOnError::Fail).unwrap().rewards(&batch).unwrap().0
    };
    let expected = score(&builtin, "repetition");
    assert!(expected[0] < 0.0 && expected[1] == 0.0);
    assert_eq!(score(&native, "repetition"), expected);
    assert_eq!(score(&wasm, "repetition_wasm"), expected);
}

#[test]
fn failing_reward_scripts_fail_the_sample_or_score_zero() {
    let assets = TextAssets::load(&fixtures().join("models/tiny-qwen3")).unwrap();
    let sandbox = SandboxConfig { fuel_per_sample: 5_000_000, memory_limit: 4 << 20, ..Default::default() };
    let mut registry = Registry::empty();
    for script in ["infinite_loop.wat", "memory_hog.wat", "traps.wat"] {
        registry.load_path(&fixtures().join("wasm").join(script), &sandbox).unwrap();
    }
    registry.load_path(&build_cdylib("oxtune-fixture-misbehaving", &[]), &sandbox).unwrap();
    let batch = samples(&["one", "two"]);
    for name in ["infinite_loop", "memory_hog", "traps", "short"] {
        let strict = objective(&registry, &assets, &[name], 0.0, RewardOnError::Fail).unwrap();
        let err = strict.rewards(&batch).unwrap_err().to_string();
        assert!(err.contains(name) && err.contains("sample 0"), "{name}: {err}");
        assert!(err.lines().count() <= 2 && err.len() < 600, "{name}: not a short message: {err}");
        let lenient = objective(&registry, &assets, &[name], 0.0, RewardOnError::Zero).unwrap();
        let (scores, logged) = lenient.rewards(&batch).unwrap();
        assert_eq!(scores, vec![0.0, 0.0], "{name}");
        assert_eq!(logged[&format!("rewards/{name}/failed")], 2.0, "{name}");
    }
}

#[test]
fn a_wit_component_reward_scores_like_the_native_plugin() {
    let assets = TextAssets::load(&fixtures().join("models/tiny-qwen3")).unwrap();
    let batch: Vec<RewardSample> = [("The sky is Blue.", "blue"), ("Grass is green.", "red"), ("BLUE!", "blue")]
        .iter()
        .map(|(completion, keyword)| RewardSample {
            prompt: "p".into(),
            completion: completion.to_string(),
            columns: json!({"keyword": keyword}).as_object().unwrap().clone(),
        })
        .collect();
    let mut native = Registry::empty();
    native.load_path(&build_cdylib("oxtune-example-plugin", &["cdylib"]), &SandboxConfig::default()).unwrap();
    let mut component = Registry::empty();
    component.load_path(&build_wasm_reward_component(), &SandboxConfig::default()).unwrap();
    let score = |registry: &Registry, name: &str| {
        objective(registry, &assets, &[name], 0.0, RewardOnError::Fail).unwrap().rewards(&batch).unwrap().0
    };
    let expected = score(&native, "keyword");
    assert_eq!(expected, vec![1.0, 0.0, 1.0]);
    assert_eq!(score(&component, "keyword_component"), expected);
    // The script's own error comes back for the sample, named.
    let no_keyword = [RewardSample { prompt: "p".into(), completion: "c".into(), columns: Default::default() }];
    let err = objective(&component, &assets, &["keyword_component"], 0.0, RewardOnError::Fail)
        .unwrap()
        .rewards(&no_keyword)
        .unwrap_err()
        .to_string();
    assert!(err.contains("keyword_component") && err.contains("no string column `keyword`"), "{err}");
}
