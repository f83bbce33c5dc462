//! `oxtune bench infer`: how fast a model prefills and decodes on this
//! machine, against the memory-bandwidth bound of decoding (every step
//! reads every weight once), measured in the same run.

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

/// Peak resident memory of this process in bytes (Linux), if known.
fn peak_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
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

/// Runs `oxtune bench infer`.
pub fn run(global: &GlobalArgs, command: &BenchCommand) -> anyhow::Result<()> {
    let BenchCommand::Infer(args) = command;
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
                "peak_memory_mb": peak_memory().map(|b| b as f64 / 1e6),
            })
        );
    }
    Ok(())
}
