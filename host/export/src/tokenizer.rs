//! The `tokenizer.*` metadata llama.cpp reads: copied from a GGUF source,
//! or built from a Hugging Face folder's `tokenizer.json` and
//! `tokenizer_config.json` as llama.cpp's converter builds it (byte-level
//! BPE: `gpt2` model, the pre-tokenizer type, tokens with their types,
//! merges, special ids, `add_bos_token`, the chat template).

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use oxtune_data::text::TextAssets;
use oxtune_engine::model::gguf::{pre_tokenizer_json, GgufFile, PRE_TOKENIZERS};
use oxtune_engine::model::is_gguf;
use oxtune_plugin_api::gguf::GgufValue;
use serde_json::Value as Json;

use crate::ExportError;

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

fn from_candle(value: &Value) -> GgufValue {
    match value {
        Value::U8(v) => GgufValue::U32(u32::from(*v)),
        Value::I8(v) => GgufValue::I32(i32::from(*v)),
        Value::U16(v) => GgufValue::U32(u32::from(*v)),
        Value::I16(v) => GgufValue::I32(i32::from(*v)),
        Value::U32(v) => GgufValue::U32(*v),
        Value::I32(v) => GgufValue::I32(*v),
        Value::U64(v) => GgufValue::U64(*v),
        Value::I64(v) => GgufValue::U64(*v as u64),
        Value::F32(v) => GgufValue::F32(*v),
        Value::F64(v) => GgufValue::F64(*v),
        Value::Bool(v) => GgufValue::Bool(*v),
        Value::String(v) => GgufValue::Str(v.clone()),
        Value::Array(items) => GgufValue::Array(items.iter().map(from_candle).collect()),
    }
}

/// The tokenizer metadata for the model at `source` (a GGUF file or a
/// Hugging Face folder) whose embedding has `vocab_size` rows.
pub fn tokenizer_metadata(source: &Path, vocab_size: usize) -> Result<Vec<(String, GgufValue)>, ExportError> {
    if is_gguf(source) {
        let file = GgufFile::open(source).map_err(|e| ExportError::source(source, e))?;
        let mut entries: Vec<(String, GgufValue)> =
            file.metadata_with_prefix("tokenizer.").map(|(k, v)| (k.to_owned(), from_candle(v))).collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        return Ok(entries);
    }
    from_hf_folder(source, vocab_size)
}

/// The llama.cpp pre-tokenizer type whose `tokenizer.json` form matches
/// `pre_tokenizer` (compared on what changes the split: types, patterns,
/// digit splitting, the byte-level regex).
fn pre_tokenizer_type(pre_tokenizer: &Json) -> Option<&'static str> {
    fn signature(v: &Json) -> Json {
        match v {
            Json::Object(o) => Json::Object(
                o.iter()
                    .filter(|(k, _)| {
                        ["type", "pattern", "Regex", "String", "individual_digits", "use_regex", "pretokenizers"]
                            .contains(&k.as_str())
                    })
                    .map(|(k, v)| (k.clone(), signature(v)))
                    .collect(),
            ),
            Json::Array(a) => Json::Array(a.iter().map(signature).collect()),
            other => other.clone(),
        }
    }
    let wanted = signature(pre_tokenizer);
    PRE_TOKENIZERS.into_iter().find(|name| pre_tokenizer_json(name).is_some_and(|j| signature(&j) == wanted))
}

fn read_json(path: &Path) -> Result<Json, ExportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ExportError::Io { path: path.to_owned(), source })?;
    serde_json::from_str(&text).map_err(|e| ExportError::source(path, e))
}

