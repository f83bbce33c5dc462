//! `oxtune bench infer|train|grpo|vl|serve|encode`: the arguments of each benchmark of
//! `oxtune-bench`, and its JSON records printed one per line.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

use super::model_args::ModelArgs;
use super::GlobalArgs;

/// What to benchmark.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode throughput of a model at several batch sizes.
    Infer(InferBenchArgs),
    /// Training-step throughput (tokens/s, FLOP/s vs the matmul peak) of LoRA SFT.
    Train(TrainBenchArgs),
    /// GRPO step time: rollout vs update, and rollout tokens/s.
    Grpo(GrpoBenchArgs),
    /// A vision-language training step: the vision encoder's and the language model's shares.
    Vl(VlBenchArgs),
    /// `oxtune serve` under 1, 8, 32 concurrent streaming clients: time to first token, time per token, throughput.
    Serve(ServeBenchArgs),
    /// Streamed dataset encoding (`--streaming`): rows/s and peak memory on generated files of growing length.
    Encode(EncodeBenchArgs),
}

/// Arguments of `oxtune bench encode`.
#[derive(Debug, clap::Args)]
pub struct EncodeBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Conversations in each generated JSONL file; a comma-separated list
    /// measures each in its own process (its own peak memory).
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    rows: Vec<usize>,
    /// Encoding threads [default: every core].
    #[arg(long)]
    threads: Option<usize>,
    /// Where the generated files and tokenised datasets go (removed after).
    #[arg(long, value_name = "DIR")]
    scratch_dir: Option<PathBuf>,
    /// A Python with transformers and datasets (and gguf for a GGUF model):
    /// after oxtune, Hugging Face `datasets` encodes the same file with as
    /// many worker processes, and the ratio is printed.
    #[arg(long, value_name = "PATH")]
    peer_python: Option<PathBuf>,
}

/// `oxtune bench encode`: one file in this process, or each row count in
/// a child process.
fn encode(global: &GlobalArgs, args: &EncodeBenchArgs) -> anyhow::Result<()> {
    if let [rows] = args.rows.as_slice() {
        let registry = global.registry()?;
        let text = args.model.load(&registry)?;
        let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let peer = args.peer_python.clone().map(|python| oxtune_bench::peer::PythonPeer { python, threads });
        let bench = oxtune_bench::encode::EncodeBench { rows: *rows, threads, peer };
        let scratch = args.scratch_dir.clone().unwrap_or_else(std::env::temp_dir);
        let scratch = scratch.join(format!("oxtune-bench-encode-{}", std::process::id()));
        let model = &args.model.model;
        print(oxtune_bench::encode::encode(&registry, &text.model, model, &text.assets, &bench, &scratch)?);
        return Ok(());
    }
    for rows in &args.rows {
        print(child_records(&["--rows"], &["--rows".into(), rows.to_string()], json!({"rows": rows}))?);
    }
    Ok(())
}

/// Arguments of `oxtune bench serve`.
#[derive(Debug, clap::Args)]
pub struct ServeBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Concurrent streaming clients, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    clients: Vec<usize>,
    /// Tokens each request asks for.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// The user message every client sends.
    #[arg(long, default_value = "Tell me a long story about a lighthouse keeper.")]
    prompt: String,
}

/// Arguments of `oxtune bench grpo`.
#[derive(Debug, clap::Args)]
pub struct GrpoBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Completions per prompt (G).
    #[arg(long, default_value_t = 8)]
    num_generations: usize,
    /// Prompts per step.
    #[arg(long, default_value_t = 2)]
    prompts: usize,
    /// Tokens generated per completion (at most).
    #[arg(long, default_value_t = 32)]
    max_completion_length: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 2)]
    steps: usize,
}

