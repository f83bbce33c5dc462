//! Gradient checkpointing: the layers' activations are recomputed in the
//! backward pass, and every gradient comes out as without it — for LoRA
//! with dropout (the replayed masks must match), for full fine-tuning,
//! and for freeze (trainable layers below frozen ones).

use candle_core::{DType, Device, Tensor};
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::loss::{mean_token_nll, IGNORE_INDEX};
use oxtune_engine::model::checkpoint::Trainable;
use oxtune_engine::model::{LoadOptions, LoadedModel};
use oxtune_registry::Registry;
use oxtune_tests::fixtures;
use serde_json::json;

fn batch(vocab: usize) -> (Tensor, Tensor, BatchInfo) {
    let ids: Vec<u32> = (0..20).map(|i| ((i * 4099 + 5) % vocab) as u32).collect();
    let mut labels: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    labels[..3].fill(IGNORE_INDEX);
    let mask: Vec<u32> = (0..20).map(|i| u32::from(i < 18)).collect();
    let info = BatchInfo {
        attention_mask: Some(Tensor::from_vec(mask, (2, 10), &Device::Cpu).unwrap()),
        dropout_seed: Some(7),
        ..Default::default()
    };
    (
        Tensor::from_vec(ids, (2, 10), &Device::Cpu).unwrap(),
        Tensor::from_vec(labels, (2, 10), &Device::Cpu).unwrap(),
        info,
    )
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Runs one step with checkpointing off, then on; checks the loss and
/// every trainable parameter's gradient agree, and that the layers'
/// parameters got theirs only through the replayed blocks.
fn same_gradients(mut model: LoadedModel) {
    let (ids, labels, info) = batch(model.vocab_size().unwrap());
    let trainable: Vec<String> =
        model.weights().names().into_iter().filter(|n| model.weights().var(n).is_some()).map(str::to_owned).collect();
    assert!(!trainable.is_empty());
    let step = |model: &LoadedModel| {
        let oxtune_engine::model::LabelLogps { logps, mask, .. } = model.label_logps(&ids, &info, &labels).unwrap();
        let loss = mean_token_nll(&logps, &mask).unwrap();
        (loss.to_scalar::<f32>().unwrap(), loss.backward().unwrap())
    };
    let (plain_loss, plain) = step(&model);
    model.set_gradient_checkpointing(true);
    let (loss, mut grads) = step(&model);
    assert_eq!(loss, plain_loss, "the forward values changed");
    let layer_param = trainable.iter().find(|n| n.contains(".layers.")).unwrap();
    let var = model.weights().var(layer_param).unwrap().as_tensor().clone();
    assert!(grads.get(&var).is_none(), "{layer_param} got a gradient outside the checkpointed blocks");
    model.merge_block_gradients(&mut grads).unwrap();
    for name in &trainable {
        let var = model.weights().var(name).unwrap().as_tensor();
        let (a, b) = (grads.get(var).unwrap_or_else(|| panic!("{name}: no gradient")), plain.get(var).unwrap());
        let diff = max_abs(&(a - b).unwrap());
        assert!(diff <= 1e-6 * max_abs(b).max(1e-12), "{name}: gradients differ by {diff}");
    }
}

#[test]
fn lora_with_dropout_gets_the_same_gradients_with_checkpointing() {
    let registry = Registry::with_builtins().unwrap();
    let mut model =
        LoadedModel::load(&registry, &fixtures().join("models/tiny-qwen3"), &LoadOptions::default()).unwrap();
    let config = json!({"r": 4, "lora_alpha": 8, "lora_dropout": 0.2, "init_lora_weights": "gaussian",
                        "target_modules": ["q_proj", "v_proj", "down_proj"]});
    model.add_adapter(&registry, "lora", config, 5).unwrap();
    // B starts at zero; give it values so A's gradient is not zero too.
    for name in model.weights().names() {
        if name.contains("lora_B") {
            let var = model.weights().var(name).unwrap();
            var.set(&Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    same_gradients(model);
}

#[test]
fn full_fine_tuning_gets_the_same_gradients_with_checkpointing() {
    let registry = Registry::with_builtins().unwrap();
    let options = LoadOptions { trainable: Trainable::All, ..Default::default() };
    same_gradients(LoadedModel::load(&registry, &fixtures().join("models/tiny-llama"), &options).unwrap());
}

#[test]
fn freeze_tuner_gets_the_same_gradients_with_checkpointing() {
    let registry = Registry::with_builtins().unwrap();
    let mut model =
        LoadedModel::load(&registry, &fixtures().join("models/tiny-qwen3"), &LoadOptions::default()).unwrap();
    let config = json!({"target_modules": [], "trainable_parameters": "layers\\.0\\.mlp\\."});
    model.add_adapter(&registry, "freeze", config, 5).unwrap();
    same_gradients(model);
}
