//! Training's loss without the logits: the output head's label
//! log-probabilities (chunked on the CPU, unlabelled positions skipped)
//! equal the log-softmax of the full logits, in values and in every
//! parameter's gradient, for full fine-tuning (tied and untied heads) and
//! for LoRA (including LoRA on the head itself, which runs through the
//! tuner hook instead of the kernel).

use candle_core::{DType, Device, Tensor};
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::loss::{causal_lm_loss, mean_token_nll, IGNORE_INDEX};
use oxtune_engine::model::checkpoint::Trainable;
use oxtune_engine::model::{LoadOptions, LoadedModel};
use oxtune_registry::Registry;
use oxtune_tests::fixtures;
use serde_json::json;

/// Two rows of 12: row 0 has a 4-token prompt (unlabelled), row 1 three
/// tokens of right padding (unlabelled, masked out of attention).
fn batch(vocab: usize) -> (Tensor, Tensor, BatchInfo) {
    let ids: Vec<u32> = (0..24).map(|i| ((i * 7919 + 11) % vocab) as u32).collect();
    let mut labels: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    labels[..4].fill(IGNORE_INDEX);
    labels[21..].fill(IGNORE_INDEX);
    let mask: Vec<u32> = (0..24).map(|i| u32::from(i < 21)).collect();
    let ids = Tensor::from_vec(ids, (2, 12), &Device::Cpu).unwrap();
    let labels = Tensor::from_vec(labels, (2, 12), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (2, 12), &Device::Cpu).unwrap();
    (ids, labels, BatchInfo { attention_mask: Some(mask), ..Default::default() })
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Loss and gradients of every trainable parameter, both ways; asserts
/// they agree and returns how many parameters were compared.
fn compare(model: &LoadedModel, trainable: &[&str]) -> usize {
    let vocab = model.vocab_size().unwrap();
    let (ids, labels, info) = batch(vocab);
    let oxtune_engine::model::LabelLogps { logps, mask, .. } = model.label_logps(&ids, &info, &labels).unwrap();
    let fast = mean_token_nll(&logps, &mask).unwrap();
    let slow = causal_lm_loss(&model.forward(&ids, &info, None, None).unwrap(), &labels).unwrap();
    let (f, s) = (fast.to_scalar::<f32>().unwrap() as f64, slow.to_scalar::<f32>().unwrap() as f64);
    assert!(((f - s) / s).abs() < 1e-6, "loss {f} vs {s} on the full logits");
    let (gf, gs) = (fast.backward().unwrap(), slow.backward().unwrap());
    let mut compared = 0;
    for name in trainable {
        let var = model.weights().var(name).unwrap_or_else(|| panic!("{name} is not trainable"));
        let (a, b) = (gf.get(var.as_tensor()), gs.get(var.as_tensor()));
        let (Some(a), Some(b)) = (a, b) else {
            assert!(a.is_none() && b.is_none(), "{name}: a gradient on one side only");
            continue;
        };
        let scale = max_abs(b).max(1e-12);
        let diff = max_abs(&(a - b).unwrap());
        assert!(diff / scale < 1e-5, "{name}: gradients differ by {diff} (largest {scale})");
        compared += 1;
    }
    compared
}

#[test]
fn full_fine_tuning_gets_the_same_loss_and_gradients_without_the_logits() {
    let registry = Registry::with_builtins().unwrap();
    for (model, tied) in [("tiny-qwen3", true), ("tiny-llama", false)] {
        let options = LoadOptions { trainable: Trainable::All, ..Default::default() };
        let model = LoadedModel::load(&registry, &fixtures().join("models").join(model), &options).unwrap();
        let names = model.weights().names();
        let head = if tied { "model.embed_tokens.weight" } else { "lm_head.weight" };
        assert!(names.contains(&head), "{head} missing");
        let compared = compare(&model, &names);
        // Every parameter gets a gradient, the head's included.
        assert_eq!(compared, names.len(), "{}", model.dir().display());
    }
}

#[test]
fn lora_gets_the_same_gradients_with_the_head_frozen_or_adapted() {
    let registry = Registry::with_builtins().unwrap();
    for targets in [json!(["q_proj", "v_proj"]), json!(["q_proj", "lm_head"])] {
        let dir = fixtures().join("models/tiny-llama");
        let mut model = LoadedModel::load(&registry, &dir, &LoadOptions::default()).unwrap();
        let config = json!({"r": 4, "lora_alpha": 8, "target_modules": targets});
        model.add_adapter(&registry, "lora", config, 3).unwrap();
        // B starts at zero, so A's gradient would be zero: start from a trained-looking B.
        let mut names = Vec::new();
        for name in model.weights().names() {
            if let Some(var) = model.weights().var(name) {
                if name.contains("lora_B") {
                    var.set(&Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu).unwrap()).unwrap();
                }
                names.push(name);
            }
        }
        assert!(names.iter().any(|n| n.contains("lm_head")) == (targets[1] == "lm_head"), "{names:?}");
        assert_eq!(compare(&model, &names), names.len());
    }
}

#[test]
fn a_label_outside_the_vocabulary_is_an_error_naming_it() {
    let registry = Registry::with_builtins().unwrap();
    let model = LoadedModel::load(&registry, &fixtures().join("models/tiny-qwen3"), &LoadOptions::default()).unwrap();
    let vocab = model.vocab_size().unwrap();
    let (ids, _, info) = batch(vocab);
    let labels = Tensor::from_vec(vec![vocab as i64; 24], (2, 12), &Device::Cpu).unwrap();
    let err = oxtune_engine::error_chain(&model.label_logps(&ids, &info, &labels).unwrap_err());
    assert!(err.contains(&format!("label {vocab} is outside the vocabulary of {vocab} tokens")), "{err}");
}
