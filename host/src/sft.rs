//! `oxtune sft` (supervised fine-tuning on conversations, loss on the
//! assistant turns) and `oxtune pt` (pretraining on plain text, loss on
//! every token), with ms-swift's flag names. Both train any tuner — an
//! adapter (LoRA, DoRA, a plugin's) or base parameters (full, freeze) —
//! and write `args.json`, `metrics.jsonl` and `checkpoint-<step>/` folders.

use std::path::{Path, PathBuf};

use anyhow::Context;
use oxtune_data::tokenised::TokenisedItems;
use oxtune_data::{Encoded, EncodedRow, Encoder, Items, Objective, PackedItems, Prepared, Streamed};
use oxtune_engine::model::checkpoint::Trainable;
use oxtune_train::run::{check_identity, resume_point, sample_answers, write_args};
use oxtune_train::{train_items, PackedSftObjective, PaddingFreeSftObjective, SftObjective, StepMetrics, TrainConfig};
use serde_json::{json, Value};

use super::model_args::{LoadedText, ModelArgs};
use super::train_args::{DataArgs, LoopArgs, TunerArgs};
use super::GlobalArgs;

/// Arguments of `oxtune sft` and `oxtune pt`.
#[derive(Debug, clap::Args)]
pub struct SftArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub tuner: TunerArgs,
    #[command(flatten)]
    pub train: LoopArgs,
    /// Where checkpoints, metrics.jsonl and args.json go (must not hold another run).
    #[arg(long, value_name = "DIR")]
    pub output_dir: PathBuf,
    /// Answer this prompt (greedily) before and after training, to show
    /// what changed (repeatable).
    #[arg(long, value_name = "TEXT")]
    pub sample_prompt: Vec<String>,
}

/// What a run is, as `args.json` records it: a later run on the same
/// output folder resumes only if this is the same.
fn recorded_args(args: &SftArgs, tuner_config: &Value, model_type: &str) -> Value {
    let sources = |s: &[oxtune_data::sources::DatasetSource]| -> Vec<String> {
        s.iter()
            .map(|d| match d.sample {
                Some(n) => format!("{}#{n}", d.path.display()),
                None => d.path.display().to_string(),
            })
            .collect()
    };
    let t = &args.train;
    json!({
        "model": args.model.model, "model_type": model_type, "adapter": args.model.adapter, "dtype": args.model.dtype,
        "tuner": args.tuner.name, "tuner_config": tuner_config,
        "dataset": sources(&args.data.dataset), "val_dataset": sources(&args.data.val_dataset),
        "split_ratio": args.data.split_ratio, "columns": args.data.columns, "dataset_adapter": args.data.dataset_adapter,
        "max_length": args.data.max_length, "truncation_strategy": args.data.truncation_strategy,
        "packing": args.data.packing, "padding_free": args.data.padding_free,
        "learning_rate": t.learning_rate, "num_train_epochs": t.num_train_epochs, "max_steps": t.max_steps,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps, "max_grad_norm": t.max_grad_norm,
        "warmup_ratio": t.warmup_ratio, "lr_scheduler_type": t.lr_scheduler_type, "weight_decay": t.weight_decay,
        "seed": t.seed, "gradient_checkpointing": t.gradient_checkpointing,
        "freeze_vit": args.tuner.freeze_vit, "freeze_aligner": args.tuner.freeze_aligner,
        "freeze_llm": args.tuner.freeze_llm, "media_options": args.model.media_options(),
    })
}

/// The identity a checkpoint records and a resume must match.
fn identity(args: &SftArgs) -> Value {
    let model = args.model.model.canonicalize().unwrap_or_else(|_| args.model.model.clone());
    json!({"model": model, "tuner": args.tuner.name})
}

/// Greedy answers to `prompts` (templated unless pretraining), for before/after samples.
pub(super) fn sample_answers_of(
    text: &LoadedText,
    prompts: &[String],
    objective: Objective,
) -> anyhow::Result<Vec<String>> {
    Ok(sample_answers(&text.model, &text.assets, prompts, objective == Objective::AssistantTurns)?)
}

/// A training run between loading and training: the model (a resumed
/// whole-model checkpoint's weights, if any) with its text assets, and
/// what the run records and resumes from.
pub(super) struct RunSetup {
    /// Built-ins and plugins.
    pub registry: oxtune_registry::Registry,
    /// The model to train and its tokenizer/template.
    pub text: LoadedText,
    /// The tuner's configuration.
    tuner_config: Value,
    /// `args.json`.
    recorded: Value,
    /// The checkpoint the run continues, if any.
    resume: Option<PathBuf>,
    /// What checkpoints record and a resume must match.
    identity: Value,
}

