//! `oxtune-webui`: the browser UI of `oxtune web-ui` (ms-swift's name). One
//! page, embedded in the binary (`assets/`: plain HTML, CSS and JavaScript,
//! charts drawn as SVG, nothing fetched from elsewhere), over:
//!
//! - the OpenAI-compatible API of `oxtune-serve` (chat with the base model
//!   or any adapter, streaming, images), merged into the same server;
//! - `/api/command` and `/api/runs`: the command line of a form and the
//!   runs launched from it — the CLI's own `sft`, `pt` and `rlhf`
//!   subcommands as child processes, confined to the workspace folder
//!   ([`workspace`], [`command`], [`runs`]);
//! - `/api/runs/{id}/metrics|log|stop`, `/api/adapters` (chat with a
//!   checkpoint) and `/api/export` (`oxtune export` of a checkpoint).
//!
//! Errors are `{"error": {"message"}}` with 400 (bad request), 403 (a
//! path outside the workspace) or 404.

pub mod command;
pub mod runs;
pub mod workspace;

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use oxtune_serve::AdapterLoader;
use serde_json::{json, Value};

use command::{arguments, command_line, RunRequest};
use runs::Runs;
use workspace::Workspace;

/// How the web UI runs.
#[derive(Clone, Debug)]
pub struct WebUiConfig {
    /// The folder runs may read and write.
    pub workspace: PathBuf,
    /// The `oxtune` binary runs are launched with (this one).
    pub exe: PathBuf,
    /// Shown in the page's header.
    pub version: String,
    /// Required as `Authorization: Bearer KEY` by the UI's API (the page
    /// itself loads without it), as by the OpenAI routes.
    pub api_key: Option<String>,
}

struct UiState {
    workspace: Workspace,
    runs: Runs,
    loader: AdapterLoader,
    version: String,
}

type Shared = Arc<UiState>;

/// An error answer: `{"error": {"message"}}` with `status`.
struct UiError(StatusCode, String);

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": {"message": self.1}}))).into_response()
    }
}

fn bad(message: impl Into<String>) -> UiError {
    UiError(StatusCode::BAD_REQUEST, message.into())
}

/// A path error: 403 when it leads outside the workspace, else 400.
fn path_error(message: String) -> UiError {
    let status =
        if message.contains("outside the workspace") { StatusCode::FORBIDDEN } else { StatusCode::BAD_REQUEST };
    UiError(status, message)
}

fn not_found(what: &str) -> UiError {
    UiError(StatusCode::NOT_FOUND, format!("no {what}"))
}

/// The web UI: its page and API, with `chat` (the OpenAI API routes of
/// `oxtune-serve`, see [`oxtune_serve::api`], and their adapter loader)
/// merged in.
pub fn app(config: WebUiConfig, chat: (Router, AdapterLoader)) -> std::io::Result<Router> {
    let workspace = Workspace::new(&config.workspace)?;
    let (chat, loader) = chat;
    let state = Arc::new(UiState {
        runs: Runs::new(config.exe, workspace.clone()),
        workspace,
        loader,
        version: config.version,
    });
    let asset = |body: &'static str, kind: &'static str| move || async move { ([(header::CONTENT_TYPE, kind)], body) };
    let page = Router::new()
        .route("/", get(asset(include_str!("../assets/index.html"), "text/html; charset=utf-8")))
        .route("/app.js", get(asset(include_str!("../assets/app.js"), "text/javascript; charset=utf-8")))
        .route("/app.css", get(asset(include_str!("../assets/app.css"), "text/css; charset=utf-8")));
    let api = Router::new()
        .route("/api/info", get(info))
        .route("/api/command", post(preview))
        .route("/api/runs", get(list_runs).post(launch))
        .route("/api/runs/{id}/metrics", get(metrics))
        .route("/api/runs/{id}/log", get(log))
        .route("/api/runs/{id}/stop", post(stop))
        .route("/api/adapters", post(load_adapter))
        .route("/api/export", post(export))
        .route_layer(axum::middleware::from_fn_with_state(config.api_key.map(Arc::new), require_key))
        .with_state(state);
    Ok(page.merge(api).merge(chat).fallback(|| async { not_found("such page") }))
}

/// Lets a request through when no key is set or it carries the key.
async fn require_key(
    State(key): State<Option<Arc<String>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match key {
        Some(key) if given.and_then(|g| g.strip_prefix("Bearer ")) != Some(key.as_str()) => {
            UiError(StatusCode::UNAUTHORIZED, "invalid API key".into()).into_response()
        }
        _ => next.run(request).await,
    }
}

async fn info(State(state): State<Shared>) -> Json<Value> {
    Json(json!({"workspace": state.workspace.root(), "version": state.version}))
}

/// The argument list of a form, with its output folder and the run's id.
fn form_arguments(state: &UiState, body: &Value) -> Result<(Vec<String>, PathBuf, String), UiError> {
    let request = RunRequest::from_json(body).map_err(bad)?;
    let id = state.runs.next_id();
    let argv = arguments(&request, &state.workspace, &format!("runs/{id}")).map_err(path_error)?;
    let output = argv.iter().position(|a| a == "--output-dir").map(|i| argv[i + 1].clone()).unwrap_or_default();
    let output = state.workspace.resolve(&output).map_err(path_error)?;
    Ok((argv, output, id))
}

