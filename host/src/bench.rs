//! `oxtune bench infer|train|grpo|vl`: the arguments of each benchmark of
//! `oxtune-bench`, and its JSON records printed one per line.

use serde_json::Value;

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
    /// Rows per step.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
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
    let registry = global.registry()?;
    match command {
        BenchCommand::Infer(args) => {
            let text = args.model.load(&registry)?;
            let vocab = text.assets.tokenizer.vocab_size();
            let bench = oxtune_bench::InferBench {
                batch_sizes: args.batch_sizes.clone(),
                prompt_tokens: args.prompt_tokens,
                new_tokens: args.new_tokens,
            };
            print(oxtune_bench::infer(&text.model, vocab, &bench)?);
        }
        BenchCommand::Train(args) => {
            let mut text = args.model.load(&registry)?;
            let vocab = text.assets.tokenizer.vocab_size();
            let bench = oxtune_bench::TrainBench {
                tuner: args.tuner.clone(),
                lora_rank: args.lora_rank,
                target_modules: args.target_modules.clone(),
                batch_size: args.batch_size,
                seq_len: args.seq_len,
                steps: args.steps,
            };
            print([oxtune_bench::train(&registry, &mut text.model, vocab, &bench)?]);
        }
        BenchCommand::Grpo(args) => {
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
