//! `oxtune-bench`: the measurements behind `oxtune bench`. Each returns
//! JSON records (one per configuration) with the figure and, beside it,
//! the bound it is measured against in the same run: decode speed against
//! this machine's memory bandwidth, a training step's FLOP/s against its
//! f32 matmul peak, a GRPO step's rollout share, a vision-language step's
//! vision-encoder share.

#![warn(missing_docs)]

use std::time::Instant;

use candle_core::{DType, Tensor};
use oxtune_data::{EncodeError, EncodedRow, PromptRow, TextAssets};
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::memory::peak_resident_bytes;
use oxtune_engine::model::OUTPUT_LAYER;
use oxtune_engine::{LoadedModel, ModelError};
use oxtune_registry::Registry;
use oxtune_train::align::grpo::{GrpoConfig, GrpoLossType, GrpoObjective, RewardOnError, ScaleRewards};
use oxtune_train::align::objective::Reference;
use oxtune_train::{TrainConfig, TrainError};
use serde_json::{json, Value};

pub mod encode;
pub mod packing;
pub mod peer;
pub mod serve;
pub mod vl;

/// A benchmark that could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] Box<ModelError>),
    /// A tensor computation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// The training loop failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// Encoding the benchmark's rows failed.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The benchmark does not apply to this model, or its input failed.
    #[error("{0}")]
    Invalid(String),
}

impl From<ModelError> for BenchError {
    fn from(e: ModelError) -> Self {
        BenchError::Model(Box::new(e))
    }
}

pub(crate) fn peak_memory_mb() -> Option<f64> {
    peak_resident_bytes().map(|b| b as f64 / 1e6)
}

/// The best copy bandwidth (bytes/s) of a 256 MiB buffer, over a few tries.
fn copy_bandwidth() -> f64 {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    // A copy reads and writes every byte.
    2.0 * n as f64 / best
}

/// The best f32 matmul rate (FLOP/s) of candle on this machine: square
/// products of the size that dominates a training step, a few tries each.
fn matmul_peak(device: &candle_core::Device) -> candle_core::Result<f64> {
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        std::hint::black_box(a.matmul(&b)?);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best)
}

/// Bytes one decode step reads: every weight, except an untied token
/// embedding, of which it reads a row.
fn bytes_per_step(model: &LoadedModel) -> u64 {
    let store = model.weights();
    let tied = !store.contains("lm_head.weight");
    store
        .names()
        .into_iter()
        .filter(|n| tied || *n != "model.embed_tokens.weight")
        .map(|n| match (store.get(n), store.quantized(n)) {
            (Some(t), _) => (t.elem_count() * t.dtype().size_in_bytes()) as u64,
            // Kept quantised: its blocks are what a step reads.
            (None, Some(q)) => q.bytes() as u64,
            (None, None) => 0,
        })
        .sum()
}

/// Matmul FLOPs of one adapter-training step over `tokens` tokens in rows of
/// `seq_len`: the frozen linear layers run forward and pass gradients back
/// (2 + 2 FLOPs per weight per token; no weight gradient), attention scores
/// and mixing run forward and twice backward. The adapter's own matmuls are
/// left out (a rank-8 adapter adds under 2%).
fn adapter_step_flops(model: &LoadedModel, tokens: usize, seq_len: usize) -> f64 {
    let store = model.weights();
    let config = model.config();
    let matrix_weights: usize = model
        .linear_layers()
        .iter()
        .map(|layer| format!("{layer}.weight"))
        .map(|name| match (store.get(&name), store.quantized(&name)) {
            (Some(t), _) => t.elem_count(),
            // Kept quantised: the same products, through dequantised panels.
            (None, Some(q)) => q.dims().0 * q.dims().1,
            (None, None) => 0,
        })
        .sum();
    // A tied output layer reuses the embedding matrix.
    let output_layer = if store.contains(&format!("{OUTPUT_LAYER}.weight")) {
        0
    } else {
        store.get("model.embed_tokens.weight").map_or(0, |t| t.elem_count())
    };
    let get = |k: &str| config.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as f64;
    let head_dim = config
        .get("head_dim")
        .and_then(|v| v.as_u64())
        .map(|d| d as f64)
        .unwrap_or_else(|| get("hidden_size") / get("num_attention_heads").max(1.0));
    let attention_width = get("num_attention_heads") * head_dim;
    let attention = 3.0 * 4.0 * get("num_hidden_layers") * tokens as f64 * seq_len as f64 * attention_width;
    4.0 * (matrix_weights + output_layer) as f64 * tokens as f64 + attention
}

