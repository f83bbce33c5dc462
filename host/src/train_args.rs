//! The flags every training command shares (`sft`, `pt`, and the
//! alignment trainers to come), with ms-swift's names in kebab-case: the
//! data, the tuner and the loop.

use std::path::PathBuf;

use anyhow::bail;
use serde_json::{json, Value};

use oxtune_data::sources::{parse_renames, DatasetSource};
use oxtune_data::{DataOptions, StreamOptions};
use oxtune_engine::media::MediaSpec;
use oxtune_train::optim::{AdamWConfig, Schedule};
use oxtune_train::TrainConfig;

/// Which records a run trains and evaluates on, and how they are cut.
#[derive(Debug, clap::Args)]
pub struct DataArgs {
    /// Training data: JSONL or JSON-array files (repeatable); `FILE#N`
    /// samples N records. Each record's format is detected from its columns
    /// (messages, ShareGPT, Alpaca, query/response, image/text/answer,
    /// input_ids, or a plugin's).
    #[arg(long, required = true, value_name = "FILE[#N]")]
    pub dataset: Vec<DatasetSource>,
    /// Held-out data for the evaluation loss (repeatable, `FILE#N` too).
    #[arg(long, value_name = "FILE[#N]")]
    pub val_dataset: Vec<DatasetSource>,
    /// Hold out this share of the training records for evaluation (when no
    /// --val-dataset is given).
    #[arg(long, alias = "split-dataset-ratio", default_value_t = 0.0)]
    pub split_ratio: f64,
    /// Rename columns before detection: `old=new` (repeatable or comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "OLD=NEW")]
    pub columns: Vec<String>,
    /// Read every record with this dataset adapter instead of detecting one.
    #[arg(long, value_name = "NAME")]
    pub dataset_adapter: Option<String>,
    /// Longest row in tokens.
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// What to do with a longer row: `delete` it, or cut it on the `left` or `right`.
    #[arg(long, default_value = "delete", value_parser = ["delete", "left", "right"])]
    pub truncation_strategy: String,
    /// Skip records that are malformed or that no adapter can read (counted
    /// and reported) instead of stopping at the first one.
    #[arg(long)]
    pub skip_bad_records: bool,
    /// Pack samples end to end into rows of up to --max-length tokens
    /// (best fit decreasing, a sample never split; positions restart and
    /// attention stays within each sample): no compute spent on padding.
    /// `sft` and `pt` on text rows.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL", conflicts_with = "padding_free")]
    pub packing: bool,
    /// Flatten each micro-batch into one row without padding (samples kept
    /// apart as with --packing). `sft` and `pt` on text rows.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub padding_free: bool,
    /// Datasets larger than memory: read each file a chunk of records at a
    /// time, encode on every core into a tokenised dataset on disk, and
    /// train from it by index (same rows, order and split as without).
    /// `sft`, `pt` and the preference methods, on text rows.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub streaming: bool,
    /// With --streaming: reuse the tokenised dataset an earlier run made of
    /// the same file, tokenizer, template and cutting rules; `false`
    /// encodes again.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub load_from_cache_file: bool,
    /// Where tokenised datasets are kept [default: $OXTUNE_HOME/datasets,
    /// i.e. ~/.oxtune/datasets].
    #[arg(long, value_name = "DIR")]
    pub dataset_cache_dir: Option<PathBuf>,
    /// Threads encoding a streamed dataset [default: every core].
    #[arg(long, value_name = "N")]
    pub dataset_num_proc: Option<usize>,
}

impl DataArgs {
    /// How a `--streaming` run encodes and keeps its datasets.
    pub fn stream_options(&self, progress: bool) -> StreamOptions {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        StreamOptions {
            cache_dir: self.dataset_cache_dir.clone().unwrap_or_else(StreamOptions::default_cache_dir),
            reuse: self.load_from_cache_file,
            threads: self.dataset_num_proc.unwrap_or(cores).max(1),
            progress,
        }
    }

