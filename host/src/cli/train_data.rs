//! Turning dataset files into training rows for `sft` and `pt`: records
//! through the dataset adapters, then the chat template with assistant-only
//! labels (`sft`) or plain text with every token labelled (`pt`), then
//! `--max-length` truncation — each step counted, each error naming the
//! file and line.

use anyhow::{bail, Context};
use serde_json::Value;

use super::train_args::DataArgs;
use crate::data::sources::{parse_renames, read_sources, split, DatasetSource, SourcedRecord};
use crate::loss::IGNORE_INDEX;
use crate::media::{collect, encode_chat_with_media};
use crate::model::LoadedModel;
use crate::text::{encode_chat, EncodedRow, TextAssets};
use oxtune_registry::Registry;

/// What the labels cover.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Objective {
    /// The assistant turns of a templated conversation (`oxtune sft`).
    AssistantTurns,
    /// Every token of untemplated text (`oxtune pt`).
    AllTokens,
}

/// The rows of a run and what happened to the records on the way.
#[derive(Debug, Default)]
pub struct PreparedData {
    /// Training rows.
    pub train: Vec<EncodedRow>,
    /// Evaluation rows (from --val-dataset or --split-ratio).
    pub eval: Vec<EncodedRow>,
    /// Records skipped as malformed (with --skip-bad-records), first error kept.
    pub skipped: Vec<anyhow::Error>,
    /// Rows longer than --max-length that were cut.
    pub truncated: usize,
    /// Rows longer than --max-length that were dropped.
    pub deleted: usize,
}

impl PreparedData {
    /// Prints the counts a user should know about.
    pub fn report(&self, args: &DataArgs) {
        if let Some(first) = self.skipped.first() {
            eprintln!("skipped {} bad record(s); the first: {first:#}", self.skipped.len());
        }
        if self.truncated > 0 {
            eprintln!(
                "{} row(s) longer than --max-length {} were cut on the {}",
                self.truncated, args.max_length, args.truncation_strategy
            );
        }
        if self.deleted > 0 {
            eprintln!("{} row(s) longer than --max-length {} were dropped", self.deleted, args.max_length);
        }
    }
}

/// What encoding a record needs: the plugins, the model's text side and the run's data flags.
pub struct Encoder<'a> {
    /// The registry (dataset adapters).
    pub registry: &'a Registry,
    /// Tokenizer and chat template.
    pub assets: &'a TextAssets,
    /// The model (whether and how it reads images).
    pub model: &'a LoadedModel,
    /// Media preprocessing overrides (`--max-pixels`, ...).
    pub media_options: Value,
    /// The data flags.
    pub args: &'a DataArgs,
    /// What the labels cover.
    pub objective: Objective,
}

impl Encoder<'_> {
    /// Tokens and labels for one record.
    fn encode_record(&self, record: &SourcedRecord) -> anyhow::Result<EncodedRow> {
        let Encoder { registry, assets, model, args, objective, .. } = *self;
        let fields = &record.record.value;
        if objective == Objective::AllTokens {
            if let Some(text) = fields.get("text").and_then(Value::as_str) {
                return plain_text(assets, text);
            }
        }
        let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
        let adapter = match &args.dataset_adapter {
            Some(name) => name.clone(),
            None => registry.detect_adapter(&keys)?.name().to_owned(),
        };
        let row = registry.adapt(&adapter, &Value::Object(fields.clone()))?;
        if let Some(ids) = row.get("input_ids") {
            return pre_tokenized(ids, row.get("labels"), assets.tokenizer.vocab_size());
        }
        let (messages, media) = collect(&row, record.path.parent())?;
        if !media.is_empty() && model.media_spec().is_none() {
            bail!("the row has images or videos, and this model reads text only");
        }
        match objective {
            Objective::AssistantTurns if !media.is_empty() => {
                let tools = row_tools(&row)?;
                let options = &self.media_options;
                let mut encoded = encode_chat_with_media(model, assets, &messages, &media, tools.as_deref(), options)?;
                if let Some(row_media) = encoded.media.as_mut() {
                    row_media.release_pixels(media, options.clone());
                }
                Ok(encoded)
            }
            Objective::AssistantTurns => {
                let tools = row_tools(&row)?;
                Ok(encode_chat(assets, &messages, tools.as_deref())?)
            }
            Objective::AllTokens if !media.is_empty() => bail!("`pt` trains on text only, and the row has media"),
            Objective::AllTokens => {
                let joined: Vec<&str> = messages.iter().filter_map(|m| m["content"].as_str()).collect();
                plain_text(assets, &joined.join("\n"))
            }
        }
    }
}