/// `oxtune bench infer`: prefill and decode throughput.
#[derive(Clone, Debug)]
pub struct InferBench {
    /// Batch sizes to measure.
    pub batch_sizes: Vec<usize>,
    /// Prompt tokens per row.
    pub prompt_tokens: usize,
    /// Decoded tokens per row.
    pub new_tokens: usize,
}

/// Measures prefill and greedy decode of `model` at each batch size, with
/// decode speed against the memory-bandwidth bound (weight bytes read per
/// step vs. this machine's copy bandwidth).
pub fn infer(model: &LoadedModel, vocab: usize, bench: &InferBench) -> Result<Vec<Value>, BenchError> {
    let step_bytes = bytes_per_step(model);
    let vocab = vocab.max(1) as u32;
    // (batch, prefill seconds, decode seconds, peak memory so far)
    let mut runs = Vec::new();
    for &batch in &bench.batch_sizes {
        let ids: Vec<u32> = (0..batch * bench.prompt_tokens).map(|i| (i as u32 * 7919 + 13) % vocab).collect();
        let prompt = Tensor::from_vec(ids, (batch, bench.prompt_tokens), model.device())?;
        let mut cache = model.new_kv_cache();
        let start = Instant::now();
        let logits = model.forward_last(&prompt, &BatchInfo::default(), Some(&mut cache), None)?;
        let mut next = oxtune_engine::generate::last_argmax(&logits)?;
        let prefill = start.elapsed().as_secs_f64();
        let start = Instant::now();
        for _ in 0..bench.new_tokens {
            let input = Tensor::from_vec(next, (batch, 1), model.device())?.to_dtype(DType::U32)?;
            let logits = model.forward_last(&input, &BatchInfo::default(), Some(&mut cache), None)?;
            next = oxtune_engine::generate::last_argmax(&logits)?;
        }
        runs.push((batch, prefill, start.elapsed().as_secs_f64(), peak_memory_mb()));
    }
    // Measured last: its 512 MiB of buffers would otherwise be the peak.
    let bandwidth = copy_bandwidth();
    let mut records = Vec::new();
    for (batch, prefill, decode, peak) in runs {
        let decode_tps = (batch * bench.new_tokens) as f64 / decode;
        let bound_tps = batch as f64 * bandwidth / step_bytes as f64;
        records.push(json!({
            "batch": batch,
            "prompt_tokens": bench.prompt_tokens,
            "new_tokens": bench.new_tokens,
            "prefill_tokens_per_s": (batch * bench.prompt_tokens) as f64 / prefill,
            "decode_tokens_per_s": decode_tps,
            "weight_bytes_per_step": step_bytes,
            "copy_bandwidth_gb_per_s": bandwidth / 1e9,
            "decode_bandwidth_bound_tokens_per_s": bound_tps,
            "decode_vs_bound": decode_tps / bound_tps,
            "peak_memory_mb": peak,
            "kv_cache_dtype": format!("{:?}", model.kv_cache_dtype()).to_lowercase(),
        }));
    }
    Ok(records)
}

/// `oxtune bench train`: a LoRA (or other tuner) SFT step.
#[derive(Clone, Debug)]
pub struct TrainBench {
    /// The tuner to train.
    pub tuner: String,
    /// LoRA rank.
    pub lora_rank: usize,
    /// Modules to adapt (names, or `all-linear`).
    pub target_modules: Vec<String>,
    /// Rows per step.
    pub batch_size: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Timed steps (after one untimed warm-up step).
    pub steps: usize,
    /// Recompute each layer's activations in the backward pass.
    pub gradient_checkpointing: bool,
    /// The compute dtype the model was loaded in (`f32`, `bf16`, `f16`),
    /// which the peer loads its model in too.
    pub dtype: String,
}

