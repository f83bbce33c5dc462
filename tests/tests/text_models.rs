//! The Llama, Qwen2, Qwen3, Gemma-3, Phi-3 and Qwen3-MoE architecture plugins against transformers:
//! logits, greedy continuation with the KV cache, the loss with -100
//! labels and the gradient of every parameter, for the tiny reference
//! checkpoints in `tests/fixtures/models` (made with transformers 5.24).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::error_chain;
use oxtune_engine::generate::{generate, greedy, SamplingParams};
use oxtune_engine::loss::causal_lm_loss;
use oxtune_engine::model::checkpoint::Trainable;
use oxtune_engine::model::{LoadOptions, LoadedModel};
use oxtune_registry::{Registry, SandboxConfig};
use oxtune_tests::{build_cdylib, fixtures};

const MODELS: [&str; 6] = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3", "tiny-phi3", "tiny-qwen3-moe"];

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn reference(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(model_dir(name).join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn load(registry: &Registry, name: &str, trainable: Trainable) -> LoadedModel {
    let options = LoadOptions { trainable, ..Default::default() };
    LoadedModel::load(registry, &model_dir(name), &options).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

#[test]
fn logits_match_transformers() {
    let registry = Registry::with_builtins().unwrap();
    for name in MODELS {
        let r = reference(name);
        let model = load(&registry, name, Trainable::None);
        let logits = model.forward(&ids(&r["input_ids"]), &BatchInfo::default(), None, None).unwrap();
        assert_eq!(logits.dims(), r["logits"].dims(), "{name}");
        let diff = max_abs_diff(&logits, &r["logits"]);
        assert!(diff < 1e-4, "{name}: logits differ from transformers by {diff}");
    }
}

#[test]
fn greedy_continuation_with_the_kv_cache_matches_transformers() {
    let registry = Registry::with_builtins().unwrap();
    for name in MODELS {
        let r = reference(name);
        let model = load(&registry, name, Trainable::None);
        let expected: Vec<u32> = ids(&r["greedy_output"]).flatten_all().unwrap().to_vec1().unwrap();
        let prompt = ids(&r["greedy_prompt"]);
        let got = greedy(&model, &prompt, expected.len()).unwrap();
        assert_eq!(got, expected, "{name}");
    }
}

#[test]
fn loss_and_every_gradient_match_transformers() {
    let registry = Registry::with_builtins().unwrap();
    for name in MODELS {
        let r = reference(name);
        let model = load(&registry, name, Trainable::All);
        let logits = model.forward(&ids(&r["input_ids"]), &BatchInfo::default(), None, None).unwrap();
        let loss = causal_lm_loss(&logits, &r["labels"]).unwrap();
        let expected = r["loss"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        let got = loss.to_scalar::<f32>().unwrap();
        assert!((got - expected).abs() < 1e-5, "{name}: loss {got} vs {expected}");
        let grads = loss.backward().unwrap();
        let mut checked = 0;
        for param in model.weights().names() {
            let want = &r[&format!("grad.{param}")];
            let var = model.weights().var(param).expect("trainable");
            let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {param}"));
            let scale =
                want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-8);
            let diff = max_abs_diff(got, want);
            assert!(diff <= 1e-4 * scale, "{name}: gradient of {param} differs by {diff} (scale {scale})");
            checked += 1;
        }
        let reference_grads = r.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(checked, reference_grads, "{name}: every parameter's gradient is checked");
    }
}

#[test]
fn cdylib_builds_of_the_architectures_give_bit_identical_logits() {
    let builtin = Registry::with_builtins().unwrap();
    for (name, package) in MODELS.iter().zip([
        "oxtune-plugin-llama",
        "oxtune-plugin-qwen2",
        "oxtune-plugin-qwen3",
        "oxtune-plugin-gemma3",
        "oxtune-plugin-phi3",
        "oxtune-plugin-qwen3-moe",
    ]) {
        let mut dynamic = Registry::empty();
        dynamic.load_path(&build_cdylib(package, &["cdylib"]), &SandboxConfig::default()).unwrap();
        let r = reference(name);
        let input = ids(&r["input_ids"]);
        let a = load(&builtin, name, Trainable::None).forward(&input, &BatchInfo::default(), None, None).unwrap();
        let b = load(&dynamic, name, Trainable::None).forward(&input, &BatchInfo::default(), None, None).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
        };
        assert_eq!(bits(&a), bits(&b), "{name}");
    }
}

#[test]
fn a_batch_of_four_decodes_each_row_as_alone() {
    let registry = Registry::with_builtins().unwrap();
    for name in MODELS {
        let r = reference(name);
        let model = load(&registry, name, Trainable::None);
        let rows: Vec<Vec<u32>> = ids(&r["input_ids"]).to_vec2().unwrap();
        let prompts = vec![rows[0].clone(), rows[1][..7].to_vec(), rows[0][3..9].to_vec(), rows[1][..2].to_vec()];
        let params = SamplingParams { max_new_tokens: 8, ..Default::default() };
        let batched = generate(&model, None, &prompts, &params, |_, _| {}).unwrap();
        for (prompt, together) in prompts.iter().zip(&batched) {
            let alone = generate(&model, None, std::slice::from_ref(prompt), &params, |_, _| {}).unwrap();
            assert_eq!(together.tokens, alone[0].tokens, "{name}: prompt {prompt:?}");
        }
    }
}

/// A copy of a tiny model folder with `edit` applied to its tensors and config.
fn edited_copy(
    name: &str,
    tag: &str,
    edit: impl Fn(&mut std::collections::HashMap<String, Tensor>, &mut serde_json::Value),
) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("oxtune-{name}-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut tensors = candle_core::safetensors::load(model_dir(name).join("model.safetensors"), &Device::Cpu).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir(name).join("config.json")).unwrap()).unwrap();
    edit(&mut tensors, &mut config);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn sharded_checkpoints_load_like_single_files() {
    let dir = std::env::temp_dir().join(format!("oxtune-sharded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(model_dir("tiny-qwen2").join("config.json"), dir.join("config.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(model_dir("tiny-qwen2").join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (shard, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let subset: std::collections::HashMap<String, Tensor> =
            part.iter().map(|n| ((*n).clone(), tensors[*n].to_dtype(DType::BF16).unwrap())).collect();
        candle_core::safetensors::save(&subset, dir.join(shard)).unwrap();
        for n in part {
            map.insert((*n).clone(), shard.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let registry = Registry::with_builtins().unwrap();
    let r = reference("tiny-qwen2");
    let sharded = LoadedModel::load(&registry, &dir, &LoadOptions::default()).unwrap();
    let logits = sharded.forward(&ids(&r["input_ids"]), &BatchInfo::default(), None, None).unwrap();
    // Stored in bf16, computed in f32: close to transformers' f32 logits.
    let diff = max_abs_diff(&logits, &r["logits"]);
    assert!(diff < 0.05, "bf16 shards: logits differ by {diff}");
    assert_eq!(sharded.weights().names().len(), tensors.len());
}

#[test]
fn bad_checkpoints_name_the_field_tensor_or_architecture() {
    let registry = Registry::with_builtins().unwrap();
    let load_err =
        |dir: &PathBuf| error_chain(&LoadedModel::load(&registry, dir, &LoadOptions::default()).err().unwrap());

    let dir = edited_copy("tiny-llama", "no-hidden", |_, c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    let message = load_err(&dir);
    assert!(message.contains("config.json") && message.contains("`hidden_size` is missing"), "{message}");

    let dir = edited_copy("tiny-llama", "unknown-arch", |_, c| {
        c["architectures"] = serde_json::json!(["FooForCausalLM"]);
        c["model_type"] = serde_json::json!("foo");
    });
    let message = load_err(&dir);
    assert!(message.contains("FooForCausalLM") && message.contains("llama (LlamaForCausalLM)"), "{message}");
    assert!(message.contains("--plugin"), "{message}");

    let dir = edited_copy("tiny-llama", "bad-shape", |t, _| {
        let w = t["model.layers.1.mlp.up_proj.weight"].narrow(1, 0, 32).unwrap();
        t.insert("model.layers.1.mlp.up_proj.weight".into(), w);
    });
    let model = LoadedModel::load(&registry, &dir, &LoadOptions::default()).unwrap();
    let message = model.forward(&Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap(), &BatchInfo::default(), None, None);
    let message = error_chain(&message.err().unwrap());
    assert!(
        message.contains("`model.layers.1.mlp.up_proj.weight` is [128, 32]") && message.contains("64 features"),
        "{message}"
    );

    let dir = edited_copy("tiny-llama", "missing-tensor", |t, _| {
        t.remove("model.norm.weight");
    });
    let model = LoadedModel::load(&registry, &dir, &LoadOptions::default()).unwrap();
    let message = model.forward(&Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap(), &BatchInfo::default(), None, None);
    let message = error_chain(&message.err().unwrap());
    assert!(message.contains("no weight `model.norm.weight`") && message.contains("oxtune-plugin-llama"), "{message}");

    let dir = edited_copy("tiny-llama", "truncated", |_, _| {});
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let message = load_err(&dir);
    assert!(message.contains("model.safetensors"), "{message}");
}

#[test]
fn gemma3_and_phi3_train_with_all_linear_lora_and_full_fine_tuning() {
    use oxtune_tests::cli::{fresh_dir, metrics, scratch, sft, succeeded};
    let data = scratch(
        "new-archs-chats.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"sky?\"}, {\"role\": \"assistant\", \"content\": \"blue\"}]}\n",
    );
    // Phi-3's fused projections are adapted as the modules PEFT names.
    let cases = [
        ("tiny-gemma3", &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"][..]),
        ("tiny-phi3", &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"][..]),
    ];
    for (name, modules) in cases {
        let model = model_dir(name);
        for (tuner, extra) in [("lora", ["--target-modules", "all-linear"]), ("full", ["--seed", "1"])] {
            let out = fresh_dir(&format!("{name}-{tuner}"));
            let mut args = vec!["--tuner", tuner, "--max-steps", "4", "--learning-rate", "1e-2"];
            args.extend(extra);
            succeeded(&sft(&model, &data, &out, &args));
            let losses: Vec<f64> = metrics(&out).iter().map(|m| m["loss"].as_f64().unwrap()).collect();
            assert!(losses[3] < losses[0], "{name} {tuner}: {losses:?}");
            if tuner == "lora" {
                let config: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(out.join("checkpoint-4/adapter_config.json")).unwrap(),
                )
                .unwrap();
                let mut targets: Vec<&str> =
                    config["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
                targets.sort();
                let mut want = modules.to_vec();
                want.sort();
                assert_eq!(targets, want, "{name}: all-linear");
                let tensors =
                    candle_core::safetensors::load(out.join("checkpoint-4/adapter_model.safetensors"), &Device::Cpu)
                        .unwrap();
                let a = format!(
                    "base_model.model.model.layers.0.self_attn.{}.lora_A.weight",
                    if name == "tiny-phi3" { "qkv_proj" } else { "q_proj" }
                );
                assert!(tensors.contains_key(&a), "{name}: {a} in {:?}", tensors.keys().take(4).collect::<Vec<_>>());
            }
        }
    }
}
