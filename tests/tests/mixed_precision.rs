//! `--dtype bf16` / `f16`: the model in the narrow dtype, norms, softmax,
//! attention and the loss in f32, trainable parameters updated through f32
//! master copies. Checked against the f32 PEFT fixture (logits, loss,
//! every LoRA gradient) within bf16's precision, and end to end: a bf16
//! run follows the f32 run's curve, and resumes exactly (the master copies
//! live in the checkpoint).

use candle_core::{DType, Device, Tensor};
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::model::checkpoint::Trainable;
use oxtune_engine::model::{LoadOptions, LoadedModel};
use oxtune_registry::Registry;
use oxtune_tests::cli::{fresh_dir, metrics, scratch, sft, succeeded, tiny};
use oxtune_tests::fixtures;

/// The largest |value| of `t`, in f64.
fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

/// max |a − b| / max |b|.
fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    max_abs(&(&a - &b).unwrap()) / max_abs(&b).max(1e-12)
}

/// The in-memory PEFT name of an oxtune adapter parameter.
fn peft_grad_name(name: &str) -> String {
    let inner =
        name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight");
    format!("grad.base_model.model.{inner}")
}

/// The stated tolerance of the narrow dtypes against f32, relative to the
/// reference's largest value. bf16 keeps 8 significant bits (a relative
/// step of 2^-8 ≈ 0.4%), f16 11. Measured here: bf16 logits 0.50%, loss
/// 0.006%, the worst LoRA gradient 2.0%; f16 0.057%, 0.0015%, 0.28%. The
/// bounds are about 3× those.
const BF16_BOUNDS: Bounds = Bounds { logits: 0.015, loss: 0.0003, grads: 0.06 };
const F16_BOUNDS: Bounds = Bounds { logits: 0.002, loss: 0.0001, grads: 0.008 };

struct Bounds {
    logits: f64,
    loss: f64,
    grads: f64,
}

