//! The peers benchmarks are compared with, run right after oxtune's
//! measurement (the machine's speed drifts; only figures taken back to back
//! compare): PyTorch + PEFT training the same model, shape and tuner
//! (`peer/peft_train.py`: `torch`, `transformers`, `peft`, and `gguf` for a
//! GGUF model), and Hugging Face `datasets` + a transformers tokenizer
//! encoding the same file (`peer/encode_peer.py`: `transformers`,
//! `datasets`, and `gguf` for a GGUF model).
//!
//! The peer programs are embedded in the binary and written to a scratch
//! folder when they run.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::{BenchError, TrainBench};

/// The training peer's source.
const PEFT_TRAIN: &str = include_str!("../peer/peft_train.py");
/// The encoding peer's source.
const ENCODE_PEER: &str = include_str!("../peer/encode_peer.py");

/// A Python interpreter with the peer's packages, and how many threads it may use.
#[derive(Clone, Debug)]
pub struct PythonPeer {
    /// The interpreter (`/tmp/peer/bin/python`).
    pub python: PathBuf,
    /// Torch's intra-op threads, or `datasets` worker processes: the same
    /// as oxtune's threads for a fair ratio.
    pub threads: usize,
}

impl PythonPeer {
    /// Trains `bench`'s shape and tuner on `model` (a Hugging Face folder or
    /// a GGUF file) with PyTorch + PEFT and returns the peer's record.
    pub fn train(&self, model: &Path, bench: &TrainBench) -> Result<Value, BenchError> {
        let tuner = match bench.tuner.as_str() {
            "lora" | "full" => bench.tuner.as_str(),
            other => {
                return Err(BenchError::Invalid(format!("the PyTorch peer trains `lora` or `full`, not `{other}`")))
            }
        };
        let mut command = Command::new(&self.python);
        command
            .arg(write_script("peft_train.py", PEFT_TRAIN)?)
            .arg(model)
            .args(["--batch", &bench.batch_size.to_string(), "--seq", &bench.seq_len.to_string()])
            .args(["--steps", &bench.steps.to_string(), "--tuner", tuner, "--r", &bench.lora_rank.to_string()])
            .args(["--targets", &bench.target_modules.join(","), "--threads", &self.threads.to_string()])
            .args(["--dtype", &bench.dtype])
            .args(bench.gradient_checkpointing.then_some("--gradient-checkpointing"));
        run_peer(&self.python, command)
    }

    /// Encodes `data` (the JSONL `oxtune bench encode` wrote) with `model`'s
    /// tokenizer and chat template through Hugging Face `datasets`, with as
    /// many worker processes as oxtune's threads, caching into `scratch`;
    /// returns the peer's record.
    pub fn encode(&self, model: &Path, data: &Path, scratch: &Path) -> Result<Value, BenchError> {
        let mut command = Command::new(&self.python);
        command
            .arg(write_script("encode_peer.py", ENCODE_PEER)?)
            .arg(model)
            .arg(data)
            .args(["--threads", &self.threads.to_string()])
            .arg("--scratch")
            .arg(scratch);
        run_peer(&self.python, command)
    }
}

/// Runs a peer program and returns the last JSON record it printed.
fn run_peer(python: &Path, mut command: Command) -> Result<Value, BenchError> {
    let output =
        command.output().map_err(|e| BenchError::Invalid(format!("cannot run the peer {}: {e}", python.display())))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(BenchError::Invalid(format!(
            "the peer {} failed ({}): {}",
            python.display(),
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .ok_or_else(|| BenchError::Invalid(format!("the peer {} printed no JSON record", python.display())))
}

/// Writes a peer program to a scratch folder as `name` (through a rename,
/// so a concurrent run never reads half a file) and returns its path.
fn write_script(name: &str, source: &str) -> Result<PathBuf, BenchError> {
    let dir = std::env::temp_dir().join("oxtune-peer");
    let io =
        |e: std::io::Error| BenchError::Invalid(format!("cannot write the peer program to {}: {e}", dir.display()));
    std::fs::create_dir_all(&dir).map_err(io)?;
    let path = dir.join(name);
    let partial = dir.join(format!("{name}.{}", std::process::id()));
    std::fs::write(&partial, source).map_err(io)?;
    std::fs::rename(&partial, &path).map_err(io)?;
    Ok(path)
}

/// oxtune's figures over the peer's for one shape: tokens/s (above 1:
/// oxtune is faster) and peak memory (below 1: oxtune needs less).
pub fn ratio(ours: &Value, peer: &Value) -> Value {
    let of = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
    let divide = |k: &str| match (of(ours, k), of(peer, k)) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    json!({
        "ratio": "oxtune / peer",
        "batch_size": ours.get("batch_size"),
        "seq_len": ours.get("seq_len"),
        "rows": ours.get("rows"),
        "tokens_per_s": divide("tokens_per_s"),
        "peak_memory": divide("peak_memory_mb"),
    })
}
