//! `oxtune serve` (alias `deploy`): an OpenAI-compatible server over a
//! model (`oxtune-serve`).

use std::net::SocketAddr;

use anyhow::Context;
use std::path::{Path, PathBuf};

use oxtune_serve::{api, serve_blocking, with_not_found, AdapterLoader, Limits, Router, ServeConfig};

use super::model_args::ModelArgs;
use super::GlobalArgs;

/// Arguments of `oxtune serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// LoRA (or any PEFT) adapters served beside the base model, as
    /// `NAME=DIR` or `DIR` (named after its folder); requests pick one by
    /// `model`, per request, in the same batch (repeatable). `--adapter
    /// DIR` serves one too.
    #[arg(long, value_name = "NAME=DIR", num_args = 1..)]
    pub adapters: Vec<String>,
    /// Address to listen on (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one, printed when ready).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long, value_name = "KEY", env = "OXTUNE_API_KEY")]
    pub api_key: Option<String>,
    /// The name clients ask for in `model` (default: the model folder's or file's name).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 10 << 20)]
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_limit: usize,
    /// Largest `n`.
    #[arg(long, default_value_t = 8)]
    pub max_n: usize,
    /// Requests waiting for the model before new ones get 429.
    #[arg(long, default_value_t = 64)]
    pub queue_capacity: usize,
    /// Most requests decoding together (the continuous batch's rows).
    #[arg(long, default_value_t = 32)]
    pub max_num_seqs: usize,
    /// Most prompt tokens prefilled between two decode steps.
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Let image parts name files on this machine (paths or file:// URLs).
    #[arg(long)]
    pub allow_local_files: bool,
    /// Largest image a request may send, in bytes.
    #[arg(long, default_value_t = 20 << 20)]
    pub max_image_bytes: usize,
    /// Largest image a request may send, in pixels (width × height).
    #[arg(long, default_value_t = 4096 * 4096)]
    pub max_image_pixels: u64,
}

/// The adapters to serve: `--adapters NAME=DIR|DIR ...` and `--adapter DIR`,
/// each with its name.
pub fn adapter_list(adapters: &[String], adapter: Option<&Path>) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let folder_name = |dir: &Path| dir.file_name().map_or("adapter".into(), |n| n.to_string_lossy().into_owned());
    let mut list: Vec<(String, PathBuf)> = adapters
        .iter()
        .map(|a| match a.split_once('=') {
            Some((name, dir)) => (name.to_owned(), PathBuf::from(dir)),
            None => (folder_name(Path::new(a)), PathBuf::from(a)),
        })
        .collect();
    list.extend(adapter.map(|dir| (folder_name(dir), dir.to_owned())));
    for (i, (name, _)) in list.iter().enumerate() {
        if name.is_empty() || list[..i].iter().any(|(n, _)| n == name) {
            anyhow::bail!("--adapters: the name `{name}` is empty or given twice; name them NAME=DIR");
        }
    }
    Ok(list)
}

/// The OpenAI API of `args`' model and adapters, loaded.
pub struct LoadedApi {
    /// Its routes (no fallback).
    pub router: Router,
    /// Loads more adapters into it.
    pub loader: AdapterLoader,
    /// The base model's served name.
    pub name: String,
    /// The adapters' names.
    pub adapters: Vec<String>,
}

/// Loads the model and adapters of `args` into the server's API routes.
pub fn load_api(global: &GlobalArgs, args: &ServeArgs) -> anyhow::Result<LoadedApi> {
    let registry = global.registry()?;
    let text = args.model.load_with(&registry, false)?;
    let mut adapters = Vec::new();
    for (name, dir) in adapter_list(&args.adapters, args.model.adapter.as_deref())? {
        let adapter = text
            .model
            .load_served_adapter(&registry, &dir)
            .with_context(|| format!("--adapters {name}={}", dir.display()))?;
        adapters.push((name, adapter));
    }
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        let path = &args.model.model;
        // A folder by its name (`tiny-qwen2.5-vl`), a file without its extension.
        let name = if path.is_dir() { path.file_name() } else { path.file_stem() };
        name.map_or("model".into(), |s| s.to_string_lossy().into_owned())
    });
    let config = ServeConfig {
        served_model_name: name.clone(),
        api_key: args.api_key.clone(),
        max_body_bytes: args.max_body_bytes,
        max_tokens_limit: args.max_tokens_limit,
        max_n: args.max_n,
        limits: Limits {
            queue_capacity: args.queue_capacity,
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens: args.max_num_batched_tokens,
        },
        allow_local_files: args.allow_local_files,
        max_image_bytes: args.max_image_bytes,
        max_image_pixels: args.max_image_pixels,
    };
    let served: Vec<String> = adapters.iter().map(|(n, _)| n.clone()).collect();
    let (router, loader) = api(text.model, text.assets, registry, adapters, config);
    Ok(LoadedApi { router, loader, name, adapters: served })
}

/// `host:port` of `args`.
pub fn address(args: &ServeArgs) -> anyhow::Result<SocketAddr> {
    format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("--host {} --port {}: not an address", args.host, args.port))
}

/// Runs `oxtune serve` until SIGTERM or Ctrl-C.
pub fn run(global: &GlobalArgs, args: &ServeArgs) -> anyhow::Result<()> {
    let LoadedApi { router, name, adapters, .. } = load_api(global, args)?;
    let addr = address(args)?;
    serve_blocking(addr, with_not_found(router), |bound| {
        let adapters = match adapters.is_empty() {
            true => String::new(),
            false => format!(" with adapters {}", adapters.iter().map(|a| format!("`{a}`")).collect::<Vec<_>>().join(", ")),
        };
        println!(
            "serving `{name}`{adapters} on http://{bound}/v1 (OpenAI API: /v1/chat/completions, /v1/completions, /v1/models)"
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })
    .with_context(|| format!("serving on {addr}"))
}
