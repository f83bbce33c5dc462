//! `--to-ollama`: a Modelfile beside the exported GGUF files — `FROM`,
//! `ADAPTER`, the chat template as Ollama's Go template, the template's
//! default system prompt as `SYSTEM`, and the turn-ending tokens as
//! `PARAMETER stop`.
//!
//! A Jinja chat template cannot be translated in general, so the
//! template is recognised by what it renders: a probe conversation is
//! rendered and compared with the chat formats Ollama's own library uses
//! (ChatML, Llama 3). An unrecognised format gets no `TEMPLATE` line, and
//! the caller is told: Ollama then uses the GGUF file's own
//! `tokenizer.chat_template`.

use std::path::Path;

use oxtune_data::text::{ChatRequest, TextAssets};
use serde_json::json;

use crate::ExportError;

/// A chat format Ollama can be given as a Go template.
struct ChatFormat {
    name: &'static str,
    /// How one user turn renders, `{}` standing for the content.
    user_turn: &'static str,
    /// How a system turn renders; the text between the two parts is the system prompt.
    system_turn: (&'static str, &'static str),
    template: &'static str,
    stops: &'static [&'static str],
}

const FORMATS: [ChatFormat; 2] = [
    ChatFormat {
        name: "ChatML",
        user_turn: "<|im_start|>user\n{}<|im_end|>\n",
        system_turn: ("<|im_start|>system\n", "<|im_end|>\n"),
        template: "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\
{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        stops: &["<|im_end|>", "<|im_start|>"],
    },
    ChatFormat {
        name: "Llama 3",
        user_turn: "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
        system_turn: ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
        template: "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}\
{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}\
<|start_header_id|>assistant<|end_header_id|>\n\n",
        stops: &["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
    },
];

/// A Modelfile's text.
#[derive(Clone, Debug)]
pub struct Modelfile {
    /// The file's contents.
    pub text: String,
    /// The chat format recognised, if any (`ChatML`).
    pub format: Option<&'static str>,
}

/// The Modelfile for `model_file` (and `adapter_file`), both named
/// relative to the Modelfile's folder, with the chat format of the model
/// whose text assets are at `source`.
pub fn modelfile(source: &Path, model_file: &str, adapter_file: Option<&str>) -> Result<Modelfile, ExportError> {
    let assets = TextAssets::load(source).map_err(|e| ExportError::source(source, e))?;
    let mut text = format!("FROM ./{model_file}\n");
    if let Some(adapter) = adapter_file {
        text.push_str(&format!("ADAPTER ./{adapter}\n"));
    }
    let probe = "Ollama probe 7d1f";
    let messages = [json!({"role": "user", "content": probe})];
    let request = ChatRequest { messages: &messages, add_generation_prompt: true, ..Default::default() };
    let rendered = match &assets.template {
        Some(template) => template.render(&request).ok(),
        None => None,
    };
    let Some(rendered) = rendered else { return Ok(Modelfile { text, format: None }) };
    let Some(format) = FORMATS.iter().find(|f| rendered.contains(&f.user_turn.replace("{}", probe))) else {
        return Ok(Modelfile { text, format: None });
    };
    text.push_str(&format!("TEMPLATE \"\"\"{}\"\"\"\n", format.template));
    // A system turn the template adds by itself is its default system prompt.
    let (open, close) = format.system_turn;
    if let Some(start) = rendered.find(open) {
        let body = &rendered[start + open.len()..];
        if let Some(end) = body.find(close) {
            text.push_str(&format!("SYSTEM \"\"\"{}\"\"\"\n", &body[..end]));
        }
    }
    for stop in format.stops {
        text.push_str(&format!("PARAMETER stop \"{stop}\"\n"));
    }
    Ok(Modelfile { text, format: Some(format.name) })
}
