//! `oxtune-serve`: an OpenAI-compatible server over a loaded model —
//! `GET /health`, `GET /v1/models`, `GET /metrics`, `POST /v1/completions`
//! (string or token-id prompts, `echo` with `logprobs`, streaming) and
//! `POST /v1/chat/completions` (the model's chat template, streaming with
//! OpenAI's server-sent events). Errors are OpenAI's error objects; every
//! endpoint but `/health` takes the API key when one is set; bodies,
//! `max_tokens` and `n` are capped.
//!
//! The model runs on its own thread ([`worker`]) behind a bounded queue (a
//! full queue answers 429) and decodes requests together: a request joins
//! the running batch at the next step and leaves it when it finishes
//! (continuous batching). The `model` field picks the base model or one of
//! the served LoRA adapters per request, in the same batch. Chat messages
//! may carry images (`data:` URLs; local files only when allowed).

pub mod error;
pub mod images;
pub mod tools;
pub mod worker;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
pub use axum::Router;
use futures_util::Stream;
use oxtune_data::TextAssets;
use oxtune_engine::backend::ServedAdapter;
use oxtune_engine::generate::SamplingParams;
use oxtune_engine::media::RowMedia;
use oxtune_engine::model::LoadedModel;
use oxtune_registry::Registry;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

pub use error::ApiError;
pub use worker::Limits;
use worker::{Event, Job, Queue, Request, Scored};

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The name clients ask for (`model` in requests).
    pub served_model_name: String,
    /// Required as `Authorization: Bearer KEY` when set.
    pub api_key: Option<String>,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask.
    pub max_tokens_limit: usize,
    /// Largest `n`.
    pub max_n: usize,
    /// The queue and the decode batch's size.
    pub limits: Limits,
    /// Whether image parts may name files on the server's disk.
    pub allow_local_files: bool,
    /// Largest image a request may send, in bytes.
    pub max_image_bytes: usize,
    /// Largest image a request may send, in pixels (width × height).
    pub max_image_pixels: u64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            served_model_name: "model".into(),
            api_key: None,
            max_body_bytes: 10 << 20,
            max_tokens_limit: 4096,
            max_n: 8,
            limits: Limits::default(),
            allow_local_files: false,
            max_image_bytes: 20 << 20,
            max_image_pixels: 4096 * 4096,
        }
    }
}

/// Counters behind `/metrics`.
#[derive(Default)]
struct Metrics {
    ok: AtomicU64,
    client_errors: AtomicU64,
    server_errors: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    first_token_micros: AtomicU64,
    first_tokens: AtomicU64,
}

struct AppState {
    config: ServeConfig,
    queue: Queue,
    assets: Arc<TextAssets>,
    /// The model's context length (`max_position_embeddings`), if stated.
    context: Option<usize>,
    vocab: Option<usize>,
    created: u64,
    metrics: Metrics,
    next_id: AtomicU64,
    /// Where images sent inline wait while the worker reads them.
    images: images::ImageStore,
}

type Shared = Arc<AppState>;

