//! What a mixture of experts costs against a dense model of equal active
//! parameters: a Qwen3-MoE decoder (8 experts, top 2, expert width 256)
//! and the same Qwen3 decoder with one dense MLP of width 512 (2 × 256: the
//! same multiply-adds per token), random weights, full fine-tuning's
//! forward and backward pass over a 2 × 256 batch. Prints both medians and
//! the ratio (routing, grouping rows by expert and the router's aux loss
//! are the difference).
//!
//! `cargo bench -p oxtune-tests --bench moe --profile dev`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::model::checkpoint::Trainable;
use oxtune_engine::model::{LoadOptions, LoadedModel};
use oxtune_registry::Registry;

const HIDDEN: usize = 512;
const LAYERS: usize = 4;
const EXPERTS: usize = 8;
const TOP_K: usize = 2;
const EXPERT_WIDTH: usize = 256;
const BATCH: usize = 2;
const SEQ: usize = 256;
const VOCAB: usize = 1024;

/// Writes a random checkpoint of the given kind into a fresh folder.
fn checkpoint(moe: bool) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("oxtune-bench-moe-{moe}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = oxtune_tests::fixtures().join("models/tiny-qwen3-moe");
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(file), dir.join(file)).unwrap();
    }
    let (heads, kv_heads, head_dim) = (8, 4, 64);
    let config = serde_json::json!({
        "architectures": [if moe { "Qwen3MoeForCausalLM" } else { "Qwen3ForCausalLM" }],
        "model_type": if moe { "qwen3_moe" } else { "qwen3" },
        "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": VOCAB,
        "intermediate_size": TOP_K * EXPERT_WIDTH, "moe_intermediate_size": EXPERT_WIDTH,
        "num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "norm_topk_prob": true,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": false, "hidden_act": "silu",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut tensors = std::collections::HashMap::new();
    let mut add = |name: String, shape: &[usize]| {
        let scale = 1.0 / (*shape.last().unwrap() as f32).sqrt();
        tensors.insert(name, Tensor::rand(-scale, scale, shape, &Device::Cpu).unwrap());
    };
    add("model.embed_tokens.weight".into(), &[VOCAB, HIDDEN]);
    add("model.norm.weight".into(), &[HIDDEN]);
    add("lm_head.weight".into(), &[VOCAB, HIDDEN]);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            add(format!("{p}.{norm}.weight"), &[HIDDEN]);
        }
        add(format!("{p}.self_attn.q_proj.weight"), &[heads * head_dim, HIDDEN]);
        add(format!("{p}.self_attn.k_proj.weight"), &[kv_heads * head_dim, HIDDEN]);
        add(format!("{p}.self_attn.v_proj.weight"), &[kv_heads * head_dim, HIDDEN]);
        add(format!("{p}.self_attn.o_proj.weight"), &[HIDDEN, heads * head_dim]);
        add(format!("{p}.self_attn.q_norm.weight"), &[head_dim]);
        add(format!("{p}.self_attn.k_norm.weight"), &[head_dim]);
        let mut mlp = |prefix: String, width: usize| {
            add(format!("{prefix}.gate_proj.weight"), &[width, HIDDEN]);
            add(format!("{prefix}.up_proj.weight"), &[width, HIDDEN]);
            add(format!("{prefix}.down_proj.weight"), &[HIDDEN, width]);
        };
        if moe {
            (0..EXPERTS).for_each(|e| mlp(format!("{p}.mlp.experts.{e}"), EXPERT_WIDTH));
        } else {
            mlp(format!("{p}.mlp"), TOP_K * EXPERT_WIDTH);
        }
        if moe {
            add(format!("{p}.mlp.gate.weight"), &[EXPERTS, HIDDEN]);
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    dir
}

/// Median seconds of a full fine-tuning forward + backward pass.
fn time_step(registry: &Registry, dir: &Path) -> Duration {
    let options = LoadOptions { trainable: Trainable::All, ..Default::default() };
    let model = LoadedModel::load(registry, dir, &options).unwrap();
    let ids = Tensor::rand(0f32, VOCAB as f32, (BATCH, SEQ), &Device::Cpu).unwrap().to_dtype(DType::U32).unwrap();
    let labels = ids.to_dtype(DType::I64).unwrap();
    let mut times = Vec::new();
    for run in 0..6 {
        let start = Instant::now();
        let out = model.label_logps(&ids, &BatchInfo::default(), &labels).unwrap();
        let loss = out.logps.sum_all().unwrap().neg().unwrap();
        loss.backward().unwrap();
        if run > 0 {
            times.push(start.elapsed());
        }
    }
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let registry = Registry::with_builtins().unwrap();
    let (moe, dense) = (checkpoint(true), checkpoint(false));
    let t_dense = time_step(&registry, &dense);
    let t_moe = time_step(&registry, &moe);
    let tokens = (BATCH * SEQ) as f64;
    println!(
        "forward+backward, {BATCH}x{SEQ} tokens, {LAYERS} layers, hidden {HIDDEN}: dense MLP {:.1} ms ({:.0} tokens/s), \
         MoE {EXPERTS} experts top {TOP_K} {:.1} ms ({:.0} tokens/s); MoE / dense time = {:.2}",
        t_dense.as_secs_f64() * 1e3,
        tokens / t_dense.as_secs_f64(),
        t_moe.as_secs_f64() * 1e3,
        tokens / t_moe.as_secs_f64(),
        t_moe.as_secs_f64() / t_dense.as_secs_f64()
    );
    for dir in [moe, dense] {
        let _ = std::fs::remove_dir_all(dir);
    }
}
