//! Preference data: rows of the forms ms-swift and TRL read, turned into
//! encoded (prompt + completion) rows whose labels cover the completion
//! only — the prompt is templated by the model's chat template, and the
//! completion is the final assistant turn.
//!
//! | form | columns |
//! |---|---|
//! | ms-swift | `messages` (ending with the chosen assistant turn) + `rejected_response` |
//! | ms-swift | `messages` + `rejected_messages` (two whole conversations) |
//! | TRL / Alpaca | `chosen` + `rejected` (strings, or message lists), prompt in `prompt`/`query`/`question`/`problem`/`instruction` (+`input`), optional `system` |
//! | KTO | `messages` (ending with the completion) or `prompt` + `completion`, and a boolean `label` |

use oxtune_engine::loss::IGNORE_INDEX;
use serde_json::{json, Map, Value};

use crate::error::{EncodeError, OrInvalid};
use crate::text::{encode_chat, EncodedRow, TextAssets};

/// A prompt with a preferred and a dispreferred completion, encoded.
#[derive(Clone, Debug)]
pub struct PreferencePair {
    /// Prompt + chosen completion.
    pub chosen: EncodedRow,
    /// Prompt + rejected completion.
    pub rejected: EncodedRow,
}

/// A prompt with one completion judged desirable or not (KTO), encoded.
#[derive(Clone, Debug)]
pub struct LabelledCompletion {
    /// Prompt + completion.
    pub row: EncodedRow,
    /// Whether the completion is desirable.
    pub desirable: bool,
}

const PROMPT_COLUMNS: [&str; 5] = ["prompt", "query", "question", "problem", "instruction"];

fn text<'a>(record: &'a Map<String, Value>, key: &str) -> Result<&'a str, EncodeError> {
    match record.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => bail!("`{key}` must be a string, not {other}"),
        None => bail!("`{key}` is missing"),
    }
}

/// The prompt turns of a record with a separate prompt column (and `system`).
fn prompt_messages(record: &Map<String, Value>) -> Result<Vec<Value>, EncodeError> {
    if let Some(Value::Array(messages)) = record.get("prompt") {
        return Ok(messages.clone());
    }
    let key = PROMPT_COLUMNS
        .iter()
        .find(|k| record.contains_key(**k))
        .or_invalid(format!("no prompt: the row needs `messages` or one of {}", PROMPT_COLUMNS.join(", ")))?;
    let mut prompt = text(record, key)?.to_owned();
    if *key == "instruction" {
        if let Some(input) = record.get("input").and_then(Value::as_str).filter(|s| !s.is_empty()) {
            prompt = format!("{prompt}\n{input}");
        }
    }
    let mut messages = Vec::new();
    if let Some(system) = record.get("system").and_then(Value::as_str) {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": prompt}));
    Ok(messages)
}

/// `prompt` followed by `completion` (a string, or message list whose last
/// turn is the assistant's).
fn conversation(prompt: &[Value], completion: &Value, side: &str) -> Result<Vec<Value>, EncodeError> {
    let mut messages = prompt.to_vec();
    match completion {
        Value::String(s) => messages.push(json!({"role": "assistant", "content": s})),
        Value::Array(turns) => messages.extend(turns.iter().cloned()),
        other => bail!("`{side}` must be a string or a list of messages, not {other}"),
    }
    Ok(messages)
}

/// Encodes `messages`, labelling only the final assistant turn (which must
/// be there and not empty).
fn encode_final_turn(assets: &TextAssets, messages: &[Value], side: &str) -> Result<EncodedRow, EncodeError> {
    let last = messages.last().or_invalid(format!("the {side} conversation is empty"))?;
    if last.get("role").and_then(Value::as_str) != Some("assistant") {
        bail!("the {side} conversation must end with the assistant's completion");
    }
    if last.get("content").and_then(Value::as_str).is_none_or(|c| c.trim().is_empty()) {
        bail!("the {side} completion is empty");
    }
    let n = messages.len();
    let masked: Vec<Value> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut m = m.clone();
            if i + 1 < n && m.get("role").and_then(Value::as_str) == Some("assistant") {
                m["loss"] = json!(false);
            }
            m
        })
        .collect();
    let row = encode_chat(assets, &masked, None)?;
    if !row.labels.iter().any(|&l| l != IGNORE_INDEX) {
        bail!("the {side} completion has no token to score");
    }
    Ok(row)
}

