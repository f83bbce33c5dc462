//! `oxtune infer`: answer a prompt, a conversation, every row of a
//! dataset, or chat interactively when stdin is a terminal.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::model_args::{LoadedText, ModelArgs, SamplingArgs};
use super::GlobalArgs;
use oxtune_data::media::collect;
use oxtune_data::{encode_prompt, prompt_of_row, read_records, EncodedRow, Prompt, PromptOptions};
use oxtune_engine::generate::{generate_with_media, SamplingParams};

/// Arguments of `oxtune infer`.
#[derive(Debug, clap::Args)]
pub struct InferArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// One user message.
    #[arg(long, conflicts_with_all = ["messages", "dataset"])]
    pub prompt: Option<String>,
    /// A prompt as token ids (`1,2,3`), sent as they are: no tokenizer, no
    /// template (for checking a model against transformers token by token).
    #[arg(long, value_name = "IDS", value_delimiter = ',', conflicts_with_all = ["prompt", "messages", "dataset"])]
    pub prompt_ids: Vec<u32>,
    /// A conversation: a JSON list of {"role", "content"} messages, or a file holding one.
    #[arg(long, conflicts_with = "dataset")]
    pub messages: Option<String>,
    /// A JSONL or JSON-array dataset: one answer per row (any format a dataset
    /// adapter reads — messages, ShareGPT, Alpaca, query/response — raw
    /// `text`, or pre-tokenized `input_ids`).
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
    /// An image for --prompt or --messages (repeatable): `<image>` tags in
    /// the text mark where each goes; untagged images go first.
    #[arg(long, value_name = "FILE", conflicts_with = "dataset")]
    pub image: Vec<PathBuf>,
    /// A video for --prompt or --messages (repeatable): a folder of frames,
    /// or frame files separated by commas.
    #[arg(long, value_name = "FRAMES", conflicts_with = "dataset")]
    pub video: Vec<String>,
    /// Rows generated together when answering a dataset.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

impl InferArgs {
    /// `messages` with the --image and --video flags attached.
    fn chat_with_flags(&self, messages: Vec<Value>) -> anyhow::Result<Prompt> {
        if self.image.is_empty() && self.video.is_empty() {
            return Ok(Prompt::Chat(messages, Vec::new()));
        }
        let videos: Vec<Value> = self.video.iter().map(|v| json!(v.split(',').collect::<Vec<_>>())).collect();
        let row = json!({"messages": messages, "images": self.image, "videos": videos});
        let (messages, media) = collect(&row, None)?;
        Ok(Prompt::Chat(messages, media))
    }

    fn encode(&self, text: &LoadedText, prompt: &Prompt) -> anyhow::Result<EncodedRow> {
        let options =
            PromptOptions { system: self.system.clone(), raw: self.raw, media_options: self.model.media_options() };
        Ok(encode_prompt(&text.model, &text.assets, prompt, &options)?)
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
            args.chat_with_flags(vec![json!({"role": "user", "content": prompt})])?
        };
        return answer_streaming(args, &text, &params, &p).map(|_| ());
    }
    if !args.prompt_ids.is_empty() {
        return answer_streaming(args, &text, &params, &Prompt::Ids(args.prompt_ids.clone())).map(|_| ());
    }
    if let Some(messages) = &args.messages {
        let prompt = args.chat_with_flags(parse_messages(messages)?)?;
        return answer_streaming(args, &text, &params, &prompt).map(|_| ());
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
    let row = args.encode(text, prompt)?;
    let mut stdout = std::io::stdout().lock();
    let rows = [row.as_prompt()];
    let out = generate_with_media(&text.model, Some(&text.assets.tokenizer), &rows, params, |_, delta| {
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
        let answer = answer_streaming(args, text, params, &args.chat_with_flags(history.clone())?)?;
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
        let at = || format!("{}:{}", dataset.display(), record.line);
        let (prompt, label) = prompt_of_row(registry, &record.value, dataset.parent()).with_context(at)?;
        requests.push((args.encode(text, &prompt).with_context(at)?, label));
    }
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    for (chunk_index, chunk) in requests.chunks(args.batch_size.max(1)).enumerate() {
        let prompts: Vec<_> = chunk.iter().map(|(row, _)| row.as_prompt()).collect();
        let answers = generate_with_media(&text.model, Some(&text.assets.tokenizer), &prompts, params, |_, _| {})?;
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
