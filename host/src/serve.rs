//! `oxtune serve` (alias `deploy`): an OpenAI-compatible server over a
//! model (`oxtune-serve`).

use std::net::SocketAddr;

use anyhow::Context;
use oxtune_serve::{app, serve_blocking, ServeConfig};

use super::model_args::ModelArgs;
use super::GlobalArgs;

/// Arguments of `oxtune serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
}

/// Runs `oxtune serve` until SIGTERM or Ctrl-C.
pub fn run(global: &GlobalArgs, args: &ServeArgs) -> anyhow::Result<()> {
    if args.model.adapter.is_some() {
        anyhow::bail!("--adapter: serving adapters is not supported yet; merge it first (oxtune export --merge-lora)");
    }
    let registry = global.registry()?;
    let text = args.model.load(&registry)?;
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        let path = &args.model.model;
        path.file_stem().or(path.file_name()).map_or("model".into(), |s| s.to_string_lossy().into_owned())
    });
    let config = ServeConfig {
        served_model_name: name.clone(),
        api_key: args.api_key.clone(),
        max_body_bytes: args.max_body_bytes,
        max_tokens_limit: args.max_tokens_limit,
        max_n: args.max_n,
        queue_capacity: args.queue_capacity,
    };
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("--host {} --port {}: not an address", args.host, args.port))?;
    let router = app(text.model, text.assets, config);
    serve_blocking(addr, router, |bound| {
        println!(
            "serving `{name}` on http://{bound}/v1 (OpenAI API: /v1/chat/completions, /v1/completions, /v1/models)"
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })
    .with_context(|| format!("serving on {addr}"))
}