#[test]
fn narrow_dtypes_give_pefts_f32_logits_loss_and_lora_gradients_within_their_precision() {
    let registry = Registry::with_builtins().unwrap();
    let dir = fixtures().join("peft/tiny-qwen3-lora");
    let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    for (dtype, bounds) in [(DType::BF16, BF16_BOUNDS), (DType::F16, F16_BOUNDS)] {
        let options = LoadOptions { dtype, ..LoadOptions::default() };
        let mut model = LoadedModel::load(&registry, &fixtures().join("models/tiny-qwen3"), &options).unwrap();
        model.attach_adapter(&registry, &dir, Trainable::All).unwrap();
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let labels = &r["labels"];

        let logits = model.forward(&ids, &BatchInfo::default(), None, None).unwrap();
        assert_eq!(logits.dtype(), dtype, "the model computes in {dtype:?}");
        let off = relative(&logits, &r["logits"]);
        assert!(off < bounds.logits, "{dtype:?}: logits off PEFT's f32 by {off} of their scale");

        // The loss the trainer uses: label log-probabilities, in f32.
        let loss = label_loss(&model, &ids, labels);
        assert_eq!(loss.dtype(), DType::F32, "the loss is computed in f32");
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        let want = r["loss"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        assert!(((got - want) / want).abs() < bounds.loss, "{dtype:?}: loss {got} vs PEFT's {want}");

        let grads = loss.backward().unwrap();
        let mut checked = 0;
        for name in model.weights().names() {
            let Some(var) = model.weights().var(name) else { continue };
            assert_eq!(var.dtype(), dtype, "{name}: the adapter is held in the model's dtype");
            let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{dtype:?}: no gradient for {name}"));
            let off = relative(got, &r[&peft_grad_name(name)]);
            assert!(off < bounds.grads, "{dtype:?}: gradient of {name} off PEFT's f32 by {off} of its scale");
            checked += 1;
        }
        assert_eq!(checked, r.keys().filter(|k| k.starts_with("grad.")).count(), "{dtype:?}: every adapter gradient");
    }
}

/// The mean negative log-likelihood of `labels` (transformers' causal-LM
/// loss) through the model's label head.
fn label_loss(model: &LoadedModel, ids: &Tensor, labels: &Tensor) -> Tensor {
    let out = model.label_logps(ids, &BatchInfo::default(), labels).unwrap();
    let total = (out.logps * &out.mask).unwrap().sum_all().unwrap().neg().unwrap();
    (total / out.mask.sum_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()).unwrap()
}

const CHATS: &str = concat!(
    "{\"messages\": [{\"role\": \"user\", \"content\": \"hi there\"}, {\"role\": \"assistant\", \"content\": \"hello to you\"}]}\n",
    "{\"messages\": [{\"role\": \"user\", \"content\": \"sky?\"}, {\"role\": \"assistant\", \"content\": \"blue, mostly\"}]}\n",
    "{\"messages\": [{\"role\": \"user\", \"content\": \"2+2\"}, {\"role\": \"assistant\", \"content\": \"four\"}]}\n",
    "{\"messages\": [{\"role\": \"user\", \"content\": \"fruit?\"}, {\"role\": \"assistant\", \"content\": \"an apple\"}]}\n",
);

/// Each step's loss in `out`'s metrics.
fn losses(out: &std::path::Path) -> Vec<f64> {
    metrics(out).iter().filter_map(|m| m["loss"].as_f64()).collect()
}

#[test]
fn a_bf16_run_follows_the_f32_curve_and_resumes_exactly_from_its_master_copies() {
    let model = tiny("tiny-qwen3");
    let data = scratch("bf16-chats.jsonl", CHATS);
    let run = |out: &std::path::Path, dtype: &str, extra: &[&str]| {
        let mut args =
            vec!["--dtype", dtype, "--max-steps", "8", "--per-device-train-batch-size", "2", "--learning-rate", "1e-3"];
        args.extend(["--lora-dropout", "0", "--save-steps", "2", "--gradient-checkpointing", "false"]);
        args.extend(extra);
        succeeded(&sft(std::path::Path::new(&model), &data, out, &args));
        losses(out)
    };
    let f32_out = fresh_dir("bf16-curve-f32");
    let bf16_out = fresh_dir("bf16-curve-bf16");
    let f32_curve = run(&f32_out, "f32", &[]);
    let bf16_curve = run(&bf16_out, "bf16", &[]);
    assert_eq!(f32_curve.len(), 8);
    assert_eq!(bf16_curve.len(), 8);
    for (step, (a, b)) in f32_curve.iter().zip(&bf16_curve).enumerate() {
        // Measured: at most 8e-5 of the loss over the 8 steps.
        assert!(((a - b) / a).abs() < 5e-4, "step {}: bf16 loss {b} vs f32 {a}", step + 1);
    }
    assert!(bf16_curve[7] < bf16_curve[0], "the bf16 run learns: {bf16_curve:?}");

    // Killed after step 4: resuming from checkpoint-4 must give steps 5-8
    // bit for bit, which needs the f32 master copies from the checkpoint
    // (resuming from the bf16 adapter alone drifts).
    let optimizer =
        candle_core::safetensors::load(bf16_out.join("checkpoint-4/optimizer.safetensors"), &Device::Cpu).unwrap();
    let masters: Vec<&String> = optimizer.keys().filter(|k| k.starts_with("master.")).collect();
    assert!(!masters.is_empty(), "the checkpoint holds master copies");
    assert!(masters.iter().all(|k| optimizer[*k].dtype() == DType::F32));
    for step in [6, 8] {
        std::fs::remove_dir_all(bf16_out.join(format!("checkpoint-{step}"))).unwrap();
    }
    let resumed = run(&bf16_out, "bf16", &[]);
    assert_eq!(resumed, bf16_curve, "the resumed bf16 run's steps equal the uninterrupted run's");
}