/// A request body as read, or why it could not be (too large, broken).
type RawBody = Result<Bytes, axum::extract::rejection::BytesRejection>;

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Loads more adapters into a running server (the web UI's "chat with
/// this checkpoint").
#[derive(Clone)]
pub struct AdapterLoader(Queue);

impl AdapterLoader {
    /// Loads the PEFT adapter in `dir` and serves it as `name` (it then
    /// appears in `/v1/models`).
    pub async fn load(&self, name: &str, dir: &std::path::Path) -> Result<(), String> {
        if name == "" || self.0.status().adapters.read().expect("not poisoned").iter().any(|n| n == name) {
            return Err(format!("an adapter named `{name}` is already served (or the name is empty)"));
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.0.ask(Request::LoadAdapter { name: name.to_owned(), dir: dir.to_owned(), reply })?;
        answer.await.map_err(|_| "the model worker has stopped".to_owned())?.map(|_| ())
    }
}

/// The app: routes over `model` (moved to its own thread with `registry`,
/// which loads adapters later) and `assets`, serving `adapters` by name
/// beside the base model; unknown paths get OpenAI's 404 error.
pub fn app(
    model: LoadedModel,
    assets: TextAssets,
    registry: Registry,
    adapters: Vec<(String, ServedAdapter)>,
    config: ServeConfig,
) -> Router {
    with_not_found(api(model, assets, registry, adapters, config).0)
}

/// `router` answering unknown paths with OpenAI's 404 error object.
pub fn with_not_found(router: Router) -> Router {
    router
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", None, "no such endpoint") })
}

/// The routes of [`app`] without a fallback (to merge into a larger app,
/// as the web UI does), with a handle that loads more adapters into it.
pub fn api(
    model: LoadedModel,
    assets: TextAssets,
    registry: Registry,
    adapters: Vec<(String, ServedAdapter)>,
    config: ServeConfig,
) -> (Router, AdapterLoader) {
    let context = model.config().get("max_position_embeddings").and_then(Value::as_u64).map(|v| v as usize);
    let vocab = model.vocab_size();
    let queue = worker::start(model, assets.clone(), registry, adapters, config.limits.clone());
    let max_body = config.max_body_bytes;
    let loader = AdapterLoader(queue.clone());
    let state = Arc::new(AppState {
        config,
        queue,
        assets: Arc::new(assets),
        context,
        vocab,
        created: now(),
        metrics: Metrics::default(),
        next_id: AtomicU64::new(1),
        images: images::ImageStore::new(),
    });
    let router = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state);
    (router, loader)
}

/// Serves `app` on `listener` until SIGTERM or Ctrl-C, then lets the
/// requests in flight finish.
pub async fn serve(listener: tokio::net::TcpListener, app: Router) -> std::io::Result<()> {
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Binds `addr` and serves until a shutdown signal (blocking the thread).
pub fn serve_blocking(addr: SocketAddr, app: Router, on_ready: impl FnOnce(SocketAddr)) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        on_ready(listener.local_addr()?);
        serve(listener, app).await
    })
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.config.api_key else { return Ok(()) };
    let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        return Ok(());
    }
    Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", Some("invalid_api_key"), "invalid API key"))
}

fn count(state: &AppState, status: StatusCode) {
    let counter = match status.as_u16() {
        200..=299 => &state.metrics.ok,
        400..=499 => &state.metrics.client_errors,
        _ => &state.metrics.server_errors,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

fn finish(state: &AppState, result: Result<Response, ApiError>) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    count(state, response.status());
    response
}

async fn models(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let result = authorize(&state, &headers).map(|()| {
        let base = &state.config.served_model_name;
        let mut data = vec![json!({"id": base, "object": "model", "created": state.created,
                           "owned_by": "oxtune", "root": base, "parent": null})];
        for name in state.queue.status().adapters.read().expect("not poisoned").iter() {
            data.push(json!({"id": name, "object": "model", "created": state.created,
                             "owned_by": "oxtune", "root": base, "parent": base}));
        }
        Json(json!({"object": "list", "data": data})).into_response()
    });
    finish(&state, result)
}

async fn metrics(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let result = authorize(&state, &headers).map(|()| {
        let m = &state.metrics;
        let worker = state.queue.status();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let ttft = load(&m.first_token_micros) as f64 / 1e6;
        let text = format!(
            "# TYPE oxtune_requests_total counter\n\
             oxtune_requests_total{{status=\"2xx\"}} {}\noxtune_requests_total{{status=\"4xx\"}} {}\n\
             oxtune_requests_total{{status=\"5xx\"}} {}\n\
             # TYPE oxtune_prompt_tokens_total counter\noxtune_prompt_tokens_total {}\n\
             # TYPE oxtune_completion_tokens_total counter\noxtune_completion_tokens_total {}\n\
             # TYPE oxtune_time_to_first_token_seconds summary\n\
             oxtune_time_to_first_token_seconds_sum {ttft}\noxtune_time_to_first_token_seconds_count {}\n\
             # TYPE oxtune_cancelled_total counter\noxtune_cancelled_total {}\n\
             # TYPE oxtune_cancelled_tokens_total counter\noxtune_cancelled_tokens_total {}\n\
             # TYPE oxtune_queue_length gauge\noxtune_queue_length {}\n\
             # TYPE oxtune_running_batch_size gauge\noxtune_running_batch_size {}\n\
             # TYPE oxtune_decode_steps_total counter\noxtune_decode_steps_total {}\n",
            load(&m.ok),
            load(&m.client_errors),
            load(&m.server_errors),
            load(&m.prompt_tokens),
            load(&m.completion_tokens),
            load(&m.first_tokens),
            load(&worker.cancelled_jobs),
            load(&worker.cancelled_tokens),
            load(&worker.queued),
            load(&worker.running),
            load(&worker.steps),
        );
        ([("content-type", "text/plain; version=0.0.4")], text).into_response()
    });
    finish(&state, result)
}

/// The JSON body, or OpenAI's error for a malformed or oversized one.
fn parse_body(body: RawBody) -> Result<Value, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        ApiError::new(status, "invalid_request_error", None, format!("the request body could not be read: {e}"))
    })?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid("body", format!("the body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid("body", "the body must be a JSON object"));
    }
    Ok(value)
}