fn from_hf_folder(dir: &Path, vocab_size: usize) -> Result<Vec<(String, GgufValue)>, ExportError> {
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = read_json(&tokenizer_path)?;
    let bad = |message: String| ExportError::Unsupported { what: tokenizer_path.display().to_string(), message };
    let model = &tokenizer["model"];
    if model["type"] != "BPE" || tokenizer["decoder"]["type"].as_str() != Some("ByteLevel") {
        return Err(bad("only byte-level BPE tokenizers (llama.cpp's `gpt2` model) can be written to GGUF yet".into()));
    }
    let pre = pre_tokenizer_type(&tokenizer["pre_tokenizer"]).ok_or_else(|| {
        bad(format!("its pre-tokenizer matches none llama.cpp knows by these names: {}", PRE_TOKENIZERS.join(", ")))
    })?;
    let vocab = model["vocab"].as_object().ok_or_else(|| bad("`model.vocab` is missing".into()))?;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![NORMAL; vocab_size];
    let mut place = |token: &str, id: u64, kind: i32| -> Result<(), ExportError> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            bad(format!("token `{token}` has id {id}, beyond the model's {vocab_size} embedding rows"))
        })?;
        *slot = Some(token.to_owned());
        types[id as usize] = kind;
        Ok(())
    };
    for (token, id) in vocab {
        place(token, id.as_u64().ok_or_else(|| bad(format!("token `{token}` has no integer id")))?, NORMAL)?;
    }
    for added in tokenizer["added_tokens"].as_array().into_iter().flatten() {
        let (Some(content), Some(id)) = (added["content"].as_str(), added["id"].as_u64()) else { continue };
        place(content, id, if added["special"] == true { CONTROL } else { USER_DEFINED })?;
    }
    let tokens: Vec<GgufValue> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            GgufValue::Str(t.unwrap_or_else(|| {
                types[i] = UNUSED;
                format!("[PAD{i}]")
            }))
        })
        .collect();
    let merges: Vec<GgufValue> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            // The list form may hold spaces inside a part; llama.cpp's
            // converter writes them as U+0120, the byte-level space.
            Json::Array(pair) => GgufValue::Str(
                pair.iter().filter_map(Json::as_str).map(|p| p.replace(' ', "\u{120}")).collect::<Vec<_>>().join(" "),
            ),
            other => GgufValue::Str(other.as_str().unwrap_or_default().to_owned()),
        })
        .collect();
    let mut out = vec![
        ("tokenizer.ggml.model".to_owned(), GgufValue::Str("gpt2".into())),
        ("tokenizer.ggml.pre".to_owned(), GgufValue::Str(pre.into())),
        ("tokenizer.ggml.tokens".to_owned(), GgufValue::Array(tokens)),
        ("tokenizer.ggml.token_type".to_owned(), GgufValue::Array(types.into_iter().map(GgufValue::I32).collect())),
        ("tokenizer.ggml.merges".to_owned(), GgufValue::Array(merges)),
    ];
    let assets = TextAssets::from_hf_dir(dir).map_err(|e| ExportError::source(dir, e))?;
    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.is_file() { read_json(&config_path)? } else { Json::Null };
    let token_text = |v: &Json| match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_owned),
        _ => None,
    };
    for (key, which) in [("bos_token", "bos"), ("pad_token", "padding"), ("unk_token", "unknown")] {
        if let Some(id) = config.get(key).and_then(token_text).and_then(|t| assets.tokenizer.token_id(&t)) {
            out.push((format!("tokenizer.ggml.{which}_token_id"), GgufValue::U32(id)));
        }
    }
    if let Some(&eos) = assets.eos_token_ids.first() {
        out.push(("tokenizer.ggml.eos_token_id".to_owned(), GgufValue::U32(eos)));
    }
    if let Some(adds_bos) = config.get("add_bos_token").and_then(Json::as_bool) {
        out.push(("tokenizer.ggml.add_bos_token".to_owned(), GgufValue::Bool(adds_bos)));
    }
    if let Some(template) = &assets.template {
        out.push(("tokenizer.chat_template".to_owned(), GgufValue::Str(template.source().to_owned())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_pre_tokenizer_is_recognised_from_its_own_json() {
        for name in PRE_TOKENIZERS {
            assert_eq!(pre_tokenizer_type(&pre_tokenizer_json(name).unwrap()), Some(name));
        }
        assert_eq!(pre_tokenizer_type(&serde_json::json!({"type": "Whitespace"})), None);
    }
}
