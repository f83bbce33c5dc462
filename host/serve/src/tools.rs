//! Tool calls in chat completions: the request's `tools` go to the model's
//! chat template (which renders them the family's way), and calls in the
//! model's answer are parsed into OpenAI's `tool_calls`. The call format
//! parsed is the Hermes one that Qwen2.5/Qwen3 and many fine-tunes emit:
//! `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

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

/// The answer's text outside tool calls (`None` when nothing else), and
/// its tool calls in OpenAI's form, ids `call_{prefix}_{i}`.
pub fn parse_tool_calls(text: &str, prefix: &str) -> (Option<String>, Vec<Value>) {
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
                let arguments = match call.get("arguments") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                    None => "{}".into(),
                };
                calls.push(json!({"id": format!("call_{prefix}_{}", calls.len()), "type": "function",
                                  "function": {"name": name, "arguments": arguments}}));
            }
            // Not a call after all: keep the text as it was.
            None => rest.push_str(&remaining[start..start + open.len() + end + close.len()]),
        }
        remaining = &after[end + close.len()..];
    }
    rest.push_str(remaining);
    let content = rest.trim();
    ((!content.is_empty()).then(|| content.to_owned()), calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hermes_calls_become_openai_tool_calls() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (content, calls) = parse_tool_calls(text, "7");
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["id"], "call_7_0");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        let arguments: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(arguments, json!({"city": "Paris"}));
        // Two calls and nothing else: no content.
        let two =
            "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>\n<tool_call>{\"name\": \"b\"}</tool_call>";
        let (content, calls) = parse_tool_calls(two, "x");
        assert_eq!((content, calls.len()), (None, 2));
        assert_eq!(calls[1]["function"]["arguments"], "{}");
        // Not JSON: left as text, no call.
        let (content, calls) = parse_tool_calls("<tool_call>oops</tool_call> fine", "x");
        assert_eq!((content.as_deref(), calls.len()), (Some("<tool_call>oops</tool_call> fine"), 0));
        assert_eq!(parse_tool_calls("plain answer", "x"), (Some("plain answer".into()), vec![]));
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