/// Typed readers of request fields, each error naming the field.
fn opt_u64(body: &Value, key: &str) -> Result<Option<u64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::invalid(key, format!("`{key}` must be a non-negative integer"))),
    }
}

fn opt_f64(body: &Value, key: &str) -> Result<Option<f64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| ApiError::invalid(key, format!("`{key}` must be a number"))),
    }
}

fn opt_bool(body: &Value, key: &str) -> Result<bool, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid(key, format!("`{key}` must be true or false"))),
    }
}

fn stops(body: &Value) -> Result<Vec<String>, ApiError> {
    match body.get("stop") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|s| s.as_str().map(str::to_owned).ok_or_else(|| ApiError::invalid("stop", "`stop` must hold strings")))
            .collect(),
        Some(_) => Err(ApiError::invalid("stop", "`stop` must be a string or a list of at most 4 strings")),
    }
}

/// `n`, the choices asked for (1 by default), within the server's cap.
fn choice_count(state: &AppState, body: &Value) -> Result<usize, ApiError> {
    let n = opt_u64(body, "n")?.unwrap_or(1) as usize;
    if n == 0 || n > state.config.max_n {
        return Err(ApiError::invalid("n", format!("`n` must be between 1 and {}", state.config.max_n)));
    }
    Ok(n)
}

/// The adapter a request's `model` names (`None`: the base model).
fn requested_adapter(state: &AppState, body: &Value) -> Result<Option<usize>, ApiError> {
    let base = &state.config.served_model_name;
    match body.get("model").and_then(Value::as_str) {
        Some(m) if m == base => Ok(None),
        Some(m) => {
            let adapters = state.queue.status().adapters.read().expect("not poisoned");
            match adapters.iter().position(|a| a == m) {
                Some(index) => Ok(Some(index)),
                None => Err(ApiError {
                    status: StatusCode::NOT_FOUND,
                    message: format!(
                        "the model `{m}` does not exist (this server serves `{base}`{})",
                        adapters.iter().map(|a| format!(", `{a}`")).collect::<String>()
                    ),
                    kind: "invalid_request_error",
                    param: Some("model".into()),
                    code: Some("model_not_found"),
                }),
            }
        }
        None => Err(ApiError::invalid("model", "`model` is required")),
    }
}

/// The sampling settings of a request.
fn sampling(state: &AppState, body: &Value, default_max: usize) -> Result<SamplingParams, ApiError> {
    let max =
        opt_u64(body, "max_completion_tokens")?.or(opt_u64(body, "max_tokens")?).map_or(default_max, |v| v as usize);
    if max > state.config.max_tokens_limit {
        return Err(ApiError::invalid(
            "max_tokens",
            format!("`max_tokens` {max} is over this server's limit of {}", state.config.max_tokens_limit),
        ));
    }
    let temperature = opt_f64(body, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid("temperature", "`temperature` must be between 0 and 2"));
    }
    let top_p = opt_f64(body, "top_p")?.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
        return Err(ApiError::invalid("top_p", "`top_p` must be in (0, 1]"));
    }
    let repetition = match (
        opt_f64(body, "repetition_penalty")?,
        opt_f64(body, "presence_penalty")?,
        opt_f64(body, "frequency_penalty")?,
    ) {
        (Some(r), _, _) => r,
        // OpenAI's additive penalties, approximated by transformers' multiplicative one.
        (None, p, f) => 1.0 + (p.unwrap_or(0.0) + f.unwrap_or(0.0)).max(0.0) / 2.0,
    };
    Ok(SamplingParams {
        max_new_tokens: max,
        temperature: temperature as f32,
        top_k: opt_u64(body, "top_k")?.unwrap_or(0) as usize,
        top_p: top_p as f32,
        repetition_penalty: repetition as f32,
        seed: opt_u64(body, "seed")?.unwrap_or(0),
        eos_token_ids: state.assets.eos_token_ids.clone(),
        stop: stops(body)?,
        ..Default::default()
    })
}