    /// Fails for a command that reads its dataset into memory when
    /// `--streaming` is set.
    pub fn refuse_streaming(&self, command: &str) -> anyhow::Result<()> {
        if self.streaming {
            bail!("--streaming: `{command}` reads its dataset into memory; streaming serves `sft`, `pt` and the preference methods (dpo, cpo, simpo, orpo, kto)");
        }
        Ok(())
    }

    /// The data options of the one encoder, with the run's seed.
    pub fn options(&self, seed: u64) -> anyhow::Result<DataOptions> {
        Ok(DataOptions {
            dataset: self.dataset.clone(),
            val_dataset: self.val_dataset.clone(),
            split_ratio: self.split_ratio,
            renames: parse_renames(&self.columns).map_err(anyhow::Error::msg)?,
            dataset_adapter: self.dataset_adapter.clone(),
            max_length: self.max_length,
            truncation: self.truncation_strategy.parse().map_err(anyhow::Error::msg)?,
            skip_bad_records: self.skip_bad_records,
            seed,
        })
    }
}

/// The tuner and its settings.
#[derive(Debug, clap::Args)]
pub struct TunerArgs {
    /// The tuner: lora, dora, full, freeze, or one a plugin provides.
    #[arg(long = "tuner", alias = "train-type", default_value = "lora")]
    pub name: String,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank).
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`;
    /// default 0.05, or 0 when the targets include a mixture's experts, on
    /// which PEFT allows none).
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Scale by alpha / √rank (rsLoRA).
    #[arg(long)]
    pub use_rslora: bool,
    /// Initialisation of LoRA's A: `true` (PEFT's Kaiming-uniform) or `gaussian`.
    #[arg(long, default_value = "true", value_parser = ["true", "gaussian"])]
    pub init_weights: String,
    /// Modules to adapt: names (comma-separated), `all-linear`, or a regex
    /// (anything with regex characters) matched against full layer names.
    #[arg(long, value_delimiter = ',', default_value = "all-linear")]
    pub target_modules: Vec<String>,
    /// freeze: regexes of the parameters to train (repeatable).
    #[arg(long, value_name = "REGEX")]
    pub trainable_parameters: Vec<String>,
    /// freeze: regexes of the parameters to keep frozen (the rest train).
    #[arg(long, value_name = "REGEX")]
    pub freeze_parameters: Vec<String>,
    /// Vision-language models: leave the vision tower alone (no adapter on
    /// it, not trained in place). `false` adapts or trains it too.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub freeze_vit: bool,
    /// Vision-language models: leave the aligner (patch merger) alone.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub freeze_aligner: bool,
    /// Vision-language models: leave the language model alone.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub freeze_llm: bool,
}

/// `--lora-dropout` when not given (ms-swift's default).
pub const DEFAULT_LORA_DROPOUT: f64 = 0.05;

impl TunerArgs {
    /// The parameter-name prefixes the `--freeze-*` flags keep frozen on a
    /// model whose plugin names its parts (none on a text model).
    pub fn frozen_prefixes(&self, spec: Option<&MediaSpec>) -> Vec<String> {
        let Some(spec) = spec else { return Vec::new() };
        [("vit", self.freeze_vit), ("aligner", self.freeze_aligner), ("llm", self.freeze_llm)]
            .into_iter()
            .filter(|(_, frozen)| *frozen)
            .flat_map(|(part, _)| spec.parts.get(part).cloned().unwrap_or_default())
            .collect()
    }
}

/// The training loop's flags.
#[derive(Debug, clap::Args)]
pub struct LoopArgs {
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub learning_rate: f64,
    /// Passes over the data.
    #[arg(long, default_value_t = 1)]
    pub num_train_epochs: usize,
    /// Optimizer steps, overriding the epochs.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 1)]
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    /// Recompute each layer's activations in the backward pass instead of
    /// keeping them (on by default, as in ms-swift): memory holds one
    /// layer's activations instead of every layer's, for a second forward
    /// pass of each layer (about a third more compute).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub gradient_checkpointing: bool,
    /// Global gradient-norm clip (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Weight of a mixture of experts' router load-balancing loss added to
    /// the loss (transformers' and ms-swift's `router_aux_loss_coef`; the
    /// model's config says 0.001–0.01); 0 leaves it out. Refused for a
    /// model without a router.
    #[arg(long, default_value_t = 0.0)]
    pub router_aux_loss_coef: f64,
    /// Share of the steps spent warming up.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_ratio: f64,
    /// Learning-rate schedule after warm-up: cosine, linear or constant.
    #[arg(long, default_value = "cosine")]
    pub lr_scheduler_type: String,
    /// AdamW weight decay (matrices only; never norms or biases).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// AdamW β₁.
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    /// AdamW β₂.
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    /// AdamW ε.
    #[arg(long, default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    /// Seed of initialisation, sampling, splitting and data order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Save a checkpoint every this many steps (and at the end).
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Keep only the newest this many checkpoints.
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Evaluate the held-out rows every this many steps (and at the end).
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// Continue an interrupted run from one of its checkpoints (same model,
    /// tuner, data and flags): weights, optimizer, schedule and data order.
    /// Re-running the same command on its output folder resumes from the
    /// latest checkpoint without it.
    #[arg(long, value_name = "DIR")]
    pub resume_from: Option<PathBuf>,
}

impl TunerArgs {
    /// The tuner's configuration (PEFT's keys for LoRA-family tuners), with
    /// the model's linear module names to expand `all-linear`.
    pub fn config(&self, linear_modules: &[String]) -> Value {
        let targets: Value = if self.target_modules.iter().any(|t| t == "all-linear") {
            json!(linear_modules)
        } else if let [single] = self.target_modules.as_slice() {
            let is_regex = single.chars().any(|c| "^$*+?()[]{}|\\".contains(c));
            if is_regex {
                json!(single)
            } else {
                json!([single])
            }
        } else {
            json!(self.target_modules)
        };
        let init: Value = if self.init_weights == "gaussian" { json!("gaussian") } else { json!(true) };
        match self.name.as_str() {
            "full" => json!({"target_modules": []}),
            "freeze" => json!({"target_modules": [], "trainable_parameters": self.trainable_parameters,
                               "freeze_parameters": self.freeze_parameters}),
            _ => json!({"r": self.lora_rank, "lora_alpha": self.lora_alpha,
                        "lora_dropout": self.lora_dropout.unwrap_or(DEFAULT_LORA_DROPOUT),
                        "use_rslora": self.use_rslora,
                        "init_lora_weights": init, "target_modules": targets}),
        }
    }
}

impl LoopArgs {
    /// The loop's configuration (output folder, identity and resume point
    /// are filled in by the command).
    pub fn train_config(&self) -> anyhow::Result<TrainConfig> {
        let schedule = match self.lr_scheduler_type.as_str() {
            "cosine" => Schedule::Cosine,
            "linear" => Schedule::Linear,
            "constant" | "constant_with_warmup" => Schedule::Constant,
            other => bail!("--lr-scheduler-type {other}: use cosine, linear or constant"),
        };
        Ok(TrainConfig {
            learning_rate: self.learning_rate,
            epochs: self.num_train_epochs,
            max_steps: self.max_steps,
            batch_size: self.per_device_train_batch_size,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            max_grad_norm: self.max_grad_norm,
            warmup_ratio: self.warmup_ratio,
            schedule,
            adamw: AdamWConfig {
                weight_decay: self.weight_decay,
                beta1: self.adam_beta1,
                beta2: self.adam_beta2,
                eps: self.adam_epsilon,
            },
            seed: self.seed,
            save_steps: self.save_steps,
            save_total_limit: self.save_total_limit,
            eval_steps: self.eval_steps,
            progress: true,
            router_aux_loss_coef: self.router_aux_loss_coef,
            ..TrainConfig::default()
        })
    }
}
