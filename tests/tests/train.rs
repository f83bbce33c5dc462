//! The shared training loop: LoRA on tiny-qwen3 learns a small chat
//! dataset, writes its metrics and PEFT checkpoints, and is deterministic
//! for a seed.

use oxtune_data::text::{encode_chat, EncodedRow, TextAssets};
use oxtune_engine::model::{LoadOptions, LoadedModel};
use oxtune_registry::Registry;
use oxtune_tests::fixtures;
use oxtune_train::{train, TrainConfig};
use serde_json::json;

fn rows(assets: &TextAssets) -> Vec<EncodedRow> {
    let pairs = [("What colour is the sky?", "blue"), ("Name a fruit.", "apple"), ("Say hello.", "hello there")];
    pairs
        .iter()
        .map(|(q, a)| {
            let messages = [json!({"role": "user", "content": q}), json!({"role": "assistant", "content": a})];
            encode_chat(assets, &messages, None).unwrap()
        })
        .collect()
}

fn lora_model(registry: &Registry, seed: u64) -> LoadedModel {
    let dir = fixtures().join("models/tiny-qwen3");
    let mut model = LoadedModel::load(registry, &dir, &LoadOptions::default()).unwrap();
    // With dropout: the resume test below then proves the masks reproduce.
    let config = json!({"r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]});
    model.add_adapter(registry, "lora", config, seed).unwrap();
    model
}

#[test]
fn lora_sft_lowers_the_loss_and_checkpoints_in_peft_layout() {
    let registry = Registry::with_builtins().unwrap();
    let assets = TextAssets::load(&fixtures().join("models/tiny-qwen3")).unwrap();
    let model = lora_model(&registry, 1);
    let out = std::env::temp_dir().join(format!("oxtune-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let config = TrainConfig {
        learning_rate: 2e-2,
        max_steps: Some(30),
        batch_size: 1,
        gradient_accumulation_steps: 3,
        warmup_ratio: 0.1,
        save_steps: Some(10),
        output_dir: Some(out.clone()),
        ..Default::default()
    };
    let metrics = train(&model, &rows(&assets), &[], &config).unwrap();
    assert_eq!(metrics.len(), 30);
    let (first, last) = (metrics[0].loss, metrics.last().unwrap().loss);
    let losses: Vec<f64> = metrics.iter().map(|m| m.loss).collect();
    // A random 64-wide model learns slowly through rank-8 adapters: demand
    // a drop of 0.8 nat (6.9 -> about 5.9 here), not memorisation.
    assert!(last < first - 0.8, "loss went from {first} to {last}: {losses:?}");
    assert!(metrics.iter().all(|m| m.grad_norm.is_finite() && m.lr >= 0.0 && m.tokens_per_s > 0.0));
    // Warm-up: the first step's rate is 0, the peak comes after 3 steps.
    assert_eq!(metrics[0].lr, 0.0);
    assert!((metrics[3].lr - 2e-2).abs() < 2e-3);

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 30);
    for key in ["step", "loss", "lr", "grad_norm", "tokens_per_s"] {
        assert!(lines[0].get(key).is_some(), "metrics lack `{key}`");
    }
    for step in [10, 20, 30] {
        let checkpoint = out.join(format!("checkpoint-{step}"));
        assert!(
            checkpoint.join("adapter_config.json").is_file() && checkpoint.join("adapter_model.safetensors").is_file()
        );
    }
    // The last checkpoint, loaded onto a fresh base model, gives the trained model's loss.
    let mut reloaded =
        LoadedModel::load(&registry, &fixtures().join("models/tiny-qwen3"), &LoadOptions::default()).unwrap();
    reloaded
        .attach_adapter(&registry, &out.join("checkpoint-30"), oxtune_engine::model::checkpoint::Trainable::None)
        .unwrap();
    let data = rows(&assets);
    let loss_of = |m: &LoadedModel| -> f32 {
        let r = &data[0];
        let ids = candle_core::Tensor::new(r.input_ids.as_slice(), m.device()).unwrap().unsqueeze(0).unwrap();
        let labels = candle_core::Tensor::new(r.labels.as_slice(), m.device()).unwrap().unsqueeze(0).unwrap();
        let logits = m.forward(&ids, &Default::default(), None, None).unwrap();
        oxtune_engine::loss::causal_lm_loss(&logits, &labels).unwrap().to_scalar::<f32>().unwrap()
    };
    assert!((loss_of(&reloaded) - loss_of(&model)).abs() < 1e-4);
}

#[test]
fn training_is_deterministic_for_a_seed() {
    let registry = Registry::with_builtins().unwrap();
    let assets = TextAssets::load(&fixtures().join("models/tiny-qwen3")).unwrap();
    let config = TrainConfig { learning_rate: 5e-3, max_steps: Some(4), batch_size: 2, ..Default::default() };
    let runs: Vec<Vec<f64>> = (0..2)
        .map(|_| {
            let model = lora_model(&registry, 3);
            train(&model, &rows(&assets), &[], &config).unwrap().iter().map(|m| m.loss).collect()
        })
        .collect();
    assert_eq!(runs[0], runs[1]);
}

#[test]
fn a_resumed_run_ends_with_the_same_adapter_as_an_uninterrupted_one() {
    let registry = Registry::with_builtins().unwrap();
    let assets = TextAssets::load(&fixtures().join("models/tiny-qwen3")).unwrap();
    let base = std::env::temp_dir().join(format!("oxtune-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let config = |out: &str| TrainConfig {
        learning_rate: 1e-2,
        max_steps: Some(6),
        batch_size: 2,
        warmup_ratio: 0.2,
        save_steps: Some(3),
        output_dir: Some(base.join(out)),
        ..Default::default()
    };
    // Uninterrupted: 6 steps (2 rows per step over 3 rows: epochs straddle steps).
    train(&lora_model(&registry, 5), &rows(&assets), &[], &config("full")).unwrap();
    // Interrupted after step 3, resumed from its checkpoint into another folder.
    let mut resumed =
        LoadedModel::load(&registry, &fixtures().join("models/tiny-qwen3"), &LoadOptions::default()).unwrap();
    let checkpoint = base.join("full/checkpoint-3");
    resumed.attach_adapter(&registry, &checkpoint, oxtune_engine::model::checkpoint::Trainable::All).unwrap();
    let metrics =
        train(&resumed, &rows(&assets), &[], &TrainConfig { resume_from: Some(checkpoint), ..config("resumed") })
            .unwrap();
    assert_eq!(metrics.iter().map(|m| m.step).collect::<Vec<_>>(), vec![4, 5, 6]);
    let load = |dir: &str| {
        candle_core::safetensors::load(base.join(dir).join("adapter_model.safetensors"), &candle_core::Device::Cpu)
            .unwrap()
    };
    let (a, b) = (load("full/checkpoint-6"), load("resumed/checkpoint-6"));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let bits = |t: &candle_core::Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(bits(t), bits(&b[name]), "{name} differs after resuming");
    }
    // A checkpoint of another run shape is refused.
    let mut other =
        LoadedModel::load(&registry, &fixtures().join("models/tiny-qwen3"), &LoadOptions::default()).unwrap();
    other
        .attach_adapter(&registry, &base.join("full/checkpoint-3"), oxtune_engine::model::checkpoint::Trainable::All)
        .unwrap();
    let wrong =
        TrainConfig { max_steps: Some(9), resume_from: Some(base.join("full/checkpoint-3")), ..config("other") };
    let err = oxtune_engine::error_chain(&train(&other, &rows(&assets), &[], &wrong).unwrap_err());
    assert!(err.contains("6 steps") && err.contains("9 steps"), "{err}");
}

#[test]
fn lora_dropout_acts_while_training_only() {
    use candle_core::{Device, Tensor};
    use oxtune_engine::backend::BatchInfo;
    let registry = Registry::with_builtins().unwrap();
    let model = lora_model(&registry, 3);
    // B starts at zero, so the adapter (and its dropout) would add nothing:
    // give it a value first.
    let b = model.weights().var("model.layers.0.self_attn.q_proj.lora_B.weight").unwrap();
    b.set(&Tensor::ones(b.shape(), b.dtype(), &Device::Cpu).unwrap()).unwrap();
    let ids = Tensor::new(&[[5u32, 9, 14, 2, 77]], &Device::Cpu).unwrap();
    let run = |seed: Option<u64>| {
        let info = BatchInfo { dropout_seed: seed, ..Default::default() };
        model.forward(&ids, &info, None, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let inference = run(None);
    assert_eq!(inference, run(None), "no dropout at inference");
    assert_ne!(inference, run(Some(1)), "dropout while training");
    assert_eq!(run(Some(1)), run(Some(1)), "the masks follow the seed");
    assert_ne!(run(Some(1)), run(Some(2)));
}