fn check_ids(state: &AppState, ids: &[u32], max_new: usize) -> Result<(), ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if let (Some(vocab), Some(bad)) = (state.vocab, ids.iter().find(|&&t| Some(t as usize) >= state.vocab)) {
        return Err(ApiError::invalid("prompt", format!("token id {bad} is outside the vocabulary of {vocab}")));
    }
    if let Some(context) = state.context {
        if ids.len() + max_new > context {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid(
                    "messages",
                    format!(
                        "the prompt has {} tokens and asks for {max_new} more; the model's context is {context}",
                        ids.len()
                    ),
                )
            });
        }
    }
    Ok(())
}

/// What one prompt became.
struct Answer {
    text: String,
    tokens: Vec<u32>,
    finish_reason: &'static str,
    scored: Option<Scored>,
}

/// What a request asks the model, less its sampling settings.
#[derive(Clone)]
struct Target {
    /// The prompt's token ids.
    ids: Vec<u32>,
    /// Its laid-out images, if any.
    media: Option<RowMedia>,
    /// The served adapter, if any.
    adapter: Option<usize>,
}

/// Queues a job; its events arrive on the returned receiver.
fn submit(
    state: &AppState,
    target: &Target,
    params: SamplingParams,
    logprobs: Option<usize>,
) -> Result<UnboundedReceiver<Event>, ApiError> {
    let (tx, rx) = unbounded_channel();
    let job = Job {
        prompt: target.ids.clone(),
        media: target.media.clone(),
        adapter: target.adapter,
        params,
        logprobs,
        events: tx,
    };
    state.queue.submit(job).map_err(|m| {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("rate_limit_exceeded"), m)
    })?;
    Ok(rx)
}

/// Queues `n` samples of `target` (seeds `seed`, `seed + 1`, ...) at
/// once, so they decode together.
fn submit_samples(
    state: &AppState,
    target: &Target,
    params: &SamplingParams,
    n: usize,
    logprobs: Option<usize>,
) -> Result<Vec<UnboundedReceiver<Event>>, ApiError> {
    (0..n)
        .map(|i| {
            let params = SamplingParams { seed: params.seed.wrapping_add(i as u64), ..params.clone() };
            submit(state, target, params, logprobs)
        })
        .collect()
}

/// [`submit_samples`], then waits for their answers in order.
async fn run_jobs(
    state: &AppState,
    target: &Target,
    params: &SamplingParams,
    n: usize,
    logprobs: Option<usize>,
) -> Result<Vec<Answer>, ApiError> {
    let started = Instant::now();
    let receivers = submit_samples(state, target, params, n, logprobs)?;
    let mut answers = Vec::with_capacity(n);
    for rx in receivers {
        answers.push(collect_answer(state, rx, started).await?);
    }
    Ok(answers)
}

/// Waits for a job's end.
async fn collect_answer(
    state: &AppState,
    mut rx: UnboundedReceiver<Event>,
    started: Instant,
) -> Result<Answer, ApiError> {
    let mut first = true;
    while let Some(event) = rx.recv().await {
        match event {
            Event::Delta(_) => {
                if std::mem::take(&mut first) {
                    record_first_token(state, started);
                }
            }
            Event::Done { tokens, text, finish_reason, scored } => {
                return Ok(Answer { text, tokens, finish_reason: finish_reason.as_str(), scored })
            }
            Event::Failed(m) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, m)),
        }
    }
    Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, "the model worker stopped"))
}

fn record_first_token(state: &AppState, started: Instant) {
    state.metrics.first_token_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    state.metrics.first_tokens.fetch_add(1, Ordering::Relaxed);
}

