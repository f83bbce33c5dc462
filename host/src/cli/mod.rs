//! The command line: global options shared by every subcommand, and the
//! dispatch to each subcommand's module.

mod bench;
mod bench_vl;
mod config_file;
mod eval;
mod grpo;
mod infer;
mod model_args;
mod plugins;
mod rlhf;
mod sft;
mod train_args;
mod train_data;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use oxtune_registry::{Discovery, Registry, SandboxConfig};

/// Fine-tune and align language models, with plugins.
#[derive(Debug, Parser)]
#[command(name = "oxtune", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand accepts.
#[derive(Debug, clap::Args)]
pub struct GlobalArgs {
    /// Load a plugin: a cdylib, a `.wasm`/`.wat` reward script, or a folder of them (repeatable).
    #[arg(long = "plugin", value_name = "PATH", global = true)]
    pub plugins: Vec<PathBuf>,
    /// Grant reward scripts a capability: `clock` or `env:NAME` (repeatable).
    #[arg(long = "wasm-grant", value_name = "WHAT", global = true)]
    pub wasm_grants: Vec<String>,
    /// Memory cap of one reward-script instance, in MiB.
    #[arg(long = "wasm-memory-mb", value_name = "MIB", default_value_t = 64, global = true)]
    pub wasm_memory_mb: usize,
    /// Fuel (about one unit per wasm instruction) one reward-script call may burn.
    #[arg(long = "wasm-fuel", value_name = "UNITS", default_value_t = 1_000_000_000, global = true)]
    pub wasm_fuel: u64,
}

impl GlobalArgs {
    /// The registry: built-ins, `OXTUNE_PLUGIN_PATH`, the user folder and `--plugin`.
    pub fn registry(&self) -> anyhow::Result<Registry> {
        let mut sandbox = SandboxConfig {
            memory_limit: self.wasm_memory_mb << 20,
            fuel_per_sample: self.wasm_fuel,
            ..Default::default()
        };
        for grant in &self.wasm_grants {
            sandbox.grant(grant).map_err(anyhow::Error::msg)?;
        }
        let discovery = Discovery::from_env(self.plugins.clone(), sandbox);
        Registry::discover(&discovery).context("loading plugins")
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fine-tune on conversations (loss on the assistant turns) with a tuner: LoRA, DoRA, full, freeze, ...
    Sft(Box<sft::SftArgs>),
    /// Pretrain or continue pretraining on plain text (loss on every token, no template).
    Pt(Box<sft::SftArgs>),
    /// Align with preferences (DPO, KTO, CPO, SimPO, ORPO) or rewards (GRPO).
    Rlhf(Box<rlhf::RlhfArgs>),
    /// Answer a prompt, a conversation or a dataset with a model, or chat in a terminal.
    Infer(Box<infer::InferArgs>),
    /// Evaluate a model on a dataset (`--task perplexity`).
    Eval(Box<eval::EvalArgs>),
    /// Measure performance (`bench infer`: prefill and decode throughput).
    #[command(subcommand)]
    Bench(Box<bench::BenchCommand>),
    /// List every registered component: kind, name, origin, version, API version.
    Plugins(plugins::PluginsArgs),
}

/// Parses the command line, runs it, and reports errors with their context.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("OXTUNE_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let argv = match config_file::expand(std::env::args_os().collect(), &["sft", "pt", "rlhf"]) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(argv);
    let result = match &cli.command {
        Command::Sft(args) => sft::run(&cli.global, args, train_data::Objective::AssistantTurns),
        Command::Pt(args) => sft::run(&cli.global, args, train_data::Objective::AllTokens),
        Command::Rlhf(args) => rlhf::run(&cli.global, args),
        Command::Infer(args) => infer::run(&cli.global, args),
        Command::Eval(args) => eval::run(&cli.global, args),
        Command::Bench(command) => bench::run(&cli.global, command),
        Command::Plugins(args) => plugins::run(&cli.global, args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