/// Loads the model and settles where the run starts: `command` and
/// `knobs` (the objective's own settings) join `args.json`.
pub(super) fn set_up(global: &GlobalArgs, args: &SftArgs, command: &str, knobs: Value) -> anyhow::Result<RunSetup> {
    let registry = global.registry()?;
    let mut text = args.model.load_with(&registry, false)?;
    let frozen = args.tuner.frozen_prefixes(text.model.media_spec());
    text.model.freeze_prefixes(frozen.clone());
    let mut tuner_config = args.tuner.config(&text.model.all_linear_modules());
    if args.tuner.lora_dropout.is_none() && text.model.targets_fused_experts(&tuner_config) {
        // PEFT refuses dropout on transformers 5's fused expert parameters.
        tuner_config["lora_dropout"] = serde_json::json!(0.0);
    }
    let mut recorded = recorded_args(args, &tuner_config, text.model.architecture());
    recorded["command"] = json!(command);
    recorded["objective"] = knobs;
    let resume = resume_point(&args.output_dir, args.train.resume_from.as_deref(), &recorded)?;
    let identity = identity(args);
    if let Some(dir) = &resume {
        check_identity(dir, &identity)?;
        eprintln!("resuming from {}", dir.display());
        if dir.join("config.json").is_file() {
            // A whole-model checkpoint: its weights replace the base's.
            let from_checkpoint = ModelArgs { model: dir.clone(), adapter: None, ..args.model.clone() };
            text.model = from_checkpoint.load_with(&registry, false)?.model;
            text.model.freeze_prefixes(frozen);
        }
    }
    Ok(RunSetup { registry, text, tuner_config, recorded, resume, identity })
}

impl RunSetup {
    /// Attaches the tuner (the resumed or given adapter, or a new one),
    /// writes `args.json`, and returns the loop's configuration.
    pub(super) fn start(&mut self, args: &SftArgs) -> anyhow::Result<TrainConfig> {
        let resumed_adapter = self.resume.clone().filter(|d| d.join("adapter_config.json").is_file());
        match resumed_adapter.or(args.model.adapter.clone()) {
            Some(dir) => self
                .text
                .model
                .attach_adapter(&self.registry, &dir, Trainable::All)
                .with_context(|| format!("continuing the adapter {}", dir.display()))?,
            None => self
                .text
                .model
                .add_adapter(&self.registry, &args.tuner.name, self.tuner_config.clone(), args.train.seed)
                .with_context(|| format!("--tuner {}", args.tuner.name))?,
        }
        self.text.model.set_gradient_checkpointing(args.train.gradient_checkpointing);
        self.text.model.set_aux_gradients(args.train.router_aux_loss_coef != 0.0);
        let out = &args.output_dir;
        write_args(out, &self.recorded)?;
        let mut config = args.train.train_config()?;
        config.output_dir = Some(out.clone());
        config.resume_from = self.resume.clone();
        config.identity = self.identity.clone();
        Ok(config)
    }
}

/// Prints the first and last step of a finished run.
pub(super) fn report(metrics: &[StepMetrics], out: &Path) {
    if let (Some(first), Some(last)) = (metrics.first(), metrics.last()) {
        eprintln!(
            "steps {}..{}: loss {:.4} -> {:.4}; saved {}",
            first.step,
            last.step,
            first.loss,
            last.loss,
            out.join(format!("checkpoint-{}", last.step)).display()
        );
    }
}

/// The encoder of a run's data.
pub(super) fn encoder<'a>(setup: &'a RunSetup, args: &SftArgs, options: &'a oxtune_data::DataOptions) -> Encoder<'a> {
    Encoder {
        registry: &setup.registry,
        assets: &setup.text.assets,
        model: &setup.text.model,
        media_options: args.model.media_options(),
        options,
    }
}

/// Prints what happened to the records on the way to rows.
pub(super) fn report_data<T: Encoded>(data: &Prepared<T>, args: &DataArgs) {
    let first = data.skipped.first().map(|e| oxtune_engine::error_chain(e));
    report_counts(first.map(|f| (data.skipped.len(), f)), data.truncated, data.deleted, args);
}

/// Prints the bad records skipped (how many, and the first one's error)
/// and the rows cut or dropped for `--max-length`.
fn report_counts(skipped: Option<(usize, String)>, truncated: usize, deleted: usize, args: &DataArgs) {
    if let Some((count, first)) = skipped {
        eprintln!("skipped {count} bad record(s); the first: {first}");
    }
    if truncated > 0 {
        eprintln!(
            "{truncated} row(s) longer than --max-length {} were cut on the {}",
            args.max_length, args.truncation_strategy
        );
    }
    if deleted > 0 {
        eprintln!("{deleted} row(s) longer than --max-length {} were dropped", args.max_length);
    }
}