/// Arguments of `oxtune bench train`.
#[derive(Debug, clap::Args)]
pub struct TrainBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The tuner to train.
    #[arg(long, default_value = "lora")]
    tuner: String,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// Modules to adapt (comma-separated names, or `all-linear`).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    target_modules: Vec<String>,
    /// Rows per step; a comma-separated list sweeps them (each with every `--seq-len`).
    #[arg(long, value_delimiter = ',', default_value = "4")]
    batch_size: Vec<usize>,
    /// Tokens per row; a comma-separated list sweeps them.
    #[arg(long, value_delimiter = ',', default_value = "128")]
    seq_len: Vec<usize>,
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Recompute each layer's activations in the backward pass (the
    /// training commands' default; off here by default to compare with
    /// PyTorch's default; the peer follows this flag).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    gradient_checkpointing: bool,
    /// A Python with torch, transformers and peft (and gguf for a GGUF
    /// model): after each shape, the same training runs in PyTorch + PEFT
    /// and the ratio of the two is printed.
    #[arg(long, value_name = "PATH")]
    peer_python: Option<PathBuf>,
    /// Compare padded batches with packing on rows of skewed lengths
    /// (log-normal, 16 to --seq-len tokens): --batch-size rows per padded
    /// step, the same rows packed into rows of --seq-len.
    #[arg(long)]
    packing: bool,
}

impl TrainBenchArgs {
    /// The benchmark of one shape.
    fn bench(&self, (batch_size, seq_len): (usize, usize)) -> oxtune_bench::TrainBench {
        oxtune_bench::TrainBench {
            tuner: self.tuner.clone(),
            lora_rank: self.lora_rank,
            target_modules: self.target_modules.clone(),
            batch_size,
            seq_len,
            steps: self.steps,
            gradient_checkpointing: self.gradient_checkpointing,
            dtype: self.model.dtype.clone(),
        }
    }

    /// Every (batch size, sequence length) pair of the sweep.
    fn shapes(&self) -> Vec<(usize, usize)> {
        self.batch_size.iter().flat_map(|&b| self.seq_len.iter().map(move |&s| (b, s))).collect()
    }
}

/// The flags a sweep sets anew for each shape's child process.
const SWEEP_FLAGS: [&str; 3] = ["--batch-size", "--seq-len", "--peer-python"];

/// This process's arguments without `flags` (and their values).
fn without_flags(flags: &[&str]) -> Vec<OsString> {
    let mut kept = Vec::new();
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if flags.iter().any(|f| text == *f) {
            args.next();
        } else if !flags.iter().any(|f| text.starts_with(&format!("{f}="))) {
            kept.push(arg);
        }
    }
    kept
}

/// Measures one shape in a child process of this binary, so that each
/// shape's peak memory is its own.
fn measure_in_child((batch, seq): (usize, usize)) -> anyhow::Result<Value> {
    let shape = ["--batch-size".into(), batch.to_string(), "--seq-len".into(), seq.to_string()];
    let records = child_records(&SWEEP_FLAGS, &shape, json!({"batch_size": batch, "seq_len": seq}))?;
    Ok(records.into_iter().last().expect("at least one record"))
}

