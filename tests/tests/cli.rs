//! The `oxtune` binary end to end: `oxtune plugins` over built-in, dynamic
//! and wasm plugins found through `--plugin`, `OXTUNE_PLUGIN_PATH` and the
//! user folder, and its error messages.

use std::process::{Command, Output};

use oxtune_tests::cli::{fails_with, oxtune, scratch, tiny};
use oxtune_tests::{build_against_api_variant, build_cdylib, oxtune_bin, workspace_root};
use serde_json::Value;

fn json_lines(out: &Output) -> Vec<Value> {
    assert!(out.status.success(), "oxtune failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

fn find<'a>(rows: &'a [Value], kind: &str, name: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["kind"] == kind && r["name"] == name)
        .unwrap_or_else(|| panic!("{kind} `{name}` not listed in {rows:#?}"))
}

#[test]
fn plugins_lists_builtins_in_a_table() {
    let out = oxtune(&["plugins"], &[]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let header = text.lines().next().unwrap();
    assert!(header.starts_with("KIND") && header.contains("ORIGIN") && header.contains("API"), "{text}");
    let format = text.lines().find(|l| l.contains(" format ")).unwrap_or_else(|| panic!("{text}"));
    assert!(format.starts_with("reward") && format.contains("built-in (oxtune-plugin-rewards)"), "{format}");
    assert!(format.trim_end().ends_with(oxtune_plugin_api::API_VERSION), "{format}");
}

#[test]
fn plugins_lists_dynamic_and_wasm_plugins_from_every_source() {
    let cdylib = build_cdylib("oxtune-example-plugin", &["cdylib"]);
    let wat = workspace_root().join("examples/wasm-rewards/sentence_end.wat");
    let rows = json_lines(&oxtune(
        &["plugins", "--json", "--plugin", cdylib.to_str().unwrap(), "--plugin", wat.to_str().unwrap()],
        &[],
    ));
    let model = find(&rows, "model", "example-block");
    assert_eq!(model["origin"], "dynamic");
    assert_eq!(model["source"], cdylib.display().to_string());
    assert_eq!(model["architectures"], serde_json::json!(["ExampleBlockModel"]));
    assert_eq!(model["api_version"], oxtune_plugin_api::API_VERSION);
    assert_eq!(find(&rows, "tuner", "ia3")["origin"], "dynamic");
    assert_eq!(find(&rows, "dataset-adapter", "qa-pairs")["origin"], "dynamic");
    assert_eq!(find(&rows, "reward", "sentence_end")["origin"], "wasm");
    assert_eq!(find(&rows, "reward", "format")["origin"], "built-in");
    // Sorted by kind, then name.
    let keys: Vec<(String, String)> = rows.iter().map(|r| (r["kind"].to_string(), r["name"].to_string())).collect();
    let kinds: Vec<&str> = rows.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"model"));
    let rewards: Vec<&String> = keys.iter().filter(|k| k.0 == "\"reward\"").map(|k| &k.1).collect();
    let mut sorted = rewards.clone();
    sorted.sort();
    assert_eq!(rewards, sorted);

    // The same folder through OXTUNE_PLUGIN_PATH and through the user folder.
    let folder = std::env::temp_dir().join(format!("oxtune-plugin-folder-{}", std::process::id()));
    std::fs::create_dir_all(folder.join("plugins")).unwrap();
    std::fs::copy(&wat, folder.join("plugins/sentence_end.wat")).unwrap();
    let rows = json_lines(&oxtune(&["plugins", "--json"], &[("OXTUNE_PLUGIN_PATH", &folder.join("plugins"))]));
    assert_eq!(find(&rows, "reward", "sentence_end")["origin"], "wasm");
    let home = Command::new(oxtune_bin())
        .args(["plugins", "--json"])
        .env_remove("OXTUNE_PLUGIN_PATH")
        .env("OXTUNE_HOME", &folder)
        .output()
        .unwrap();
    assert_eq!(find(&json_lines(&home), "reward", "sentence_end")["origin"], "wasm");
}

#[test]
fn plugin_errors_are_short_messages() {
    fails_with(
        &oxtune(&["plugins", "--plugin", "/nonexistent/libx.so"], &[]),
        &["/nonexistent/libx.so", "does not exist"],
    );
    let rewards = build_cdylib("oxtune-plugin-rewards", &["cdylib"]);
    fails_with(
        &oxtune(&["plugins", "--plugin", rewards.to_str().unwrap()], &[]),
        &["two plugins provide the reward `format`", "built-in (oxtune-plugin-rewards)", rewards.to_str().unwrap()],
    );
    let api2 = build_against_api_variant("plugin-2.0", "2.0.0", &[], "plugin");
    fails_with(&oxtune(&["plugins", "--plugin", api2.to_str().unwrap()], &[]), &["2.0.0", "oxtune-plugin-api"]);
    fails_with(&oxtune(&["plugins", "--wasm-grant", "network"], &[]), &["unknown sandbox grant `network`"]);
}