fn usage(state: &AppState, prompt: usize, completion: usize) -> Value {
    state.metrics.prompt_tokens.fetch_add(prompt as u64, Ordering::Relaxed);
    state.metrics.completion_tokens.fetch_add(completion as u64, Ordering::Relaxed);
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// One prompt of a completions request.
struct CompletionPrompt {
    /// Its token ids.
    ids: Vec<u32>,
    /// The text it stands for (decoded, for a token-id prompt).
    text: String,
    /// Each token's character offset in `text`, from the tokenizer's spans
    /// (string prompts only; token-id prompts use their decoded pieces).
    char_offsets: Option<Vec<usize>>,
}

/// The prompts of a completions request, each tokenized once.
fn completion_prompts(state: &AppState, body: &Value) -> Result<Vec<CompletionPrompt>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string, a list of strings, a list of token ids or a list of such lists",
        )
    };
    let tokenizer = &state.assets.tokenizer;
    let of_text = |s: &str| -> Result<CompletionPrompt, ApiError> {
        let spans = tokenizer.encode_with_offsets(s, true).map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
        let char_offsets =
            spans.iter().map(|(_, (start, _))| s.get(..*start).map_or(0, |p| p.chars().count())).collect();
        let ids = spans.into_iter().map(|(id, _)| id).collect();
        Ok(CompletionPrompt { ids, text: s.to_owned(), char_offsets: Some(char_offsets) })
    };
    let of_ids = |a: &[Value]| -> Result<CompletionPrompt, ApiError> {
        let ids = a.iter().map(|v| v.as_u64().map(|v| v as u32)).collect::<Option<Vec<u32>>>().ok_or_else(bad)?;
        let text = tokenizer.decode(&ids, false).unwrap_or_default();
        Ok(CompletionPrompt { ids, text, char_offsets: None })
    };
    match body.get("prompt") {
        Some(Value::String(s)) => Ok(vec![of_text(s)?]),
        Some(Value::Array(items)) if items.is_empty() => Err(ApiError::invalid("prompt", "`prompt` is empty")),
        Some(Value::Array(items)) if items[0].is_number() => Ok(vec![of_ids(items)?]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => of_text(s),
                Value::Array(a) => of_ids(a),
                _ => Err(bad()),
            })
            .collect(),
        _ => Err(bad()),
    }
}

/// OpenAI's `logprobs` object of a completion choice: tokens, their
/// log-probabilities, top alternatives and character offsets into the text.
fn completion_logprobs(state: &AppState, scored: &Scored, from: usize, offsets: &[usize]) -> Value {
    let tokenizer = &state.assets.tokenizer;
    let range = from..scored.token_logprobs.len();
    let tops: Vec<Value> = scored.top_logprobs[range.clone()]
        .iter()
        .map(|t| match t {
            Some(list) => Value::Object(
                list.iter().map(|(id, lp)| (tokenizer.decode(&[*id], false).unwrap_or_default(), json!(lp))).collect(),
            ),
            None => Value::Null,
        })
        .collect();
    json!({
        "tokens": scored.pieces[range.clone()],
        "token_logprobs": scored.token_logprobs[range.clone()],
        "top_logprobs": tops,
        "text_offset": offsets,
    })
}

/// Character offsets of each token in the echoed text: the prompt's
/// (from its tokenizer spans, or its decoded pieces), then the completion's
/// pieces after the prompt text.
fn text_offsets(prompt: &CompletionPrompt, scored: &Scored, echo: bool) -> Vec<usize> {
    let n = prompt.ids.len();
    let mut offsets = match &prompt.char_offsets {
        Some(spans) => spans.clone(),
        None => {
            let mut at = 0;
            scored.pieces[..n]
                .iter()
                .map(|piece| {
                    let start = at;
                    at += piece.chars().count();
                    start
                })
                .collect()
        }
    };
    let prompt_chars = prompt.text.chars().count();
    let mut at = prompt_chars;
    for piece in &scored.pieces[n..] {
        offsets.push(at);
        at += piece.chars().count();
    }
    if echo {
        offsets
    } else {
        offsets[n..].iter().map(|o| o - prompt_chars).collect()
    }
}

async fn completions(State(state): State<Shared>, headers: HeaderMap, body: RawBody) -> Response {
    let result = completions_inner(&state, &headers, body).await;
    finish(&state, result)
}

