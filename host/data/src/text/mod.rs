//! Text in and out of a model: its tokenizer, its chat template and its
//! generation defaults, as a Hugging Face model folder stores them.

pub mod encode;
pub mod template;
pub mod tokenizer;

pub use encode::{encode_chat, EncodedRow};
pub use template::{ChatRequest, ChatTemplate, TemplateError};
pub use tokenizer::{TextAssets, TextError, TextTokenizer};
