//! oxtune's built-in dataset adapters: each turns one raw record into the
//! standard row `{"messages": [{"role", "content"}, ...]}` (other columns
//! pass through).
//!
//! | adapter | columns |
//! |---|---|
//! | `messages` | `messages` (system / user / assistant / tool turns, optional per-message `loss`) |
//! | `sharegpt` | `conversations` with `from` (`human`/`gpt`/`system`/...) and `value` |
//! | `alpaca` | `instruction`, optional `input`, `output` (optional `system`) |
//! | `query-response` | `query`/`prompt`/`question`/`problem`, optionally `response`/`answer`/`output`/`solution` |
//! | `image-text-answer` | `image` (a path or a list), `text`, optional `answer` |
//! | `pre-tokenized` | `input_ids`, optional `labels` (passed through for the host to check) |

use oxtune_plugin_api::serde_json::{json, Map, Value};
use oxtune_plugin_api::{declare_plugin, DatasetAdapter, Descriptor, Error, Plugin, Result};

fn string<'a>(record: &'a Map<String, Value>, key: &str) -> Result<&'a str> {
    match record.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(Error::new(format!("`{key}` must be a string, not {other}"))),
        None => Err(Error::new(format!("`{key}` is missing"))),
    }
}

/// The row with `messages` set and the consumed columns removed.
fn row(record: &Map<String, Value>, messages: Vec<Value>, consumed: &[&str]) -> Value {
    let mut out: Map<String, Value> =
        record.iter().filter(|(k, _)| !consumed.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
    out.insert("messages".into(), Value::Array(messages));
    Value::Object(out)
}

/// Standard rows, validated.
pub struct Messages;

impl DatasetAdapter for Messages {
    fn descriptor(&self) -> Descriptor {
        Descriptor::dataset_adapter("messages", env!("CARGO_PKG_VERSION"))
            .description("the standard {\"messages\": [...]} row")
            .columns(&["messages"])
    }

    fn adapt(&self, record: &Map<String, Value>) -> Result<Value> {
        let messages =
            record.get("messages").and_then(Value::as_array).ok_or_else(|| Error::new("`messages` must be a list"))?;
        for (i, m) in messages.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str);
            if !matches!(role, Some("system" | "user" | "assistant" | "tool")) {
                return Err(Error::new(format!("message {i}: `role` must be system, user, assistant or tool")));
            }
            if m.get("content").is_none() && m.get("tool_calls").is_none() {
                return Err(Error::new(format!("message {i} has no `content`")));
            }
        }
        Ok(Value::Object(record.clone()))
    }
}

/// ShareGPT conversations.
pub struct ShareGpt;

impl DatasetAdapter for ShareGpt {
    fn descriptor(&self) -> Descriptor {
        Descriptor::dataset_adapter("sharegpt", env!("CARGO_PKG_VERSION"))
            .description("ShareGPT {\"conversations\": [{\"from\", \"value\"}]}")
            .columns(&["conversations"])
    }

    fn adapt(&self, record: &Map<String, Value>) -> Result<Value> {
        let turns = record
            .get("conversations")
            .and_then(Value::as_array)
            .ok_or_else(|| Error::new("`conversations` must be a list"))?;
        let mut messages = Vec::with_capacity(turns.len());
        for (i, t) in turns.iter().enumerate() {
            let from =
                t.get("from").and_then(Value::as_str).ok_or_else(|| Error::new(format!("turn {i} has no `from`")))?;
            let role = match from {
                "human" | "user" => "user",
                "gpt" | "assistant" | "model" => "assistant",
                "system" => "system",
                "tool" | "function" | "observation" => "tool",
                other => return Err(Error::new(format!("turn {i}: unknown speaker `{other}`"))),
            };
            let value =
                t.get("value").and_then(Value::as_str).ok_or_else(|| Error::new(format!("turn {i} has no `value`")))?;
            messages.push(json!({"role": role, "content": value}));
        }
        Ok(row(record, messages, &["conversations"]))
    }
}

/// Alpaca instruction rows.
pub struct Alpaca;

impl DatasetAdapter for Alpaca {
    fn descriptor(&self) -> Descriptor {
        Descriptor::dataset_adapter("alpaca", env!("CARGO_PKG_VERSION"))
            .description("Alpaca {\"instruction\", \"input\", \"output\"}")
            .columns(&["instruction", "output"])
    }

    fn adapt(&self, record: &Map<String, Value>) -> Result<Value> {
        let mut prompt = string(record, "instruction")?.to_owned();
        if let Some(input) = record.get("input").and_then(Value::as_str).filter(|s| !s.is_empty()) {
            prompt = format!("{prompt}\n{input}");
        }
        let mut messages = Vec::new();
        if let Some(system) = record.get("system").and_then(Value::as_str) {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": prompt}));
        messages.push(json!({"role": "assistant", "content": string(record, "output")?}));
        Ok(row(record, messages, &["instruction", "input", "output", "system"]))
    }
}

const QUERY: [&str; 4] = ["query", "prompt", "question", "problem"];
const RESPONSE: [&str; 4] = ["response", "answer", "output", "solution"];

/// Query/response rows with the usual column aliases.
pub struct QueryResponse;

impl DatasetAdapter for QueryResponse {
    fn descriptor(&self) -> Descriptor {
        Descriptor::dataset_adapter("query-response", env!("CARGO_PKG_VERSION"))
            .description("{\"query\", \"response\"} and aliases (prompt/question/problem, answer/output/solution)")
            .columns(&["query|prompt|question|problem"])
    }