async fn completions_inner(state: &Shared, headers: &HeaderMap, body: RawBody) -> Result<Response, ApiError> {
    authorize(state, headers)?;
    let body = parse_body(body)?;
    let params = sampling(state, &body, 16)?;
    let adapter = requested_adapter(state, &body)?;
    let echo = opt_bool(&body, "echo")?;
    let logprobs = opt_u64(&body, "logprobs")?.map(|n| n.min(20) as usize);
    let n = choice_count(state, &body)?;
    let prompts = completion_prompts(state, &body)?;
    if opt_bool(&body, "stream")? {
        let [CompletionPrompt { ids, .. }] = prompts.as_slice() else {
            return Err(ApiError::invalid("prompt", "streaming serves one prompt"));
        };
        if echo || logprobs.is_some() {
            return Err(ApiError::invalid("stream", "streaming serves no echo or logprobs"));
        }
        check_ids(state, ids, params.max_new_tokens)?;
        let id = format!("cmpl-{}", state.next_id.fetch_add(1, Ordering::Relaxed));
        let target = Target { ids: ids.clone(), media: None, adapter };
        return start_stream(state, &target, params, n, StreamKind::Completion, id, &body, None);
    }
    let mut choices = Vec::new();
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    // Every prompt's samples are queued at once: they decode together.
    let started = Instant::now();
    let mut pending = Vec::with_capacity(prompts.len() * n);
    for prompt in &prompts {
        check_ids(state, &prompt.ids, params.max_new_tokens)?;
        let target = Target { ids: prompt.ids.clone(), media: None, adapter };
        pending.extend(submit_samples(state, &target, &params, n, logprobs)?);
    }
    let mut pending = pending.into_iter();
    for prompt in &prompts {
        let (ids, text) = (&prompt.ids, &prompt.text);
        prompt_tokens += ids.len();
        for _ in 0..n {
            let rx = pending.next().expect("one receiver per prompt and sample");
            let answer = collect_answer(state, rx, started).await?;
            completion_tokens += answer.tokens.len();
            let logprobs = answer.scored.as_ref().map(|scored| {
                let offsets = text_offsets(prompt, scored, echo);
                completion_logprobs(state, scored, if echo { 0 } else { ids.len() }, &offsets)
            });
            let out_text = if echo { format!("{text}{}", answer.text) } else { answer.text };
            choices.push(json!({"index": choices.len(), "text": out_text, "logprobs": logprobs, "finish_reason": answer.finish_reason}));
        }
    }
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    Ok(Json(json!({
        "id": format!("cmpl-{id}"), "object": "text_completion", "created": now(), "model": body["model"],
        "choices": choices, "usage": usage(state, prompt_tokens, completion_tokens),
    }))
    .into_response())
}

/// The messages of a chat request as the chat template takes them (text
/// content; a list of parts joined, each image part becoming an `<image>`
/// tag) and the request's images, in tag order.
fn chat_messages(state: &AppState, body: &Value) -> Result<(Vec<Value>, images::RequestImages), ApiError> {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::invalid("messages", "`messages` must be a list"))?;
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` is empty"));
    }
    let limits = images::ImageLimits {
        allow_local_files: state.config.allow_local_files,
        max_bytes: state.config.max_image_bytes,
        max_pixels: state.config.max_image_pixels,
    };
    let mut found = images::RequestImages::default();
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid(&format!("messages[{i}].role"), "each message needs a string `role`"))?;
        let param = format!("messages[{i}].content");
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match part.get("type").and_then(Value::as_str) {
                        Some("text") => text.push_str(part.get("text").and_then(Value::as_str).unwrap_or_default()),
                        Some("image_url") => {
                            let url = part.get("image_url").unwrap_or(&Value::Null);
                            found.push(&state.images, limits, url, &param)?;
                            text.push_str("<image>");
                        }
                        _ => {
                            return Err(ApiError::invalid(&param, "a content part needs a `type` (text or image_url)"))
                        }
                    }
                }
                text
            }
            None | Some(Value::Null) if role == "assistant" => String::new(),
            _ => return Err(ApiError::invalid(&param, "`content` must be a string or a list of parts")),
        };
        let mut message = m.clone();
        message["content"] = json!(content);
        out.push(message);
    }
    Ok((out, found))
}

async fn chat_completions(State(state): State<Shared>, headers: HeaderMap, body: RawBody) -> Response {
    let result = chat_inner(&state, &headers, body).await;
    finish(&state, result)
}

async fn chat_inner(state: &Shared, headers: &HeaderMap, body: RawBody) -> Result<Response, ApiError> {
    authorize(state, headers)?;
    let body = parse_body(body)?;
    let params = sampling(state, &body, 1024)?;
    let adapter = requested_adapter(state, &body)?;
    let (messages, images) = chat_messages(state, &body)?;
    let n = choice_count(state, &body)?;
    let assets = &state.assets;
    if assets.template.is_none() {
        return Err(ApiError::invalid("messages", "the model has no chat template; use /v1/completions"));
    }
    let tools = tools::request_tools(&body)?;
    let top_logprobs = match (opt_bool(&body, "logprobs")?, opt_u64(&body, "top_logprobs")?) {
        (true, top) => Some(top.unwrap_or(0).min(20) as usize),
        (false, Some(_)) => return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`")),
        (false, None) => None,
    };
    let target = if images.is_empty() {
        let rendered = assets
            .render_chat(&oxtune_data::ChatRequest {
                messages: &messages,
                tools: tools.as_deref(),
                add_generation_prompt: true,
                ..Default::default()
            })
            .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
        let ids =
            assets.tokenizer.encode(&rendered, false).map_err(|e| ApiError::invalid("messages", e.to_string()))?;
        Target { ids, media: None, adapter }
    } else {
        if tools.is_some() {
            return Err(ApiError::invalid("tools", "tools with images are not served"));
        }
        let encoded = images.encode(state, messages).await?;
        Target { ids: encoded.ids, media: encoded.media, adapter }
    };
    let ids = &target.ids;
    check_ids(state, ids, params.max_new_tokens)?;
    let id = format!("chatcmpl-{}", state.next_id.fetch_add(1, Ordering::Relaxed));
    let stream = opt_bool(&body, "stream")?;
    if stream {
        if top_logprobs.is_some() {
            return Err(ApiError::invalid("stream", "streaming serves no logprobs"));
        }
        let format = tools.as_ref().map(|_| tool_format(state));
        return start_stream(state, &target, params, n, StreamKind::Chat, id, &body, format);
    }
    let mut choices = Vec::new();
    let mut completion_tokens = 0;
    let answers = run_jobs(state, &target, &params, n, top_logprobs).await?;
    for (i, answer) in answers.into_iter().enumerate() {
        completion_tokens += answer.tokens.len();
        let logprobs = answer.scored.as_ref().map(|scored| chat_logprobs(state, scored, ids.len()));
        let mut message = json!({"role": "assistant", "content": answer.text});
        let mut finish_reason = answer.finish_reason;
        if tools.is_some() {
            let (content, calls) = tools::parse_tool_calls(&answer.text, &format!("{id}_{i}"), tool_format(state));
            if !calls.is_empty() {
                message = json!({"role": "assistant", "content": content, "tool_calls": calls});
                finish_reason = "tool_calls";
            }
        }
        choices.push(json!({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}));
    }
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": now(), "model": body["model"],
        "choices": choices, "usage": usage(state, ids.len(), completion_tokens),
    }))
    .into_response())
}

