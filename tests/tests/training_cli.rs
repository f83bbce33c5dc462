//! `oxtune sft` and `oxtune pt` end to end on the tiny fixture models:
//! every tuner (LoRA, full, freeze), every dataset form and selection flag,
//! held-out evaluation, checkpoint rotation, config files, and the errors a
//! user meets with bad input.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use oxtune_tests::cli::{fails_with, fresh_dir, metrics, oxtune, oxtune_in, scratch, succeeded, tiny};
use serde_json::Value;

const CHATS: &str = concat!(
    "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
    "{\"conversations\": [{\"from\": \"human\", \"value\": \"sky?\"}, {\"from\": \"gpt\", \"value\": \"blue\"}]}\n",
    "{\"instruction\": \"Add\", \"input\": \"2 2\", \"output\": \"4\"}\n",
    "{\"question\": \"fruit?\", \"answer\": \"apple\"}\n",
);

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.flatten_all().unwrap().to_vec1::<f32>().unwrap() == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn sft(model: &str, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args =
        vec!["sft", "--model", model, "--dataset", data.to_str().unwrap(), "--output-dir", out.to_str().unwrap()];
    args.extend(extra);
    oxtune(&args, &[])
}

#[test]
fn full_fine_tuning_saves_a_model_folder_that_loads_anywhere() {
    let model = tiny("tiny-qwen3");
    let data = scratch("full.jsonl", CHATS);
    let out = fresh_dir("sft-full");
    let run = sft(
        &model,
        &data,
        &out,
        &["--tuner", "full", "--max-steps", "2", "--learning-rate", "1e-3", "--split-ratio", "0.25"],
    );
    succeeded(&run);
    let checkpoint = out.join("checkpoint-2");
    for file in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "trainer_state.json"] {
        assert!(checkpoint.join(file).is_file(), "{file} missing");
    }
    let base = tensors(&Path::new(&model).join("model.safetensors"));
    let trained = tensors(&checkpoint.join("model.safetensors"));
    assert_eq!(base.len(), trained.len(), "every parameter is saved, nothing else");
    let changed = base.iter().filter(|(name, t)| !same(t, &trained[*name])).count();
    assert!(
        changed * 10 >= base.len() * 9,
        "full fine-tuning updates (nearly) every parameter: {changed}/{}",
        base.len()
    );
    let lines = metrics(&out);
    assert!(lines.last().unwrap()["eval_loss"].as_f64().unwrap().is_finite(), "the held-out loss is logged at the end");
    assert!(lines[0]["memory_mib"].as_f64().unwrap() > 0.0);
    // The checkpoint is a model folder: infer and eval load it directly.
    let answer =
        oxtune(&["infer", "--model", checkpoint.to_str().unwrap(), "--prompt", "hi", "--max-new-tokens", "2"], &[]);
    succeeded(&answer);
}

#[test]
fn freeze_trains_only_the_matched_parameters() {
    let model = tiny("tiny-qwen3");
    let data = scratch("freeze.jsonl", CHATS);
    let out = fresh_dir("sft-freeze");
    let pattern = r"layers\.0\.mlp\.";
    let run = sft(
        &model,
        &data,
        &out,
        &["--tuner", "freeze", "--trainable-parameters", pattern, "--max-steps", "2", "--learning-rate", "1e-2"],
    );
    succeeded(&run);
    let base = tensors(&Path::new(&model).join("model.safetensors"));
    let trained = tensors(&out.join("checkpoint-2/model.safetensors"));
    let matcher = regex_lite(pattern);
    for (name, tensor) in &base {
        assert_eq!(same(tensor, &trained[name]), !matcher(name), "{name}");
    }
    fails_with(
        &sft(
            &model,
            &data,
            &fresh_dir("sft-freeze-none"),
            &["--tuner", "freeze", "--trainable-parameters", "nothing_matches"],
        ),
        &["trains no base parameter"],
    );
}

/// The test's pattern `layers\.0\.mlp\.` as a plain substring check.
fn regex_lite(pattern: &str) -> impl Fn(&str) -> bool {
    let literal = pattern.replace('\\', "");
    move |name: &str| name.contains(&literal)
}

