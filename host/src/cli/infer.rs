//! `oxtune infer`: answer a prompt, a conversation, every row of a
//! dataset, or chat interactively when stdin is a terminal.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::model_args::{LoadedText, ModelArgs, SamplingArgs};
use super::GlobalArgs;
use crate::data::read_records;
use crate::generate::{generate, SamplingParams};
use crate::text::ChatRequest;

/// Arguments of `oxtune infer`.
#[derive(Debug, clap::Args)]
pub struct InferArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// One user message.
    #[arg(long, conflicts_with_all = ["messages", "dataset"])]
    pub prompt: Option<String>,
    /// A conversation: a JSON list of {"role", "content"} messages, or a file holding one.
    #[arg(long, conflicts_with = "dataset")]
    pub messages: Option<String>,
    /// A JSONL or JSON-array dataset: one answer per row (any format a dataset
    /// adapter reads — messages, ShareGPT, Alpaca, query/response — or raw `text`).
    #[arg(long, value_name = "FILE")]
    pub dataset: Option<PathBuf>,
    /// Where dataset answers go (JSONL); stdout when absent.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// A system message put before the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Send the prompt as raw text, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Rows generated together when answering a dataset.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// What to send to the model for one request.
enum Prompt {
    Chat(Vec<Value>),
    Raw(String),
}

impl InferArgs {
    fn encode(&self, text: &LoadedText, prompt: &Prompt) -> anyhow::Result<Vec<u32>> {
        let tokenizer = &text.assets.tokenizer;
        let messages = match prompt {
            Prompt::Raw(s) => return Ok(tokenizer.encode(s, true)?),
            Prompt::Chat(messages) => messages,
        };
        if self.raw || text.assets.template.is_none() {
            let joined: Vec<&str> = messages.iter().filter_map(|m| m["content"].as_str()).collect();
            return Ok(tokenizer.encode(&joined.join("\n"), true)?);
        }
        let mut all = Vec::new();
        if let Some(system) = &self.system {
            if messages.first().and_then(|m| m["role"].as_str()) != Some("system") {
                all.push(json!({"role": "system", "content": system}));
            }
        }
        all.extend(messages.iter().cloned());
        let request = ChatRequest { messages: &all, add_generation_prompt: true, ..Default::default() };
        let rendered = text.assets.render_chat(&request)?;
        Ok(tokenizer.encode(&rendered, false)?)
    }
}

fn parse_messages(arg: &str) -> anyhow::Result<Vec<Value>> {
    let text = if arg.trim_start().starts_with('[') {
        arg.to_owned()
    } else {
        std::fs::read_to_string(arg)
            .with_context(|| format!("--messages {arg}: neither a JSON list nor a readable file"))?
    };
    let messages: Vec<Value> = serde_json::from_str(&text).context("--messages: not a JSON list of messages")?;
    for (i, m) in messages.iter().enumerate() {
        if m.get("role").and_then(Value::as_str).is_none() || m.get("content").is_none() {
            bail!("--messages: message {i} needs a string `role` and a `content`");
        }
    }
    Ok(messages)
}

/// The prompt of a dataset row and its reference answer, if it has one: a
/// raw `text` row is sent as is; any other row is read by the dataset
/// adapter the registry detects for it, and a trailing assistant turn is
/// the reference answer.
fn prompt_of_row(
    registry: &oxtune_registry::Registry,
    row: &serde_json::Map<String, Value>,
) -> anyhow::Result<(Prompt, Option<Value>)> {
    if let (Some(text), false) = (row.get("text").and_then(Value::as_str), row.contains_key("messages")) {
        return Ok((Prompt::Raw(text.to_owned()), None));
    }
    let keys: Vec<&str> = row.keys().map(String::as_str).collect();
    let adapter = registry.detect_adapter(&keys)?;
    let adapted = registry.adapt(adapter.name(), &Value::Object(row.clone()))?;
    let mut messages = adapted["messages"].as_array().cloned().unwrap_or_default();
    let label = match messages.last() {
        Some(m) if m["role"] == "assistant" => messages.pop().map(|m| m["content"].clone()),
        _ => None,
    };
    if messages.is_empty() {
        bail!("the row has nothing before the assistant's answer");
    }
    Ok((Prompt::Chat(messages), label))
}

