//! `oxtune bench`: how fast this machine runs a model, each figure printed
//! beside a bound measured in the same run.
//!
//! - `bench infer`: prefill and decode, against the memory-bandwidth bound
//!   of decoding (every step reads every weight once).
//! - `bench train`: tokens/s of adapter (LoRA) SFT steps, with the FLOP/s
//!   they achieve against the machine's measured f32 matmul peak.
//! - `bench grpo`: a GRPO step's split between rollout (batched generation
//!   of G completions per prompt) and update, and the rollout tokens/s.
//! - `bench vl` ([`super::bench_vl`]): a vision-language step's split
//!   between the vision encoder and the language model.

use std::time::Instant;

use candle_core::{DType, Tensor};
use serde_json::json;

use super::model_args::ModelArgs;
use super::GlobalArgs;
use crate::backend::{BatchInfo, KvCache};
use crate::model::LoadedModel;

/// What to benchmark.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode throughput of a model at several batch sizes.
    Infer(InferBenchArgs),
    /// Training-step throughput (tokens/s, FLOP/s vs the matmul peak) of LoRA SFT.
    Train(TrainBenchArgs),
    /// GRPO step time: rollout vs update, and rollout tokens/s.
    Grpo(GrpoBenchArgs),
    /// A vision-language training step: the vision encoder's and the language model's shares.
    Vl(super::bench_vl::VlBenchArgs),
}

/// Arguments of `oxtune bench grpo`.
#[derive(Debug, clap::Args)]
pub struct GrpoBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Completions per prompt (G).
    #[arg(long, default_value_t = 8)]
    pub num_generations: usize,
    /// Prompts per step.
    #[arg(long, default_value_t = 2)]
    pub prompts: usize,
    /// Tokens generated per completion (at most).
    #[arg(long, default_value_t = 32)]
    pub max_completion_length: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
}

/// Arguments of `oxtune bench train`.
#[derive(Debug, clap::Args)]
pub struct TrainBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The tuner to train.
    #[arg(long, default_value = "lora")]
    pub tuner: String,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    /// Modules to adapt (comma-separated names, or `all-linear`).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    pub target_modules: Vec<String>,
    /// Rows per step.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
}

/// Arguments of `oxtune bench infer`.
#[derive(Debug, clap::Args)]
pub struct InferBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch_sizes: Vec<usize>,
    /// Prompt tokens per row.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Decoded tokens per row.
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
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
fn matmul_peak(device: &candle_core::Device) -> anyhow::Result<f64> {
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
        .filter_map(|n| store.get(n))
        .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum()
}

/// Runs `oxtune bench`.
pub fn run(global: &GlobalArgs, command: &BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Infer(args) => infer(global, args),
        BenchCommand::Train(args) => train(global, args),
        BenchCommand::Grpo(args) => grpo(global, args),
        BenchCommand::Vl(args) => super::bench_vl::run(global, args),
    }
}

/// Runs `oxtune bench grpo`: LoRA r8 on q/v, the `length` reward, β = 0.04.
fn grpo(global: &GlobalArgs, args: &GrpoBenchArgs) -> anyhow::Result<()> {
    use crate::align::grpo::{GrpoConfig, GrpoLossType, GrpoObjective, RewardOnError, ScaleRewards};
    let registry = global.registry()?;
    let mut text = args.model.load(&registry)?;
    let config = json!({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]});
    text.model.add_adapter(&registry, "lora", config, 0)?;
    let prompts: Vec<crate::align::grpo::GrpoPrompt> = (0..args.prompts * args.steps)
        .map(|i| {
            let record = json!({"prompt": format!("Write one sentence about the number {i}.")});
            super::grpo::encode_prompt(&registry, &text.assets, None, record.as_object().expect("an object"))
        })
        .collect::<anyhow::Result<_>>()?;
    let config = GrpoConfig {
        num_generations: args.num_generations,
        max_completion_length: args.max_completion_length,
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
    let eos = text.assets.eos_token_ids.clone();
    let objective = GrpoObjective::new(
        config,
        &registry,
        &text.assets.tokenizer,
        eos,
        crate::align::objective::Reference::AdapterOff,
    )
    .map_err(anyhow::Error::msg)?;
    let train_config = crate::train::TrainConfig {
        batch_size: args.prompts,
        max_steps: Some(args.steps),
        learning_rate: 1e-5,
        ..Default::default()
    };
    let metrics = crate::train::train_with(&text.model, &objective, &prompts, &[], &train_config)?;
    for m in &metrics {
        let rollout = m.extra.get("rollout_s").copied().unwrap_or(0.0);
        println!(
            "{}",
            json!({
                "step": m.step,
                "prompts": args.prompts,
                "num_generations": args.num_generations,
                "completions/mean_length": m.extra.get("completions/mean_length"),
                "step_s": m.seconds,
                "rollout_s": rollout,
                "update_s": m.seconds - rollout,
                "rollout_share": rollout / m.seconds,
                "rollout_tokens_per_s": m.extra.get("rollout_tokens_per_s"),
                "peak_memory_mb": crate::memory::peak_resident_bytes().map(|b| b as f64 / 1e6),
            })
        );
    }
    Ok(())
}

