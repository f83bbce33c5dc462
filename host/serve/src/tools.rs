//! Tool calls in chat completions: the request's `tools` go to the model's
//! chat template (which renders them the family's way), and calls in the
//! model's answer are parsed into OpenAI's `tool_calls`, in the format the
//! template teaches ([`ToolFormat::of_template`]): Hermes'
//! `<tool_call>{"name", "arguments"}</tool_call>` (Qwen2.5/Qwen3 and many
//! fine-tunes), Llama 3.1's JSON `{"name", "parameters"}` (after
//! `<|python_tag|>` or alone, several joined by `;`), or Mistral's
//! `[TOOL_CALLS] [{"name", "arguments"}, ...]` (and its newer
//! `[TOOL_CALLS]name[ARGS]{...}`).

use serde_json::{json, Value};

use crate::error::ApiError;

/// The `tools` to render for a request, or `None` (no tools, or
/// `tool_choice: "none"`).
pub fn request_tools(body: &Value) -> Result<Option<Vec<Value>>, ApiError> {
    let tools = match body.get("tools") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err(ApiError::invalid("tools", "`tools` must be a list")),
    };
    for (i, tool) in tools.iter().enumerate() {
        if tool.get("type").and_then(Value::as_str) != Some("function")
            || tool.pointer("/function/name").and_then(Value::as_str).is_none()
        {
            return Err(ApiError::invalid(&format!("tools[{i}]"), "a tool needs `type: function` and `function.name`"));
        }
    }
    match body.get("tool_choice") {
        Some(Value::String(s)) if s == "none" => Ok(None),
        None | Some(Value::Null) => Ok(Some(tools.clone())),
        Some(Value::String(s)) if s == "auto" || s == "required" => Ok(Some(tools.clone())),
        Some(Value::Object(choice)) => {
            let name = choice.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
            let chosen: Vec<Value> =
                tools.iter().filter(|t| t.pointer("/function/name").and_then(Value::as_str) == name).cloned().collect();
            if chosen.is_empty() {
                return Err(ApiError::invalid("tool_choice", "`tool_choice` names no tool of `tools`"));
            }
            Ok(Some(chosen))
        }
        Some(_) => Err(ApiError::invalid("tool_choice", "`tool_choice` must be none, auto, required or a function")),
    }
}

/// How a model family writes tool calls.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
    Hermes,
    /// `{"name": ..., "parameters": {...}}`, maybe after `<|python_tag|>`.
    Llama3Json,
    /// `[TOOL_CALLS] [{"name": ..., "arguments": {...}}]` or `[TOOL_CALLS]name[ARGS]{...}`.
    Mistral,
}

impl ToolFormat {
    /// The format a chat template's source teaches (Hermes unless it
    /// names Mistral's or Llama 3's markers).
    pub fn of_template(source: &str) -> ToolFormat {
        if source.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if source.contains("<|python_tag|>") || source.contains("\"parameters\": dictionary of argument") {
            ToolFormat::Llama3Json
        } else {
            ToolFormat::Hermes
        }
    }
}

/// One call in OpenAI's form (arguments as a JSON string).
fn openai_call(id: String, name: &str, arguments: Option<&Value>) -> Value {
    let arguments = match arguments {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "{}".into(),
    };
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

/// The answer's text outside tool calls (`None` when nothing else), and
/// its tool calls in OpenAI's form, ids `call_{prefix}_{i}`, read in
/// `format`.
pub fn parse_tool_calls(text: &str, prefix: &str, format: ToolFormat) -> (Option<String>, Vec<Value>) {
    let (rest, calls) = match format {
        ToolFormat::Hermes => parse_hermes(text, prefix),
        ToolFormat::Llama3Json => parse_llama3(text, prefix),
        ToolFormat::Mistral => parse_mistral(text, prefix),
    };
    let content = rest.trim();
    ((!content.is_empty()).then(|| content.to_owned()), calls)
}

fn parse_hermes(text: &str, prefix: &str) -> (String, Vec<Value>) {
    let (open, close) = ("<tool_call>", "</tool_call>");
    let mut calls = Vec::new();
    let mut rest = String::new();
    let mut remaining = text;
    while let Some(start) = remaining.find(open) {
        let after = &remaining[start + open.len()..];
        let Some(end) = after.find(close) else { break };
        rest.push_str(&remaining[..start]);
        let parsed: Option<Value> = serde_json::from_str(after[..end].trim()).ok();
        match parsed.as_ref().and_then(|v| v.get("name").and_then(Value::as_str).map(|n| (n, v))) {
            Some((name, call)) => {
                calls.push(openai_call(format!("call_{prefix}_{}", calls.len()), name, call.get("arguments")))
            }
            // Not a call after all: keep the text as it was.
            None => rest.push_str(&remaining[start..start + open.len() + end + close.len()]),
        }
        remaining = &after[end + close.len()..];
    }
    rest.push_str(remaining);
    (rest, calls)
}

/// Llama 3.1: the whole answer (after an optional `<|python_tag|>`, an
/// end-of-message marker dropped) is one call or several joined by `;`;
/// anything else is plain text.
fn parse_llama3(text: &str, prefix: &str) -> (String, Vec<Value>) {
    let body = text.trim().trim_start_matches("<|python_tag|>").trim_end_matches("<|eom_id|>").trim();
    let mut calls = Vec::new();
    for part in body.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let parsed: Option<Value> = serde_json::from_str(part).ok();
        let Some(name) = parsed.as_ref().and_then(|v| v.get("name")?.as_str()) else {
            return (text.to_owned(), Vec::new());
        };
        let call = parsed.as_ref().expect("parsed above");
        let arguments = call.get("parameters").or_else(|| call.get("arguments"));
        calls.push(openai_call(format!("call_{prefix}_{}", calls.len()), name, arguments));
    }
    (String::new(), calls)
}

