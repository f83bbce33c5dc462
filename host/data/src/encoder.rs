//! The one encoder: dataset files into the rows every trainer reads.
//!
//! Records go through the dataset adapters, then the chat template with
//! assistant-only labels (`sft`), plain text with every token labelled
//! (`pt`), a prompt with a chosen and a rejected completion (DPO and its
//! kin), a completion with a desirable flag (KTO) or a generation prompt
//! (GRPO). Every item is then cut to `max_length` by the same rule
//! ([`Truncation`]), each step counted, each error naming the file and line.

use oxtune_engine::loss::IGNORE_INDEX;
use oxtune_engine::model::LoadedModel;
use oxtune_registry::Registry;
use serde_json::{Map, Value};

use crate::error::EncodeError;
use crate::media::{collect, encode_chat_with_media};
use crate::preference::{encode_labelled, encode_pair, refuse_media, LabelledCompletion, PreferencePair};
use crate::sources::{read_sources, split, DatasetSource, SourcedRecord};
use crate::text::{encode_chat, ChatRequest, EncodedRow, TextAssets};

/// What the labels of an SFT or pretraining row cover.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Objective {
    /// The assistant turns of a templated conversation (`oxtune sft`).
    AssistantTurns,
    /// Every token of untemplated text (`oxtune pt`).
    AllTokens,
}

/// What happens to an item longer than `max_length` (ms-swift's
/// `--truncation-strategy`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Truncation {
    /// Drop the item (counted).
    Delete,
    /// Cut tokens off the start of each row that is too long.
    Left,
    /// Cut tokens off the end of each row that is too long.
    Right,
}

impl std::str::FromStr for Truncation {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "delete" => Ok(Truncation::Delete),
            "left" => Ok(Truncation::Left),
            "right" => Ok(Truncation::Right),
            other => Err(format!("truncation strategy `{other}`: use delete, left or right")),
        }
    }
}

impl Truncation {
    /// The flag's name (`delete`, `left`, `right`).
    pub fn as_str(self) -> &'static str {
        match self {
            Truncation::Delete => "delete",
            Truncation::Left => "left",
            Truncation::Right => "right",
        }
    }
}

/// Which records a run reads and how they are cut.
#[derive(Clone, Debug)]
pub struct DataOptions {
    /// Training data files (with optional sample sizes).
    pub dataset: Vec<DatasetSource>,
    /// Evaluation data files; when empty, `split_ratio` of the training
    /// items are held out instead.
    pub val_dataset: Vec<DatasetSource>,
    /// The share of training items held out for evaluation.
    pub split_ratio: f64,
    /// Column renames applied before adapter detection (`old`, `new`).
    pub renames: Vec<(String, String)>,
    /// Read every record with this dataset adapter instead of detecting one.
    pub dataset_adapter: Option<String>,
    /// Longest row in tokens.
    pub max_length: usize,
    /// What to do with a longer item.
    pub truncation: Truncation,
    /// Skip malformed records (counted) instead of stopping at the first.
    pub skip_bad_records: bool,
    /// Seed of sampling and of the held-out split.
    pub seed: u64,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            dataset: Vec::new(),
            val_dataset: Vec::new(),
            split_ratio: 0.0,
            renames: Vec::new(),
            dataset_adapter: None,
            max_length: 2048,
            truncation: Truncation::Delete,
            skip_bad_records: false,
            seed: 42,
        }
    }
}

/// A generation prompt from a record (GRPO rollouts, `infer --dataset`):
/// its conversation templated with the generation prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptRow {
    /// The templated prompt's tokens.
    pub ids: Vec<u32>,
    /// The templated prompt's text (what reward functions see).
    pub text: String,
    /// The row's columns (a `solution` reaches an accuracy reward).
    pub columns: Map<String, Value>,
}

/// One token row of an encoded item, as truncation sees it.
pub struct TokenRow<'a> {
    /// The row's ids.
    pub ids: &'a mut Vec<u32>,
    /// Its labels, cut with the ids (`None`: an unlabelled prompt).
    pub labels: Option<&'a mut Vec<i64>>,
    /// Whether the row carries media (cutting would split an image's
    /// tokens from its pixels, so such a row is dropped instead).
    pub has_media: bool,
}

/// An encoded item: one or more token rows cut together.
pub trait Encoded {
    /// Whether each labelled row must keep a labelled token after cutting
    /// (a preference completion cut away entirely cannot be scored).
    const NEEDS_LABELS: bool = false;

    /// The item's token rows.
    fn token_rows(&mut self) -> Vec<TokenRow<'_>>;
}

