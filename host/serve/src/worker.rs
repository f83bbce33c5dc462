//! The model's thread: it owns the model and its served adapters and runs
//! a continuous batch ([`ContinuousBatch`]): each loop it takes what the
//! handlers sent, admits waiting requests into the decode batch (up to
//! [`Limits::max_num_seqs`] rows, and up to
//! [`Limits::max_num_batched_tokens`] prompt tokens prefilled per loop, so
//! prefill interleaves with decoding), drops rows whose client went away,
//! and decodes one token for every row. Finished rows are answered with
//! their text and, when asked, the log-probabilities of prompt and output
//! (scored by one teacher-forced pass). Prompts with images are encoded
//! here too, as only this thread may call the model plugin.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, RwLock};

use candle_core::{DType, Device, Tensor, D};
use oxtune_data::{encode_prompt, Prompt, PromptOptions, TextAssets};
use oxtune_engine::backend::{BatchInfo, RowAdapters, ServedAdapter};
use oxtune_engine::generate::{ContinuousBatch, FinishReason, Generation, RowRequest, SamplingParams, StepEvent};
use oxtune_engine::media::{MediaRef, RowMedia};
use oxtune_engine::model::LoadedModel;
use oxtune_registry::Registry;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

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

/// One generation request.
#[derive(Debug)]
pub struct Job {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// The prompt's laid-out images, if any (see [`Request::Encode`]).
    pub media: Option<RowMedia>,
    /// The served adapter to answer with (its index), or the base model.
    pub adapter: Option<usize>,
    /// How to generate (`max_new_tokens` 0: only score).
    pub params: SamplingParams,
    /// Score prompt and output, keeping this many top tokens per position.
    pub logprobs: Option<usize>,
    /// Where its events go; a closed receiver (a client gone) is ignored.
    pub events: UnboundedSender<Event>,
}

/// A conversation with images, encoded by the worker.
#[derive(Debug)]
pub struct Encoded {
    /// The prompt's token ids.
    pub ids: Vec<u32>,
    /// Its laid-out media.
    pub media: Option<RowMedia>,
}

/// What the handlers ask the model's thread.
#[derive(Debug)]
pub enum Request {
    /// Generate (or score) for a prompt.
    Generate(Job),
    /// Render a conversation with the chat template and prepare its media
    /// with the model plugin.
    Encode {
        /// Messages with `<image>` tags in their text.
        messages: Vec<Value>,
        /// The images, in tag order.
        media: Vec<MediaRef>,
        /// The answer, or why the conversation cannot be encoded.
        reply: oneshot::Sender<Result<Encoded, String>>,
    },
    /// Load the PEFT adapter in `dir` and serve it as `name`.
    LoadAdapter {
        /// The name requests select it by.
        name: String,
        /// The adapter folder.
        dir: PathBuf,
        /// Its index, or why it could not be loaded.
        reply: oneshot::Sender<Result<usize, String>>,
    },
}

/// How much the worker takes on.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Generation requests waiting for the batch before new ones get 429.
    pub queue_capacity: usize,
    /// Most rows decoding together.
    pub max_num_seqs: usize,
    /// Most prompt tokens prefilled between two decode steps (a longer
    /// prompt is still admitted alone).
    pub max_num_batched_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { queue_capacity: 64, max_num_seqs: 32, max_num_batched_tokens: 2048 }
    }
}

/// What the worker and the handlers share: gauges, counters and the
/// served adapters' names (index = adapter index).
#[derive(Default)]
pub struct Status {
    /// Generation requests waiting for the batch.
    pub queued: AtomicU64,
    /// Rows in the decode batch.
    pub running: AtomicU64,
    /// Decode steps run.
    pub steps: AtomicU64,
    /// Jobs stopped (or skipped) because their client went away.
    pub cancelled_jobs: AtomicU64,
    /// Tokens those jobs had generated when they stopped.
    pub cancelled_tokens: AtomicU64,
    /// Names of the served adapters, by index.
    pub adapters: RwLock<Vec<String>>,
}

/// The sending end of the worker's requests.
#[derive(Clone)]
pub struct Queue {
    sender: Sender<Request>,
    status: Arc<Status>,
    capacity: usize,
}

impl Queue {
    /// Queues `job`; `Err` when the queue is full (or the worker is gone).
    pub fn submit(&self, job: Job) -> Result<(), &'static str> {
        if self.status.queued.fetch_add(1, Ordering::SeqCst) >= self.capacity as u64 {
            self.status.queued.fetch_sub(1, Ordering::SeqCst);
            return Err("the server's queue is full; retry later");
        }
        self.sender.send(Request::Generate(job)).map_err(|_| {
            self.status.queued.fetch_sub(1, Ordering::SeqCst);
            "the model worker has stopped"
        })
    }

    /// Sends a request that is not a generation (answered at the worker's
    /// next loop, whatever the queue holds).
    pub fn ask(&self, request: Request) -> Result<(), &'static str> {
        self.sender.send(request).map_err(|_| "the model worker has stopped")
    }

    /// What the worker shares.
    pub fn status(&self) -> &Arc<Status> {
        &self.status
    }
}

