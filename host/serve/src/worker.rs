//! The model's thread: it owns the model and answers jobs from a bounded
//! queue one at a time — generation (streamed as text deltas) and the
//! log-probabilities of given tokens (`echo` + `logprobs`, and the
//! `logprobs` of generated tokens, scored by one teacher-forced pass).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use oxtune_data::TextAssets;
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::generate::{generate_until, FinishReason, SamplingParams};
use oxtune_engine::model::LoadedModel;
use tokio::sync::mpsc::UnboundedSender;

/// The log-probabilities of a sequence: per token, its own (`None` for
/// the first, which nothing predicts) and the `top` most likely tokens.
#[derive(Clone, Debug, Default)]
pub struct Scored {
    /// Per token: log p(token | tokens before).
    pub token_logprobs: Vec<Option<f64>>,
    /// Per token: the most likely tokens at its position, with their log-probabilities.
    pub top_logprobs: Vec<Option<Vec<(u32, f64)>>>,
    /// Per token: its text alone.
    pub pieces: Vec<String>,
}

/// What a job reports, in order: text deltas, then its end.
#[derive(Debug)]
pub enum Event {
    /// More generated text.
    Delta(String),
    /// The job is done.
    Done {
        /// Generated token ids (an end token left out).
        tokens: Vec<u32>,
        /// Generated text.
        text: String,
        /// Why it stopped.
        finish_reason: FinishReason,
        /// Log-probabilities of prompt and generated tokens, when asked.
        scored: Option<Scored>,
    },
    /// The job failed.
    Failed(String),
}

/// One request for the model.
#[derive(Debug)]
pub struct Job {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// How to generate (`max_new_tokens` 0: only score).
    pub params: SamplingParams,
    /// Score prompt and output, keeping this many top tokens per position.
    pub logprobs: Option<usize>,
    /// Where its events go; a closed receiver (a client gone) is ignored.
    pub events: UnboundedSender<Event>,
}

/// The sending end of the queue.
#[derive(Clone)]
pub struct Queue(SyncSender<Job>);

impl Queue {
    /// Queues `job`; `Err` when the queue is full (or the worker is gone).
    pub fn submit(&self, job: Job) -> Result<(), &'static str> {
        self.0.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => "the server's queue is full; retry later",
            TrySendError::Disconnected(_) => "the model worker has stopped",
        })
    }
}

/// Counters of the jobs whose client went away.
#[derive(Clone, Default)]
pub struct Cancelled {
    /// Jobs stopped (or skipped) because their client went away.
    pub jobs: Arc<AtomicU64>,
    /// Tokens those jobs had generated when they stopped.
    pub tokens: Arc<AtomicU64>,
}

/// Starts the model's thread with a queue of `capacity` waiting jobs,
/// counting in `cancelled` the jobs whose client went away.
pub fn start(model: LoadedModel, assets: TextAssets, capacity: usize, cancelled: Cancelled) -> Queue {
    let (tx, rx) = std::sync::mpsc::sync_channel(capacity.max(1));
    std::thread::Builder::new()
        .name("oxtune-model".into())
        .spawn(move || run(model, assets, rx, cancelled))
        .expect("a thread can be started");
    Queue(tx)
}

fn run(model: LoadedModel, assets: TextAssets, jobs: Receiver<Job>, cancelled: Cancelled) {
    while let Ok(job) = jobs.recv() {
        let events = job.events.clone();
        if events.is_closed() {
            // Its client left while it waited.
            cancelled.jobs.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        match answer(&model, &assets, job) {
            Ok(tokens) if events.is_closed() => {
                cancelled.jobs.fetch_add(1, Ordering::Relaxed);
                cancelled.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(message) => {
                let _ = events.send(Event::Failed(message));
            }
        }
    }
}

/// Answers `job`; returns how many tokens it generated.
fn answer(model: &LoadedModel, assets: &TextAssets, job: Job) -> Result<usize, String> {
    let (tokens, text, finish_reason) = if job.params.max_new_tokens > 0 {
        let events = job.events.clone();
        let gone = job.events.clone();
        let rows = [(job.prompt.as_slice(), None)];
        // A client that went away (its receiver dropped) stops the generation.
        let mut generated = generate_until(
            model,
            Some(&assets.tokenizer),
            &rows,
            &job.params,
            |_, delta| {
                let _ = events.send(Event::Delta(delta.to_owned()));
            },
            &|| gone.is_closed(),
        )
        .map_err(|e| oxtune_engine::error_chain(&e))?;
        let g = generated.remove(0);
        let mut tokens = g.tokens;
        if g.finish_reason == FinishReason::Eos {
            tokens.pop();
        }
        (tokens, g.text, g.finish_reason)
    } else {
        (Vec::new(), String::new(), FinishReason::Length)
    };
    let scored = match job.logprobs {
        Some(top) => {
            let all: Vec<u32> = job.prompt.iter().chain(&tokens).copied().collect();
            Some(score(model, assets, &all, top).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let generated = tokens.len();
    let _ = job.events.send(Event::Done { tokens, text, finish_reason, scored });
    Ok(generated)
}

/// The log-probabilities of `ids` from one forward pass.
pub fn score(model: &LoadedModel, assets: &TextAssets, ids: &[u32], top: usize) -> candle_core::Result<Scored> {
    let input = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let logits = model
        .forward(&input, &BatchInfo::default(), None, None)
        .map_err(|e| candle_core::Error::Msg(oxtune_engine::error_chain(&e)))?
        .squeeze(0)?
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let rows = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?.to_vec2::<f64>()?;
    let mut scored = Scored::default();
    for (t, &id) in ids.iter().enumerate() {
        scored.pieces.push(assets.tokenizer.decode(&[id], false).unwrap_or_default());
        if t == 0 {
            scored.token_logprobs.push(None);
            scored.top_logprobs.push(None);
            continue;
        }
        let row = &rows[t - 1];
        scored.token_logprobs.push(Some(row[id as usize]));
        scored.top_logprobs.push((top > 0).then(|| top_k(row, top)));
    }
    Ok(scored)
}

/// The `k` largest entries of `row` with their indices, largest first
/// (a linear-time selection, then a sort of the `k`).
fn top_k(row: &[f64], k: usize) -> Vec<(u32, f64)> {
    let mut all: Vec<(u32, f64)> = row.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
    let k = k.min(all.len());
    if k > 0 && k < all.len() {
        all.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
    }
    all.truncate(k);
    all.sort_by(|a, b| b.1.total_cmp(&a.1));
    all
}

#[cfg(test)]
mod tests {
    use super::top_k;

    #[test]
    fn top_k_keeps_the_largest_in_order() {
        let row = [0.1, 0.7, -1.0, 0.5, 0.9];
        assert_eq!(top_k(&row, 3), vec![(4, 0.9), (1, 0.7), (3, 0.5)]);
        assert_eq!(top_k(&row, 1), vec![(4, 0.9)]);
        assert!(top_k(&row, 0).is_empty());
        assert_eq!(top_k(&row, 9).len(), 5);
    }
}
