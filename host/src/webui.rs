//! `oxtune web-ui`: the browser UI (`oxtune-webui`) — chat with the model
//! and its adapters, launch `sft`/`pt`/`rlhf` runs in a workspace folder,
//! watch their curves, chat with or export their checkpoints.

use std::path::PathBuf;

use anyhow::Context;
use oxtune_serve::serve_blocking;
use oxtune_webui::{app, WebUiConfig};

use super::serve::{address, load_api, ServeArgs};
use super::GlobalArgs;

/// Arguments of `oxtune web-ui`.
#[derive(Debug, clap::Args)]
pub struct WebUiArgs {
    /// The model to chat with, its adapters and the server's limits.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// The folder runs launched from the UI read and write (paths outside
    /// it are refused); created if missing.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub workspace: PathBuf,
}

/// Runs `oxtune web-ui` until SIGTERM or Ctrl-C (runs still going are stopped).
pub fn run(global: &GlobalArgs, args: &WebUiArgs) -> anyhow::Result<()> {
    let api = load_api(global, &args.serve)?;
    let exe = std::env::current_exe().context("finding the oxtune binary to launch runs with")?;
    let config = WebUiConfig {
        workspace: args.workspace.clone(),
        exe,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        api_key: args.serve.api_key.clone(),
    };
    let router =
        app(config, (api.router, api.loader)).with_context(|| format!("--workspace {}", args.workspace.display()))?;
    let addr = address(&args.serve)?;
    let workspace = args.workspace.display().to_string();
    serve_blocking(addr, router, |bound| {
        println!("web-ui on http://{bound}/ (chat with `{}`, runs in {workspace})", api.name);
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })
    .with_context(|| format!("serving on {addr}"))
}
