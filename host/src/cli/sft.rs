//! `oxtune sft` (supervised fine-tuning on conversations, loss on the
//! assistant turns) and `oxtune pt` (pretraining on plain text, loss on
//! every token), with ms-swift's flag names. Both train any tuner — an
//! adapter (LoRA, DoRA, a plugin's) or base parameters (full, freeze) —
//! and write `args.json`, `metrics.jsonl` and `checkpoint-<step>/` folders.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::model_args::{LoadedText, ModelArgs};
use super::train_args::{DataArgs, LoopArgs, TunerArgs};
use super::train_data::{Encoder, Objective};
use super::GlobalArgs;
use crate::generate::{generate, SamplingParams};
use crate::model::checkpoint::Trainable;
use crate::text::ChatRequest;
use crate::train::{checkpoints, train, TrainConfig};

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

/// The module names (`q_proj`, ...) of a model's linear layers, output layer excluded.
pub(super) fn linear_modules(model: &crate::model::LoadedModel) -> Vec<String> {
    let names: BTreeSet<String> = model
        .weights()
        .names()
        .iter()
        .filter_map(|n| n.strip_suffix(".weight"))
        .filter(|l| model.weights().get(&format!("{l}.weight")).is_some_and(|w| w.rank() == 2))
        .filter(|l| !l.ends_with("embed_tokens") && *l != "lm_head")
        .filter_map(|l| l.rsplit('.').next().map(str::to_owned))
        .collect();
    names.into_iter().collect()
}

/// What a run is, as `args.json` records it: a later run on the same
/// output folder resumes only if this is the same.
fn recorded_args(args: &SftArgs, tuner_config: &Value, model_type: &str) -> Value {
    let sources = |s: &[crate::data::sources::DatasetSource]| -> Vec<String> {
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
        "learning_rate": t.learning_rate, "num_train_epochs": t.num_train_epochs, "max_steps": t.max_steps,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps, "max_grad_norm": t.max_grad_norm,
        "warmup_ratio": t.warmup_ratio, "lr_scheduler_type": t.lr_scheduler_type, "weight_decay": t.weight_decay,
        "seed": t.seed,
        "freeze_vit": args.tuner.freeze_vit, "freeze_aligner": args.tuner.freeze_aligner,
        "freeze_llm": args.tuner.freeze_llm, "media_options": args.model.media_options(),
    })
}

/// The identity a checkpoint records and a resume must match.
fn identity(args: &SftArgs) -> Value {
    let model = args.model.model.canonicalize().unwrap_or_else(|_| args.model.model.clone());
    json!({"model": model, "tuner": args.tuner.name})
}

/// The checkpoint to continue from: `--resume-from`, or the latest one of
/// an earlier run of the same arguments in the output folder. Any other
/// run in the folder is an error.
fn resume_point(args: &SftArgs, recorded: &Value) -> anyhow::Result<Option<PathBuf>> {
    let out = &args.output_dir;
    let args_path = out.join("args.json");
    if let Some(dir) = &args.train.resume_from {
        return Ok(Some(dir.clone()));
    }
    if !args_path.exists() {
        if out.join("metrics.jsonl").exists() {
            bail!("{} holds another run (metrics.jsonl); choose another --output-dir", out.display());
        }
        return Ok(None);
    }
    let earlier: Value = serde_json::from_str(&std::fs::read_to_string(&args_path)?)
        .with_context(|| format!("parsing {}", args_path.display()))?;
    if &earlier != recorded {
        let differing: Vec<&str> = recorded
            .as_object()
            .map(|o| o.iter().filter(|(k, v)| earlier.get(k.as_str()) != Some(*v)).map(|(k, _)| k.as_str()).collect())
            .unwrap_or_default();
        bail!(
            "{} holds another run (its args.json differs in: {}); choose another --output-dir, or --resume-from one of its checkpoints",
            out.display(),
            differing.join(", ")
        );
    }
    Ok(checkpoints::latest(out))
}