impl Encoded for EncodedRow {
    fn token_rows(&mut self) -> Vec<TokenRow<'_>> {
        let has_media = self.media.is_some();
        vec![TokenRow { ids: &mut self.input_ids, labels: Some(&mut self.labels), has_media }]
    }
}

impl Encoded for PreferencePair {
    const NEEDS_LABELS: bool = true;

    fn token_rows(&mut self) -> Vec<TokenRow<'_>> {
        let mut rows = self.chosen.token_rows();
        rows.extend(self.rejected.token_rows());
        rows
    }
}

impl Encoded for LabelledCompletion {
    const NEEDS_LABELS: bool = true;

    fn token_rows(&mut self) -> Vec<TokenRow<'_>> {
        self.row.token_rows()
    }
}

impl Encoded for PromptRow {
    fn token_rows(&mut self) -> Vec<TokenRow<'_>> {
        vec![TokenRow { ids: &mut self.ids, labels: None, has_media: false }]
    }
}

/// What [`cut`] did to an item.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Cut {
    Kept,
    Truncated,
    Deleted,
}

/// Cuts `item` to `max_length` tokens per row by `truncation`.
pub(crate) fn cut<T: Encoded>(item: &mut T, max_length: usize, truncation: Truncation) -> Cut {
    let mut rows = item.token_rows();
    if rows.iter().all(|r| r.ids.len() <= max_length) {
        return Cut::Kept;
    }
    if truncation == Truncation::Delete || rows.iter().any(|r| r.has_media) {
        return Cut::Deleted;
    }
    for row in &mut rows {
        let excess = row.ids.len().saturating_sub(max_length);
        if excess == 0 {
            continue;
        }
        let had_labels = row.labels.as_ref().is_some_and(|l| l.iter().any(|&x| x != IGNORE_INDEX));
        match truncation {
            Truncation::Left => {
                row.ids.drain(..excess);
                if let Some(labels) = row.labels.as_mut() {
                    labels.drain(..excess);
                }
            }
            _ => {
                row.ids.truncate(max_length);
                if let Some(labels) = row.labels.as_mut() {
                    labels.truncate(max_length);
                }
            }
        }
        let has_labels = row.labels.as_ref().is_some_and(|l| l.iter().any(|&x| x != IGNORE_INDEX));
        if T::NEEDS_LABELS && had_labels && !has_labels {
            return Cut::Deleted;
        }
    }
    Cut::Truncated
}

/// The items of a run and what happened to the records on the way.
#[derive(Debug)]
pub struct Prepared<T> {
    /// Training items.
    pub train: Vec<T>,
    /// Evaluation items (from the validation files or the held-out share).
    pub eval: Vec<T>,
    /// Records skipped as malformed (with `skip_bad_records`), in order.
    pub skipped: Vec<EncodeError>,
    /// Items longer than `max_length` that were cut.
    pub truncated: usize,
    /// Items longer than `max_length` that were dropped.
    pub deleted: usize,
}

impl<T> Default for Prepared<T> {
    fn default() -> Self {
        Prepared { train: Vec::new(), eval: Vec::new(), skipped: Vec::new(), truncated: 0, deleted: 0 }
    }
}

/// What encoding a record needs: the plugins, the model's text side and
/// the run's data options.
pub struct Encoder<'a> {
    /// The registry (dataset adapters).
    pub registry: &'a Registry,
    /// Tokenizer and chat template.
    pub assets: &'a TextAssets,
    /// The model (how it reads images, how many ids it embeds).
    pub model: &'a LoadedModel,
    /// Media preprocessing overrides (`max_pixels`, ...).
    pub media_options: Value,
    /// The data options.
    pub options: &'a DataOptions,
}