/// Mistral: text before `[TOOL_CALLS]`, then a JSON list of calls, or
/// (newer tokenizers) `name[ARGS]{json}` pairs each after its own marker.
fn parse_mistral(text: &str, prefix: &str) -> (String, Vec<Value>) {
    let marker = "[TOOL_CALLS]";
    let Some(start) = text.find(marker) else { return (text.to_owned(), Vec::new()) };
    let (before, after) = (&text[..start], &text[start..]);
    let mut calls = Vec::new();
    for chunk in after.split(marker).map(str::trim).filter(|c| !c.is_empty()) {
        if let Some((name, arguments)) = chunk.split_once("[ARGS]") {
            let arguments: Option<Value> = serde_json::from_str(arguments.trim()).ok();
            match arguments {
                Some(a) => calls.push(openai_call(format!("call_{prefix}_{}", calls.len()), name.trim(), Some(&a))),
                None => return (text.to_owned(), Vec::new()),
            }
            continue;
        }
        let list: Option<Vec<Value>> = serde_json::from_str(chunk).ok();
        let Some(list) = list else { return (text.to_owned(), Vec::new()) };
        for call in &list {
            let Some(name) = call.get("name").and_then(Value::as_str) else { return (text.to_owned(), Vec::new()) };
            calls.push(openai_call(format!("call_{prefix}_{}", calls.len()), name, call.get("arguments")));
        }
    }
    (before.to_owned(), calls)
}

/// A streamed answer that may hold tool calls: text is passed on as it
/// comes until it may be the start of a call (the format's marker, or
/// for Llama 3 an answer opening with `{`), which is held back; at the end
/// the held text is parsed into calls (or passed on after all).
pub struct StreamedCalls {
    format: ToolFormat,
    text: String,
    emitted: usize,
}

impl StreamedCalls {
    /// Nothing streamed yet, calls read in `format`.
    pub fn new(format: ToolFormat) -> StreamedCalls {
        StreamedCalls { format, text: String::new(), emitted: 0 }
    }

    /// Adds generated text; returns what can be sent as content now.
    pub fn push(&mut self, delta: &str) -> String {
        self.text.push_str(delta);
        let ready = self.safe_len();
        let out = self.text[self.emitted..ready].to_owned();
        self.emitted = ready;
        out
    }

    /// How much of the text cannot start a call.
    fn safe_len(&self) -> usize {
        let marker = match self.format {
            ToolFormat::Hermes => "<tool_call>",
            ToolFormat::Mistral => "[TOOL_CALLS]",
            ToolFormat::Llama3Json => {
                let start = self.text.trim_start();
                let tag = "<|python_tag|>";
                let maybe_call =
                    start.is_empty() || start.starts_with('{') || start.starts_with(tag) || tag.starts_with(start);
                return if maybe_call { self.emitted } else { self.text.len() };
            }
        };
        if let Some(at) = self.text[self.emitted..].find(marker) {
            return self.emitted + at;
        }
        // Hold back a tail that may be the marker's beginning.
        let tail = (1..marker.len())
            .rev()
            .find(|&k| {
                self.text.len() >= k
                    && self.text.is_char_boundary(self.text.len() - k)
                    && self.text.ends_with(&marker[..k])
            })
            .unwrap_or(0);
        (self.text.len() - tail).max(self.emitted)
    }

