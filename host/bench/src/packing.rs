//! `oxtune bench train --packing`: LoRA SFT on rows of skewed lengths
//! (log-normal, as real chat data), padded batches against the same rows
//! packed into full rows, in tokens the model learns from per second.

use oxtune_data::{pack_rows, EncodedRow};
use oxtune_engine::rng::SplitMix64;
use oxtune_engine::LoadedModel;
use oxtune_registry::Registry;
use oxtune_train::{train, train_with, PackedSftObjective, TrainConfig};
use serde_json::{json, Value};

use crate::{peak_memory_mb, BenchError, TrainBench};

/// Shortest synthetic row, in tokens.
const SHORTEST: usize = 16;

/// `count` rows whose lengths are log-normal (median `longest / 8`, σ 1)
/// clamped to `[16, longest]`, with ids below `vocab`.
pub fn skewed_rows(count: usize, longest: usize, vocab: u32, seed: u64) -> Vec<EncodedRow> {
    let mut rng = SplitMix64::new(seed);
    let median = (longest as f64 / 8.0).max(SHORTEST as f64);
    (0..count)
        .map(|r| {
            let length = (median * rng.normal().exp()).round().clamp(SHORTEST as f64, longest as f64) as usize;
            let ids: Vec<u32> = (0..length).map(|i| ((r * 7919 + i * 104_729 + 13) as u32) % vocab).collect();
            let labels = ids.iter().map(|&t| i64::from(t)).collect();
            EncodedRow { input_ids: ids, labels, media: None }
        })
        .collect()
}

/// Mean tokens/s of the steps after the first (the warm-up).
fn timed_tokens_per_s(metrics: &[oxtune_train::StepMetrics]) -> f64 {
    let timed = &metrics[1.min(metrics.len())..];
    let tokens: f64 = timed.iter().map(|m| m.tokens_per_s * m.seconds).sum();
    let seconds: f64 = timed.iter().map(|m| m.seconds).sum();
    tokens / seconds.max(1e-9)
}

/// Trains `model` (a LoRA adapter is added) on the same skewed rows,
/// padded `bench.batch_size` at a time and packed into rows of
/// `bench.seq_len`; returns both throughputs and their ratio.
pub fn packing(
    registry: &Registry,
    model: &mut LoadedModel,
    vocab: usize,
    bench: &TrainBench,
) -> Result<Value, BenchError> {
    let config =
        json!({"r": bench.lora_rank, "lora_alpha": 2 * bench.lora_rank, "target_modules": bench.target_modules});
    model.add_adapter(registry, &bench.tuner, config, 0)?;
    model.set_gradient_checkpointing(bench.gradient_checkpointing);
    let steps = bench.steps + 1;
    let rows = skewed_rows(bench.batch_size * steps, bench.seq_len, vocab.max(1) as u32, 17);
    let real: usize = rows.iter().map(|r| r.input_ids.len()).sum();
    let padded_config =
        TrainConfig { batch_size: bench.batch_size, max_steps: Some(steps), learning_rate: 1e-4, ..Default::default() };
    let padded = timed_tokens_per_s(&train(model, &rows, &[], &padded_config)?);
    let packs = pack_rows(&rows, bench.seq_len).map_err(BenchError::Invalid)?;
    let per_step = packs.len().div_ceil(steps);
    let packed_config =
        TrainConfig { batch_size: per_step, max_steps: Some(steps), learning_rate: 1e-4, ..Default::default() };
    let packed = timed_tokens_per_s(&train_with(model, &PackedSftObjective, &packs, &[], &packed_config)?);
    Ok(json!({
        "benchmark": "packing",
        "rows": rows.len(),
        "mean_row_tokens": real as f64 / rows.len() as f64,
        "longest_row_tokens": rows.iter().map(|r| r.input_ids.len()).max(),
        "padded_batch_size": bench.batch_size,
        "packs": packs.len(),
        "packs_per_step": per_step,
        "pack_fill": real as f64 / (packs.len() * bench.seq_len) as f64,
        "padded_tokens_per_s": padded,
        "packed_tokens_per_s": packed,
        "packed_over_padded": packed / padded,
        "peak_memory_mb": peak_memory_mb(),
    }))
}
