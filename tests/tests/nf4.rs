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
    // Kept in 4 bits: codes and one f32 scale per 64 values.
    let quantized = model.weights().quantized(name).expect("the frozen weight stays 4-bit");
    assert_eq!(quantized.dims(), (64, 64));
    assert_eq!(quantized.bytes(), 64 * 64 / 2 + 64 * 64 / 64 * 4);
    let ours =
        model.weights().dense(name, DType::F32).unwrap().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
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

/// The fixture's stored 4-bit parts of `name`: packed codes, scale codes,
/// nested scales and the offset.
fn stored_parts(name: &str) -> (Vec<u8>, Vec<u8>, Vec<f32>, f32) {
    let file = candle_core::safetensors::load(dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let u8s = |n: &str| file[n].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&u8s(&format!("{name}.quant_state.bitsandbytes__nf4"))).unwrap();
    let nested = file[&format!("{name}.nested_absmax")].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (u8s(name), u8s(&format!("{name}.absmax")), nested, state["nested_offset"].as_f64().unwrap() as f32)
}

#[test]
fn quantising_on_load_gives_bitsandbytes_codes_and_scales() {
    use oxtune_engine::quant::bnb4::{quantize, Scales};
    use oxtune_engine::quant::{Bnb4Type, QuantizeOnLoad};
    // The fixture is tiny-qwen3 quantised on load by bitsandbytes: quantise
    // the same weights here and compare every stored byte.
    let original = fixtures().join("models/tiny-qwen3");
    let weights = candle_core::safetensors::load(original.join("model.safetensors"), &Device::Cpu).unwrap();
    let file = candle_core::safetensors::load(dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut layers: Vec<&String> =
        file.keys().filter(|n| n.ends_with(".weight") && file[*n].dtype() == DType::U8).collect();
    layers.sort();
    assert_eq!(layers.len(), 14, "every linear layer of the two decoder layers");
    for name in layers {
        let w = &weights[name];
        let values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let parts = quantize(&values, w.dims(), Bnb4Type::Nf4, true);
        let (packed, absmax_codes, nested, offset) = stored_parts(name);
        assert_eq!(parts.packed, packed, "{name}: the 4-bit codes");
        let Scales::Nested { codes, nested_absmax, offset: ours, .. } = &parts.scales else { panic!("nested") };
        assert_eq!(codes, &absmax_codes, "{name}: the scales' 8-bit codes");
        assert_eq!(nested_absmax, &nested, "{name}: the nested scale");
        assert_eq!(ours.to_bits(), offset.to_bits(), "{name}: the scales' mean");
    }
    // The model quantised on load: the same layers 4-bit, the same logits as the stored checkpoint.
    let options = LoadOptions {
        quantize: Some(QuantizeOnLoad { kind: Bnb4Type::Nf4, double_quant: true }),
        ..Default::default()
    };
    let model = LoadedModel::load(&Registry::with_builtins().unwrap(), &original, &options).unwrap();
    let quantized: Vec<&str> =
        model.weights().names().into_iter().filter(|n| model.weights().quantized(n).is_some()).collect();
    assert_eq!(quantized.len(), 14, "{quantized:?}");
    assert!(model.weights().quantized("lm_head.weight").is_none(), "the output layer stays full precision");
    let r = reference();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = model.forward(&ids, &BatchInfo::default(), None, None).unwrap();
    let diff = max_abs(&(&logits - &r["base_logits"]).unwrap());
    assert!(diff < 1e-4, "logits of the model quantised on load differ from bitsandbytes' by {diff}");
}

#[test]
fn qlora_from_the_command_line_trains_an_adapter_on_a_4bit_base_and_refuses_full_tuning() {
    use oxtune_tests::cli::{fails_with, fresh_dir, oxtune, succeeded};
    let model = fixtures().join("models/tiny-qwen3").display().to_string();
    let data = oxtune_tests::workspace_root().join("examples/quickstart/sft.jsonl").display().to_string();
    let out = fresh_dir("qlora-cli");
    let out_dir = out.display().to_string();
    let common = ["sft", "--model", &model, "--dataset", &data, "--quant-method", "bnb", "--quant-bits", "4"];
    let mut args = common.to_vec();
    args.extend(["--output-dir", &out_dir, "--max-steps", "3", "--save-steps", "3", "--tuner", "lora"]);
    succeeded(&oxtune(&args, &[]));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(out.join("checkpoint-3/adapter_model.safetensors").is_file());
    let full_dir = fresh_dir("qlora-full").display().to_string();
    let mut full = common.to_vec();
    full.extend(["--output-dir", &full_dir, "--max-steps", "1", "--tuner", "full"]);
    fails_with(&oxtune(&full, &[]), &["4 bits"]);
    let eight = ["sft", "--model", &model, "--dataset", &data, "--quant-method", "bnb", "--quant-bits", "8"];
    let mut bad = eight.to_vec();
    bad.extend(["--output-dir", &full_dir]);
    fails_with(&oxtune(&bad, &[]), &["--quant-bits 8", "4-bit"]);
}
