//! PEFT adapters through the tuner plugins at the host's linear hook:
//! LoRA and DoRA adapters saved by PEFT 0.21.2 for tiny-qwen3 give PEFT's
//! logits, loss, adapter gradients and merged model.

use candle_core::{DType, Device, Tensor};
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::loss::causal_lm_loss;
use oxtune_engine::model::checkpoint::Trainable;
use oxtune_engine::model::{LoadOptions, LoadedModel};
use oxtune_registry::Registry;
use oxtune_tests::fixtures;

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// The in-memory PEFT name of an oxtune adapter parameter.
fn peft_grad_name(name: &str) -> String {
    let inner = name
        .replace(".lora_A.weight", ".lora_A.default.weight")
        .replace(".lora_B.weight", ".lora_B.default.weight")
        .replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight");
    format!("grad.base_model.model.{inner}")
}

#[test]
fn lora_and_dora_adapters_match_peft() {
    let registry = Registry::with_builtins().unwrap();
    for kind in ["lora", "dora"] {
        let dir = fixtures().join(format!("peft/tiny-qwen3-{kind}"));
        let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
        let mut model =
            LoadedModel::load(&registry, &fixtures().join("models/tiny-qwen3"), &LoadOptions::default()).unwrap();
        model.attach_adapter(&registry, &dir, Trainable::All).unwrap();
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();

        let logits = model.forward(&ids, &BatchInfo::default(), None, None).unwrap();
        let diff = max_abs(&(&logits - &r["logits"]).unwrap());
        assert!(diff < 1e-4, "{kind}: logits differ from PEFT by {diff}");

        let loss = causal_lm_loss(&logits, &r["labels"]).unwrap();
        let (got, want) =
            (loss.to_scalar::<f32>().unwrap(), r["loss"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]);
        assert!((got - want).abs() < 1e-5, "{kind}: loss {got} vs {want}");

        let grads = loss.backward().unwrap();
        let mut checked = 0;
        for name in model.weights().names() {
            let Some(var) = model.weights().var(name) else { continue };
            let want = &r[&peft_grad_name(name)];
            let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{kind}: no gradient for {name}"));
            let scale = max_abs(want).max(1e-8);
            let diff = max_abs(&(got - want).unwrap());
            assert!(diff <= 1e-4 * scale, "{kind}: gradient of {name} differs by {diff} (scale {scale})");
            checked += 1;
        }
        assert_eq!(checked, r.keys().filter(|k| k.starts_with("grad.")).count(), "{kind}: every adapter gradient");
        // Base weights are frozen: no gradient is computed for them.
        assert!(model.weights().var("model.norm.weight").is_none());

        model.merge_adapter().unwrap();
        assert!(model.adapter().is_none() && model.weights().names().iter().all(|n| !n.contains("lora_")));
        let merged = model.forward(&ids, &BatchInfo::default(), None, None).unwrap();
        let diff = max_abs(&(&merged - &r["merged_logits"]).unwrap());
        assert!(diff < 1e-4, "{kind}: merged logits differ from PEFT's by {diff}");
        let q = model.weights().get("model.layers.0.self_attn.q_proj.weight").unwrap();
        let diff = max_abs(&(q - &r["merged.model.layers.0.self_attn.q_proj.weight"]).unwrap());
        assert!(diff < 1e-5, "{kind}: merged q_proj differs by {diff}");
    }
}