/// Reads the identity a checkpoint was saved with.
fn checkpoint_identity(dir: &Path) -> anyhow::Result<Value> {
    let path = dir.join("trainer_state.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("{} is not a resumable checkpoint", dir.display()))?;
    let state: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(state["identity"].clone())
}

/// Greedy answers to `prompts` (templated for `sft`), for before/after samples.
pub(super) fn sample_answers(
    text: &LoadedText,
    prompts: &[String],
    objective: Objective,
) -> anyhow::Result<Vec<String>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let tokenizer = &text.assets.tokenizer;
    let mut encoded = Vec::new();
    for prompt in prompts {
        let ids = match (&text.assets.template, objective) {
            (Some(_), Objective::AssistantTurns) => {
                let messages = [json!({"role": "user", "content": prompt})];
                let request = ChatRequest { messages: &messages, add_generation_prompt: true, ..Default::default() };
                tokenizer.encode(&text.assets.render_chat(&request)?, false)?
            }
            _ => tokenizer.encode(prompt, true)?,
        };
        encoded.push(ids);
    }
    let params =
        SamplingParams { max_new_tokens: 48, eos_token_ids: text.assets.eos_token_ids.clone(), ..Default::default() };
    let out = generate(&text.model, Some(tokenizer), &encoded, &params, |_, _| {})?;
    Ok(out.into_iter().map(|g| g.text.trim().to_owned()).collect())
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
    let tuner_config = args.tuner.config(&linear_modules(&text.model));
    let mut recorded = recorded_args(args, &tuner_config, text.model.architecture());
    recorded["command"] = json!(command);
    recorded["objective"] = knobs;
    let resume = resume_point(args, &recorded)?;
    let identity = identity(args);
    if let Some(dir) = &resume {
        let saved = checkpoint_identity(dir)?;
        if saved != identity {
            bail!("{} was saved by another run ({saved}); this run is {identity}", dir.display());
        }
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
        let out = &args.output_dir;
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        std::fs::write(out.join("args.json"), serde_json::to_string_pretty(&self.recorded)?)?;
        let mut config = args.train.train_config()?;
        config.output_dir = Some(out.clone());
        config.resume_from = self.resume.clone();
        config.identity = self.identity.clone();
        Ok(config)
    }
}

/// Prints the first and last step of a finished run.
pub(super) fn report(metrics: &[crate::train::StepMetrics], out: &Path) {
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

/// Runs `oxtune sft` (`objective` = assistant turns) or `oxtune pt` (all tokens).
pub fn run(global: &GlobalArgs, args: &SftArgs, objective: Objective) -> anyhow::Result<()> {
    let command = if objective == Objective::AllTokens { "pt" } else { "sft" };
    let mut setup = set_up(global, args, command, json!({}))?;
    let text = &setup.text;
    let encoder = Encoder {
        registry: &setup.registry,
        assets: &text.assets,
        model: &text.model,
        media_options: args.model.media_options(),
        args: &args.data,
        objective,
    };
    let data = encoder.prepare_data(args.train.seed)?;
    data.report(&args.data);
    let before = sample_answers(text, &args.sample_prompt, objective)?;
    let config = setup.start(args)?;
    eprintln!(
        "training {} row(s) ({} held out) with {} on {}",
        data.train.len(),
        data.eval.len(),
        args.tuner.name,
        args.model.model.display()
    );
    let metrics = train(&setup.text.model, &data.train, &data.eval, &config)?;
    report(&metrics, &args.output_dir);
    let after = sample_answers(&setup.text, &args.sample_prompt, objective)?;
    print_samples(&args.sample_prompt, &before, &after);
    Ok(())
}

/// Prints each `--sample-prompt` with its answers before and after training.
pub(super) fn print_samples(prompts: &[String], before: &[String], after: &[String]) {
    for ((prompt, before), after) in prompts.iter().zip(before).zip(after) {
        println!("prompt: {prompt}\n  before: {before}\n  after:  {after}");
    }
}