/// Runs `oxtune infer`.
pub fn run(global: &GlobalArgs, args: &InferArgs) -> anyhow::Result<()> {
    let registry = global.registry()?;
    let text = args.model.load(&registry)?;
    let params = args.sampling.params(&text.assets);
    if let Some(dataset) = &args.dataset {
        return answer_dataset(args, &registry, &text, &params, dataset);
    }
    if let Some(prompt) = &args.prompt {
        let p = if args.raw {
            Prompt::Raw(prompt.clone())
        } else {
            Prompt::Chat(vec![json!({"role": "user", "content": prompt})])
        };
        return answer_streaming(args, &text, &params, &p).map(|_| ());
    }
    if let Some(messages) = &args.messages {
        return answer_streaming(args, &text, &params, &Prompt::Chat(parse_messages(messages)?)).map(|_| ());
    }
    if std::io::stdin().is_terminal() {
        return chat(args, &text, &params);
    }
    bail!("nothing to answer: give --prompt, --messages or --dataset (or run in a terminal to chat)")
}

fn answer_streaming(
    args: &InferArgs,
    text: &LoadedText,
    params: &SamplingParams,
    prompt: &Prompt,
) -> anyhow::Result<String> {
    let ids = args.encode(text, prompt)?;
    let mut stdout = std::io::stdout().lock();
    let out = generate(&text.model, Some(&text.assets.tokenizer), &[ids], params, |_, delta| {
        let _ = stdout.write_all(delta.as_bytes());
        let _ = stdout.flush();
    })?;
    writeln!(stdout)?;
    Ok(out.into_iter().next().map(|g| g.text).unwrap_or_default())
}

fn chat(args: &InferArgs, text: &LoadedText, params: &SamplingParams) -> anyhow::Result<()> {
    eprintln!("Chatting with {} — /clear starts over, /exit or Ctrl-D leaves.", args.model.model.display());
    let mut history: Vec<Value> = Vec::new();
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/clear" => {
                history.clear();
                continue;
            }
            message => history.push(json!({"role": "user", "content": message})),
        }
        let answer = answer_streaming(args, text, params, &Prompt::Chat(history.clone()))?;
        history.push(json!({"role": "assistant", "content": answer}));
    }
}

fn answer_dataset(
    args: &InferArgs,
    registry: &oxtune_registry::Registry,
    text: &LoadedText,
    params: &SamplingParams,
    dataset: &std::path::Path,
) -> anyhow::Result<()> {
    let records = read_records(dataset)?;
    let mut requests = Vec::with_capacity(records.len());
    for record in &records {
        let (prompt, label) =
            prompt_of_row(registry, &record.value).with_context(|| format!("{}:{}", dataset.display(), record.line))?;
        requests.push((args.encode(text, &prompt)?, label));
    }
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    for (chunk_index, chunk) in requests.chunks(args.batch_size.max(1)).enumerate() {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|(ids, _)| ids.clone()).collect();
        let answers = generate(&text.model, Some(&text.assets.tokenizer), &prompts, params, |_, _| {})?;
        for (i, (answer, (_, label))) in answers.iter().zip(chunk).enumerate() {
            let row = chunk_index * args.batch_size.max(1) + i;
            let mut line = json!({"row": row, "response": answer.text, "finish_reason": answer.finish_reason.as_str()});
            if let Some(label) = label {
                line["labels"] = label.clone();
            }
            writeln!(out, "{line}")?;
        }
        out.flush()?;
    }
    Ok(())
}