impl Encoder<'_> {
    /// The record as a standard row, through the chosen or detected dataset adapter.
    pub fn adapt(&self, fields: &Map<String, Value>) -> Result<Value, EncodeError> {
        let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
        let adapter = match &self.options.dataset_adapter {
            Some(name) => name.clone(),
            None => self.registry.detect_adapter(&keys)?.name().to_owned(),
        };
        Ok(self.registry.adapt(&adapter, &Value::Object(fields.clone()))?)
    }

    /// Tokens and labels of one SFT (`AssistantTurns`) or pretraining
    /// (`AllTokens`) record.
    pub fn row(&self, record: &SourcedRecord, objective: Objective) -> Result<EncodedRow, EncodeError> {
        let Encoder { assets, model, .. } = *self;
        let fields = &record.record.value;
        if objective == Objective::AllTokens {
            if let Some(text) = fields.get("text").and_then(Value::as_str) {
                return plain_text(assets, text);
            }
        }
        let row = self.adapt(fields)?;
        if let Some(ids) = row.get("input_ids") {
            let rows = model.vocab_size().unwrap_or_else(|| assets.tokenizer.vocab_size());
            return pre_tokenized(ids, row.get("labels"), rows);
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

    /// A preference record (DPO, CPO, SimPO, ORPO): its prompt with the
    /// chosen and the rejected completion.
    pub fn pair(&self, record: &SourcedRecord) -> Result<PreferencePair, EncodeError> {
        encode_pair(self.assets, &record.record.value)
    }

    /// A KTO record: a completion and whether it is desirable.
    pub fn labelled(&self, record: &SourcedRecord) -> Result<LabelledCompletion, EncodeError> {
        encode_labelled(self.assets, &record.record.value)
    }

    /// A generation prompt: the record's conversation (through the dataset
    /// adapters, a trailing assistant turn dropped) templated with the
    /// generation prompt; every raw column is kept.
    pub fn prompt(&self, record: &SourcedRecord) -> Result<PromptRow, EncodeError> {
        let fields = &record.record.value;
        refuse_media(fields)?;
        let row = self.adapt(fields)?;
        let mut messages = row["messages"].as_array().cloned().unwrap_or_default();
        if messages.last().and_then(|m| m["role"].as_str()) == Some("assistant") {
            messages.pop();
        }
        if messages.is_empty() {
            bail!("the row has no prompt");
        }
        let assets = self.assets;
        let text = match &assets.template {
            Some(_) => assets.render_chat(&ChatRequest {
                messages: &messages,
                add_generation_prompt: true,
                ..Default::default()
            })?,
            None => messages.iter().filter_map(|m| m["content"].as_str()).collect::<Vec<_>>().join("\n"),
        };
        let ids = assets.tokenizer.encode(&text, assets.template.is_none())?;
        Ok(PromptRow { ids, text, columns: fields.clone() })
    }

    /// Reads the run's training and evaluation files, encodes each record
    /// with `encode` and cuts each item to `max_length`.
    pub fn prepare<T: Encoded>(
        &self,
        encode: impl Fn(&Self, &SourcedRecord) -> Result<T, EncodeError>,
    ) -> Result<Prepared<T>, EncodeError> {
        let options = self.options;
        let mut out = Prepared::default();
        let train = self.prepare_files(&options.dataset, &encode, &mut out)?;
        if options.val_dataset.is_empty() {
            (out.train, out.eval) = split(train, options.split_ratio, options.seed);
        } else {
            out.eval = self.prepare_files(&options.val_dataset, &encode, &mut out)?;
            out.train = train;
        }
        if out.train.is_empty() {
            bail!("no training row is left (every record was skipped, dropped as too long, or held out)");
        }
        Ok(out)
    }

    fn prepare_files<T: Encoded>(
        &self,
        sources: &[DatasetSource],
        encode: &impl Fn(&Self, &SourcedRecord) -> Result<T, EncodeError>,
        out: &mut Prepared<T>,
    ) -> Result<Vec<T>, EncodeError> {
        let options = self.options;
        let (records, bad) = read_sources(sources, &options.renames, options.seed)?;
        let mut bad = bad.into_iter();
        if !options.skip_bad_records {
            if let Some(first) = bad.next() {
                return Err(first.into());
            }
        }
        out.skipped.extend(bad.map(EncodeError::from));
        let mut items = Vec::with_capacity(records.len());
        for record in &records {
            let mut item = match encode(self, record) {
                Ok(item) => item,
                Err(e) => {
                    let e = EncodeError::Record { at: record.at(), source: Box::new(e) };
                    if !options.skip_bad_records {
                        return Err(e);
                    }
                    out.skipped.push(e);
                    continue;
                }
            };
            match cut(&mut item, options.max_length, options.truncation) {
                Cut::Kept => items.push(item),
                Cut::Truncated => {
                    out.truncated += 1;
                    items.push(item);
                }
                Cut::Deleted => out.deleted += 1,
            }
        }
        Ok(items)
    }
}

/// A row's tool definitions; ms-swift rows often carry `tools` as a JSON string.
fn row_tools(row: &Value) -> Result<Option<Vec<Value>>, EncodeError> {
    Ok(match row.get("tools") {
        Some(Value::Array(tools)) => Some(tools.clone()),
        Some(Value::String(text)) => match serde_json::from_str(text) {
            Ok(tools) => Some(tools),
            Err(e) => bail!("`tools` is a string but not a JSON list: {e}"),
        },
        _ => None,
    })
}

/// `text` tokenized (special tokens as the tokenizer adds them), then the
/// end-of-sequence token; every token labelled.
fn plain_text(assets: &TextAssets, text: &str) -> Result<EncodedRow, EncodeError> {
    let mut ids = assets.tokenizer.encode(text, true)?;
    if let Some(&eos) = assets.eos_token_ids.first() {
        ids.push(eos);
    }
    let labels = ids.iter().map(|&t| t as i64).collect();
    Ok(EncodedRow { input_ids: ids, labels, media: None })
}

/// A pre-tokenized row, checked against the model's embedding rows.
fn pre_tokenized(ids: &Value, labels: Option<&Value>, rows: usize) -> Result<EncodedRow, EncodeError> {
    let numbers = |v: &Value, key: &str| -> Result<Vec<i64>, EncodeError> {
        match v.as_array().and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<i64>>>()) {
            Some(numbers) => Ok(numbers),
            None => bail!("`{key}` must be a list of integers"),
        }
    };
    let raw = numbers(ids, "input_ids")?;
    let mut input_ids = Vec::with_capacity(raw.len());
    for (i, &id) in raw.iter().enumerate() {
        if id < 0 || id as usize >= rows {
            bail!("input_ids[{i}] = {id} is outside the vocabulary (the model's {rows} embedding rows)");
        }
        input_ids.push(id as u32);
    }
    let labels = match labels {
        Some(l) => numbers(l, "labels")?,
        None => raw,
    };
    if labels.len() != input_ids.len() {
        bail!("`labels` has {} entries for {} input_ids", labels.len(), input_ids.len());
    }
    if let Some(bad) = labels.iter().find(|&&l| l != IGNORE_INDEX && (l < 0 || l as usize >= rows)) {
        bail!("label {bad} is outside the vocabulary (the model's {rows} embedding rows)");
    }
    Ok(EncodedRow { input_ids, labels, media: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ids: &[u32], labels: &[i64]) -> EncodedRow {
        EncodedRow { input_ids: ids.to_vec(), labels: labels.to_vec(), media: None }
    }

    #[test]
    fn ids_past_the_tokenizer_but_inside_the_embedding_are_accepted() {
        let ids = serde_json::json!([1, 1010, 1023]);
        let ok = pre_tokenized(&ids, None, 1024).unwrap();
        assert_eq!(ok.input_ids, vec![1, 1010, 1023]);
        let err = pre_tokenized(&serde_json::json!([1, 1024]), None, 1024).unwrap_err().to_string();
        assert!(
            err.contains("input_ids[1] = 1024 is outside the vocabulary (the model's 1024 embedding rows)"),
            "{err}"
        );
    }

    #[test]
    fn every_item_kind_is_cut_by_the_same_rule() {
        let pair = || PreferencePair {
            chosen: row(&[1, 2, 3, 4, 5, 6], &[-100, -100, -100, -100, 5, 6]),
            rejected: row(&[1, 2, 3, 4, 7], &[-100, -100, -100, -100, 7]),
        };
        let mut left = pair();
        assert_eq!(cut(&mut left, 4, Truncation::Left), Cut::Truncated);
        assert_eq!(left.chosen.input_ids, vec![3, 4, 5, 6]);
        assert_eq!(left.chosen.labels, vec![-100, -100, 5, 6]);
        assert_eq!(left.rejected.input_ids, vec![2, 3, 4, 7]);
        // Cutting on the right would leave the rejected completion empty.
        assert_eq!(cut(&mut pair(), 4, Truncation::Right), Cut::Deleted);
        assert_eq!(cut(&mut pair(), 4, Truncation::Delete), Cut::Deleted);
        assert_eq!(cut(&mut pair(), 6, Truncation::Delete), Cut::Kept);
        let mut sft = row(&[1, 2, 3, 4], &[-100, -100, 3, 4]);
        assert_eq!(cut(&mut sft, 3, Truncation::Right), Cut::Truncated);
        assert_eq!((sft.input_ids, sft.labels), (vec![1, 2, 3], vec![-100, -100, 3]));
        let mut prompt = PromptRow { ids: vec![1, 2, 3], text: String::new(), columns: Map::new() };
        assert_eq!(cut(&mut prompt, 2, Truncation::Left), Cut::Truncated);
        assert_eq!(prompt.ids, vec![2, 3]);
    }
}
