//! Continuous batching: a decode batch that requests join and leave
//! between steps, as a server needs. A new request is prefilled alone
//! (its prompt's keys and values computed once), then its cache rows join
//! the batch's, left-padded to a common length that the attention mask
//! leaves out; every step decodes one token for every row; a row that
//! finishes (or whose client leaves) is dropped at once, and columns that
//! became padding in every row are trimmed. Each row keeps its own
//! sampling settings, seed, stop strings and, optionally, its own adapter
//! (applied to its rows only, see [`RowAdapters`]), so a row decodes
//! exactly what it would decode alone.

use candle_core::{DType, Tensor};

use super::{candle_error, Detokenizer, Generation, RowState, SamplingParams};
use crate::backend::{BatchInfo, KvCache, RowAdapters, ServedAdapter};
use crate::media::{batch_inputs, RowMedia};
use crate::model::{LoadedModel, ModelError};

/// What a step (or a join) produced for a row.
#[derive(Clone, Debug, PartialEq)]
pub enum StepEvent<K> {
    /// New text of the row `K`.
    Text(K, String),
    /// The row `K` finished; it has left the batch.
    Finished(K, Generation),
}

/// What a row is asked to generate.
#[derive(Clone, Debug)]
pub struct RowRequest<'a> {
    /// The prompt's token ids.
    pub prompt: &'a [u32],
    /// Its laid-out images or videos, if any.
    pub media: Option<&'a RowMedia>,
    /// How to sample and when to stop (the row's seed is `params.seed`).
    pub params: SamplingParams,
    /// The served adapter the row goes through (an index into the
    /// adapters given to every call), or the base model.
    pub adapter: Option<usize>,
}

/// One request being decoded.
struct Row<K> {
    key: K,
    params: SamplingParams,
    state: RowState,
    /// The token the next step feeds (the last one chosen).
    next_token: u32,
    /// The position of `next_token`.
    position: u32,
    /// Index into the batch's served adapters (`None`: the base model).
    adapter: Option<usize>,
}

/// A decode batch that rows join and leave between steps (see the module
/// documentation). `K` names a row for its caller (a request id).
pub struct ContinuousBatch<'m, K> {
    model: &'m LoadedModel,
    rows: Vec<Row<K>>,
    cache: KvCache,
    /// Per row, per cached column: 1 for a real token, 0 for left padding.
    mask: Vec<Vec<u32>>,
}

impl<'m, K: Clone + PartialEq> ContinuousBatch<'m, K> {
    /// An empty batch over `model`.
    pub fn new(model: &'m LoadedModel) -> Self {
        ContinuousBatch { model, rows: Vec::new(), cache: model.new_kv_cache(), mask: Vec::new() }
    }