/// Starts the model's thread, serving `adapters` (named) beside the base
/// model, within `limits`.
pub fn start(
    model: LoadedModel,
    assets: TextAssets,
    registry: Registry,
    adapters: Vec<(String, ServedAdapter)>,
    limits: Limits,
) -> Queue {
    let (sender, receiver) = std::sync::mpsc::channel();
    let status = Arc::new(Status::default());
    let (names, adapters): (Vec<String>, Vec<ServedAdapter>) = adapters.into_iter().unzip();
    *status.adapters.write().expect("not poisoned") = names;
    let worker = Worker { model, assets, registry, adapters, status: status.clone(), limits: limits.clone() };
    std::thread::Builder::new()
        .name("oxtune-model".into())
        .spawn(move || worker.run(receiver))
        .expect("a thread can be started");
    Queue { sender, status, capacity: limits.queue_capacity.max(1) }
}

/// A row of the batch: where its answer goes and what else it asked.
struct Active {
    prompt: Vec<u32>,
    adapter: Option<usize>,
    logprobs: Option<usize>,
    events: UnboundedSender<Event>,
}

struct Worker {
    model: LoadedModel,
    assets: TextAssets,
    registry: Registry,
    adapters: Vec<ServedAdapter>,
    status: Arc<Status>,
    limits: Limits,
}