/// A row's tool definitions; ms-swift rows often carry `tools` as a JSON string.
fn row_tools(row: &Value) -> anyhow::Result<Option<Vec<Value>>> {
    Ok(match row.get("tools") {
        Some(Value::Array(tools)) => Some(tools.clone()),
        Some(Value::String(text)) => {
            Some(serde_json::from_str(text).context("`tools` is a string but not a JSON list")?)
        }
        _ => None,
    })
}

/// `text` tokenized (special tokens as the tokenizer adds them), then the
/// end-of-sequence token; every token labelled.
fn plain_text(assets: &TextAssets, text: &str) -> anyhow::Result<EncodedRow> {
    let mut ids = assets.tokenizer.encode(text, true)?;
    if let Some(&eos) = assets.eos_token_ids.first() {
        ids.push(eos);
    }
    let labels = ids.iter().map(|&t| t as i64).collect();
    Ok(EncodedRow { input_ids: ids, labels, media: None })
}

/// A pre-tokenized row, checked against the vocabulary.
fn pre_tokenized(ids: &Value, labels: Option<&Value>, vocab: usize) -> anyhow::Result<EncodedRow> {
    let numbers = |v: &Value, key: &str| -> anyhow::Result<Vec<i64>> {
        v.as_array()
            .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<i64>>>())
            .with_context(|| format!("`{key}` must be a list of integers"))
    };
    let raw = numbers(ids, "input_ids")?;
    let mut input_ids = Vec::with_capacity(raw.len());
    for (i, &id) in raw.iter().enumerate() {
        if id < 0 || id as usize >= vocab {
            bail!("input_ids[{i}] = {id} is outside the vocabulary of {vocab} tokens");
        }
        input_ids.push(id as u32);
    }
    let labels = match labels {
        Some(l) => numbers(l, "labels")?,
        None => raw,
    };
    if let Some(bad) = labels.iter().find(|&&l| l != IGNORE_INDEX && (l < 0 || l as usize >= vocab)) {
        bail!("label {bad} is outside the vocabulary of {vocab} tokens");
    }
    Ok(EncodedRow { input_ids, labels, media: None })
}

impl Encoder<'_> {
    /// Reads, encodes and truncates `sources`.
    fn prepare(&self, sources: &[DatasetSource], seed: u64, out: &mut PreparedData) -> anyhow::Result<Vec<EncodedRow>> {
        let args = self.args;
        let renames = parse_renames(&args.columns).map_err(anyhow::Error::msg)?;
        let (records, bad) = read_sources(sources, &renames, seed)?;
        if let (Some(first), false) = (bad.first(), args.skip_bad_records) {
            bail!("{first} (--skip-bad-records skips such records)");
        }
        out.skipped.extend(bad.into_iter().map(anyhow::Error::from));
        let mut rows = Vec::with_capacity(records.len());
        for record in &records {
            let encoded = self.encode_record(record).with_context(|| record.at());
            let mut row = match encoded {
                Ok(row) => row,
                Err(e) if args.skip_bad_records => {
                    out.skipped.push(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let excess = row.input_ids.len().saturating_sub(args.max_length);
            if excess > 0 && row.media.is_some() {
                // Cutting would split an image's tokens from its pixels.
                out.deleted += 1;
                continue;
            }
            if excess > 0 {
                match args.truncation_strategy.as_str() {
                    "left" => {
                        row.input_ids.drain(..excess);
                        row.labels.drain(..excess);
                    }
                    "right" => {
                        row.input_ids.truncate(args.max_length);
                        row.labels.truncate(args.max_length);
                    }
                    _ => {
                        out.deleted += 1;
                        continue;
                    }
                }
                out.truncated += 1;
            }
            rows.push(row);
        }
        Ok(rows)
    }

    /// Reads and encodes the training and evaluation data of a run.
    pub fn prepare_data(&self, seed: u64) -> anyhow::Result<PreparedData> {
        let args = self.args;
        let mut out = PreparedData::default();
        let train = self.prepare(&args.dataset, seed, &mut out)?;
        if args.val_dataset.is_empty() {
            let (train, eval) = split(train, args.split_ratio, seed);
            (out.train, out.eval) = (train, eval);
        } else {
            out.eval = self.prepare(&args.val_dataset, seed, &mut out)?;
            out.train = train;
        }
        if out.train.is_empty() {
            bail!("no training row is left (every record was skipped, dropped as too long, or held out)");
        }
        Ok(out)
    }
}