async fn preview(State(state): State<Shared>, Json(body): Json<Value>) -> Result<Json<Value>, UiError> {
    let (argv, _, _) = form_arguments(&state, &body)?;
    Ok(Json(json!({"command_line": command_line(&argv), "argv": argv})))
}

async fn launch(State(state): State<Shared>, Json(body): Json<Value>) -> Result<Response, UiError> {
    let (argv, output, id) = form_arguments(&state, &body)?;
    if output.join("metrics.jsonl").exists() {
        return Err(bad(format!("{} holds another run; pick a new output folder", state.workspace.relative(&output))));
    }
    let run = state.runs.launch(id, &argv, Some(output)).map_err(|m| UiError(StatusCode::INTERNAL_SERVER_ERROR, m))?;
    Ok((StatusCode::CREATED, Json(run)).into_response())
}

async fn list_runs(State(state): State<Shared>) -> Json<Value> {
    Json(json!({"runs": state.runs.list()}))
}

async fn metrics(State(state): State<Shared>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, UiError> {
    let records = state.runs.metrics(&id).ok_or_else(|| not_found("such run"))?;
    Ok(Json(json!({"records": records})))
}

async fn log(State(state): State<Shared>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, UiError> {
    let text = state.runs.log(&id).ok_or_else(|| not_found("such run"))?;
    Ok(Json(json!({"text": text})))
}

async fn stop(State(state): State<Shared>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, UiError> {
    let status = state.runs.stop(&id).ok_or_else(|| not_found("such run"))?;
    Ok(Json(json!({"status": status})))
}

/// `{"name", "path"}`: serves the adapter checkpoint at `path` for chat.
async fn load_adapter(State(state): State<Shared>, Json(body): Json<Value>) -> Result<Json<Value>, UiError> {
    let name = body.get("name").and_then(Value::as_str).ok_or_else(|| bad("`name` is required"))?;
    let path = body.get("path").and_then(Value::as_str).ok_or_else(|| bad("`path` is required"))?;
    let dir = state.workspace.resolve(path).map_err(path_error)?;
    if !dir.join("adapter_config.json").is_file() {
        return Err(bad(format!(
            "{path} is not an adapter checkpoint (no adapter_config.json); a full checkpoint is a model: serve it with --model"
        )));
    }
    state.loader.load(name, &dir).await.map_err(bad)?;
    Ok(Json(json!({"id": name})))
}

/// `{"checkpoint", "kind": "merge-lora" | "gguf"}`: launches `oxtune export`
/// of the checkpoint as a run (the output lands beside it).
async fn export(State(state): State<Shared>, Json(body): Json<Value>) -> Result<Response, UiError> {
    let checkpoint = body.get("checkpoint").and_then(Value::as_str).ok_or_else(|| bad("`checkpoint` is required"))?;
    let kind = body.get("kind").and_then(Value::as_str).unwrap_or("merge-lora");
    let dir = state.workspace.resolve(checkpoint).map_err(path_error)?;
    let adapter_config = dir.join("adapter_config.json");
    let mut argv = vec!["export".to_owned()];
    if adapter_config.is_file() {
        // The base model: the run's (its `args.json` beside the
        // checkpoints), else the one the adapter config names.
        let read = |path: PathBuf| -> Option<Value> { serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok() };
        let from_run = dir
            .parent()
            .and_then(|run| read(run.join("args.json")))
            .and_then(|a| a["model"].as_str().map(str::to_owned));
        let from_config = read(adapter_config).and_then(|c| c["base_model_name_or_path"].as_str().map(str::to_owned));
        let base = from_run.or(from_config).ok_or_else(|| {
            bad(format!("{checkpoint}: no args.json beside it and no base model in its adapter_config.json"))
        })?;
        let base = base.as_str();
        let base = state.workspace.resolve(base).map_err(path_error)?;
        argv.extend(["--model".into(), base.display().to_string(), "--adapter".into(), dir.display().to_string()]);
        argv.push("--merge-lora".into());
    } else if dir.join("config.json").is_file() {
        if kind == "merge-lora" {
            return Err(bad(format!("{checkpoint} is a full model already; export it as GGUF")));
        }
        argv.extend(["--model".into(), dir.display().to_string()]);
    } else {
        return Err(bad(format!("{checkpoint} is not a checkpoint folder")));
    }
    match kind {
        "merge-lora" => {}
        "gguf" => argv.push("--to-gguf".into()),
        other => return Err(bad(format!("`kind` {other}: use merge-lora or gguf"))),
    }
    let id = state.runs.next_id();
    let run = state.runs.launch(id, &argv, None).map_err(|m| UiError(StatusCode::INTERNAL_SERVER_ERROR, m))?;
    Ok((StatusCode::CREATED, Json(run)).into_response())
}