/// OpenAI's chat `logprobs`: per generated token its text, log-probability,
/// UTF-8 bytes and the most likely alternatives.
fn chat_logprobs(state: &AppState, scored: &Scored, prompt_len: usize) -> Value {
    let entry = |token: &str, logprob: f64| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    let content: Vec<Value> = (prompt_len..scored.token_logprobs.len())
        .map(|t| {
            let mut e = entry(&scored.pieces[t], scored.token_logprobs[t].unwrap_or(f64::NEG_INFINITY));
            let top: Vec<Value> = scored.top_logprobs[t]
                .iter()
                .flatten()
                .map(|(id, lp)| entry(&state.assets.tokenizer.decode(&[*id], false).unwrap_or_default(), *lp))
                .collect();
            e["top_logprobs"] = json!(top);
            e
        })
        .collect();
    json!({"content": content})
}

/// How the served model writes tool calls (from its chat template).
fn tool_format(state: &AppState) -> tools::ToolFormat {
    tools::ToolFormat::of_template(state.assets.template.as_ref().map_or("", |t| t.source()))
}

/// What a stream's chunks say besides the text.
struct StreamMeta {
    kind: StreamKind,
    id: String,
    model: String,
    prompt_tokens: usize,
    include_usage: bool,
    /// Tool calls to read from the answer, in this format.
    tools: Option<tools::ToolFormat>,
}

/// Which endpoint a stream answers: its chunks differ in shape.
#[derive(Copy, Clone, PartialEq)]
enum StreamKind {
    /// `chat.completion.chunk`: a role chunk first, then `delta.content`.
    Chat,
    /// `text_completion`: `text` pieces.
    Completion,
}

impl StreamKind {
    /// The `choices` of a chunk for choice `index`.
    fn choice(self, index: usize, text: Option<&str>, finish_reason: Option<&str>) -> Value {
        match self {
            StreamKind::Chat => {
                let delta = text.map_or(json!({}), |t| json!({"content": t}));
                json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish_reason}])
            }
            StreamKind::Completion => {
                json!([{"index": index, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish_reason}])
            }
        }
    }
}

