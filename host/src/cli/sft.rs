//! `oxtune sft`: supervised fine-tuning of an adapter (LoRA, DoRA, or a
//! tuner plugin's) on chat data, with ms-swift's flag names.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::model_args::ModelArgs;
use super::GlobalArgs;
use crate::data::read_records_lenient;
use crate::model::checkpoint::Trainable;
use crate::text::encode_chat;
use crate::train::optim::{AdamWConfig, Schedule};
use crate::train::{train, TrainConfig};

/// Arguments of `oxtune sft`.
#[derive(Debug, clap::Args)]
pub struct SftArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training data: JSONL or JSON-array files (repeatable); each record's
    /// format is detected from its columns (messages, ShareGPT, Alpaca, query/response).
    #[arg(long, required = true, value_name = "FILE")]
    pub dataset: Vec<PathBuf>,
    /// Read every record with this dataset adapter instead of detecting one.
    #[arg(long, value_name = "NAME")]
    pub dataset_adapter: Option<String>,
    /// Where checkpoints, metrics.jsonl and args.json go (must not hold another run).
    #[arg(long, value_name = "DIR")]
    pub output_dir: PathBuf,
    /// The tuner: lora, dora, or one a plugin provides.
    #[arg(long, default_value = "lora")]
    pub tuner: String,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank).
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f64,
    /// Scale by alpha / √rank (rsLoRA).
    #[arg(long)]
    pub use_rslora: bool,
    /// Modules to adapt: names (comma-separated) or `all-linear`.
    #[arg(long, value_delimiter = ',', default_value = "all-linear")]
    pub target_modules: Vec<String>,
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
    /// Global gradient-norm clip (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Share of the steps spent warming up.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_ratio: f64,
    /// Learning-rate schedule after warm-up: cosine, linear or constant.
    #[arg(long, default_value = "cosine")]
    pub lr_scheduler_type: String,
    /// AdamW weight decay (matrices only).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Longest row in tokens; longer rows are cut on the right (and counted).
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// Seed of initialisation and data order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Save a checkpoint every this many steps (and at the end).
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Skip records that are malformed or that no adapter can read (counted
    /// and reported) instead of stopping at the first one.
    #[arg(long)]
    pub skip_bad_records: bool,
    /// Continue an interrupted run from one of its checkpoints (same model,
    /// tuner, data and flags): weights, optimizer, schedule and data order.
    #[arg(long, value_name = "DIR", conflicts_with = "adapter")]
    pub resume_from: Option<PathBuf>,
}

/// The module names (`q_proj`, ...) of a model's linear layers, output layer excluded.
fn linear_modules(model: &crate::model::LoadedModel) -> BTreeSet<String> {
    model
        .weights()
        .names()
        .iter()
        .filter_map(|n| n.strip_suffix(".weight"))
        .filter(|l| model.weights().get(&format!("{l}.weight")).is_some_and(|w| w.rank() == 2))
        .filter(|l| !l.ends_with("embed_tokens") && *l != "lm_head")
        .filter_map(|l| l.rsplit('.').next().map(str::to_owned))
        .collect()
}

impl SftArgs {
    /// The adapter the run continues: a checkpoint to resume, or `--adapter`.
    fn adapter_source(&self) -> Option<PathBuf> {
        self.resume_from.clone().or_else(|| self.model.adapter.clone())
    }
}

