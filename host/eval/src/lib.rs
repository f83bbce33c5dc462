//! `oxtune-eval`: standard benchmarks from local files in their own
//! formats ([`tasks`]: GSM8K, MMLU, ARC, HellaSwag), scored as
//! lm-evaluation-harness scores them ([`scoring`]), on a model in this
//! process or an OpenAI-compatible server ([`backend`]), with few-shot
//! prompts and per-group results ([`run`]).

pub mod backend;
pub mod run;
pub mod scoring;
pub mod tasks;

use std::path::PathBuf;

pub use backend::{ApiModel, LanguageModel, LocalModel, LoglikelihoodRequest};
pub use run::{evaluate, EvalOptions, TaskResult};
pub use tasks::{load_docs, Doc, LoadedDoc, TaskKind};

/// An evaluation that could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The benchmark file could not be read.
    #[error("{path}")]
    Dataset {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A record lacks a field the task needs, or has it in another form.
    #[error("{}:{line}: {message}", path.display())]
    Record {
        /// The file.
        path: PathBuf,
        /// Its 1-based line (JSONL) or index (JSON array).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The local model failed.
    #[error("the model failed")]
    Model(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A request the model cannot score.
    #[error("{0}")]
    Request(String),
    /// The server could not be reached or answered wrongly.
    #[error("{url}: {message}")]
    Api {
        /// The endpoint.
        url: String,
        /// What went wrong.
        message: String,
    },
}
