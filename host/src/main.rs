//! The `oxtune` command line: clap arguments and the dispatch to the
//! library crates (`oxtune-engine`, `oxtune-data`, `oxtune-train`,
//! `oxtune-bench`). Global options shared by every subcommand live here;
//! each subcommand's arguments in its own module.

mod bench;
mod builtin;
mod config_file;
mod eval;
mod export;
mod grpo;
mod infer;
mod logits;
mod model_args;
mod plot;
mod plugins;
mod rlhf;
mod serve;
mod sft;
mod train_args;
mod webui;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use oxtune_data::Objective;
use oxtune_registry::{Discovery, Registry, SandboxConfig};

/// Keeps freed tensor buffers in the heap instead of handing them back to
/// the kernel. A training step allocates and frees the same sizes again and
/// again; with glibc's defaults every buffer over its adaptive mmap
/// threshold is mapped fresh and its pages zeroed on first touch
/// (`oxtune bench train` on SmolLM2-135M measured 11% faster with this).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; it is called before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

/// Stack of each rayon worker: a command runs on one (see [`run_cli`]).
const WORKER_STACK_BYTES: usize = 16 << 20;

/// Settings candle's CPU backend reads from the environment, fixed before
/// any thread starts (each is left alone when the user set it):
/// - `RAYON_NUM_THREADS`: without it candle finds its thread count by
///   parsing `/proc/cpuinfo` on every matrix product (~670 parses in a
///   SmolLM2 training step at 1×1024, seen with `strace`); set once here to
///   the count candle would find (the physical cores), capped by the CPUs
///   this process may use (affinity and cgroup quota, which candle's count
///   ignores), and rayon's pool and candle's own threads then use it too.
/// - `CANDLE_BARRIER_POOL_SPIN_LIMIT`: after each element-wise op candle's
///   own worker threads spin 25,000 pauses before sleeping, taking a core
///   from the rayon workers that run the next kernel (8% of a 1×1024
///   training profile); a short spin keeps back-to-back ops cheap.
fn configure_candle_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = candle_core::utils::get_num_threads().clamp(1, allowed);
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", BARRIER_POOL_SPIN_LIMIT.to_string());
    }
}

/// Pauses a candle barrier-pool worker spins before it sleeps (candle's
/// default is 25,000): about 20 µs.
const BARRIER_POOL_SPIN_LIMIT: u32 = 1000;

fn main() -> ExitCode {
    configure_candle_threads();
    tune_allocator();
    // A failure leaves rayon's default pool, which works the same.
    let _ = rayon::ThreadPoolBuilder::new().stack_size(WORKER_STACK_BYTES).build_global();
    run_cli()
}

/// Fine-tune and align language models, with plugins.
#[derive(Debug, Parser)]
#[command(name = "oxtune", version, about)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
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
    /// Serve a model with an OpenAI-compatible API (chat completions, completions, models).
    #[command(alias = "deploy")]
    Serve(Box<serve::ServeArgs>),
    /// A browser UI: chat with the model and its adapters, launch and watch training runs in a workspace folder.
    #[command(name = "web-ui")]
    WebUi(Box<webui::WebUiArgs>),
    /// Write a model's logits (or per-token log-probabilities) for token ids or text to a file.
    Logits(Box<logits::LogitsArgs>),
    /// Evaluate a model: perplexity, or GSM8K, MMLU, ARC and HellaSwag from local files.
    Eval(Box<eval::EvalArgs>),
    /// Merge an adapter into its model, or write GGUF (llama.cpp) and Ollama files.
    Export(Box<export::ExportArgs>),
    /// Measure performance (`bench infer`: prefill and decode throughput).
    #[command(subcommand)]
    Bench(Box<bench::BenchCommand>),
    /// Draw training curves (loss, eval loss, learning rate, rewards, KL) of one or more runs as a PNG.
    Plot(plot::PlotArgs),
    /// List every registered component: kind, name, origin, version, API version.
    Plugins(plugins::PluginsArgs),
}

/// Parses the command line, runs it, and reports errors with their context.
fn run_cli() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("OXTUNE_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let argv = match config_file::expand(
        std::env::args_os().collect(),
        &<Cli as clap::CommandFactory>::command(),
        &["sft", "pt", "rlhf"],
    ) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(argv);
    let result = if cli.command.runs_a_server() {
        run(&cli)
    } else {
        // The command runs on a rayon worker: the kernels' parallel loops
        // then start inside the pool (work-stealing) instead of handing each
        // loop to a sleeping worker and blocking until it wakes the caller
        // back — two context switches per loop, hundreds per decoded token
        // (`perf` put 30% of single-threaded decoding in wake-ups).
        rayon::scope(|_| run(&cli))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

impl Command {
    /// Whether the command serves requests from other threads (`serve`,
    /// `web-ui`, `bench serve`): it must not hold a rayon worker while it
    /// waits, or the model thread's kernels would lose one.
    fn runs_a_server(&self) -> bool {
        matches!(self, Command::Serve(_) | Command::WebUi(_))
            || matches!(self, Command::Bench(command) if matches!(**command, bench::BenchCommand::Serve(_)))
    }
}

/// Runs the parsed command.
fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Sft(args) => sft::run(&cli.global, args, Objective::AssistantTurns),
        Command::Pt(args) => sft::run(&cli.global, args, Objective::AllTokens),
        Command::Rlhf(args) if args.algo == "grpo" => grpo::run(&cli.global, args),
        Command::Rlhf(args) => rlhf::run(&cli.global, args),
        Command::Infer(args) => infer::run(&cli.global, args),
        Command::Serve(args) => serve::run(&cli.global, args),
        Command::WebUi(args) => webui::run(&cli.global, args),
        Command::Logits(args) => logits::run(&cli.global, args),
        Command::Eval(args) => eval::run(&cli.global, args),
        Command::Export(args) => export::run(&cli.global, args),
        Command::Plot(args) => plot::run(args),
        Command::Bench(command) => bench::run(&cli.global, command),
        Command::Plugins(args) => plugins::run(&cli.global, args),
    }
}
