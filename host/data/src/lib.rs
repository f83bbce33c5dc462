//! `oxtune-data`: from dataset files to token ids. Records are read with
//! every error naming its file and line ([`records`], [`sources`]), turned
//! into standard conversation rows by the dataset-adapter plugins, rendered
//! with the model's own chat template and tokenized with loss masks derived
//! from the rendering ([`text`]), with images and videos laid out through
//! the model plugin ([`media`]). [`encoder`] is the one place a record of
//! any kind — an SFT conversation, pretraining text, a preference pair, a
//! KTO completion, a generation prompt — becomes rows, each cut to
//! `--max-length` the same way.
//!
//! Builds on `oxtune-engine` (the model, for media and its vocabulary);
//! knows nothing of training.

#![warn(missing_docs)]

/// Returns an [`EncodeError::Invalid`] built like `format!`.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::EncodeError::Invalid(format!($($arg)*)))
    };
}

pub mod encoder;
pub mod error;
pub mod items;
pub mod media;
pub mod packing;
pub mod preference;
pub mod prompt;
pub mod records;
pub mod sources;
pub mod streaming;
pub mod text;
pub mod tokenised;

pub use encoder::{DataOptions, Encoded, Encoder, Objective, Prepared, PromptRow, Truncation};
pub use error::EncodeError;
pub use items::Items;
pub use packing::{pack_best_fit_decreasing, pack_rows, PackedItems, PackedRow};
pub use prompt::{encode_prompt, prompt_of_row, Prompt, PromptOptions};
pub use records::{read_records, DataError, Record};
pub use streaming::{StreamOptions, Streamed};
pub use text::{ChatRequest, EncodedRow, TextAssets, TextTokenizer};