/// Trains `model` (a tuner is attached) on synthetic rows and measures
/// step time, tokens/s and FLOP/s against this machine's f32 matmul peak.
pub fn train(
    registry: &Registry,
    model: &mut LoadedModel,
    vocab: usize,
    bench: &TrainBench,
) -> Result<Value, BenchError> {
    let peak = matmul_peak(model.device())?;
    let targets: Vec<String> = if bench.target_modules.iter().any(|t| t == "all-linear") {
        model.all_linear_modules()
    } else {
        bench.target_modules.clone()
    };
    let config = json!({"r": bench.lora_rank, "lora_alpha": 2 * bench.lora_rank, "target_modules": targets});
    model.add_adapter(registry, &bench.tuner, config, 0)?;
    model.set_gradient_checkpointing(bench.gradient_checkpointing);
    let vocab = vocab.max(1) as u32;
    let rows: Vec<EncodedRow> = (0..bench.batch_size * (bench.steps + 1))
        .map(|r| {
            let ids: Vec<u32> =
                (0..bench.seq_len).map(|i| ((r * bench.seq_len + i) as u32 * 7919 + 13) % vocab).collect();
            let labels = ids.iter().map(|&t| t as i64).collect();
            EncodedRow { input_ids: ids, labels, media: None }
        })
        .collect();
    let config = TrainConfig {
        batch_size: bench.batch_size,
        max_steps: Some(bench.steps + 1),
        learning_rate: 1e-4,
        ..Default::default()
    };
    let metrics = oxtune_train::train(model, &rows, &[], &config)?;
    let timed = &metrics[1..];
    let tokens_per_s = timed.iter().map(|m| m.tokens_per_s).sum::<f64>() / timed.len().max(1) as f64;
    let tokens = bench.batch_size * bench.seq_len;
    let flops = adapter_step_flops(model, tokens, bench.seq_len);
    let achieved = flops * tokens_per_s / tokens as f64;
    Ok(json!({
        "tuner": bench.tuner,
        "lora_rank": bench.lora_rank,
        "target_modules": bench.target_modules,
        "batch_size": bench.batch_size,
        "seq_len": bench.seq_len,
        "gradient_checkpointing": bench.gradient_checkpointing,
        "dtype": bench.dtype,
        "timed_steps": timed.len(),
        "seconds_per_step": tokens as f64 / tokens_per_s,
        "tokens_per_s": tokens_per_s,
        "flops_per_step": flops,
        "achieved_gflop_per_s": achieved / 1e9,
        "matmul_peak_gflop_per_s": peak / 1e9,
        "fraction_of_peak": achieved / peak,
        "peak_memory_mb": peak_memory_mb(),
    }))
}

/// `oxtune bench grpo`: rollout vs update time of GRPO steps.
#[derive(Clone, Debug)]
pub struct GrpoBench {
    /// Completions per prompt (G).
    pub num_generations: usize,
    /// Prompts per step.
    pub prompts: usize,
    /// Tokens generated per completion (at most).
    pub max_completion_length: usize,
    /// Timed steps.
    pub steps: usize,
}

/// Runs GRPO steps (LoRA r8 on q/v, the `length` reward, β = 0.04) and
/// measures each step's rollout and update times.
pub fn grpo(
    registry: &Registry,
    model: &mut LoadedModel,
    assets: &TextAssets,
    bench: &GrpoBench,
) -> Result<Vec<Value>, BenchError> {
    let config = json!({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]});
    model.add_adapter(registry, "lora", config, 0)?;
    let prompts: Vec<PromptRow> = (0..bench.prompts * bench.steps)
        .map(|i| {
            let messages = [json!({"role": "user", "content": format!("Write one sentence about the number {i}.")})];
            let request =
                oxtune_data::ChatRequest { messages: &messages, add_generation_prompt: true, ..Default::default() };
            let text = assets.render_chat(&request)?;
            let ids = assets.tokenizer.encode(&text, false)?;
            Ok(PromptRow { ids, text, columns: Default::default() })
        })
        .collect::<Result<_, oxtune_data::text::TextError>>()
        .map_err(EncodeError::from)?;
    let config = GrpoConfig {
        num_generations: bench.num_generations,
        max_completion_length: bench.max_completion_length,
        temperature: 1.0,
        top_p: 1.0,
        epsilon: 0.2,
        epsilon_high: 0.2,
        beta: 0.04,
        loss_type: GrpoLossType::Grpo,
        scale_rewards: ScaleRewards::Group,
        num_iterations: 1,
        reward_funcs: vec!["length".into()],
        reward_weights: vec![1.0],
        on_error: RewardOnError::Fail,
        seed: 0,
    };
    let eos = assets.eos_token_ids.clone();
    let objective = GrpoObjective::new(config, registry, &assets.tokenizer, eos, Reference::AdapterOff)
        .map_err(|e| BenchError::Invalid(e.to_string()))?;
    let train_config = TrainConfig {
        batch_size: bench.prompts,
        max_steps: Some(bench.steps),
        learning_rate: 1e-5,
        ..Default::default()
    };
    let metrics = oxtune_train::train_with(model, &objective, &prompts, &[], &train_config)?;
    Ok(metrics
        .iter()
        .map(|m| {
            let rollout = m.extra.get("rollout_s").copied().unwrap_or(0.0);
            json!({
                "step": m.step,
                "prompts": bench.prompts,
                "num_generations": bench.num_generations,
                "completions/mean_length": m.extra.get("completions/mean_length"),
                "step_s": m.seconds,
                "rollout_s": rollout,
                "update_s": m.seconds - rollout,
                "rollout_share": rollout / m.seconds,
                "rollout_tokens_per_s": m.extra.get("rollout_tokens_per_s"),
                "peak_memory_mb": peak_memory_mb(),
            })
        })
        .collect())
}