#[test]
fn only_working_subcommands_are_offered() {
    let out = oxtune(&["--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .and_then(|s| s.split("Options:").next())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        commands,
        vec![
            "sft", "pt", "rlhf", "infer", "serve", "web-ui", "logits", "eval", "export", "bench", "plot", "plugins",
            "help"
        ],
        "{help}"
    );
}

#[test]
fn infer_answers_a_prompt_and_every_dataset_row() {
    let model = tiny("tiny-qwen3");
    let out = oxtune(&["infer", "--model", &model, "--prompt", "Hello", "--max-new-tokens", "4"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!out.stdout.is_empty());

    let dataset = scratch(
        "rows.jsonl",
        "{\"query\": \"hi\", \"response\": \"hello\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n{\"text\": \"raw\"}\n",
    );
    let rows = json_lines(&oxtune(
        &[
            "infer",
            "--model",
            &model,
            "--dataset",
            dataset.to_str().unwrap(),
            "--max-new-tokens",
            "3",
            "--batch-size",
            "2",
        ],
        &[],
    ));
    assert_eq!(rows.len(), 3);
    assert_eq!(rows.iter().map(|r| r["row"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert_eq!(rows[0]["labels"], "hello");
    assert!(rows.iter().all(|r| r["finish_reason"] == "length" || r["finish_reason"] == "stop"));

    let bad = scratch("bad.jsonl", "{\"query\": \"hi\"}\n{\"q\": 1}\n");
    fails_with(
        &oxtune(&["infer", "--model", &model, "--dataset", bad.to_str().unwrap()], &[]),
        &["bad.jsonl:2", "no dataset adapter recognises"],
    );
    fails_with(
        &oxtune(&["infer", "--model", "/nonexistent-model", "--prompt", "x"], &[]),
        &["/nonexistent-model/config.json"],
    );
    fails_with(
        &oxtune(&["infer", "--model", &model, "--prompt", "x", "--kv-cache-dtype", "q8"], &[]),
        &["--kv-cache-dtype q8", "auto, f32, f16 or bf16"],
    );
    // An f16 cache under an f32 model decodes (its greedy answer is pinned
    // against the f32 cache's in the GGUF tests).
    let answer = oxtune(
        &["infer", "--model", &model, "--prompt", "hi", "--max-new-tokens", "3", "--kv-cache-dtype", "f16"],
        &[],
    );
    assert!(answer.status.success(), "{}", String::from_utf8_lossy(&answer.stderr));
}

#[test]
fn eval_perplexity_matches_the_library_loss() {
    let model = tiny("tiny-llama");
    let ids: Vec<u32> = (10..30).collect();
    let dataset = scratch(
        "ppl.jsonl",
        &format!("{}\n{}\n", serde_json::json!({"input_ids": ids}), serde_json::json!({"text": "hello world"})),
    );
    let rows = json_lines(&oxtune(
        &["eval", "--task", "perplexity", "--model", &model, "--dataset", dataset.to_str().unwrap()],
        &[],
    ));
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["tokens"], 20);
    let nll = rows[0]["nll"].as_f64().unwrap();
    assert!((rows[0]["ppl"].as_f64().unwrap() - nll.exp()).abs() < 1e-9);
    assert_eq!(rows[2]["overall"], true);

    // The same number through the library: the causal-LM loss with no -100 labels.
    let registry = oxtune_registry::Registry::with_builtins().unwrap();
    let loaded =
        oxtune_engine::model::LoadedModel::load(&registry, std::path::Path::new(&model), &Default::default()).unwrap();
    let input = candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = loaded.forward(&input, &Default::default(), None, None).unwrap();
    let labels = input.to_dtype(candle_core::DType::I64).unwrap();
    let loss = oxtune_engine::loss::causal_lm_loss(&logits, &labels).unwrap().to_scalar::<f32>().unwrap();
    assert!((nll - loss as f64).abs() < 1e-4, "eval nll {nll} vs loss {loss}");

    // With a PEFT adapter the numbers change, and match the library with the adapter attached.
    let qwen3 = tiny("tiny-qwen3");
    let adapter = workspace_root().join("tests/fixtures/peft/tiny-qwen3-lora").display().to_string();
    let base = json_lines(&oxtune(
        &["eval", "--task", "perplexity", "--model", &qwen3, "--dataset", dataset.to_str().unwrap()],
        &[],
    ));
    let adapted = json_lines(&oxtune(
        &[
            "eval",
            "--task",
            "perplexity",
            "--model",
            &qwen3,
            "--adapter",
            &adapter,
            "--dataset",
            dataset.to_str().unwrap(),
        ],
        &[],
    ));
    assert_ne!(base[0]["nll"], adapted[0]["nll"]);
    let mut with_adapter =
        oxtune_engine::model::LoadedModel::load(&registry, std::path::Path::new(&qwen3), &Default::default()).unwrap();
    with_adapter
        .attach_adapter(&registry, std::path::Path::new(&adapter), oxtune_engine::model::checkpoint::Trainable::None)
        .unwrap();
    let nll = oxtune_engine::eval::mean_nll(&with_adapter, &ids).unwrap();
    assert!((adapted[0]["nll"].as_f64().unwrap() - nll).abs() < 1e-9);

    let short = scratch("short.jsonl", "{\"input_ids\": [1]}\n");
    fails_with(
        &oxtune(&["eval", "--task", "perplexity", "--model", &model, "--dataset", short.to_str().unwrap()], &[]),
        &["short.jsonl:1:", "at least 2"],
    );
}

#[test]
fn sft_trains_an_adapter_that_infer_and_eval_use() {
    let model = tiny("tiny-qwen3");
    let data = scratch(
        "sft.jsonl",
        concat!(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
            "{\"conversations\": [{\"from\": \"human\", \"value\": \"sky?\"}, {\"from\": \"gpt\", \"value\": \"blue\"}]}\n",
            "{\"instruction\": \"Add\", \"input\": \"2 2\", \"output\": \"4\"}\n",
            "{\"question\": \"fruit?\", \"answer\": \"apple\"}\n",
        ),
    );
    let out = std::env::temp_dir().join(format!("oxtune-cli-sft-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let args = [
        "sft",
        "--model",
        &model,
        "--dataset",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        "6",
        "--learning-rate",
        "0.02",
        "--per-device-train-batch-size",
        "2",
        "--lora-rank",
        "4",
        "--save-steps",
        "3",
    ];
    let run = oxtune(&args, &[]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 6);
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(out.join("args.json")).unwrap()).unwrap();
    assert_eq!(recorded["model_type"], "qwen3");
    let checkpoint = out.join("checkpoint-6");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["r"], 4);
    assert_eq!(config["target_modules"].as_array().unwrap().len(), 7, "all-linear: the seven projections");
    // The same output folder with other arguments is refused.
    let mut other = args.to_vec();
    other.extend(["--lora-alpha", "8"]);
    fails_with(&oxtune(&other, &[]), &["holds another run", "differs in: tuner_config"]);
    // The same command again finds the run complete: it resumes from the
    // last checkpoint and takes no step.
    let again = oxtune(&args, &[]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("checkpoint-6"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // Resuming needs the same tuner and model as the checkpoint; it continues
    // in the same output folder from step 4.
    let checkpoint_str = out.join("checkpoint-3").display().to_string();
    let resume = |extra: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--resume-from", checkpoint_str.as_str()]);
        all.extend(extra);
        oxtune(&all, &[])
    };
    fails_with(&resume(&["--tuner", "dora"]), &["checkpoint-3 was saved by another run", "\"tuner\":\"dora\""]);
    let resumed = resume(&[]);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6], "the resumed steps replace the ones after the checkpoint");
    // Interrupted after checkpoint-3 (checkpoint-6 lost): the same command
    // resumes from the latest checkpoint on its own.
    std::fs::remove_dir_all(&checkpoint).unwrap();
    let auto = oxtune(&args, &[]);
    assert!(auto.status.success(), "{}", String::from_utf8_lossy(&auto.stderr));
    assert!(
        String::from_utf8_lossy(&auto.stderr).contains("resuming from"),
        "{}",
        String::from_utf8_lossy(&auto.stderr)
    );
    assert!(checkpoint.join("adapter_model.safetensors").is_file());
    // The adapter is usable by infer.
    let answer = oxtune(
        &[
            "infer",
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
    assert!(answer.status.success(), "{}", String::from_utf8_lossy(&answer.stderr));
    // A record no adapter recognises names its file and line.
    let bad = scratch("sft-bad.jsonl", "{\"question\": \"q\", \"answer\": \"a\"}\n{\"foo\": 1}\n");
    let out2 = std::env::temp_dir().join(format!("oxtune-cli-sft-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out2);
    fails_with(
        &oxtune(
            &["sft", "--model", &model, "--dataset", bad.to_str().unwrap(), "--output-dir", out2.to_str().unwrap()],
            &[],
        ),
        &["sft-bad.jsonl:2", "no dataset adapter recognises"],
    );
}

#[test]
fn a_device_or_dtype_that_cannot_run_is_a_one_line_error_naming_the_flag() {
    let model = tiny("tiny-qwen3");
    let infer = |extra: &[&str]| {
        let mut args = vec!["infer", "--model", &model, "--prompt", "hi", "--max-new-tokens", "1"];
        args.extend_from_slice(extra);
        oxtune(&args, &[])
    };
    // The tests' build has no GPU backend: the flag and the cargo feature are named.
    fails_with(&infer(&["--device", "cuda:1"]), &["--device cuda:1", "--features cuda"]);
    fails_with(&infer(&["--device", "gpu"]), &["--device gpu", "cpu, cuda, cuda:N or metal"]);
    fails_with(&infer(&["--device", "cuda:x"]), &["--device cuda:x", "not a device number"]);
    fails_with(&infer(&["--dtype", "f8"]), &["--dtype f8", "f32, bf16 or f16"]);
}
