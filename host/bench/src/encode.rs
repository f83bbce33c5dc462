//! Encoding throughput and memory of a streamed dataset (`oxtune bench
//! encode`): a generated JSONL of conversations is encoded into a fresh
//! tokenised dataset as `--streaming` does, and the record gives rows/s,
//! tokens/s and the process's peak memory beside its memory before
//! encoding — which should not grow with the row count — and, with a peer,
//! Hugging Face `datasets` encoding the same file.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use oxtune_data::{DataOptions, Encoder, Objective, StreamOptions};
use oxtune_engine::rng::SplitMix64;
use oxtune_engine::LoadedModel;
use oxtune_registry::Registry;
use serde_json::{json, Value};

use crate::peer::{ratio, PythonPeer};
use crate::{peak_memory_mb, BenchError};

/// What to encode.
#[derive(Clone, Debug)]
pub struct EncodeBench {
    /// Conversations in the generated file.
    pub rows: usize,
    /// Encoding threads.
    pub threads: usize,
    /// Hugging Face `datasets` + transformers encoding the same file right
    /// after oxtune, with as many worker processes.
    pub peer: Option<PythonPeer>,
}

const WORDS: [&str; 16] = [
    "the", "river", "light", "keeper", "stone", "quietly", "over", "morning", "harbour", "winds", "carried", "old",
    "lantern", "across", "bright", "shore",
];

/// Writes `rows` two-turn conversations of 8 to 120 words each (seeded).
pub fn write_conversations(path: &Path, rows: usize) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut rng = SplitMix64::new(7);
    let text = |rng: &mut SplitMix64| {
        let n = 8 + (rng.next_u64() % 113) as usize;
        (0..n).map(|_| WORDS[(rng.next_u64() % WORDS.len() as u64) as usize]).collect::<Vec<_>>().join(" ")
    };
    for _ in 0..rows {
        let (question, answer) = (text(&mut rng), text(&mut rng));
        let row = json!({"messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]});
        writeln!(out, "{row}")?;
    }
    out.flush()
}

/// Generates the file in `scratch`, encodes it there with `assets`'
/// template and tokenizer, and reports the figures; with a peer, its
/// record (on `model_path`'s tokenizer) and the ratio follow.
pub fn encode(
    registry: &Registry,
    model: &LoadedModel,
    model_path: &Path,
    assets: &oxtune_data::TextAssets,
    bench: &EncodeBench,
    scratch: &Path,
) -> Result<Vec<Value>, BenchError> {
    let io = |e: std::io::Error| BenchError::Invalid(format!("{}: {e}", scratch.display()));
    std::fs::create_dir_all(scratch).map_err(io)?;
    let file = scratch.join(format!("conversations-{}.jsonl", bench.rows));
    write_conversations(&file, bench.rows).map_err(io)?;
    let file_mb = std::fs::metadata(&file).map_err(io)?.len() as f64 / 1e6;
    let before_mb = peak_memory_mb();
    let options = DataOptions {
        dataset: vec![file.to_string_lossy().parse().map_err(BenchError::Invalid)?],
        max_length: 4096,
        ..DataOptions::default()
    };
    let encoder = Encoder { registry, assets, model, media_options: Value::Null, options: &options };
    let stream =
        StreamOptions { cache_dir: scratch.join("cache"), reuse: false, threads: bench.threads, progress: false };
    let started = Instant::now();
    let streamed = encoder.prepare_streamed("sft", |e, record| e.row(record, Objective::AssistantTurns), &stream)?;
    let seconds = started.elapsed().as_secs_f64();
    let tokens: usize = streamed.files.iter().map(|f| f.tokens).sum();
    let rows: usize = streamed.files.iter().map(|f| f.rows).sum();
    drop(streamed);
    let ours = json!({
        "bench": "encode",
        "rows": rows,
        "file_mb": file_mb,
        "threads": bench.threads,
        "seconds": seconds,
        "rows_per_s": rows as f64 / seconds,
        "tokens_per_s": tokens as f64 / seconds,
        "memory_before_mb": before_mb,
        "peak_memory_mb": peak_memory_mb(),
    });
    let mut records = vec![ours.clone()];
    if let Some(peer) = &bench.peer {
        let theirs = peer
            .encode(model_path, &file, scratch)
            .unwrap_or_else(|e| json!({"peer": "datasets+transformers", "error": e.to_string()}));
        records.extend([theirs.clone(), ratio(&ours, &theirs)]);
    }
    let _ = std::fs::remove_dir_all(scratch);
    Ok(records)
}