    fn adapt(&self, record: &Map<String, Value>) -> Result<Value> {
        let query = QUERY.iter().find(|k| record.contains_key(**k)).ok_or_else(|| Error::new("no query column"))?;
        // Without a response the row is a prompt (for inference and rollouts).
        let response = RESPONSE.iter().find(|k| record.contains_key(**k));
        let mut messages = Vec::new();
        if let Some(system) = record.get("system").and_then(Value::as_str) {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": string(record, query)?}));
        if let Some(response) = response {
            messages.push(json!({"role": "assistant", "content": string(record, response)?}));
        }
        Ok(row(record, messages, &[query, response.copied().unwrap_or_default(), "system"]))
    }
}

/// The `{"image", "text", "answer"}` form of vision datasets.
pub struct ImageTextAnswer;

impl DatasetAdapter for ImageTextAnswer {
    fn descriptor(&self) -> Descriptor {
        Descriptor::dataset_adapter("image-text-answer", env!("CARGO_PKG_VERSION"))
            .description("{\"image\", \"text\", \"answer\"}: one question about one or more images")
            .columns(&["image|images", "text"])
    }

    fn adapt(&self, record: &Map<String, Value>) -> Result<Value> {
        let key = if record.contains_key("image") { "image" } else { "images" };
        let images: Vec<Value> = match record.get(key) {
            Some(Value::String(path)) => vec![json!(path)],
            Some(Value::Array(paths)) if paths.iter().all(Value::is_string) => paths.clone(),
            _ => return Err(Error::new(format!("`{key}` must be a path or a list of paths"))),
        };
        let text = string(record, "text")?;
        // Images attached with no tag go before the text, as ms-swift places them.
        let tags = if text.contains("<image>") { String::new() } else { "<image>".repeat(images.len()) };
        let mut messages = vec![json!({"role": "user", "content": format!("{tags}{text}")})];
        if record.contains_key("answer") {
            messages.push(json!({"role": "assistant", "content": string(record, "answer")?}));
        }
        let mut out = row(record, messages, &[key, "text", "answer"]);
        out["images"] = Value::Array(images);
        Ok(out)
    }
}

/// Rows already tokenized: `input_ids` and optional `labels` (-100 masks a position).
pub struct PreTokenized;

impl DatasetAdapter for PreTokenized {
    fn descriptor(&self) -> Descriptor {
        Descriptor::dataset_adapter("pre-tokenized", env!("CARGO_PKG_VERSION"))
            .description("{\"input_ids\": [...], \"labels\": [...]}: token ids used as they are")
            .columns(&["input_ids"])
    }

    fn adapt(&self, record: &Map<String, Value>) -> Result<Value> {
        let ids = |key: &str| -> Result<Option<usize>> {
            match record.get(key) {
                None => Ok(None),
                Some(Value::Array(items)) if items.iter().all(|v| v.is_i64()) => Ok(Some(items.len())),
                Some(_) => Err(Error::new(format!("`{key}` must be a list of integers"))),
            }
        };
        let length = ids("input_ids")?.unwrap_or(0);
        if length == 0 {
            return Err(Error::new("`input_ids` is empty"));
        }
        if let Some(labels) = ids("labels")? {
            if labels != length {
                return Err(Error::new(format!("`labels` has {labels} entries, `input_ids` {length}")));
            }
        }
        Ok(Value::Object(record.clone()))
    }
}

fn plugin() -> Plugin {
    Plugin::new("oxtune-plugin-datasets", env!("CARGO_PKG_VERSION"))
        .dataset_adapter(Messages)
        .dataset_adapter(ShareGpt)
        .dataset_adapter(Alpaca)
        .dataset_adapter(QueryResponse)
        .dataset_adapter(ImageTextAnswer)
        .dataset_adapter(PreTokenized)
}

declare_plugin!(plugin);

#[cfg(test)]
mod tests {
    use super::*;

    fn record(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn each_format_becomes_a_conversation() {
        let sharegpt = record(
            json!({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "id": 7}),
        );
        assert_eq!(
            ShareGpt.adapt(&sharegpt).unwrap(),
            json!({"id": 7, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        );
        let alpaca = record(json!({"instruction": "Add", "input": "2 and 2", "output": "4"}));
        assert_eq!(Alpaca.adapt(&alpaca).unwrap()["messages"][0]["content"], "Add\n2 and 2");
        let qr = record(json!({"problem": "1+1", "solution": "2", "level": 1}));
        let out = QueryResponse.adapt(&qr).unwrap();
        assert_eq!(out["messages"][1]["content"], "2");
        assert_eq!(out["level"], 1);
        let prompt_only = QueryResponse.adapt(&record(json!({"prompt": "hi"}))).unwrap();
        assert_eq!(prompt_only["messages"], json!([{"role": "user", "content": "hi"}]));
        assert!(Messages.adapt(&record(json!({"messages": [{"role": "bot", "content": "x"}]}))).is_err());
        let image =
            ImageTextAnswer.adapt(&record(json!({"image": "cat.png", "text": "What?", "answer": "A cat"}))).unwrap();
        assert_eq!(image["messages"][0]["content"], "<image>What?");
        assert_eq!(image["images"], json!(["cat.png"]));
        assert!(PreTokenized.adapt(&record(json!({"input_ids": [1, 2], "labels": [1]}))).is_err());
        assert!(PreTokenized.adapt(&record(json!({"input_ids": ["a"]}))).is_err());
        assert!(QueryResponse
            .adapt(&record(json!({"query": 3, "response": "x"})))
            .unwrap_err()
            .to_string()
            .contains("`query` must be a string"));
    }
}
