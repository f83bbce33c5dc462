//! The Llama, Qwen2 and Qwen3 architecture plugins against transformers:
//! logits, greedy continuation with the KV cache, the loss with -100
//! labels and the gradient of every parameter, for the tiny reference
//! checkpoints in `tests/fixtures/models` (made with transformers 5.24).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use oxtune::backend::BatchInfo;
use oxtune::generate::{generate, greedy, SamplingParams};
use oxtune::loss::causal_lm_loss;
use oxtune::model::checkpoint::Trainable;
use oxtune::model::{LoadOptions, LoadedModel};
use oxtune_registry::{Registry, SandboxConfig};
use oxtune_tests::{build_cdylib, fixtures};

const MODELS: [&str; 3] = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"];

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
    for (name, package) in MODELS.iter().zip(["oxtune-plugin-llama", "oxtune-plugin-qwen2", "oxtune-plugin-qwen3"]) {
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
