//! The tokenizer and chat template of a Hugging Face model folder.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use super::template::{ChatTemplate, TemplateError};
use oxtune_engine::generate::Detokenizer;
use oxtune_engine::model::checkpoint::{read_json, CheckpointError};
use oxtune_engine::model::gguf::GgufFile;

/// An error reading or using a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file could not be read or parsed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// `tokenizer.json` could not be loaded.
    #[error("{path}: {message}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// The tokenizers library's message.
        message: String,
    },
    /// Encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Codec(String),
    /// The chat template failed.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The model has no chat template.
    #[error("{0} has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja)")]
    NoTemplate(PathBuf),
}

/// A token id and the byte span of `[start, end)` of the text it covers.
pub type TokenSpan = (u32, (usize, usize));

/// A tokenizer (`tokenizers`' fast tokenizer).
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<TextTokenizer, TextError> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| TextError::Tokenizer { path: path.to_owned(), message: e.to_string() })?;
        Ok(TextTokenizer { inner })
    }

    /// Wraps an already-built tokenizer (e.g. one rebuilt from GGUF metadata).
    pub fn new(inner: Tokenizer) -> TextTokenizer {
        TextTokenizer { inner }
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's
    /// post-processor (a BOS token, for some models).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TextError> {
        let encoding = self.inner.encode(text, add_special_tokens).map_err(|e| TextError::Codec(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` with each token's byte span in `text`.
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenSpan>, TextError> {
        let encoding = self.inner.encode(text, add_special_tokens).map_err(|e| TextError::Codec(e.to_string()))?;
        Ok(encoding.get_ids().iter().copied().zip(encoding.get_offsets().iter().copied()).collect())
    }

    /// Text of `ids`, optionally without special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TextError> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| TextError::Codec(e.to_string()))
    }

    /// The id of a token string (`<|im_end|>`), if in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer as `tokenizer.json` text (what a cache key hashes).
    pub fn to_json(&self) -> String {
        self.inner.to_string(false).unwrap_or_default()
    }
}

impl Detokenizer for TextTokenizer {
    fn detokenize(&self, ids: &[u32]) -> Result<String, String> {
        self.decode(ids, true).map_err(|e| e.to_string())
    }
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_string(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_owned),
        _ => None,
    }
}

/// Everything a model folder says about text: tokenizer, chat template,
/// special tokens, end-of-sequence ids and generation defaults.
#[derive(Clone)]
pub struct TextAssets {
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
    /// The chat template, if the model has one.
    pub template: Option<ChatTemplate>,
    /// Where the template is missing from, for the error when one is needed.
    dir: PathBuf,
    /// Ids that end generation (`generation_config.json`, else the EOS token).
    pub eos_token_ids: Vec<u32>,
    /// `generation_config.json`, if present (default sampling settings).
    pub generation_config: serde_json::Value,
    /// The EOS token's text (`<|im_end|>`), which ends a chat turn.
    eos_token: Option<String>,
}

const SPECIAL_TOKENS: [&str; 4] = ["bos_token", "eos_token", "pad_token", "unk_token"];

impl TextAssets {
    /// A SHA-256 over everything that decides how text becomes tokens: the
    /// tokenizer, the chat template and its special tokens, the EOS ids.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        hash.update(self.tokenizer.to_json());
        hash.update([0]);
        if let Some(template) = &self.template {
            hash.update(template.source());
            hash.update(serde_json::Value::Object(template.special_tokens().clone()).to_string());
        }
        hash.update([0]);
        hash.update(format!("{:?} {:?}", self.eos_token_ids, self.eos_token));
        hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads the text assets of a model folder or a `.gguf` file.
    pub fn load(path: &Path) -> Result<TextAssets, TextError> {
        if oxtune_engine::model::is_gguf(path) {
            TextAssets::from_gguf(&GgufFile::open(path)?)
        } else {
            TextAssets::from_hf_dir(path)
        }
    }

    /// The tokenizer, chat template and special tokens stored in a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<TextAssets, TextError> {
        let json = file.tokenizer_json()?;
        let inner: Tokenizer = serde_json::from_value(json).map_err(|e| TextError::Tokenizer {
            path: file.path().to_owned(),
            message: format!("the tokenizer rebuilt from its metadata does not load: {e}"),
        })?;
        let tokenizer = TextTokenizer::new(inner);
        let mut special = serde_json::Map::new();
        for (key, which) in
            [("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"), ("unk_token", "unknown")]
        {
            let token = file.special_token_id(which).and_then(|id| tokenizer.inner.id_to_token(id));
            special.insert(key.to_owned(), token.map(serde_json::Value::from).unwrap_or(serde_json::Value::Null));
        }
        let template = file.chat_template().map(|t| ChatTemplate::new(t, file.path(), special.clone())).transpose()?;
        let eos_token_ids = file.special_token_id("eos").into_iter().collect();
        Ok(TextAssets {
            tokenizer,
            template,
            dir: file.path().to_owned(),
            eos_token_ids,
            generation_config: serde_json::json!({}),
            eos_token: special["eos_token"].as_str().map(str::to_owned),
        })
    }

    /// Reads `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`
    /// and `generation_config.json` from a model folder.
    pub fn from_hf_dir(dir: &Path) -> Result<TextAssets, TextError> {
        let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() { read_json(&config_path)? } else { serde_json::json!({}) };
        let mut special = serde_json::Map::new();
        for key in SPECIAL_TOKENS {
            let value = config.get(key).and_then(token_string);
            special.insert(key.to_owned(), value.map(serde_json::Value::from).unwrap_or(serde_json::Value::Null));
        }
        let jinja_path = dir.join("chat_template.jinja");
        let template_source = if jinja_path.is_file() {
            let text = std::fs::read_to_string(&jinja_path)
                .map_err(|source| CheckpointError::Io { path: jinja_path.clone(), source: source })?;
            Some((text, jinja_path))
        } else {
            match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some((s.clone(), config_path.clone())),
                Some(serde_json::Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template").and_then(|s| s.as_str()))
                    .map(|s| (s.to_owned(), config_path.clone())),
                _ => None,
            }
        };
        let template =
            template_source.map(|(text, path)| ChatTemplate::new(&text, &path, special.clone())).transpose()?;
        let generation_path = dir.join("generation_config.json");
        let generation_config =
            if generation_path.is_file() { read_json(&generation_path)? } else { serde_json::json!({}) };
        let mut eos_token_ids: Vec<u32> = match generation_config.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64().map(|v| v as u32)).collect(),
            _ => Vec::new(),
        };
        if let Some(id) = special["eos_token"].as_str().and_then(|t| tokenizer.token_id(t)) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        let eos_token = special["eos_token"].as_str().map(str::to_owned);
        Ok(TextAssets { tokenizer, template, dir: dir.to_owned(), eos_token_ids, generation_config, eos_token })
    }

    /// The text of the token that ends a chat turn (the EOS token), if known.
    pub fn template_eos_token(&self) -> Option<String> {
        self.eos_token.clone()
    }

    /// Renders a conversation with the model's chat template.
    pub fn render_chat(&self, request: &super::ChatRequest<'_>) -> Result<String, TextError> {
        let template = self.template.as_ref().ok_or_else(|| TextError::NoTemplate(self.dir.clone()))?;
        Ok(template.render(request)?)
    }
}
