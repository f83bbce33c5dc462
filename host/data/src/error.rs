//! What can go wrong turning a record into rows.

use oxtune_engine::ModelError;
use oxtune_registry::RegistryError;

use crate::records::DataError;
use crate::text::TextError;

/// An error encoding a record, a prompt or a dataset.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The record is malformed, or does not fit the model.
    #[error("{0}")]
    Invalid(String),
    /// Tokenizing or templating failed.
    #[error(transparent)]
    Text(#[from] TextError),
    /// The model plugin failed to preprocess the record's media.
    #[error(transparent)]
    Model(#[from] Box<ModelError>),
    /// No dataset adapter reads the record, or the adapter failed.
    #[error(transparent)]
    Adapter(#[from] RegistryError),
    /// A dataset file could not be read, or a record of it is malformed.
    #[error(transparent)]
    Read(#[from] DataError),
    /// A record failed: where it is (`data.jsonl:12`), and why.
    #[error("{at}")]
    Record {
        /// The file and line.
        at: String,
        /// What is wrong with it.
        source: Box<EncodeError>,
    },
}

impl From<ModelError> for EncodeError {
    fn from(e: ModelError) -> Self {
        EncodeError::Model(Box::new(e))
    }
}

/// `Option`'s `None` as an [`EncodeError::Invalid`] with a message.
pub(crate) trait OrInvalid<T> {
    /// `Some(v)` as `Ok(v)`, `None` as the message.
    fn or_invalid(self, message: impl Into<String>) -> Result<T, EncodeError>;
}

impl<T> OrInvalid<T> for Option<T> {
    fn or_invalid(self, message: impl Into<String>) -> Result<T, EncodeError> {
        self.ok_or_else(|| EncodeError::Invalid(message.into()))
    }
}