/// The chosen and rejected conversations of a preference record.
fn preference_conversations(record: &Map<String, Value>) -> Result<(Vec<Value>, Vec<Value>), EncodeError> {
    if let Some(Value::Array(messages)) = record.get("messages") {
        if let Some(rejected) = record.get("rejected_messages") {
            let rejected = rejected.as_array().or_invalid("`rejected_messages` must be a list of messages")?;
            return Ok((messages.clone(), rejected.clone()));
        }
        let rejected = record.get("rejected_response").or_invalid(
            "a `messages` row needs `rejected_response` (or `rejected_messages`): the rejected side is missing",
        )?;
        let prompt = &messages[..messages.len().saturating_sub(1)];
        return Ok((messages.clone(), conversation(prompt, rejected, "rejected_response")?));
    }
    let (chosen, rejected) = match (record.get("chosen"), record.get("rejected")) {
        (Some(c), Some(r)) => (c, r),
        (Some(_), None) => bail!("the row has `chosen` but no `rejected`"),
        (None, Some(_)) => bail!("the row has `rejected` but no `chosen`"),
        (None, None) => {
            bail!("not a preference row: it needs `messages` + `rejected_response`, or `chosen` + `rejected`")
        }
    };
    // TRL's conversational form carries the prompt inside each side.
    let prompt = if chosen.is_array() && PROMPT_COLUMNS.iter().all(|k| !record.contains_key(*k)) {
        Vec::new()
    } else {
        prompt_messages(record)?
    };
    Ok((conversation(&prompt, chosen, "chosen")?, conversation(&prompt, rejected, "rejected")?))
}

/// Preference and GRPO training read text only so far: a row with media
/// is refused rather than trained on without its images.
pub fn refuse_media(record: &Map<String, Value>) -> Result<(), EncodeError> {
    for key in ["images", "image", "videos", "video"] {
        let present = match record.get(key) {
            None | Some(Value::Null) => false,
            Some(Value::Array(items)) => !items.is_empty(),
            Some(_) => true,
        };
        if present {
            bail!("the row has `{key}`: preference and GRPO training read text only for now (use `oxtune sft`)");
        }
    }
    Ok(())
}

/// Encodes one preference record.
pub fn encode_pair(assets: &TextAssets, record: &Map<String, Value>) -> Result<PreferencePair, EncodeError> {
    refuse_media(record)?;
    let (chosen, rejected) = preference_conversations(record)?;
    Ok(PreferencePair {
        chosen: encode_final_turn(assets, &chosen, "chosen")?,
        rejected: encode_final_turn(assets, &rejected, "rejected")?,
    })
}

/// Encodes one KTO record (`label`: whether the completion is desirable).
pub fn encode_labelled(assets: &TextAssets, record: &Map<String, Value>) -> Result<LabelledCompletion, EncodeError> {
    refuse_media(record)?;
    let desirable = match record.get("label") {
        Some(Value::Bool(b)) => *b,
        Some(other) => bail!("`label` must be true or false, not {other}"),
        None => bail!("a KTO row needs a boolean `label` (is the completion desirable?)"),
    };
    let messages = match record.get("messages") {
        Some(Value::Array(messages)) => messages.clone(),
        _ => {
            let completion = record.get("completion").or_invalid("a KTO row needs `messages` or `completion`")?;
            conversation(&prompt_messages(record)?, completion, "completion")?
        }
    };
    Ok(LabelledCompletion { row: encode_final_turn(assets, &messages, "completion")?, desirable })
}

/// The prompt tokens (before the first label) and the completion tokens
/// (the labelled span) of an encoded row.
pub fn split_prompt(row: &EncodedRow) -> (&[u32], &[u32]) {
    let first = row.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap_or(row.labels.len());
    let last = row.labels.iter().rposition(|&l| l != IGNORE_INDEX).map_or(first, |i| i + 1);
    (&row.input_ids[..first], &row.input_ids[first..last])
}

/// `prompt` followed by `completion`, the completion labelled.
pub fn join(prompt: &[u32], completion: &[u32]) -> EncodedRow {
    let input_ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let labels = std::iter::repeat_n(IGNORE_INDEX, prompt.len()).chain(completion.iter().map(|&t| t as i64)).collect();
    EncodedRow { input_ids, labels, media: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_with_media_are_refused_by_name() {
        let row = |v: Value| v.as_object().cloned().unwrap();
        let err = refuse_media(&row(serde_json::json!({"prompt": "p", "images": ["a.png"]}))).unwrap_err();
        assert!(err.to_string().contains("`images`"), "{err}");
        assert!(refuse_media(&row(serde_json::json!({"prompt": "p", "image": "a.png"}))).is_err());
        assert!(refuse_media(&row(serde_json::json!({"prompt": "p", "images": []}))).is_ok());
    }
}