#[test]
fn adapters_for_missing_layers_and_unknown_types_are_named_errors() {
    let registry = Registry::with_builtins().unwrap();
    let mut model =
        LoadedModel::load(&registry, &fixtures().join("models/tiny-llama"), &LoadOptions::default()).unwrap();
    // tiny-llama has the same module names but other shapes: loading is fine,
    // a shape error would come at forward; a missing module is caught here.
    let dir = std::env::temp_dir().join(format!("oxtune-peft-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("peft/tiny-qwen3-lora/adapter_config.json")).unwrap(),
    )
    .unwrap();
    config["peft_type"] = "PREFIX_TUNING".into();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let err = model.attach_adapter(&registry, &dir, Trainable::None).unwrap_err().to_string();
    assert!(err.contains("adapter_config.json") && err.contains("PREFIX_TUNING"), "{err}");

    config["peft_type"] = "LORA".into();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let a = Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap();
    let tensors =
        std::collections::HashMap::from([("base_model.model.model.layers.9.mlp.up_proj.lora_A.weight".to_owned(), a)]);
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    let err = model.attach_adapter(&registry, &dir, Trainable::None).unwrap_err().to_string();
    assert!(err.contains("model.layers.9.mlp.up_proj") && err.contains("does not have"), "{err}");
}

fn tiny_qwen3(registry: &Registry) -> LoadedModel {
    LoadedModel::load(registry, &fixtures().join("models/tiny-qwen3"), &LoadOptions::default()).unwrap()
}

#[test]
fn an_adapter_saved_by_oxtune_reloads_identically_in_pefts_layout() {
    let registry = Registry::with_builtins().unwrap();
    let ids = Tensor::new(&[[3u32, 14, 15, 92, 65, 35]], &Device::Cpu).unwrap();
    let base_logits = tiny_qwen3(&registry).forward(&ids, &BatchInfo::default(), None, None).unwrap();

    let mut model = tiny_qwen3(&registry);
    let config = serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]});
    model.add_adapter(&registry, "lora", config, 7).unwrap();
    // B starts at zero, so a new adapter leaves the model unchanged (up to
    // rounding: trainable inputs take gemm instead of the decode kernel)...
    let fresh = model.forward(&ids, &BatchInfo::default(), None, None).unwrap();
    assert!(max_abs(&(&fresh - &base_logits).unwrap()) < 1e-5);
    // ...until training moves B.
    for name in model.weights().names() {
        if name.ends_with("lora_B.weight") {
            let var = model.weights().var(name).unwrap();
            var.set(&Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    let trained = model.forward(&ids, &BatchInfo::default(), None, None).unwrap();
    assert!(max_abs(&(&trained - &base_logits).unwrap()) > 1e-3);

    let dir = std::env::temp_dir().join(format!("oxtune-saved-adapter-{}", std::process::id()));
    model.save_adapter(&dir).unwrap();
    // Reloaded for training (the same computation), the logits are identical.
    let mut reloaded = tiny_qwen3(&registry);
    reloaded.attach_adapter(&registry, &dir, Trainable::All).unwrap();
    let again = reloaded.forward(&ids, &BatchInfo::default(), None, None).unwrap();
    assert_eq!(max_abs(&(&again - &trained).unwrap()), 0.0, "reloaded logits differ");
    let mut frozen = tiny_qwen3(&registry);
    frozen.attach_adapter(&registry, &dir, Trainable::None).unwrap();
    let inference = frozen.forward(&ids, &BatchInfo::default(), None, None).unwrap();
    assert!(max_abs(&(&inference - &trained).unwrap()) < 1e-5);

    // PEFT's layout: names, shapes, config keys.
    let saved = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(saved.len(), 2 * 2 * 2, "A and B for q_proj and v_proj in 2 layers");
    for (name, t) in &saved {
        assert!(name.starts_with("base_model.model.model.layers."), "{name}");
        if name.ends_with(".self_attn.q_proj.lora_A.weight") {
            assert_eq!(t.dims(), &[4, 64]);
        } else if name.ends_with(".self_attn.v_proj.lora_B.weight") {
            assert_eq!(t.dims(), &[32, 4]);
        }
    }
    let ours: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    let peft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("peft/tiny-qwen3-lora/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let keys =
        |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<std::collections::BTreeSet<_>>();
    assert_eq!(keys(&ours), keys(&peft));
    assert_eq!(ours["r"], 4);
    assert_eq!(ours["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    assert!(std::fs::read_dir(dir.parent().unwrap()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".partial-")));
}

#[test]
fn a_new_dora_adapter_starts_as_the_base_model_and_bad_targets_list_the_layers() {
    let registry = Registry::with_builtins().unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
    let base_logits = tiny_qwen3(&registry).forward(&ids, &BatchInfo::default(), None, None).unwrap();
    let mut model = tiny_qwen3(&registry);
    model
        .add_adapter(&registry, "dora", serde_json::json!({"r": 2, "target_modules": ["o_proj", "down_proj"]}), 1)
        .unwrap();
    let logits = model.forward(&ids, &BatchInfo::default(), None, None).unwrap();
    assert!(max_abs(&(&logits - &base_logits).unwrap()) < 1e-5, "magnitudes start at the weights' row norms");

    let mut model = tiny_qwen3(&registry);
    let err = model
        .add_adapter(&registry, "lora", serde_json::json!({"target_modules": ["qkv"]}), 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("match no linear layer") && err.contains("q_proj") && err.contains("down_proj"), "{err}");
    let err = model.add_adapter(&registry, "loha", serde_json::json!({"target_modules": ["q_proj"]}), 1).unwrap_err();
    // The registry's message is the source of the error.
    let err = oxtune_engine::error_chain(&err);
    assert!(err.contains("tuner named `loha`"), "{err}");
}
