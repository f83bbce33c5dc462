//! `oxtune-export`: what a trained model becomes for the tools people run
//! it with — a merged Hugging Face folder ([`merged`]), a GGUF model or
//! LoRA adapter llama.cpp loads ([`gguf_model`], [`gguf_adapter`]), an
//! Ollama Modelfile ([`ollama`]).
//!
//! Architecture-specific knowledge (GGUF tensor names, hyperparameter
//! keys, row permutations) comes from the model plugin's
//! [`oxtune_plugin_api::gguf::GgufLayout`]; this crate holds only the
//! generic parts: the file format ([`writer`]), llama.cpp's quantization
//! mixes ([`quant`]) and the tokenizer metadata ([`tokenizer`]). Every
//! file is written beside its target and renamed into place.

pub mod gguf_adapter;
pub mod gguf_model;
pub mod merged;
pub mod ollama;
pub mod quant;
pub mod tokenizer;
pub mod writer;

use std::path::{Path, PathBuf};

pub use quant::QuantType;

/// An export that could not be made. Nothing is left half-written.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading or writing a file failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A source (model, adapter, tokenizer) could not be read.
    #[error("{path}")]
    Source {
        /// The file or folder at fault.
        path: PathBuf,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The model or adapter has something the target format cannot hold.
    #[error("{what}: {message}")]
    Unsupported {
        /// The model, adapter, tensor or file at fault.
        what: String,
        /// Why, and what would work.
        message: String,
    },
    /// A bug in the exporter (a size that does not add up).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ExportError {
    /// A source error at `path`.
    pub fn source(path: &Path, cause: impl std::error::Error + Send + Sync + 'static) -> ExportError {
        ExportError::Source { path: path.to_owned(), source: Box::new(cause) }
    }
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct Written {
    /// The file or folder.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
}

/// The size of a file, or of every file in a folder.
pub fn size_on_disk(path: &Path) -> std::io::Result<u64> {
    if path.is_file() {
        return Ok(path.metadata()?.len());
    }
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        total += size_on_disk(&entry?.path())?;
    }
    Ok(total)
}