/// Runs `oxtune sft` (`objective` = assistant turns) or `oxtune pt` (all tokens).
pub fn run(global: &GlobalArgs, args: &SftArgs, objective: Objective) -> anyhow::Result<()> {
    let command = if objective == Objective::AllTokens { "pt" } else { "sft" };
    let mut setup = set_up(global, args, command, json!({}))?;
    let options = args.data.options(args.train.seed)?;
    let encoder = encoder(&setup, args, &options);
    let metrics = if args.data.streaming {
        let stream = args.data.stream_options(true);
        let streamed =
            encoder.prepare_streamed(command, |e, record| e.row(record, objective), &stream).map_err(with_hint)?;
        report_streamed(&streamed, &args.data);
        let rows = Rows { train: &streamed.train, eval: &streamed.eval, lengths: TokenisedItems::lengths };
        train_rows(&mut setup, args, objective, rows)?
    } else {
        let data = encoder.prepare(|encoder, record| encoder.row(record, objective)).map_err(with_hint)?;
        report_data(&data, &args.data);
        let lengths = |rows: &[EncodedRow]| rows.iter().map(|r| r.input_ids.len()).collect();
        let rows = Rows { train: &data.train[..], eval: &data.eval[..], lengths };
        train_rows(&mut setup, args, objective, rows)?
    };
    report(&metrics, &args.output_dir);
    Ok(())
}

/// A run's encoded rows, wherever they are kept, and how to count each
/// row's tokens (read only when packing bins them).
struct Rows<'a, S: ?Sized> {
    train: &'a S,
    eval: &'a S,
    lengths: fn(&S) -> Vec<usize>,
}

/// Samples before, trains `rows` (packed, padding-free or padded, as the
/// flags say), samples after; returns the steps' metrics.
fn train_rows<S: Items<EncodedRow> + ?Sized>(
    setup: &mut RunSetup,
    args: &SftArgs,
    objective: Objective,
    rows: Rows<'_, S>,
) -> anyhow::Result<Vec<StepMetrics>> {
    let before = sample_answers_of(&setup.text, &args.sample_prompt, objective)?;
    let config = setup.start(args)?;
    eprintln!(
        "training {} row(s) ({} held out) with {} on {}",
        rows.train.len(),
        rows.eval.len(),
        args.tuner.name,
        args.model.model.display()
    );
    let model = &setup.text.model;
    let max_length = args.data.max_length;
    let metrics = if args.data.packing {
        let train_lengths = (rows.lengths)(rows.train);
        let train = PackedItems::new(rows.train, &train_lengths, max_length).map_err(anyhow::Error::msg)?;
        let eval = PackedItems::new(rows.eval, &(rows.lengths)(rows.eval), max_length).map_err(anyhow::Error::msg)?;
        let tokens: usize = train_lengths.iter().sum();
        eprintln!(
            "packed {} row(s) into {} row(s) of at most {max_length} tokens ({:.0}% full)",
            train.samples(),
            train.len(),
            100.0 * tokens as f64 / (train.len().max(1) * max_length) as f64
        );
        train_items(model, &PackedSftObjective, &train, &eval, &config)?
    } else if args.data.padding_free {
        train_items(model, &PaddingFreeSftObjective, rows.train, rows.eval, &config)?
    } else {
        train_items(model, &SftObjective, rows.train, rows.eval, &config)?
    };
    let after = sample_answers_of(&setup.text, &args.sample_prompt, objective)?;
    print_samples(&args.sample_prompt, &before, &after);
    Ok(metrics)
}

/// Prints what encoding each streamed file did (or that it was reused).
pub(super) fn report_streamed<T>(streamed: &Streamed<T>, args: &DataArgs) {
    for file in &streamed.files {
        let how = if file.reused {
            "reused".to_owned()
        } else {
            format!("encoded in {:.1} s ({:.0} records/s)", file.seconds, file.records as f64 / file.seconds.max(1e-9))
        };
        eprintln!(
            "{}: {} record(s) -> {} row(s), {how}: {}",
            file.path.display(),
            file.records,
            file.rows,
            file.entry.display()
        );
        let skipped = file.first_skipped.clone().map(|first| (file.skipped, first));
        report_counts(skipped, file.truncated, file.deleted, args);
    }
}

/// A data error, with the flag that skips bad records named when it applies.
pub(super) fn with_hint(e: oxtune_data::EncodeError) -> anyhow::Error {
    let skippable = matches!(e, oxtune_data::EncodeError::Record { .. } | oxtune_data::EncodeError::Read(_));
    let e = anyhow::Error::new(e);
    if skippable {
        e.context("a bad record (--skip-bad-records skips such records)")
    } else {
        e
    }
}

/// Prints each `--sample-prompt` with its answers before and after training.
pub(super) fn print_samples(prompts: &[String], before: &[String], after: &[String]) {
    for ((prompt, before), after) in prompts.iter().zip(before).zip(after) {
        println!("prompt: {prompt}\n  before: {before}\n  after:  {after}");
    }
}