/// The server-sent events of a streamed answer with one choice per
/// receiver, as OpenAI sends them: for chat a first chunk with the role
/// per choice, then the text pieces as they come (each naming its choice's
/// `index`), a last chunk per choice with its finish reason, a usage chunk
/// (`choices: []`) when asked, then `[DONE]`.
fn answer_stream(
    state: Shared,
    receivers: Vec<UnboundedReceiver<Event>>,
    meta: StreamMeta,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let StreamMeta { kind, id, model, prompt_tokens, include_usage, tools } = meta;
    let call_prefix = id.clone();
    let created = now();
    let object = if kind == StreamKind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = move |choices: Value, usage: Option<Value>| {
        let mut c = json!({"id": id, "object": object, "created": created, "model": model, "choices": choices});
        if let Some(u) = usage {
            c["usage"] = u;
        }
        Ok(SseEvent::default().data(c.to_string()))
    };
    let started = Instant::now();
    let n = receivers.len();
    // The choices' events, each tagged with its choice's index.
    let mut events = futures_util::stream::select_all(receivers.into_iter().enumerate().map(|(i, rx)| {
        futures_util::StreamExt::map(tokio_stream::wrappers::UnboundedReceiverStream::new(rx), move |e| (i, e))
    }));
    async_stream(move |yield_| async move {
        if kind == StreamKind::Chat {
            for i in 0..n {
                let role = json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
                if !yield_(chunk(role, None)) {
                    return;
                }
            }
        }
        let mut first = true;
        let mut calls: Vec<Option<tools::StreamedCalls>> =
            (0..n).map(|_| tools.map(tools::StreamedCalls::new)).collect();
        let (mut finished, mut completion_tokens) = (0, 0);
        // Returning drops the receivers: the worker then sees the client gone and stops.
        while let Some((i, event)) = futures_util::StreamExt::next(&mut events).await {
            match event {
                Event::Delta(mut text) => {
                    if std::mem::take(&mut first) {
                        record_first_token(&state, started);
                    }
                    if let Some(calls) = calls[i].as_mut() {
                        text = calls.push(&text);
                    }
                    if !text.is_empty() && !yield_(chunk(kind.choice(i, Some(&text), None), None)) {
                        return;
                    }
                }
                Event::Done { tokens, finish_reason, text, .. } => {
                    let mut finish = finish_reason.as_str();
                    if let Some(streamed) = calls[i].take() {
                        let (rest, found) = streamed.finish(&text, &format!("{call_prefix}_{i}"));
                        if !rest.is_empty() {
                            yield_(chunk(kind.choice(i, Some(&rest), None), None));
                        }
                        if !found.is_empty() {
                            let deltas: Vec<Value> = found
                                .into_iter()
                                .enumerate()
                                .map(|(k, mut call)| {
                                    call["index"] = json!(k);
                                    call
                                })
                                .collect();
                            let delta = json!([{"index": i, "delta": {"tool_calls": deltas}, "logprobs": null, "finish_reason": null}]);
                            yield_(chunk(delta, None));
                            finish = "tool_calls";
                        }
                    }
                    yield_(chunk(kind.choice(i, None, Some(finish)), None));
                    completion_tokens += tokens.len();
                    finished += 1;
                    if finished == n {
                        let used = usage(&state, prompt_tokens, completion_tokens);
                        if include_usage {
                            yield_(chunk(json!([]), Some(used)));
                        }
                        break;
                    }
                }
                Event::Failed(message) => {
                    let error = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, message);
                    yield_(Ok(SseEvent::default().data(error.body().to_string())));
                    break;
                }
            }
        }
        yield_(Ok(SseEvent::default().data("[DONE]")));
    })
}

/// Queues `n` streamed answers to `target` (seeds `seed`, `seed + 1`, ...)
/// and returns their event stream, choices told apart by `index` (with
/// tool calls read in `tools`' format, when the request has tools).
#[allow(clippy::too_many_arguments)]
fn start_stream(
    state: &Shared,
    target: &Target,
    params: SamplingParams,
    n: usize,
    kind: StreamKind,
    id: String,
    body: &Value,
    tools: Option<tools::ToolFormat>,
) -> Result<Response, ApiError> {
    let include_usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let meta = StreamMeta { kind, id, model, prompt_tokens: target.ids.len(), include_usage, tools };
    let receivers = submit_samples(state, target, &params, n, None)?;
    Ok(Sse::new(answer_stream(state.clone(), receivers, meta)).into_response())
}

/// A stream fed by an async block through a `yield_` callback (a small
/// stand-in for the `async-stream` crate over a channel); `yield_` says
/// false once the stream is gone (the client disconnected).
fn async_stream<F, Fut>(body: F) -> impl Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(Box<dyn Fn(Result<SseEvent, Infallible>) -> bool + Send + Sync>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = unbounded_channel();
    let send: Box<dyn Fn(Result<SseEvent, Infallible>) -> bool + Send + Sync> =
        Box::new(move |item| tx.send(item).is_ok());
    tokio::spawn(body(send));
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
}
