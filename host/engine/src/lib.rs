//! `oxtune-engine`: the host's engine. It owns the tensors — the candle op
//! backend that runs every plugin's forward pass ([`backend`]), with a
//! backward pass for every op — and everything that runs a model: loading
//! Hugging Face folders, GGUF files and adapters ([`model`]), the losses
//! computed on the host ([`loss`]), batched KV-cached generation
//! ([`generate`]) and how media reach the forward pass ([`media`]).
//!
//! It knows nothing of datasets, chat templates or training loops: those
//! are `oxtune-data` and `oxtune-train`, which build on this crate.

#![warn(missing_docs)]

pub mod backend;
pub mod eval;
pub mod generate;
pub mod loss;
pub mod media;
pub mod memory;
pub mod model;
pub mod quant;
pub mod rng;

pub use model::{LoadOptions, LoadedModel, ModelError};

/// An error and its chain of sources as one line (`outer: inner: ...`),
/// for messages a library hands on as text (a reward's failure in a
/// metric, a plugin's error across the ABI).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.ends_with(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}
