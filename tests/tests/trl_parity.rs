//! The preference losses against TRL itself: `tests/fixtures/trl` holds
//! what TRL 1.16's trainers logged over two steps of full fine-tuning of
//! tiny-qwen3 on two pairs (and KTO on two rows), with a fixed learning
//! rate (see its README for how it was made and the token convention:
//! completion tokens end at `<|im_end|>`, without the newline the template
//! writes after it, as ms-swift and oxtune count them). oxtune runs the
//! same two steps through `oxtune rlhf` and must log the same loss,
//! gradient norm, rewards and log-probabilities at both steps.

use std::path::PathBuf;

use oxtune_tests::cli::{fresh_dir, metrics, rlhf, succeeded};
use oxtune_tests::fixtures;
use serde_json::Value;

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("trl/reference.json")).expect("the TRL fixture");
    serde_json::from_str(&text).expect("valid JSON")
}

/// Runs two steps of `algo` with TRL's settings and returns the metrics.
fn run(algo: &str, data: &str, extra: &[&str]) -> Vec<Value> {
    let data: PathBuf = fixtures().join("trl").join(data);
    let out = fresh_dir(&format!("trl-{algo}-{}", extra.join("-")));
    let trl_settings = [
        "--tuner",
        "full",
        "--per-device-train-batch-size",
        "2",
        "--max-steps",
        "2",
        "--learning-rate",
        "1e-3",
        "--lr-scheduler-type",
        "constant",
        "--weight-decay",
        "0",
        "--max-grad-norm",
        "0",
    ];
    succeeded(&rlhf(algo, &data, &out, &[&trl_settings, extra].concat()));
    metrics(&out)
}

/// Compares `keys` of both steps; `tolerance` is relative (absolute near 0).
fn compare(method: &str, ours: &[Value], theirs: &[Value], keys: &[&str], tolerance: f64) {
    assert_eq!(ours.len(), 2, "{method}: two steps");
    for (step, (o, t)) in ours.iter().zip(theirs).enumerate() {
        for key in keys {
            let (a, b) = (o[*key].as_f64(), t[*key].as_f64());
            let (Some(a), Some(b)) = (a, b) else { panic!("{method} step {}: `{key}` missing: {o} / {t}", step + 1) };
            let scale = b.abs().max(1e-3);
            assert!(
                (a - b).abs() / scale < tolerance,
                "{method} step {}: {key} = {a}, TRL logged {b} (relative difference {:.2e})",
                step + 1,
                (a - b).abs() / scale
            );
        }
    }
}

fn steps(reference: &Value, method: &str) -> Vec<Value> {
    reference["methods"][method]["steps"].as_array().expect("steps").clone()
}

const PAIR_KEYS: [&str; 8] = [
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
];

#[test]
fn dpo_matches_trl_at_both_steps() {
    let trl = reference();
    let ours = run("dpo", "pairs.jsonl", &["--beta", "0.1"]);
    // Step 1 is where a wrong derivative of log σ at 0 doubled grad_norm.
    compare("dpo sigmoid", &ours, &steps(&trl, "dpo_sigmoid"), &PAIR_KEYS, 1e-4);
    let ours = run("dpo", "pairs.jsonl", &["--beta", "0.1", "--loss-type", "hinge"]);
    compare("dpo hinge", &ours, &steps(&trl, "dpo_hinge"), &PAIR_KEYS, 1e-4);
    // IPO averages log-probabilities inside its loss only; TRL logs the
    // sums, oxtune the averages, so the loss and gradient are compared.
    let ours = run("dpo", "pairs.jsonl", &["--beta", "0.1", "--loss-type", "ipo"]);
    compare("dpo ipo", &ours, &steps(&trl, "dpo_ipo"), &["loss", "grad_norm"], 1e-4);
}

#[test]
fn padding_free_and_packed_pairs_match_trl_padded_numbers() {
    // Each micro-batch's two pairs (four rows) laid end to end in one row:
    // the same losses, gradients and log-probabilities as TRL's padded
    // batch — which only holds if attention stays within each row.
    let trl = reference();
    let ours = run("dpo", "pairs.jsonl", &["--beta", "0.1", "--padding-free", "true"]);
    compare("dpo padding-free", &ours, &steps(&trl, "dpo_sigmoid"), &PAIR_KEYS, 1e-4);
    // SimPO averages per completion: the per-sequence token counts must come out right too.
    let simpo = ["--beta", "2", "--simpo-gamma", "1", "--cpo-alpha", "0", "--padding-free", "true"];
    let ours = run("simpo", "pairs.jsonl", &simpo);
    compare("simpo padding-free", &ours, &steps(&trl, "simpo"), &PAIR_KEYS, 1e-4);
    // Packed: both pairs in one row (4096), or one pair per row (120 tokens:
    // two packed rows, padded to one width) — each pair whole either way.
    for max_length in ["4096", "120"] {
        let ours = run("dpo", "pairs.jsonl", &["--beta", "0.1", "--packing", "true", "--max-length", max_length]);
        compare(&format!("dpo packed {max_length}"), &ours, &steps(&trl, "dpo_sigmoid"), &PAIR_KEYS, 1e-4);
    }
}

#[test]
fn cpo_and_simpo_match_trl_at_both_steps() {
    let trl = reference();
    let ours = run("cpo", "pairs.jsonl", &["--beta", "0.1", "--cpo-alpha", "1"]);
    let mut keys = PAIR_KEYS.to_vec();
    keys.push("nll_loss");
    compare("cpo", &ours, &steps(&trl, "cpo"), &keys, 1e-4);
    let ours = run("simpo", "pairs.jsonl", &["--beta", "2", "--simpo-gamma", "1", "--cpo-alpha", "0"]);
    compare("simpo", &ours, &steps(&trl, "simpo"), &PAIR_KEYS, 1e-4);
}

#[test]
fn orpo_matches_the_completion_only_reference() {
    // TRL's ORPOTrainer takes its NLL over the whole chosen sequence,
    // prompt included; ORPO's paper and oxtune take it over the
    // completion. The fixture's plain-PyTorch run of that variant (TRL's
    // odds-ratio term, completion-only NLL) is the reference here.
    let trl = reference();
    let theirs = trl["methods"]["orpo"]["plain_pytorch_completion_only_nll"].as_array().unwrap().clone();
    let ours = run("orpo", "pairs.jsonl", &["--orpo-lambda", "0.1"]);
    let mut keys = PAIR_KEYS.to_vec();
    keys.push("nll_loss");
    compare("orpo", &ours, &theirs, &keys, 1e-4);
}

#[test]
fn kto_matches_trl_at_both_steps() {
    let trl = reference();
    let ours = run("kto", "kto.jsonl", &["--beta", "0.1"]);
    compare(
        "kto",
        &ours,
        &steps(&trl, "kto"),
        &["loss", "grad_norm", "kl", "rewards/chosen", "rewards/rejected"],
        1e-4,
    );
}