#[test]
fn bad_tuner_settings_are_clear_errors() {
    let model = tiny("tiny-qwen3");
    let data = scratch("bad-tuner.jsonl", CHATS);
    fails_with(
        &sft(&model, &data, &fresh_dir("sft-bad-targets"), &["--target-modules", "qkv_proj"]),
        &["match no linear layer", "q_proj", "down_proj"],
    );
    fails_with(
        &sft(&model, &data, &fresh_dir("sft-bad-tuner"), &["--tuner", "adalora"]),
        &["adalora", "lora", "dora", "full", "freeze"],
    );
}

#[test]
fn pretraining_labels_every_token_of_plain_text() {
    let model = tiny("tiny-qwen3");
    let text = scratch("pt.jsonl", "{\"text\": \"the cat sat on the mat\"}\n{\"text\": \"a dog ran in the park\"}\n");
    let out = fresh_dir("pt");
    succeeded(&oxtune(
        &[
            "pt",
            "--model",
            &model,
            "--dataset",
            text.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--max-steps",
            "2",
        ],
        &[],
    ));
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(out.join("args.json")).unwrap()).unwrap();
    assert_eq!(recorded["command"], "pt");
    assert_eq!(metrics(&out).len(), 2);
    // sft cannot read plain text: no adapter recognises a lone `text` column.
    fails_with(&sft(&model, &text, &fresh_dir("pt-as-sft"), &[]), &["pt.jsonl:1", "no dataset adapter"]);
}

#[test]
fn sampling_renaming_and_checkpoint_rotation() {
    let model = tiny("tiny-qwen3");
    let data = scratch("renamed.jsonl", "{\"q\": \"one?\", \"a\": \"1\"}\n{\"q\": \"two?\", \"a\": \"2\"}\n");
    let out = fresh_dir("sft-sampled");
    let sampled = format!("{}#5", data.display());
    let run = oxtune(
        &[
            "sft",
            "--model",
            &model,
            "--dataset",
            &sampled,
            "--columns",
            "q=query,a=response",
            "--output-dir",
            out.to_str().unwrap(),
            "--save-steps",
            "1",
            "--save-total-limit",
            "2",
        ],
        &[],
    );
    succeeded(&run);
    assert_eq!(metrics(&out).len(), 5, "five sampled rows, batch 1, one epoch");
    let mut kept: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    kept.sort();
    assert_eq!(kept, ["checkpoint-4", "checkpoint-5"]);
}

fn checkpoints_in(out: &Path) -> Vec<String> {
    let mut kept: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains("checkpoint-"))
        .collect();
    kept.sort();
    kept
}

#[test]
fn pre_tokenized_ids_are_checked_against_the_embedding_not_the_tokenizer() {
    // tiny-qwen3 embeds 1024 ids; its tokenizer has 1004 tokens.
    let model = tiny("tiny-qwen3");
    let data = scratch("padded-ids.jsonl", "{\"input_ids\": [1, 5, 1010, 1023, 7]}\n");
    succeeded(&sft(&model, &data, &fresh_dir("sft-padded-ids"), &["--max-steps", "1"]));
    let data = scratch("past-ids.jsonl", "{\"input_ids\": [1, 5, 1024]}\n");
    fails_with(
        &sft(&model, &data, &fresh_dir("sft-past-ids"), &["--max-steps", "1"]),
        &["past-ids.jsonl:1", "input_ids[2] = 1024 is outside the vocabulary (the model's 1024 embedding rows)"],
    );
}

#[test]
fn a_line_that_is_not_utf8_is_a_bad_record_like_any_other() {
    let model = tiny("tiny-qwen3");
    let path = std::env::temp_dir().join(format!("oxtune-bad-utf8-{}.jsonl", std::process::id()));
    let good = CHATS.lines().next().unwrap();
    std::fs::write(&path, [good.as_bytes(), b"\n{\"text\": \"\xff\"}\n", good.as_bytes(), b"\n"].concat()).unwrap();
    let path_text = path.to_str().unwrap();
    fails_with(
        &sft(&model, &path, &fresh_dir("sft-utf8"), &["--max-steps", "1"]),
        &[&format!("{path_text}:2"), "not valid UTF-8"],
    );
    let skipped = sft(&model, &path, &fresh_dir("sft-utf8-skip"), &["--max-steps", "1", "--skip-bad-records"]);
    succeeded(&skipped);
    assert!(
        String::from_utf8_lossy(&skipped.stderr).contains("skipped 1 bad record"),
        "{}",
        String::from_utf8_lossy(&skipped.stderr)
    );
}

