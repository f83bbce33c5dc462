//! Chat templates: a model's own Jinja template, rendered with `minijinja`
//! the way transformers' `apply_chat_template` renders it, so every Hugging
//! Face model is templated on day zero.
//!
//! transformers renders with `trim_blocks`, `lstrip_blocks` and loop
//! controls, Python string methods (`.strip()`, `.startswith()`, ...), a
//! `tojson` that is Python's `json.dumps` (`", "` and `": "` separators,
//! non-ASCII kept), `raise_exception(message)` and `strftime_now(format)`.
//! This module provides the same.

use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Serde, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::json;

/// An error loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template does not parse.
    #[error("the chat template of {source_file} does not parse: {message}")]
    Syntax {
        /// Where the template came from.
        source_file: PathBuf,
        /// minijinja's message, with the line.
        message: String,
    },
    /// Rendering failed (including the template's own `raise_exception`).
    #[error("the chat template of {source_file} failed to render: {message}")]
    Render {
        /// Where the template came from.
        source_file: PathBuf,
        /// minijinja's message, with the line.
        message: String,
    },
}

fn describe(e: &minijinja::Error) -> String {
    let mut message = match e.kind() {
        ErrorKind::InvalidOperation if e.detail().is_some() => e.detail().unwrap_or_default().to_owned(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        message.push_str(&format!(" (template line {line})"));
    }
    message
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`.
pub fn python_json(value: &Value, indent: Option<usize>) -> String {
    let mut out = String::new();
    write_json(value, indent, 0, &mut out);
    out
}

fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_json(value: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_separator = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                out.push_str(&value.to_string());
            } else {
                let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
                if f.is_finite() {
                    let s = serde_json::to_string(&f).unwrap_or_else(|_| f.to_string());
                    out.push_str(&s);
                } else if f.is_nan() {
                    out.push_str("NaN");
                } else {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                }
            }
        }
        ValueKind::String => write_json_string(value.as_str().unwrap_or_default(), out),
        ValueKind::Map => {
            let keys: Vec<Value> = value.try_iter().map(|it| it.collect()).unwrap_or_default();
            if keys.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                write_json_string(&key.to_string(), out);
                out.push_str(": ");
                write_json(&value.get_item(key).unwrap_or_default(), indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter().map(|it| it.collect()).unwrap_or_default();
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                write_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        _ => write_json_string(&value.to_string(), out),
    }
}

/// `strftime` for the fields chat templates use (`%d %b %Y`, `%B`, `%m`, `%H:%M`, ...), in UTC.
fn strftime_now(format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (hour, minute, second) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// A compiled chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    source_file: PathBuf,
    special_tokens: serde_json::Map<String, serde_json::Value>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("source_file", &self.source_file).finish()
    }
}

/// What to render.
#[derive(Clone, Debug, Default)]
pub struct ChatRequest<'a> {
    /// The conversation (`[{"role": ..., "content": ...}, ...]`).
    pub messages: &'a [serde_json::Value],
    /// Tool definitions, if any.
    pub tools: Option<&'a [serde_json::Value]>,
    /// End with the assistant's turn header.
    pub add_generation_prompt: bool,
    /// Further variables the template may read (`enable_thinking`, ...).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ChatTemplate {
    /// Compiles `source`. `special_tokens` (`bos_token`, `eos_token`, ...)
    /// are visible to the template as variables.
    pub fn new(
        source: &str,
        source_file: &Path,
        special_tokens: serde_json::Map<String, serde_json::Value>,
    ) -> Result<ChatTemplate, TemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
        let syntax_error =
            |e: minijinja::Error| TemplateError::Syntax { source_file: source_file.to_owned(), message: describe(&e) };
        env.set_syntax(syntax.map_err(syntax_error)?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_filter("tojson", |value: Value, kwargs: Kwargs| -> Result<String, minijinja::Error> {
            let indent: Option<usize> = kwargs.get("indent")?;
            let _: Option<bool> = kwargs.get("ensure_ascii")?;
            kwargs.assert_all_used()?;
            Ok(python_json(&value, indent))
        });
        env.add_template_owned("chat", source.to_owned()).map_err(syntax_error)?;
        Ok(ChatTemplate { env, source: source.to_owned(), source_file: source_file.to_owned(), special_tokens })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special tokens (`bos_token`, `eos_token`, ...) it renders with.
    pub fn special_tokens(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.special_tokens
    }

    /// Renders a conversation.
    pub fn render(&self, request: &ChatRequest<'_>) -> Result<String, TemplateError> {
        let render_error = |e: minijinja::Error| TemplateError::Render {
            source_file: self.source_file.clone(),
            message: describe(&e),
        };
        let mut context = self.special_tokens.clone();
        context.insert("messages".into(), json!(request.messages));
        context.insert("add_generation_prompt".into(), json!(request.add_generation_prompt));
        if let Some(tools) = request.tools {
            context.insert("tools".into(), json!(tools));
        }
        for (k, v) in &request.extra {
            context.insert(k.clone(), v.clone());
        }
        let template = self.env.get_template("chat").map_err(render_error)?;
        template.render(Value::from(Serde(&context))).map_err(render_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let v = Value::from(Serde(json!({"name": "f", "n": [1, 2.5, true, null], "s": "a\"b\nç"})));
        assert_eq!(python_json(&v, None), r#"{"name": "f", "n": [1, 2.5, true, null], "s": "a\"b\nç"}"#);
        assert_eq!(python_json(&Value::from(Serde(json!({"a": [1]}))), Some(2)), "{\n  \"a\": [\n    1\n  ]\n}");
    }

    #[test]
    fn raise_exception_is_a_render_error_with_its_message() {
        let t = ChatTemplate::new("{{ raise_exception('only user turns') }}", Path::new("t.jinja"), Default::default())
            .unwrap();
        let err = t.render(&ChatRequest::default()).unwrap_err().to_string();
        assert!(err.contains("only user turns") && err.contains("t.jinja"), "{err}");
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let err = ChatTemplate::new("{% for %}", Path::new("bad.jinja"), Default::default()).unwrap_err().to_string();
        assert!(err.contains("bad.jinja") && err.contains("does not parse"), "{err}");
    }

    #[test]
    fn python_methods_and_loop_controls_work() {
        let source = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content.strip().upper() }}{% endfor %}";
        let t = ChatTemplate::new(source, Path::new("t"), Default::default()).unwrap();
        let messages = [json!({"content": "  hi "}), json!({"content": "no"})];
        assert_eq!(t.render(&ChatRequest { messages: &messages, ..Default::default() }).unwrap(), "HI");
    }
}