impl Worker {
    fn run(mut self, requests: Receiver<Request>) {
        let mut waiting: VecDeque<Job> = VecDeque::new();
        let mut open = true;
        while open || !waiting.is_empty() {
            // Block only when nothing waits.
            if waiting.is_empty() {
                match requests.recv() {
                    Ok(request) => self.take(request, &mut waiting),
                    Err(_) => return,
                }
            }
            loop {
                match requests.try_recv() {
                    Ok(request) => self.take(request, &mut waiting),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            open &= self.decode_until_idle(&requests, &mut waiting);
        }
    }

    /// Runs the continuous batch until no row decodes and nothing waits;
    /// false once the handlers' side is gone. Adapters asked to load
    /// meanwhile are loaded after it (the batch borrows the model).
    fn decode_until_idle(&mut self, requests: &Receiver<Request>, waiting: &mut VecDeque<Job>) -> bool {
        let mut batch: ContinuousBatch<'_, u64> = ContinuousBatch::new(&self.model);
        let mut active: HashMap<u64, Active> = HashMap::new();
        let mut next_key = 0u64;
        let mut open = true;
        let mut deferred: Vec<Request> = Vec::new();
        loop {
            // Admit waiting requests while the batch has room.
            let mut budget = self.limits.max_num_batched_tokens;
            let mut admitted = 0;
            while batch.len() < self.limits.max_num_seqs.max(1) {
                let Some(job) = waiting.front() else { break };
                if admitted > 0 && job.prompt.len() > budget {
                    break;
                }
                let job = waiting.pop_front().expect("front exists");
                self.status.queued.fetch_sub(1, Ordering::SeqCst);
                budget = budget.saturating_sub(job.prompt.len());
                admitted += 1;
                if job.events.is_closed() {
                    self.status.cancelled_jobs.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let key = next_key;
                next_key += 1;
                let request = RowRequest {
                    prompt: &job.prompt,
                    media: job.media.as_ref(),
                    params: job.params.clone(),
                    adapter: job.adapter,
                };
                let joined = batch.join(key, request, &self.adapters, Some(&self.assets.tokenizer));
                let Job { prompt, adapter, logprobs, events, .. } = job;
                active.insert(key, Active { prompt, adapter, logprobs, events });
                match joined {
                    Ok(events) => self.deliver(events, &mut active),
                    Err(e) => fail(active.remove(&key), &oxtune_engine::error_chain(&e)),
                }
            }
            // Rows whose client went away leave the batch.
            let gone: Vec<u64> =
                batch.keys().filter(|k| active.get(k).is_none_or(|a| a.events.is_closed())).copied().collect();
            for key in gone {
                if let Ok(Some(generated)) = batch.remove(&key) {
                    self.status.cancelled_jobs.fetch_add(1, Ordering::Relaxed);
                    self.status.cancelled_tokens.fetch_add(generated.tokens.len() as u64, Ordering::Relaxed);
                }
                active.remove(&key);
            }
            self.status.running.store(batch.len() as u64, Ordering::Relaxed);
            if batch.is_empty() {
                if waiting.is_empty() {
                    break;
                }
                continue;
            }
            match batch.step(&self.adapters, Some(&self.assets.tokenizer)) {
                Ok(events) => self.deliver(events, &mut active),
                Err(e) => {
                    let message = oxtune_engine::error_chain(&e);
                    for key in batch.clear() {
                        fail(active.remove(&key), &message);
                    }
                }
            }
            self.status.steps.fetch_add(1, Ordering::Relaxed);
            // New arrivals: generations wait for the next admission; other
            // requests are answered once the batch no longer borrows the model.
            loop {
                match requests.try_recv() {
                    Ok(Request::Generate(job)) => waiting.push_back(job),
                    Ok(Request::Encode { messages, media, reply }) => {
                        let _ = reply.send(encode(&self.model, &self.assets, messages, &media));
                    }
                    Ok(other) => deferred.push(other),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
        }
        self.status.running.store(0, Ordering::Relaxed);
        drop(batch);
        for request in deferred {
            self.take(request, waiting);
        }
        open
    }

    /// Handles a request arriving while no batch runs.
    fn take(&mut self, request: Request, waiting: &mut VecDeque<Job>) {
        match request {
            Request::Generate(job) => waiting.push_back(job),
            Request::Encode { messages, media, reply } => {
                let _ = reply.send(encode(&self.model, &self.assets, messages, &media));
            }
            Request::LoadAdapter { name, dir, reply } => {
                let loaded = self
                    .model
                    .load_served_adapter(&self.registry, &dir)
                    .map_err(|e| format!("{}: {}", dir.display(), oxtune_engine::error_chain(&e)));
                let answer = loaded.map(|adapter| {
                    self.adapters.push(adapter);
                    self.status.adapters.write().expect("not poisoned").push(name);
                    self.adapters.len() - 1
                });
                let _ = reply.send(answer);
            }
        }
    }

    /// Sends a step's events to their clients; a finished row gets its
    /// scores (when asked) and its end.
    fn deliver(&self, events: Vec<StepEvent<u64>>, active: &mut HashMap<u64, Active>) {
        for event in events {
            match event {
                StepEvent::Text(key, text) => {
                    if let Some(a) = active.get(&key) {
                        let _ = a.events.send(Event::Delta(text));
                    }
                }
                StepEvent::Finished(key, generation) => {
                    if let Some(a) = active.remove(&key) {
                        self.finish(a, generation);
                    }
                }
            }
        }
    }

    fn finish(&self, row: Active, generation: Generation) {
        let Generation { mut tokens, text, finish_reason } = generation;
        if finish_reason == FinishReason::Eos {
            tokens.pop();
        }
        let scored = match row.logprobs {
            Some(top) => {
                let all: Vec<u32> = row.prompt.iter().chain(&tokens).copied().collect();
                match score(&self.model, &self.assets, row.adapter.map(|a| &self.adapters[a]), &all, top) {
                    Ok(scored) => Some(scored),
                    Err(e) => return fail(Some(row), &e.to_string()),
                }
            }
            None => None,
        };
        let _ = row.events.send(Event::Done { tokens, text, finish_reason, scored });
    }
}

fn fail(row: Option<Active>, message: &str) {
    if let Some(row) = row {
        let _ = row.events.send(Event::Failed(message.to_owned()));
    }
}

/// Renders `messages` with the chat template and prepares `media` with the
/// model plugin.
fn encode(
    model: &LoadedModel,
    assets: &TextAssets,
    messages: Vec<Value>,
    media: &[MediaRef],
) -> Result<Encoded, String> {
    let prompt = Prompt::Chat(messages, media.to_vec());
    let row = encode_prompt(model, assets, &prompt, &PromptOptions::default()).map_err(|e| e.to_string())?;
    Ok(Encoded { ids: row.input_ids, media: row.media })
}

/// The log-probabilities of `ids` from one forward pass (through
/// `adapter`, if any).
pub fn score(
    model: &LoadedModel,
    assets: &TextAssets,
    adapter: Option<&ServedAdapter>,
    ids: &[u32],
    top: usize,
) -> candle_core::Result<Scored> {
    let input = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let chain = |e: oxtune_engine::model::ModelError| candle_core::Error::Msg(oxtune_engine::error_chain(&e));
    let logits = match adapter {
        None => model.forward(&input, &BatchInfo::default(), None, None).map_err(chain)?,
        Some(adapter) => {
            let rows = RowAdapters::new(vec![(adapter, vec![0])], 1, model.device())?;
            model.forward_per_row(&input, &BatchInfo::default(), None, &rows, false).map_err(chain)?
        }
    };
    let logits = logits.squeeze(0)?.to_dtype(DType::F64)?.to_device(&Device::Cpu)?;
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