#[test]
fn a_resumed_run_keeps_no_more_than_the_checkpoint_limit() {
    let model = tiny("tiny-qwen3");
    let data = scratch("resume-limit.jsonl", CHATS);
    let out = fresh_dir("sft-resume-limit");
    let run = |limit: &str| {
        let extra = ["--max-steps", "6", "--save-steps", "1", "--save-total-limit", limit];
        succeeded(&sft(&model, &data, &out, &extra));
    };
    run("6");
    // As if the run had been killed after step 4.
    for step in [5, 6] {
        std::fs::remove_dir_all(out.join(format!("checkpoint-{step}"))).unwrap();
    }
    run("2");
    assert_eq!(checkpoints_in(&out), ["checkpoint-5", "checkpoint-6"], "the resume point is not kept past the limit");
    let steps: Vec<u64> = metrics(&out).iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
}

#[test]
fn a_config_file_sets_flags_and_the_command_line_overrides_it() {
    let model = tiny("tiny-qwen3");
    let data = scratch("config-data.jsonl", CHATS);
    let out = fresh_dir("sft-config");
    let config = scratch(
        "run.toml",
        &format!(
            "model = {model:?}\ndataset = [{:?}]\noutput_dir = {:?}\nmax_steps = 5\nlora_rank = 2\nuse_rslora = true\n",
            data.display().to_string(),
            out.display().to_string()
        ),
    );
    succeeded(&oxtune(&["sft", "--config", config.to_str().unwrap(), "--max-steps", "2"], &[]));
    assert_eq!(metrics(&out).len(), 2, "--max-steps on the command line wins");
    let adapter: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint-2/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((adapter["r"].as_u64(), adapter["use_rslora"].as_bool()), (Some(2), Some(true)));
    let yaml = scratch("bad.yaml", "max_steps: [2\n");
    fails_with(&oxtune(&["sft", "--config", yaml.to_str().unwrap()], &[]), &["bad.yaml is not valid YAML"]);
}

#[test]
fn dataset_forms_and_bad_rows() {
    let model = tiny("tiny-qwen3");
    let tokens = scratch("tokens.jsonl", "{\"input_ids\": [1, 2, 3, 4], \"labels\": [-100, -100, 3, 4]}\n");
    succeeded(&sft(&model, &tokens, &fresh_dir("sft-tokens"), &["--max-steps", "1"]));
    let out_of_vocab = scratch("tokens-bad.jsonl", "{\"input_ids\": [1, 99999999]}\n");
    fails_with(
        &sft(&model, &out_of_vocab, &fresh_dir("sft-tokens-bad"), &[]),
        &["tokens-bad.jsonl:1", "outside the vocabulary"],
    );
    let image = scratch("image.jsonl", "{\"image\": \"cat.png\", \"text\": \"What is it?\", \"answer\": \"a cat\"}\n");
    fails_with(&sft(&model, &image, &fresh_dir("sft-image"), &[]), &["image.jsonl:1", "reads text only"]);
    // A malformed line stops the run with its place; --skip-bad-records counts it and goes on.
    let mixed = scratch("mixed.jsonl", &format!("{CHATS}{{\"messages\": 3}}\nnot json\n"));
    fails_with(&sft(&model, &mixed, &fresh_dir("sft-mixed"), &[]), &["mixed.jsonl:6"]);
    let skipped = sft(&model, &mixed, &fresh_dir("sft-mixed-skip"), &["--skip-bad-records", "--max-steps", "1"]);
    succeeded(&skipped);
    assert!(
        String::from_utf8_lossy(&skipped.stderr).contains("skipped 2 bad record(s)"),
        "{}",
        String::from_utf8_lossy(&skipped.stderr)
    );
    // Rows over --max-length are dropped (and counted) by default.
    fails_with(
        &sft(&model, &mixed, &fresh_dir("sft-short"), &["--skip-bad-records", "--max-length", "4"]),
        &["no training row is left"],
    );
    let cut = sft(
        &model,
        &data_of(CHATS),
        &fresh_dir("sft-cut"),
        &["--max-length", "12", "--truncation-strategy", "left", "--max-steps", "1"],
    );
    succeeded(&cut);
    assert!(String::from_utf8_lossy(&cut.stderr).contains("were cut on the left"));
}