/// Runs this benchmark again in a child process with `drop` flags removed
/// and `add` appended, and returns the JSON records it printed. A child
/// that fails (a shape that does not fit in memory) gives `label` with its
/// `error`.
fn child_records(drop: &[&str], add: &[String], mut label: Value) -> anyhow::Result<Vec<Value>> {
    let exe = std::env::current_exe()?;
    let out = Command::new(&exe).args(without_flags(drop)).args(add).output()?;
    let records: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect();
    if out.status.success() && !records.is_empty() {
        return Ok(records);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or("no message").to_owned();
    label["error"] = json!(format!("{} ({})", last, out.status));
    Ok(vec![label])
}

/// `oxtune bench train`: one shape in this process, or a sweep (or a peer
/// comparison) shape by shape in child processes.
fn train(global: &GlobalArgs, args: &TrainBenchArgs) -> anyhow::Result<()> {
    let shapes = args.shapes();
    if args.packing {
        let registry = global.registry()?;
        for shape in shapes {
            let mut text = args.model.load(&registry)?;
            let vocab = text.assets.tokenizer.vocab_size();
            print([oxtune_bench::packing::packing(&registry, &mut text.model, vocab, &args.bench(shape))?]);
        }
        return Ok(());
    }
    if let ([shape], None) = (shapes.as_slice(), &args.peer_python) {
        let registry = global.registry()?;
        let mut text = args.model.load(&registry)?;
        let vocab = text.assets.tokenizer.vocab_size();
        print([oxtune_bench::train(&registry, &mut text.model, vocab, &args.bench(*shape))?]);
        return Ok(());
    }
    let peer = args.peer_python.as_ref().map(|python| oxtune_bench::peer::PythonPeer {
        python: python.clone(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    });
    for shape in shapes {
        let ours = measure_in_child(shape)?;
        print([ours.clone()]);
        if let Some(peer) = &peer {
            let theirs = peer.train(&args.model.model, &args.bench(shape)).unwrap_or_else(
                |e| json!({"peer": "pytorch+peft", "batch_size": shape.0, "seq_len": shape.1, "error": e.to_string()}),
            );
            print([theirs.clone(), oxtune_bench::peer::ratio(&ours, &theirs)]);
        }
    }
    Ok(())
}

/// Arguments of `oxtune bench infer`.
#[derive(Debug, clap::Args)]
pub struct InferBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch_sizes: Vec<usize>,
    /// Prompt tokens per row.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Decoded tokens per row.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
}

/// Arguments of `oxtune bench vl`.
#[derive(Debug, clap::Args)]
pub struct VlBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Side of the synthetic square image in pixels (it is not resized
    /// when it is a multiple of the model's patch × merge size).
    #[arg(long, default_value_t = 448)]
    image_size: u32,
    /// Put LoRA on the vision tower too (`--freeze-vit false`).
    #[arg(long)]
    train_vit: bool,
    /// Timed steps (after one untimed warm-up step) of each kind.
    #[arg(long, default_value_t = 2)]
    steps: usize,
}

fn print(records: impl IntoIterator<Item = Value>) {
    for record in records {
        println!("{record}");
    }
}

/// Runs `oxtune bench`.
pub fn run(global: &GlobalArgs, command: &BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Serve(args) => {
            let registry = global.registry()?;
            let text = args.model.load(&registry)?;
            let bench = oxtune_bench::serve::ServeBench {
                clients: args.clients.clone(),
                max_tokens: args.max_tokens,
                prompt: args.prompt.clone(),
            };
            print(oxtune_bench::serve::serve(text.model, text.assets, &bench)?);
        }
        BenchCommand::Infer(args) => {
            let registry = global.registry()?;
            let text = args.model.load(&registry)?;
            let vocab = text.assets.tokenizer.vocab_size();
            let bench = oxtune_bench::InferBench {
                batch_sizes: args.batch_sizes.clone(),
                prompt_tokens: args.prompt_tokens,
                new_tokens: args.new_tokens,
            };
            print(oxtune_bench::infer(&text.model, vocab, &bench)?);
        }
        BenchCommand::Train(args) => train(global, args)?,
        BenchCommand::Encode(args) => encode(global, args)?,
        BenchCommand::Grpo(args) => {
            let registry = global.registry()?;
            let mut text = args.model.load(&registry)?;
            let bench = oxtune_bench::GrpoBench {
                num_generations: args.num_generations,
                prompts: args.prompts,
                max_completion_length: args.max_completion_length,
                steps: args.steps,
            };
            print(oxtune_bench::grpo(&registry, &mut text.model, &text.assets, &bench)?);
        }
        BenchCommand::Vl(args) => {
            let registry = global.registry()?;
            let mut text = args.model.load(&registry)?;
            let bench = oxtune_bench::vl::VlBench {
                image_size: args.image_size,
                train_vit: args.train_vit,
                steps: args.steps,
                media_options: args.model.media_options(),
            };
            print([oxtune_bench::vl::vl(&registry, &mut text.model, &text.assets, &bench)?]);
        }
    }
    Ok(())
}
