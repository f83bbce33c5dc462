//! Generation prompts for `infer` and the server: plain text, or a
//! conversation (with media) rendered by the model's chat template with the
//! generation prompt; and the prompt and reference answer of a dataset row.

use std::path::Path;

use oxtune_engine::loss::IGNORE_INDEX;
use oxtune_engine::media::MediaRef;
use oxtune_engine::model::LoadedModel;
use oxtune_registry::Registry;
use serde_json::{json, Map, Value};

use crate::error::EncodeError;
use crate::media::{collect, encode_prompt_with_media};
use crate::text::{ChatRequest, EncodedRow, TextAssets};

/// What to generate from.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// A conversation and the media its tags refer to.
    Chat(Vec<Value>, Vec<MediaRef>),
    /// Text sent as is (no template).
    Raw(String),
    /// Token ids sent as they are (no tokenizer, no template): a
    /// pre-tokenized row, or `--prompt-ids`.
    Ids(Vec<u32>),
}

/// How a prompt is rendered.
#[derive(Clone, Debug, Default)]
pub struct PromptOptions {
    /// A system message put first unless the conversation has one.
    pub system: Option<String>,
    /// Join the messages' text without the chat template.
    pub raw: bool,
    /// Media preprocessing overrides (`max_pixels`, ...).
    pub media_options: Value,
}

fn unlabelled(ids: Vec<u32>) -> EncodedRow {
    EncodedRow { labels: vec![IGNORE_INDEX; ids.len()], input_ids: ids, media: None }
}

/// The prompt's tokens (and laid-out media), ready for generation.
pub fn encode_prompt(
    model: &LoadedModel,
    assets: &TextAssets,
    prompt: &Prompt,
    options: &PromptOptions,
) -> Result<EncodedRow, EncodeError> {
    let tokenizer = &assets.tokenizer;
    let (messages, media) = match prompt {
        Prompt::Raw(s) => return Ok(unlabelled(tokenizer.encode(s, true)?)),
        Prompt::Ids(ids) => {
            if ids.is_empty() {
                bail!("the prompt has no token ids");
            }
            let vocab = model.vocab_size().unwrap_or(usize::MAX);
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                bail!("token id {bad} is outside the model's vocabulary of {vocab}");
            }
            return Ok(unlabelled(ids.clone()));
        }
        Prompt::Chat(messages, media) => (messages, media),
    };
    let untemplated = options.raw || assets.template.is_none();
    if !media.is_empty() && untemplated {
        bail!("images and videos need the chat template (drop --raw)");
    }
    if untemplated {
        let joined: Vec<&str> = messages.iter().filter_map(|m| m["content"].as_str()).collect();
        return Ok(unlabelled(tokenizer.encode(&joined.join("\n"), true)?));
    }
    let mut all = Vec::new();
    if let Some(system) = &options.system {
        if messages.first().and_then(|m| m["role"].as_str()) != Some("system") {
            all.push(json!({"role": "system", "content": system}));
        }
    }
    all.extend(messages.iter().cloned());
    if !media.is_empty() {
        return encode_prompt_with_media(model, assets, &all, media, &options.media_options);
    }
    let request = ChatRequest { messages: &all, add_generation_prompt: true, ..Default::default() };
    Ok(unlabelled(tokenizer.encode(&assets.render_chat(&request)?, false)?))
}

/// The prompt of a dataset row and its reference answer, if it has one: a
/// pre-tokenized `input_ids` row or a raw `text` row (no messages, no
/// images) is sent as is; any other row is
/// read by the dataset adapter the registry detects for it, and a trailing
/// assistant turn is the reference answer. Relative media paths are read
/// from `dataset_dir` when they do not exist from the working folder.
pub fn prompt_of_row(
    registry: &Registry,
    row: &Map<String, Value>,
    dataset_dir: Option<&Path>,
) -> Result<(Prompt, Option<Value>), EncodeError> {
    let other_form = ["messages", "image", "images", "videos"].iter().any(|k| row.contains_key(*k));
    if let (Some(Value::Array(ids)), false) = (row.get("input_ids"), other_form) {
        let ids = ids
            .iter()
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| EncodeError::Invalid("`input_ids` must be a list of token ids".into()))?;
        return Ok((Prompt::Ids(ids), None));
    }
    if let (Some(text), false) = (row.get("text").and_then(Value::as_str), other_form) {
        return Ok((Prompt::Raw(text.to_owned()), None));
    }
    let keys: Vec<&str> = row.keys().map(String::as_str).collect();
    let adapter = registry.detect_adapter(&keys)?;
    let adapted = registry.adapt(adapter.name(), &Value::Object(row.clone()))?;
    let (mut messages, media) = collect(&adapted, dataset_dir)?;
    let label = match messages.last() {
        Some(m) if m["role"] == "assistant" => messages.pop().map(|m| m["content"].clone()),
        _ => None,
    };
    if messages.is_empty() {
        bail!("the row has nothing before the assistant's answer");
    }
    Ok((Prompt::Chat(messages, media), label))
}