fn data_of(contents: &str) -> std::path::PathBuf {
    scratch("plain-chats.jsonl", contents)
}

#[test]
fn a_diverging_run_stops_naming_the_step_and_the_last_checkpoint() {
    let model = tiny("tiny-qwen3");
    let data = scratch("diverge.jsonl", CHATS);
    let out = fresh_dir("sft-diverge");
    let run = sft(
        &model,
        &data,
        &out,
        &[
            "--tuner",
            "full",
            "--learning-rate",
            "1e30",
            "--max-grad-norm",
            "0",
            "--save-steps",
            "1",
            "--max-steps",
            "6",
            "--lr-scheduler-type",
            "constant",
        ],
    );
    fails_with(&run, &["at step", "the run stopped", "checkpoint-"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let step: usize = stderr.split("at step ").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();
    assert!(step >= 2, "{stderr}");
    assert!(stderr.contains(&format!("checkpoint-{}", step - 1)), "{stderr}");
    assert!(out.join(format!("checkpoint-{}", step - 1)).is_dir());
}

#[test]
fn a_tuner_from_a_dynamic_plugin_trains_saves_in_peft_layout_and_merges() {
    use oxtune_engine::backend::BatchInfo;
    use oxtune_engine::model::checkpoint::Trainable;
    use oxtune_engine::model::{LoadOptions, LoadedModel};

    let plugin = oxtune_tests::build_cdylib("oxtune-example-plugin", &["cdylib"]);
    let plugin = plugin.to_str().unwrap();
    let model = tiny("tiny-qwen3");
    let data = scratch("ia3.jsonl", CHATS);
    let out = fresh_dir("sft-ia3");
    let extra = ["--plugin", plugin, "--tuner", "ia3", "--target-modules", "k_proj,v_proj,down_proj"];
    let mut args = extra.to_vec();
    args.extend(["--max-steps", "3", "--learning-rate", "0.05"]);
    succeeded(&sft(&model, &data, &out, &args));
    let checkpoint = out.join("checkpoint-3");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "IA3");
    assert_eq!(config["feedforward_modules"], serde_json::json!(["down_proj"]));
    let saved = tensors(&checkpoint.join("adapter_model.safetensors"));
    assert_eq!(saved.len(), 2 * 3, "two layers, three modules");
    let k = &saved["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"];
    let down = &saved["base_model.model.model.layers.0.mlp.down_proj.ia3_l"];
    assert_eq!((k.dims(), down.dims()), (&[32usize, 1][..], &[1usize, 128][..]), "PEFT's shapes: [out, 1] and [1, in]");
    let ones = Tensor::ones(32, candle_core::DType::F32, &Device::Cpu).unwrap().reshape((32, 1)).unwrap();
    assert!(!same(k, &ones), "training moved the scales off their initial ones");

    // Reloaded through the plugin, the adapter's forward equals its merged weights'.
    let mut registry = oxtune_registry::Registry::with_builtins().unwrap();
    registry.load_path(Path::new(plugin), &Default::default()).unwrap();
    let mut loaded = LoadedModel::load(&registry, Path::new(&model), &LoadOptions::default()).unwrap();
    let ids = Tensor::new(&[[3u32, 17, 99, 5, 250, 8]], &Device::Cpu).unwrap();
    let plain = loaded.forward(&ids, &BatchInfo::default(), None, None).unwrap();
    loaded.attach_adapter(&registry, &checkpoint, Trainable::None).unwrap();
    let adapted = loaded.forward(&ids, &BatchInfo::default(), None, None).unwrap();
    loaded.merge_adapter().unwrap();
    let merged = loaded.forward(&ids, &BatchInfo::default(), None, None).unwrap();
    let max_diff =
        |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(max_diff(&adapted, &plain) > 1e-3, "the adapter changes the logits");
    assert!(max_diff(&adapted, &merged) < 1e-4, "merged: {}", max_diff(&adapted, &merged));
    // infer applies it from the command line too.
    let answer = oxtune(
        &[
            "infer",
            "--plugin",
            plugin,
            "--model",
            &model,
            "--adapter",
            checkpoint.to_str().unwrap(),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        ],
        &[],
    );
    succeeded(&answer);
}

#[test]
fn the_quick_start_config_trains_the_shipped_model() {
    // The README's first command, cut to 40 steps: the shipped model and
    // data load, the loss falls, and the before/after answers print.
    let root = oxtune_tests::workspace_root();
    let out = fresh_dir("quickstart");
    let run = oxtune_in(
        &root,
        &[
            "sft",
            "--config",
            "examples/quickstart/sft.toml",
            "--output-dir",
            out.to_str().unwrap(),
            "--max-steps",
            "40",
            "--eval-steps",
            "20",
        ],
        &[],
    );
    succeeded(&run);
    let lines = metrics(&out);
    let eval: Vec<f64> = lines.iter().filter_map(|m| m["eval_loss"].as_f64()).collect();
    assert_eq!(eval.len(), 2);
    let first = lines[0]["loss"].as_f64().unwrap();
    assert!(eval[1] < eval[0] && eval[1] < first - 1.0, "the held-out loss falls from {first}: {eval:?}");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(stdout.matches("after:").count(), 3, "{stdout}");
}

/// `oxtune pt` on SmolLM2 with rows of 1024 tokens, run under an
/// address-space limit (`ulimit -v`, in KiB).
fn pt_under_limit(limit_kib: u64, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let model = oxtune_tests::smollm2().expect("checked by the caller");
    let mut command = std::process::Command::new("sh");
    command
        .arg("-c")
        .arg(format!("ulimit -v {limit_kib} && exec \"$0\" \"$@\""))
        .arg(oxtune_tests::oxtune_bin())
        .args(["pt", "--model", model.to_str().unwrap(), "--dataset", data.to_str().unwrap()])
        .args(["--output-dir", out.to_str().unwrap(), "--max-length", "1024", "--truncation-strategy", "right"])
        .args(extra);
    command.output().unwrap()
}

#[test]
fn a_micro_batch_that_cannot_fit_in_memory_is_refused_before_training_naming_the_flags() {
    if oxtune_tests::smollm2().is_none() {
        return;
    }
    let text: Vec<String> = (0..1200).map(|i| format!("word{}", i % 97)).collect();
    let row = serde_json::json!({ "text": text.join(" ") }).to_string();
    let data = scratch("long-rows.jsonl", &format!("{row}\n").repeat(16));
    let out = fresh_dir("memory-refused");
    // 3 GiB of address space: the model takes about half; 8 rows of 1024
    // tokens need about 16 GB of activations without checkpointing.
    let refused = pt_under_limit(
        3 << 20,
        &data,
        &out,
        &["--per-device-train-batch-size", "8", "--gradient-checkpointing", "false"],
    );
    let error = last_error_line(&refused);
    for needle in [
        "--per-device-train-batch-size 8 with rows of up to 1024 tokens needs at least",
        // The address-space limit, unless the machine or its container
        // leaves even less.
        "GB is left under the ",
        "lower --per-device-train-batch-size or --max-length, or set --gradient-checkpointing true",
    ] {
        assert!(error.contains(needle), "`{needle}` not in: {error}");
    }
    assert!(!out.join("checkpoint-1").exists() && !out.join("metrics.jsonl").exists(), "no step was taken");
    // With checkpointing on, 16 rows still need more than is left, and the
    // message does not suggest what is already on.
    let refused = pt_under_limit(3 << 20, &data, &out, &["--per-device-train-batch-size", "16"]);
    let error = last_error_line(&refused);
    assert!(error.contains("--per-device-train-batch-size 16 with rows of up to 1024 tokens"), "{error}");
    assert!(!error.contains("--gradient-checkpointing"), "{error}");
}

/// The one-line error a failed run ended with (after its data report).
fn last_error_line(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "expected a refusal");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default().to_owned();
    assert!(last.starts_with("error: "), "the run ended without a one-line error:\n{stderr}");
    last
}