/// Matmul FLOPs of one adapter-training step over `tokens` tokens in rows of
/// `seq_len`: the frozen linear layers run forward and pass gradients back
/// (2 + 2 FLOPs per weight per token; no weight gradient), attention scores
/// and mixing run forward and twice backward. The adapter's own matmuls are
/// left out (a rank-8 adapter adds under 2%).
fn adapter_step_flops(model: &LoadedModel, tokens: usize, seq_len: usize) -> f64 {
    let store = model.weights();
    let config = model.config();
    let matrix_weights: usize = store
        .names()
        .into_iter()
        .filter(|n| n.ends_with(".weight") && !n.contains("embed_tokens"))
        .filter_map(|n| store.get(n))
        .filter(|t| t.rank() == 2)
        .map(|t| t.elem_count())
        .sum();
    // A tied output layer reuses the embedding matrix.
    let output_layer = if store.contains("lm_head.weight") {
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

/// Runs `oxtune bench train`.
fn train(global: &GlobalArgs, args: &TrainBenchArgs) -> anyhow::Result<()> {
    let registry = global.registry()?;
    let mut text = args.model.load(&registry)?;
    let peak = matmul_peak(text.model.device())?;
    let linear = super::sft::linear_modules(&text.model);
    let targets: Vec<String> =
        if args.target_modules.iter().any(|t| t == "all-linear") { linear } else { args.target_modules.clone() };
    let config = json!({"r": args.lora_rank, "lora_alpha": 2 * args.lora_rank, "target_modules": targets});
    text.model.add_adapter(&registry, &args.tuner, config, 0)?;
    let vocab = text.assets.tokenizer.vocab_size() as u32;
    let rows: Vec<crate::text::EncodedRow> = (0..args.batch_size * (args.steps + 1))
        .map(|r| {
            let ids: Vec<u32> =
                (0..args.seq_len).map(|i| ((r * args.seq_len + i) as u32 * 7919 + 13) % vocab.max(1)).collect();
            let labels = ids.iter().map(|&t| t as i64).collect();
            crate::text::EncodedRow { input_ids: ids, labels, media: None }
        })
        .collect();
    let config = crate::train::TrainConfig {
        batch_size: args.batch_size,
        max_steps: Some(args.steps + 1),
        learning_rate: 1e-4,
        ..Default::default()
    };
    let metrics = crate::train::train(&text.model, &rows, &[], &config)?;
    let timed = &metrics[1..];
    let tokens_per_s = timed.iter().map(|m| m.tokens_per_s).sum::<f64>() / timed.len().max(1) as f64;
    let tokens = args.batch_size * args.seq_len;
    let flops = adapter_step_flops(&text.model, tokens, args.seq_len);
    let achieved = flops * tokens_per_s / tokens as f64;
    println!(
        "{}",
        json!({
            "tuner": args.tuner,
            "lora_rank": args.lora_rank,
            "target_modules": args.target_modules,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "timed_steps": timed.len(),
            "seconds_per_step": tokens as f64 / tokens_per_s,
            "tokens_per_s": tokens_per_s,
            "flops_per_step": flops,
            "achieved_gflop_per_s": achieved / 1e9,
            "matmul_peak_gflop_per_s": peak / 1e9,
            "fraction_of_peak": achieved / peak,
            "peak_memory_mb": crate::memory::peak_resident_bytes().map(|b| b as f64 / 1e6),
        })
    );
    Ok(())
}

/// Runs `oxtune bench infer`.
fn infer(global: &GlobalArgs, args: &InferBenchArgs) -> anyhow::Result<()> {
    let registry = global.registry()?;
    let text = args.model.load(&registry)?;
    let model = &text.model;
    let bandwidth = copy_bandwidth();
    let step_bytes = bytes_per_step(model);
    let vocab = text.assets.tokenizer.vocab_size() as u32;
    for &batch in &args.batch_sizes {
        let ids: Vec<u32> = (0..batch * args.prompt_tokens).map(|i| (i as u32 * 7919 + 13) % vocab.max(1)).collect();
        let prompt = Tensor::from_vec(ids, (batch, args.prompt_tokens), model.device())?;
        let mut cache = KvCache::new();
        let start = Instant::now();
        let logits = model.forward(&prompt, &BatchInfo::default(), Some(&mut cache), None)?;
        let mut next = crate::generate::last_argmax(&logits)?;
        let prefill = start.elapsed().as_secs_f64();
        let start = Instant::now();
        for _ in 0..args.new_tokens {
            let input = Tensor::from_vec(next, (batch, 1), model.device())?.to_dtype(DType::U32)?;
            let logits = model.forward(&input, &BatchInfo::default(), Some(&mut cache), None)?;
            next = crate::generate::last_argmax(&logits)?;
        }
        let decode = start.elapsed().as_secs_f64();
        let decode_tps = (batch * args.new_tokens) as f64 / decode;
        let bound_tps = batch as f64 * bandwidth / step_bytes as f64;
        println!(
            "{}",
            json!({
                "batch": batch,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
                "prefill_tokens_per_s": (batch * args.prompt_tokens) as f64 / prefill,
                "decode_tokens_per_s": decode_tps,
                "weight_bytes_per_step": step_bytes,
                "copy_bandwidth_gb_per_s": bandwidth / 1e9,
                "decode_bandwidth_bound_tokens_per_s": bound_tps,
                "decode_vs_bound": decode_tps / bound_tps,
                "peak_memory_mb": crate::memory::peak_resident_bytes().map(|b| b as f64 / 1e6),
            })
        );
    }
    Ok(())
}
