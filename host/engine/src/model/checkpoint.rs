//! Reading a Hugging Face model folder: `config.json` and the safetensors
//! weights (one file, or shards listed in `model.safetensors.index.json`),
//! memory-mapped and converted to the run's dtype (bitsandbytes 4-bit
//! weights dequantised, see [`super::bnb`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Var};

use crate::backend::WeightStore;
use crate::quant::{Bnb4Weight, QuantizeOnLoad, QuantizedWeight};

/// An error reading a checkpoint; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file is malformed.
    #[error("{path} is not valid JSON")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error (with line and column).
        source: serde_json::Error,
    },
    /// A JSON file lacks a field or has it in the wrong form.
    #[error("{path}: {message}")]
    Field {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The folder has no weights.
    #[error("{0} has neither model.safetensors nor model.safetensors.index.json")]
    NoWeights(PathBuf),
    /// A safetensors file is truncated, corrupt, or holds an unusable tensor.
    #[error("{path}: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Reads and parses a JSON file.
pub fn read_json(path: &Path) -> Result<serde_json::Value, CheckpointError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| CheckpointError::Io { path: path.to_owned(), source: source })?;
    serde_json::from_str(&text).map_err(|source| CheckpointError::Json { path: path.to_owned(), source: source })
}

/// The safetensors files of a model folder, in load order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.is_file() {
        return Err(CheckpointError::NoWeights(dir.to_owned()));
    }
    let index = read_json(&index_path)?;
    let map = index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| CheckpointError::Field {
        path: index_path.clone(),
        message: "`weight_map` is missing or not an object".into(),
    })?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| CheckpointError::Field {
            path: index_path.clone(),
            message: format!("the shard of `{tensor}` is not a file name"),
        })?;
        shards.insert(file.to_owned());
    }
    Ok(shards.into_iter().map(|f| dir.join(f)).collect())
}

/// Whether loaded parameters are frozen tensors or trainable [`Var`]s.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Trainable {
    /// Every parameter is a frozen tensor (inference, adapters).
    None,
    /// Every parameter is a `Var` (full fine-tuning, gradient checks).
    All,
}

/// Loads every tensor of `files` (memory-mapped) as `dtype` on `device`,
/// linear layers quantised to 4 bits one by one when `quantize` asks.
pub fn load_weights(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
    trainable: Trainable,
    quantize: Option<QuantizeOnLoad>,
) -> Result<WeightStore, CheckpointError> {
    let mut store = WeightStore::new();
    for path in files {
        let bad = |message: String| CheckpointError::Safetensors { path: path.clone(), message };
        if !path.is_file() {
            return Err(bad("the shard is missing".into()));
        }
        // SAFETY: the file is mapped read-only; oxtune does not write
        // checkpoints it is reading.
        let tensors = unsafe { MmapedSafetensors::new(path) }.map_err(|e| bad(e.to_string()))?;
        let names: std::collections::HashSet<String> = tensors.tensors().into_iter().map(|(n, _)| n).collect();
        for name in &names {
            let name = name.clone();
            if super::bnb::is_quant_state(&name) {
                continue;
            }
            let tensor = match super::bnb::read_parts(&tensors, &names, &name).map_err(&bad)? {
                Some(parts) => {
                    let weight = Bnb4Weight::new(&parts).map_err(|e| bad(format!("`{name}`: {e}")))?;
                    let weight = QuantizedWeight::Bnb4(weight);
                    if trainable == Trainable::None {
                        // Frozen: kept in 4 bits.
                        store.insert_quantized(name, weight);
                        continue;
                    }
                    // Trained in full: dequantised, as its parameter.
                    weight.dequantize(dtype, device)
                }
                None => tensors.load(&name, device).and_then(|t| t.to_dtype(dtype)),
            }
            .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            match trainable {
                Trainable::None => {
                    store.insert_loaded(name.clone(), tensor, quantize).map_err(|e| bad(format!("`{name}`: {e}")))?
                }
                Trainable::All => {
                    store.insert_var(name.clone(), Var::from_tensor(&tensor).map_err(|e| bad(e.to_string()))?)
                }
            }
        }
    }
    Ok(store)
}
