//! `oxtune bench serve`: `oxtune serve` under concurrent streaming clients
//! — time to first token, time per output token and aggregate tokens/s at
//! each client count — against generating the same requests one after
//! another in this process.

use std::io::BufRead;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use oxtune_data::{ChatRequest, TextAssets};
use oxtune_engine::generate::{generate, SamplingParams};
use oxtune_engine::LoadedModel;
use oxtune_serve::{app, Limits, ServeConfig};
use serde_json::{json, Value};

use crate::BenchError;

/// What to measure.
#[derive(Clone, Debug)]
pub struct ServeBench {
    /// Concurrent client counts.
    pub clients: Vec<usize>,
    /// Tokens each request asks for (an end token may stop it earlier; the
    /// tokens actually streamed are counted).
    pub max_tokens: usize,
    /// The user message every client sends.
    pub prompt: String,
}

/// One streamed request as a client saw it.
struct ClientRun {
    first_token: Duration,
    total: Duration,
    chunks: usize,
}

fn stream_once(url: &str, body: &Value) -> Result<ClientRun, String> {
    let started = Instant::now();
    let agent: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(600))).build().into();
    let mut response = agent.post(url).send_json(body).map_err(|e| e.to_string())?;
    let reader = std::io::BufReader::new(response.body_mut().as_reader());
    let (mut first, mut chunks) = (None, 0);
    for line in reader.lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
        if chunk.pointer("/choices/0/delta/content").and_then(Value::as_str).is_some_and(|c| !c.is_empty()) {
            first.get_or_insert_with(|| started.elapsed());
            chunks += 1;
        }
    }
    Ok(ClientRun { first_token: first.unwrap_or_else(|| started.elapsed()), total: started.elapsed(), chunks })
}

/// Runs the benchmark: the sequential baseline in this process, then the
/// server (the model moves into it) at each client count.
pub fn serve(model: LoadedModel, assets: TextAssets, bench: &ServeBench) -> Result<Vec<Value>, BenchError> {
    let messages = [json!({"role": "user", "content": bench.prompt})];
    let text_error = |e: oxtune_data::text::TextError| BenchError::Invalid(e.to_string());
    let request = ChatRequest { messages: &messages, add_generation_prompt: true, ..Default::default() };
    let rendered = assets.render_chat(&request).map_err(text_error)?;
    let ids = assets.tokenizer.encode(&rendered, false).map_err(text_error)?;
    let params = SamplingParams {
        max_new_tokens: bench.max_tokens,
        eos_token_ids: assets.eos_token_ids.clone(),
        ..Default::default()
    };
    let most = bench.clients.iter().copied().max().unwrap_or(1);
    let started = Instant::now();
    let mut sequential_tokens = 0;
    for _ in 0..most {
        sequential_tokens +=
            generate(&model, Some(&assets.tokenizer), std::slice::from_ref(&ids), &params, |_, _| {})?[0].tokens.len();
    }
    let sequential = sequential_tokens as f64 / started.elapsed().as_secs_f64();
    let mut out = vec![json!({"benchmark": "serve", "mode": "sequential in process", "requests": most,
                              "tokens": sequential_tokens, "tokens_per_s": sequential})];
    let limits = Limits { queue_capacity: most * 2, ..Limits::default() };
    let config = ServeConfig { served_model_name: "bench".into(), limits, ..ServeConfig::default() };
    // No adapters: the registry only loads adapters asked for later.
    let router = app(model, assets, oxtune_registry::Registry::empty(), Vec::new(), config);
    let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
    std::thread::spawn(move || {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
            let _ = tx.send(listener.local_addr().expect("bound"));
            let _ = axum::serve(listener, router).await;
        });
    });
    let address = rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|e| BenchError::Invalid(format!("the server did not start: {e}")))?;
    let url = format!("http://{address}/v1/chat/completions");
    let body = json!({"model": "bench", "messages": messages, "max_tokens": bench.max_tokens, "temperature": 0, "stream": true});
    for &clients in &bench.clients {
        let started = Instant::now();
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let (url, body) = (url.clone(), body.clone());
                std::thread::spawn(move || stream_once(&url, &body))
            })
            .collect();
        let runs: Vec<ClientRun> = handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "a client panicked".to_owned()).and_then(|r| r))
            .collect::<Result<_, _>>()
            .map_err(BenchError::Invalid)?;
        let wall = started.elapsed().as_secs_f64();
        let tokens: usize = runs.iter().map(|r| r.chunks).sum();
        let mean = |f: &dyn Fn(&ClientRun) -> f64| runs.iter().map(f).sum::<f64>() / runs.len().max(1) as f64;
        out.push(json!({
            "benchmark": "serve", "mode": "streaming clients", "clients": clients, "tokens": tokens,
            "aggregate_tokens_per_s": tokens as f64 / wall,
            "mean_time_to_first_token_s": mean(&|r| r.first_token.as_secs_f64()),
            "mean_time_per_output_token_s": mean(&|r| (r.total - r.first_token).as_secs_f64() / r.chunks.saturating_sub(1).max(1) as f64),
            "vs_sequential": tokens as f64 / wall / sequential,
        }));
    }
    Ok(out)
}