/// Runs `oxtune sft`.
pub fn run(global: &GlobalArgs, args: &SftArgs) -> anyhow::Result<()> {
    let out = &args.output_dir;
    let resuming = args.resume_from.is_some();
    if !resuming && (out.join("args.json").exists() || out.join("metrics.jsonl").exists()) {
        bail!("{} holds another run (args.json / metrics.jsonl); choose another --output-dir", out.display());
    }
    let schedule = match args.lr_scheduler_type.as_str() {
        "cosine" => Schedule::Cosine,
        "linear" => Schedule::Linear,
        "constant" | "constant_with_warmup" => Schedule::Constant,
        other => bail!("--lr-scheduler-type {other}: use cosine, linear or constant"),
    };
    let registry = global.registry()?;
    let adapter = args.model.adapter.clone();
    let text = args.model.load_with(&registry, false)?;
    let mut model = text.model;
    if let Some(checkpoint) = &args.resume_from {
        let config_path = checkpoint.join("adapter_config.json");
        let saved: Value = serde_json::from_str(
            &std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?,
        )
        .with_context(|| format!("parsing {}", config_path.display()))?;
        let saved_tuner = if saved["use_dora"] == json!(true) { "dora" } else { "lora" };
        if saved_tuner != args.tuner {
            bail!("{} holds a `{saved_tuner}` adapter; this run's --tuner is `{}`", checkpoint.display(), args.tuner);
        }
        let base = saved["base_model_name_or_path"].as_str().unwrap_or_default();
        let same = |a: &std::path::Path, b: &std::path::Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        };
        if !same(std::path::Path::new(base), &args.model.model) {
            bail!(
                "{} was trained on {base}; this run's --model is {}",
                checkpoint.display(),
                args.model.model.display()
            );
        }
    }
    match args.adapter_source() {
        Some(dir) => model
            .attach_adapter(&registry, &dir, Trainable::All)
            .with_context(|| format!("continuing the adapter {}", dir.display()))?,
        None => {
            let targets: Vec<String> = if args.target_modules.iter().any(|t| t == "all-linear") {
                linear_modules(&model).into_iter().collect()
            } else {
                args.target_modules.clone()
            };
            let config = json!({"r": args.lora_rank, "lora_alpha": args.lora_alpha, "use_rslora": args.use_rslora,
                                "target_modules": targets});
            model.add_adapter(&registry, &args.tuner, config, args.seed)?;
        }
    }
    let mut rows = Vec::new();
    let (mut truncated, mut skipped) = (0usize, Vec::<anyhow::Error>::new());
    for path in &args.dataset {
        let (records, bad) = read_records_lenient(path)?;
        if let (Some(first), false) = (bad.first(), args.skip_bad_records) {
            bail!("{first} (--skip-bad-records skips such records)");
        }
        skipped.extend(bad.into_iter().map(anyhow::Error::from));
        for record in records {
            let at = || format!("{}:{}", path.display(), record.line);
            let encode = || -> anyhow::Result<crate::text::EncodedRow> {
                let keys: Vec<&str> = record.value.keys().map(String::as_str).collect();
                let adapter = match &args.dataset_adapter {
                    Some(name) => name.clone(),
                    None => registry.detect_adapter(&keys)?.name().to_owned(),
                };
                let row = registry.adapt(&adapter, &Value::Object(record.value.clone()))?;
                let messages = row["messages"].as_array().cloned().unwrap_or_default();
                Ok(encode_chat(&text.assets, &messages)?)
            };
            let mut encoded = match encode().with_context(at) {
                Ok(encoded) => encoded,
                Err(e) if args.skip_bad_records => {
                    skipped.push(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if encoded.input_ids.len() > args.max_length {
                encoded.input_ids.truncate(args.max_length);
                encoded.labels.truncate(args.max_length);
                truncated += 1;
            }
            rows.push(encoded);
        }
    }
    if let Some(first) = skipped.first() {
        eprintln!("skipped {} bad record(s); the first: {first:#}", skipped.len());
    }
    if truncated > 0 {
        eprintln!("{truncated} of {} rows were longer than --max-length {} and were cut", rows.len(), args.max_length);
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let recorded = json!({
        "model": args.model.model, "adapter": adapter, "model_type": model.architecture(), "tuner": args.tuner,
        "dataset": args.dataset, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
        "target_modules": args.target_modules, "learning_rate": args.learning_rate, "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps, "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "max_length": args.max_length, "seed": args.seed,
    });
    std::fs::write(out.join("args.json"), serde_json::to_string_pretty(&recorded)?)?;
    let config = TrainConfig {
        learning_rate: args.learning_rate,
        epochs: args.num_train_epochs,
        max_steps: args.max_steps,
        batch_size: args.per_device_train_batch_size,
        gradient_accumulation_steps: args.gradient_accumulation_steps,
        max_grad_norm: args.max_grad_norm,
        warmup_ratio: args.warmup_ratio,
        schedule,
        adamw: AdamWConfig { weight_decay: args.weight_decay, ..Default::default() },
        seed: args.seed,
        save_steps: args.save_steps,
        output_dir: Some(out.clone()),
        resume_from: args.resume_from.clone(),
    };
    let metrics = train(&model, &rows, &config)?;
    if let (Some(first), Some(last)) = (metrics.first(), metrics.last()) {
        eprintln!(
            "{} steps: loss {:.4} -> {:.4}; adapter in {}",
            metrics.len(),
            first.loss,
            last.loss,
            out.join(format!("checkpoint-{}", last.step)).display()
        );
    }
    Ok(())
}