    /// The answer is complete (`text`: its final text, of which the pushed
    /// text is a prefix): the content still to send and the calls.
    pub fn finish(self, text: &str, prefix: &str) -> (String, Vec<Value>) {
        let held = text.get(self.emitted..).unwrap_or_default();
        let (content, calls) = parse_tool_calls(held, prefix, self.format);
        if calls.is_empty() {
            return (held.to_owned(), calls);
        }
        (content.unwrap_or_default(), calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hermes_calls_become_openai_tool_calls() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let hermes = |t: &str, p: &str| parse_tool_calls(t, p, ToolFormat::Hermes);
        let (content, calls) = hermes(text, "7");
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["id"], "call_7_0");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        let arguments: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(arguments, json!({"city": "Paris"}));
        // Two calls and nothing else: no content.
        let two =
            "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>\n<tool_call>{\"name\": \"b\"}</tool_call>";
        let (content, calls) = hermes(two, "x");
        assert_eq!((content, calls.len()), (None, 2));
        assert_eq!(calls[1]["function"]["arguments"], "{}");
        // Not JSON: left as text, no call.
        let (content, calls) = hermes("<tool_call>oops</tool_call> fine", "x");
        assert_eq!((content.as_deref(), calls.len()), (Some("<tool_call>oops</tool_call> fine"), 0));
        assert_eq!(hermes("plain answer", "x"), (Some("plain answer".into()), vec![]));
    }

    #[test]
    fn llama3_and_mistral_calls_become_openai_tool_calls() {
        let llama = |t: &str| parse_tool_calls(t, "1", ToolFormat::Llama3Json);
        let (content, calls) = llama("<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}");
        assert_eq!((content, calls.len()), (None, 1));
        assert_eq!(calls[0]["function"]["arguments"], "{\"city\":\"Oslo\"}");
        let (_, calls) = llama("{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"x\": 1}}");
        assert_eq!(calls.iter().map(|c| c["function"]["name"].as_str().unwrap()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(llama("The weather is fine."), (Some("The weather is fine.".into()), vec![]));

        let mistral = |t: &str| parse_tool_calls(t, "2", ToolFormat::Mistral);
        let (content, calls) =
            mistral("Checking. [TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}]");
        assert_eq!((content.as_deref(), calls.len()), (Some("Checking."), 1));
        assert_eq!(calls[0]["id"], "call_2_0");
        let (_, calls) = mistral("[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Rome\"}[TOOL_CALLS]get_time[ARGS]{}");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1]["function"]["name"], "get_time");
        assert_eq!(mistral("[TOOL_CALLS] not json").1.len(), 0);
    }

    #[test]
    fn streamed_calls_hold_back_only_what_may_be_a_call() {
        let mut s = StreamedCalls::new(ToolFormat::Hermes);
        let pieces = ["Let me ", "check.<to", "ol_call>{\"name\": \"f\", ", "\"arguments\": {}}</tool_call>"];
        let sent: Vec<String> = pieces.iter().map(|p| s.push(p)).collect();
        assert_eq!(sent, ["Let me ", "check.", "", ""]);
        let (rest, calls) = s.finish(&pieces.concat(), "c");
        assert_eq!((rest.as_str(), calls.len()), ("", 1));
        // No call after all: the held text goes out at the end.
        let mut s = StreamedCalls::new(ToolFormat::Hermes);
        assert_eq!(s.push("a <tool"), "a ");
        assert_eq!(s.push("box> b"), "<toolbox> b");
        assert_eq!(s.finish("a <toolbox> b", "c"), (String::new(), vec![]));
        // Llama 3: an answer opening with `{` is held whole.
        let mut s = StreamedCalls::new(ToolFormat::Llama3Json);
        assert_eq!(s.push("{\"name\": \"f\", \"parameters\": {}}"), "");
        assert_eq!(s.finish("{\"name\": \"f\", \"parameters\": {}}", "c").1.len(), 1);
        let mut s = StreamedCalls::new(ToolFormat::Llama3Json);
        assert_eq!(s.push("Sunny."), "Sunny.");
    }

    #[test]
    fn formats_are_told_apart_by_their_templates() {
        assert_eq!(ToolFormat::of_template("{{ '[TOOL_CALLS]' }}"), ToolFormat::Mistral);
        assert_eq!(ToolFormat::of_template("{{- '<|python_tag|>' }}"), ToolFormat::Llama3Json);
        assert_eq!(ToolFormat::of_template("<tool_call>"), ToolFormat::Hermes);
    }

    #[test]
    fn tool_choice_selects_or_refuses() {
        let body = json!({"tools": [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "b"}}]});
        assert_eq!(request_tools(&body).unwrap().unwrap().len(), 2);
        let mut none = body.clone();
        none["tool_choice"] = json!("none");
        assert!(request_tools(&none).unwrap().is_none());
        let mut one = body.clone();
        one["tool_choice"] = json!({"type": "function", "function": {"name": "b"}});
        assert_eq!(request_tools(&one).unwrap().unwrap()[0]["function"]["name"], "b");
        one["tool_choice"] = json!({"type": "function", "function": {"name": "c"}});
        assert_eq!(request_tools(&one).unwrap_err().param.as_deref(), Some("tool_choice"));
        assert!(request_tools(&json!({"tools": [{"type": "x"}]})).is_err());
    }
}