    /// Rows decoding.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no row is decoding.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The keys of the rows decoding, in batch order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.rows.iter().map(|r| &r.key)
    }

    /// Cached columns (the batch's padded length).
    pub fn width(&self) -> usize {
        self.mask.first().map_or(0, Vec::len)
    }

    /// Prefills `request`'s prompt alone (through its adapter, one of
    /// `adapters`) and chooses its first token; the row then decodes with
    /// the batch from the next [`step`](Self::step) on, unless that token
    /// already ended it.
    pub fn join(
        &mut self,
        key: K,
        request: RowRequest<'_>,
        adapters: &[ServedAdapter],
        tokenizer: Option<&dyn Detokenizer>,
    ) -> Result<Vec<StepEvent<K>>, ModelError> {
        let RowRequest { prompt, media, params, adapter } = request;
        if prompt.is_empty() {
            return Err(invalid("an empty prompt"));
        }
        if adapter.is_some_and(|a| a >= adapters.len()) {
            return Err(invalid("no such adapter"));
        }
        let mut state = RowState::new(prompt, params.seed);
        if params.max_new_tokens == 0 {
            return Ok(vec![StepEvent::Finished(key, state.into_generation())]);
        }
        let device = self.model.device().clone();
        let len = prompt.len();
        let input = Tensor::from_slice(prompt, (1, len), &device).map_err(candle_error)?;
        let axes = self.model.position_axes();
        let (positions, media_inputs) =
            batch_inputs(&[(len, media)], len, true, axes, &device).map_err(candle_error)?;
        let position = match media {
            Some(m) => m.positions.iter().flatten().max().map_or(0, |&p| p + 1),
            None => len as u32,
        };
        let batch = BatchInfo { position_ids: positions, media: media_inputs, ..Default::default() };
        let mut cache = self.model.new_kv_cache();
        let logits = self.forward(&input, &batch, &mut cache, &[adapter], adapters)?;
        let mut logits = logits.flatten_all().and_then(|l| l.to_vec1::<f32>()).map_err(candle_error)?;
        let (token, delta) = state.advance(&mut logits, &params, tokenizer)?;
        let mut events = Vec::new();
        if !delta.is_empty() {
            events.push(StepEvent::Text(key.clone(), delta));
        }
        if state.done(params.max_new_tokens) {
            events.push(StepEvent::Finished(key, state.into_generation()));
            return Ok(events);
        }
        let width = self.width().max(len);
        for m in &mut self.mask {
            m.splice(0..0, std::iter::repeat_n(0, width - m.len()));
        }
        self.mask.push([vec![0; width - len], vec![1; len]].concat());
        self.cache.append_rows(cache).map_err(candle_error)?;
        self.rows.push(Row { key, params, state, next_token: token, position, adapter });
        Ok(events)
    }

    /// Decodes one token for every row; rows that finish leave the batch.
    /// After an error, [`clear`](Self::clear) the batch.
    /// `adapters` are those the rows were joined with (a list may grow,
    /// never reorder).
    pub fn step(
        &mut self,
        adapters: &[ServedAdapter],
        tokenizer: Option<&dyn Detokenizer>,
    ) -> Result<Vec<StepEvent<K>>, ModelError> {
        if self.rows.is_empty() {
            return Ok(Vec::new());
        }
        let device = self.model.device().clone();
        let n = self.rows.len();
        let width = self.width();
        let next: Vec<u32> = self.rows.iter().map(|r| r.next_token).collect();
        let input = Tensor::from_vec(next, (n, 1), &device).map_err(candle_error)?;
        let mask: Vec<u32> = self.mask.iter().flat_map(|m| m.iter().copied().chain([1])).collect();
        let mut positions = Tensor::from_iter(self.rows.iter().map(|r| r.position), &device)
            .and_then(|p| p.reshape((n, 1)))
            .map_err(candle_error)?;
        let axes = self.model.position_axes();
        if axes > 1 {
            positions = positions.unsqueeze(0).and_then(|p| p.repeat((axes, 1, 1))).map_err(candle_error)?;
        }
        let batch = BatchInfo {
            position_ids: Some(positions),
            attention_mask: Some(Tensor::from_vec(mask, (n, width + 1), &device).map_err(candle_error)?),
            ..Default::default()
        };
        let routes: Vec<Option<usize>> = self.rows.iter().map(|r| r.adapter).collect();
        let mut cache = self.cache.clone();
        let logits = self.forward(&input, &batch, &mut cache, &routes, adapters)?;
        let logits = logits.squeeze(1).and_then(|l| l.to_vec2::<f32>()).map_err(candle_error)?;
        self.cache = cache;
        let mut events = Vec::new();
        let mut keep = Vec::with_capacity(n);
        for (i, (row, mut row_logits)) in self.rows.iter_mut().zip(logits).enumerate() {
            self.mask[i].push(1);
            let (token, delta) = row.state.advance(&mut row_logits, &row.params, tokenizer)?;
            if !delta.is_empty() {
                events.push(StepEvent::Text(row.key.clone(), delta));
            }
            row.next_token = token;
            row.position += 1;
            if !row.state.done(row.params.max_new_tokens) {
                keep.push(i);
            }
        }
        if keep.len() < n {
            let mut kept = Vec::with_capacity(keep.len());
            for (i, row) in std::mem::take(&mut self.rows).into_iter().enumerate() {
                match keep.binary_search(&i) {
                    Ok(_) => kept.push(row),
                    Err(_) => events.push(StepEvent::Finished(row.key, row.state.into_generation())),
                }
            }
            self.rows = kept;
            self.retain(&keep)?;
        }
        Ok(events)
    }

    /// Takes the row `key` out of the batch (its client went away) and
    /// returns what it had generated.
    pub fn remove(&mut self, key: &K) -> Result<Option<Generation>, ModelError> {
        let Some(at) = self.rows.iter().position(|r| &r.key == key) else { return Ok(None) };
        let row = self.rows.remove(at);
        let keep: Vec<usize> = (0..=self.rows.len()).filter(|&i| i != at).collect();
        self.retain(&keep)?;
        Ok(Some(row.state.into_generation()))
    }

    /// Takes every row out (after a failed step) and returns their keys.
    pub fn clear(&mut self) -> Vec<K> {
        self.cache = self.model.new_kv_cache();
        self.mask.clear();
        std::mem::take(&mut self.rows).into_iter().map(|r| r.key).collect()
    }

    /// Keeps the cache and mask rows `keep` (the rows already kept), then
    /// trims columns that are padding in every remaining row.
    fn retain(&mut self, keep: &[usize]) -> Result<(), ModelError> {
        if keep.is_empty() {
            self.cache = self.model.new_kv_cache();
            self.mask.clear();
            return Ok(());
        }
        self.cache.select_rows(keep).map_err(candle_error)?;
        let mut old = std::mem::take(&mut self.mask);
        self.mask = keep.iter().map(|&i| std::mem::take(&mut old[i])).collect();
        let lead = self.mask.iter().map(|m| m.iter().take_while(|&&v| v == 0).count()).min().unwrap_or(0);
        if lead > 0 {
            self.cache.drop_leading(lead).map_err(candle_error)?;
            self.mask.iter_mut().for_each(|m| drop(m.drain(..lead)));
        }
        Ok(())
    }

    /// Last-position logits (f32) of `input`, batch row `i` through the
    /// adapter `routes[i]` (an index into the served adapters, or none).
    fn forward(
        &self,
        input: &Tensor,
        batch: &BatchInfo,
        cache: &mut KvCache,
        routes: &[Option<usize>],
        adapters: &[ServedAdapter],
    ) -> Result<Tensor, ModelError> {
        let logits = if routes.iter().all(Option::is_none) {
            self.model.forward_last(input, batch, Some(cache), None)?
        } else {
            let mut groups = Vec::new();
            for (a, adapter) in adapters.iter().enumerate() {
                let rows: Vec<u32> = (0..routes.len() as u32).filter(|&i| routes[i as usize] == Some(a)).collect();
                if !rows.is_empty() {
                    groups.push((adapter, rows));
                }
            }
            let rows = RowAdapters::new(groups, routes.len(), self.model.device()).map_err(candle_error)?;
            self.model.forward_per_row(input, batch, Some(cache), &rows, true)?
        };
        logits.to_dtype(DType::F32).map_err(candle_error)
    }
}

fn invalid(message: &str) -> ModelError {
    ModelError::Forward {
        model: "generation".into(),
        source: crate::backend::OpError::Invalid { op: "generate", message: message.into() },
    }
}
