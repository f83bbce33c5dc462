//! Checkpoints saved by transformers + bitsandbytes in 4 bits (NF4, double
//! quantisation; `tests/fixtures/qlora/tiny-qwen3-nf4`): weights read as
//! bitsandbytes dequantises them, the 4-bit base's logits, a PEFT LoRA on
//! it (logits, loss, every LoRA gradient), merging it into a
//! full-precision folder, and foreign quantisation configs refused.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::error_chain;
use oxtune_engine::loss::causal_lm_loss;
use oxtune_engine::model::checkpoint::Trainable;
use oxtune_engine::model::{LoadOptions, LoadedModel};
use oxtune_export::merged::write_merged;
use oxtune_registry::Registry;
use oxtune_tests::fixtures;

fn dir() -> PathBuf {
    fixtures().join("qlora/tiny-qwen3-nf4")
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn load() -> LoadedModel {
    LoadedModel::load(&Registry::with_builtins().unwrap(), &dir(), &LoadOptions::default()).unwrap()
}

#[test]
fn weights_dequantise_as_bitsandbytes_and_the_base_matches() {
    let r = reference();
    let model = load();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let ours = model.weights().get(name).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let theirs = r[&format!("dequantized.{name}")].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(ours.len(), theirs.len());
    assert!(ours.iter().zip(&theirs).all(|(a, b)| a.to_bits() == b.to_bits()), "bit for bit");
    assert!(model.weights().names().iter().all(|n| !n.contains("absmax") && !n.contains("quant_")), "no state tensors");
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = model.forward(&ids, &BatchInfo::default(), None, None).unwrap();
    let diff = max_abs(&(&logits - &r["base_logits"]).unwrap());
    assert!(diff < 1e-4, "4-bit base logits differ by {diff}");
}

#[test]
fn a_peft_lora_on_the_4bit_base_matches_and_merges_to_full_precision() {
    let r = reference();
    let registry = Registry::with_builtins().unwrap();
    let mut model = load();
    model.attach_adapter(&registry, &dir().join("lora"), Trainable::All).unwrap();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = model.forward(&ids, &BatchInfo::default(), None, None).unwrap();
    let diff = max_abs(&(&logits - &r["logits"]).unwrap());
    assert!(diff < 1e-4, "logits with the LoRA differ by {diff}");
    let loss = causal_lm_loss(&logits, &r["labels"]).unwrap();
    let want = r["loss"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    assert!((loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for name in model.weights().names() {
        let Some(var) = model.weights().var(name) else { continue };
        let peft = name
            .replace(".lora_A.weight", ".lora_A.default.weight")
            .replace(".lora_B.weight", ".lora_B.default.weight");
        let want = &r[&format!("grad.base_model.model.{peft}")];
        let got = grads.get(var.as_tensor()).unwrap();
        let scale = max_abs(want).max(1e-8);
        assert!(max_abs(&(got - want).unwrap()) <= 1e-4 * scale, "gradient of {name}");
        checked += 1;
    }
    assert_eq!(checked, 28, "every LoRA parameter");

    // Merged into a full-precision folder: no quantization_config, same logits.
    let mut model = load();
    model.attach_adapter(&registry, &dir().join("lora"), Trainable::None).unwrap();
    let out = std::env::temp_dir().join(format!("oxtune-nf4-merged-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    write_merged(&mut model, &out, usize::MAX).unwrap();
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(!config.contains("quantization_config"), "{config}");
    let merged = LoadedModel::load(&registry, &out, &LoadOptions::default()).unwrap();
    let diff = max_abs(&(merged.forward(&ids, &BatchInfo::default(), None, None).unwrap() - &r["logits"]).unwrap());
    assert!(diff < 1e-4, "merged logits differ from PEFT's 4-bit base + LoRA by {diff}");
}

#[test]
fn other_quantisation_methods_are_refused_by_name() {
    let copy = std::env::temp_dir().join(format!("oxtune-gptq-{}", std::process::id()));
    std::fs::create_dir_all(&copy).unwrap();
    for file in ["model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir().join(file), copy.join(file)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("config.json")).unwrap()).unwrap();
    config["quantization_config"] = serde_json::json!({"quant_method": "gptq", "bits": 4});
    std::fs::write(copy.join("config.json"), config.to_string()).unwrap();
    let err = LoadedModel::load(&Registry::with_builtins().unwrap(), &copy, &LoadOptions::default()).err().unwrap();
    let message = error_chain(&err);
    assert!(message.contains("config.json") && message.contains("gptq"), "{message}");
}
