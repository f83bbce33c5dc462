//! Mixture of experts through API 1.2, on `tiny-qwen3-moe` (top-2 of 4
//! experts, renormalised; made with transformers 5.24): the router's
//! load-balancing loss as transformers computes it, routing without any
//! read-back to the host, `all-linear` adapting the experts but never the
//! router, and `--router-aux-loss-coef` training on `loss + coef · aux_loss`
//! (SFT with or without gradient checkpointing, DPO and KTO). Logits, greedy decoding, the
//! loss and every gradient are checked with the other architectures in
//! `text_models.rs`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use oxtune_engine::backend::{read_backs, BatchInfo, ForwardContext, GraphSession, WeightStore};
use oxtune_engine::error_chain;
use oxtune_engine::generate::greedy;
use oxtune_engine::model::checkpoint::Trainable;
use oxtune_engine::model::{LoadOptions, LoadedModel};
use oxtune_registry::Registry;
use oxtune_tests::cli::{fails_with, fresh_dir, metrics, oxtune, scratch, sft as run_sft, succeeded};
use oxtune_tests::fixtures;

fn model_dir() -> PathBuf {
    fixtures().join("models/tiny-qwen3-moe")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(model_dir().join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f32 {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
}

fn load(dir: &Path) -> Result<LoadedModel, String> {
    let registry = Registry::with_builtins().unwrap();
    LoadedModel::load(&registry, dir, &LoadOptions { trainable: Trainable::None, ..Default::default() })
        .map_err(|e| error_chain(&e))
}

#[test]
fn the_router_aux_loss_matches_transformers() {
    let r = reference();
    let model = load(&model_dir()).unwrap();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let (_, aux) = model.forward_with_aux(&ids, &BatchInfo::default()).unwrap();
    let got = aux.get("aux_loss").expect("the model reports aux_loss").to_scalar::<f32>().unwrap();
    let expected = scalar(&r["aux_loss"]);
    assert!((got - expected).abs() < 1e-5, "aux_loss {got} vs transformers {expected}");
    // What transformers trains on: loss + router_aux_loss_coef (0.01) · aux_loss.
    let with_aux = scalar(&r["loss"]) + 0.01 * got;
    assert!((with_aux - scalar(&r["loss_with_aux"])).abs() < 1e-5, "{with_aux} vs {}", scalar(&r["loss_with_aux"]));
    // Padding is left out of the statistics, as transformers' attention mask does.
    let rows: Vec<Vec<u32>> = ids.to_vec2().unwrap();
    let padded = Tensor::new(vec![[vec![0u32; 3], rows[0].clone()].concat()], &Device::Cpu).unwrap();
    let mask = Tensor::new(vec![[vec![0u32; 3], vec![1u32; rows[0].len()]].concat()], &Device::Cpu).unwrap();
    let batch = BatchInfo { attention_mask: Some(mask), ..Default::default() };
    let (_, padded_aux) = model.forward_with_aux(&padded, &batch).unwrap();
    let alone = Tensor::new(vec![rows[0].clone()], &Device::Cpu).unwrap();
    let (_, alone_aux) = model.forward_with_aux(&alone, &BatchInfo::default()).unwrap();
    let (a, b) = (padded_aux.get("aux_loss").unwrap(), alone_aux.get("aux_loss").unwrap());
    let (a, b) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
    assert!((a - b).abs() < 1e-5, "left-padded {a} vs alone {b}");
}

#[test]
fn routing_stays_on_the_device() {
    let r = reference();
    let model = load(&model_dir()).unwrap();
    let before = read_backs();
    model.forward(&r["input_ids"].to_dtype(DType::U32).unwrap(), &BatchInfo::default(), None, None).unwrap();
    greedy(&model, &r["greedy_prompt"].to_dtype(DType::U32).unwrap(), 4).unwrap();
    assert_eq!(read_backs(), before, "the MoE forward pass read tensors back to the host");
}

#[test]
fn the_aux_loss_is_computed_only_when_the_host_asks_for_it() {
    // Generation and serving do not pass `want_aux_outputs`: the router
    // loss costs them nothing. Training and evaluation pass it.
    let registry = Registry::with_builtins().unwrap();
    let config = std::fs::read_to_string(model_dir().join("config.json")).unwrap();
    let model = registry.load_model("qwen3_moe", &config).unwrap();
    let mut weights = WeightStore::new();
    for (name, t) in candle_core::safetensors::load(model_dir().join("model.safetensors"), &Device::Cpu).unwrap() {
        weights.insert(name, t);
    }
    let ids = reference()["input_ids"].to_dtype(DType::U32).unwrap();
    let positions = Tensor::arange(0u32, ids.dim(1).unwrap() as u32, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .broadcast_as(ids.dims())
        .unwrap()
        .contiguous()
        .unwrap();
    let aux_names = |want: bool| -> Vec<String> {
        let batch = BatchInfo::default();
        let mut session =
            GraphSession::new(ForwardContext { weights: &weights, batch: &batch, cache: None, tuner: None });
        let mut inputs = vec![("input_ids", ids.clone()), ("position_ids", positions.clone())];
        if want {
            inputs.push((oxtune_plugin_api::abi::WANT_AUX_OUTPUTS, Tensor::new(1u8, &Device::Cpu).unwrap()));
        }
        session.run_model(&model, &inputs).unwrap();
        session.aux_outputs().iter().map(|(name, _)| name.to_owned()).collect()
    };
    assert_eq!(aux_names(false), Vec::<String>::new());
    assert_eq!(aux_names(true), ["aux_loss"]);
}

fn chats() -> PathBuf {
    scratch(
        "moe-chats.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello there\"}]}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"sky?\"}, {\"role\": \"assistant\", \"content\": \"blue, mostly\"}]}\n",
    )
}

/// Trains the MoE fixture on [`chats`] (batch 2, learning rate 1e-2) and
/// returns its metrics.
fn sft(out: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["--per-device-train-batch-size", "2", "--learning-rate", "1e-2"];
    args.extend(extra);
    succeeded(&run_sft(&model_dir(), &chats(), out, &args));
    metrics(out)
}

#[test]
fn all_linear_lora_adapts_the_experts_and_never_the_router() {
    let model = load(&model_dir()).unwrap();
    let modules = model.all_linear_modules();
    assert_eq!(modules, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]);
    assert!(model.linear_layers().contains(&"model.layers.1.mlp.gate".to_owned()), "the router is a linear layer");
    // PEFT refuses dropout on transformers 5's fused expert parameters, and so does oxtune when asked
    // for it; not asked, the dropout on experts' targets is 0.
    let args = ["--target-modules", "all-linear", "--lora-dropout", "0.05"];
    let run = run_sft(&model_dir(), &chats(), &fresh_dir("moe-lora-dropout"), &args);
    fails_with(&run, &["experts.0.gate_proj", "--lora-dropout 0"]);
    let out = fresh_dir("moe-lora");
    let args = ["--tuner", "lora", "--target-modules", "all-linear", "--max-steps", "4"];
    let steps = sft(&out, &args);
    let losses: Vec<f64> = steps.iter().map(|m| m["loss"].as_f64().unwrap()).collect();
    assert!(losses[3] < losses[0], "{losses:?}");
    let tensors =
        candle_core::safetensors::load(out.join("checkpoint-4/adapter_model.safetensors"), &Device::Cpu).unwrap();
    // PEFT's fused layout: expert e's rank k of down_proj is column k·4 + e of B.
    let b = &tensors["base_model.model.model.layers.1.mlp.experts.lora_B.weight"];
    assert_eq!(b.dims(), &[64, 8 * 4]);
    for e in 0..4 {
        let columns = Tensor::new((0..8u32).map(|k| k * 4 + e).collect::<Vec<_>>(), &Device::Cpu).unwrap();
        // Every expert was chosen by some token, so each B moved off zero.
        let moved = b.index_select(&columns, 1).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(moved > 0.0, "expert {e} never trained");
    }
    assert!(!tensors.keys().any(|k| k.contains("mlp.gate.")), "the router was adapted");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint-4/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["lora_dropout"], 0.0);
    let full = fresh_dir("moe-full");
    let losses: Vec<f64> =
        sft(&full, &["--tuner", "full", "--max-steps", "4"]).iter().map(|m| m["loss"].as_f64().unwrap()).collect();
    assert!(losses[3] < losses[0], "full fine-tuning: {losses:?}");
}

fn peft_dir(name: &str) -> PathBuf {
    fixtures().join("peft").join(name)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn with_adapter(adapter: &Path) -> LoadedModel {
    let registry = Registry::with_builtins().unwrap();
    let mut model = load(&model_dir()).unwrap();
    model.attach_adapter(&registry, adapter, Trainable::None).unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    model
}

/// Logits of `model` for an adapter fixture's ids, and PEFT's.
fn logits_and_peft(model: &LoadedModel, adapter: &Path) -> (Tensor, Tensor) {
    let r = candle_core::safetensors::load(adapter.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    (model.forward(&ids, &BatchInfo::default(), None, None).unwrap(), r["logits"].clone())
}

/// PEFT 0.21.2 + transformers 5.24 (`tests/fixtures/peft/make_moe_references.py`):
/// an adapter in PEFT's own fused layout (gate and up sharing `A`), and a
/// per-expert one PEFT loads by converting it, with what PEFT saves of it.
#[test]
fn expert_lora_reads_and_writes_peft_s_fused_layout() {
    let base = load(&model_dir()).unwrap();
    for name in ["tiny-qwen3-moe-lora", "tiny-qwen3-moe-lora-per-expert"] {
        let (got, want) = logits_and_peft(&with_adapter(&peft_dir(name)), &peft_dir(name));
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-5, "{name}: logits differ from PEFT's by {diff}");
        let (plain, _) = logits_and_peft(&base, &peft_dir(name));
        assert!(max_diff(&plain, &want) > 1e-2, "{name}: the adapter changes nothing");
    }
    // Saved, the per-expert adapter is what PEFT itself writes of it.
    let out = fresh_dir("moe-peft-saved");
    with_adapter(&peft_dir("tiny-qwen3-moe-lora-per-expert")).save_adapter(&out).unwrap();
    let converted = peft_dir("tiny-qwen3-moe-lora-converted");
    let ours = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let peft = candle_core::safetensors::load(converted.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let (mut our_keys, mut peft_keys): (Vec<&String>, Vec<&String>) = (ours.keys().collect(), peft.keys().collect());
    our_keys.sort();
    peft_keys.sort();
    assert_eq!(our_keys, peft_keys);
    for (key, t) in &peft {
        assert_eq!(ours[key].dims(), t.dims(), "{key}");
        assert!(max_diff(&ours[key], t) < 1e-7, "{key}");
    }
    let read = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap()
    };
    let (ours, peft) = (read(&out), read(&converted));
    let set = |v: &serde_json::Value| {
        let mut items: Vec<String> = v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect();
        items.sort();
        items
    };
    for key in ["target_modules", "target_parameters"] {
        assert_eq!(set(&ours[key]), set(&peft[key]), "{key}");
    }
    for key in ["rank_pattern", "alpha_pattern", "r", "lora_alpha", "lora_dropout"] {
        assert_eq!(ours[key].to_string().replace(".0", ""), peft[key].to_string().replace(".0", ""), "{key}");
    }
    // And oxtune reads its own save back.
    let (got, want) = logits_and_peft(&with_adapter(&out), &peft_dir("tiny-qwen3-moe-lora-per-expert"));
    assert!(max_diff(&got, &want) < 1e-5);
}

#[test]
fn the_router_aux_loss_trains_with_and_without_gradient_checkpointing() {
    let step = |coef: &str, checkpointing: &str| {
        let out = fresh_dir(&format!("moe-aux-{coef}-{checkpointing}"));
        let args = [
            "--tuner",
            "full",
            "--max-steps",
            "1",
            "--router-aux-loss-coef",
            coef,
            "--gradient-checkpointing",
            checkpointing,
        ];
        let m = sft(&out, &args).remove(0);
        (m["loss"].as_f64().unwrap(), m["grad_norm"].as_f64().unwrap(), m.get("aux_loss").and_then(|a| a.as_f64()))
    };
    let (plain, plain_norm, logged) = step("0", "false");
    let logged = logged.expect("aux_loss is logged");
    let (with_aux, norm, _) = step("1", "false");
    assert!((with_aux - (plain + logged)).abs() < 1e-5, "{with_aux} vs {plain} + {logged}");
    assert!((norm - plain_norm).abs() > 1e-4, "the aux loss's gradient changed nothing: {norm} vs {plain_norm}");
    // Checkpointed layers that collect router logits stay connected, so
    // the aux loss's gradient is the same.
    let (ckpt_loss, ckpt_norm, _) = step("1", "true");
    assert!((ckpt_loss - with_aux).abs() < 1e-6, "{ckpt_loss} vs {with_aux}");
    assert!((ckpt_norm - norm).abs() < 1e-5 * norm, "grad norm {ckpt_norm} with checkpointing vs {norm}");
}

#[test]
fn preference_methods_add_the_policy_s_router_aux_loss() {
    // TRL adds `aux_loss_coef · aux_loss` of the policy's forward pass to
    // the DPO and KTO losses; the reference's router loss plays no part.
    for (algo, data) in [("dpo", "pairs.jsonl"), ("kto", "kto.jsonl")] {
        let step = |coef: &str| {
            let out = fresh_dir(&format!("moe-{algo}-aux-{coef}"));
            let (model, data) = (model_dir(), fixtures().join("trl").join(data));
            let args = [
                "rlhf",
                "--algo",
                algo,
                "--model",
                model.to_str().unwrap(),
                "--dataset",
                data.to_str().unwrap(),
                "--output-dir",
                out.to_str().unwrap(),
                "--max-steps",
                "1",
                "--per-device-train-batch-size",
                "2",
                "--router-aux-loss-coef",
                coef,
                "--lora-dropout",
                "0",
            ];
            succeeded(&oxtune(&args, &[]));
            let m = metrics(&out).remove(0);
            (m["loss"].as_f64().unwrap(), m.get("aux_loss").and_then(|a| a.as_f64()))
        };
        let (plain, logged) = step("0");
        let logged = logged.unwrap_or_else(|| panic!("{algo}: aux_loss is logged"));
        assert!(logged > 0.0, "{algo}: aux_loss {logged}");
        let (with_aux, _) = step("0.5");
        assert!((with_aux - (plain + 0.5 * logged)).abs() < 1e-5, "{algo}: {with_aux} vs {plain} + 0.5 * {logged}");
    }
}

#[test]
fn the_router_aux_loss_on_a_dense_model_is_refused() {
    let dense = fixtures().join("models/tiny-qwen3");
    let args = ["--max-steps", "1", "--router-aux-loss-coef", "0.01"];
    let run = run_sft(&dense, &chats(), &fresh_dir("dense-aux"), &args);
    fails_with(&run, &["--router-aux-loss-coef", "`qwen3`", "not a mixture of experts"]);
}

/// A copy of the fixture with its config edited and the tensors `drop` left out.
fn edited(name: &str, config: impl Fn(&mut serde_json::Value), drop: &[&str]) -> PathBuf {
    let dir = fresh_dir(name);
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model_dir().join(file), dir.join(file)).unwrap();
    }
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir().join("config.json")).unwrap()).unwrap();
    config(&mut value);
    std::fs::write(dir.join("config.json"), value.to_string()).unwrap();
    let mut tensors = candle_core::safetensors::load(model_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    tensors.retain(|k, _| !drop.contains(&k.as_str()));
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    dir
}

#[test]
fn bad_configs_and_missing_experts_are_named() {
    let too_many = edited("moe-topk", |c| c["num_experts_per_tok"] = 5.into(), &[]);
    let message = load(&too_many).err().expect("refused");
    assert!(message.contains("`num_experts_per_tok` (5)") && message.contains("(4)"), "{message}");
    let missing = edited("moe-missing", |_| {}, &["model.layers.0.mlp.experts.3.up_proj.weight"]);
    let message = load(&missing).err().expect("refused");
    assert!(message.contains("model.layers.0.mlp.experts.3.up_proj.weight"), "{message}");
}
