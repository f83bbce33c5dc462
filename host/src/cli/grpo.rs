//! `oxtune rlhf --algo grpo`: prompts from a dataset, G completions each
//! from the generation engine, rewards from reward plugins (built-in,
//! native or wasm), and the GRPO policy loss on the shared training loop.

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::rlhf::RlhfArgs;
use super::sft::{print_samples, report, sample_answers, set_up};
use super::train_data::Objective;
use super::GlobalArgs;
use crate::align::grpo::{GrpoConfig, GrpoLossType, GrpoObjective, GrpoPrompt, RewardOnError, ScaleRewards};
use crate::align::objective::Reference;
use crate::data::sources::{parse_renames, read_sources};
use crate::text::{ChatRequest, TextAssets};
use crate::train::train_with;
use oxtune_registry::Registry;

/// GRPO's flags (TRL's names in kebab-case).
#[derive(Debug, clap::Args)]
pub struct GrpoArgs {
    /// Reward functions (comma-separated or repeated): built-in, from a plugin, or a wasm script's name.
    #[arg(long, value_delimiter = ',')]
    pub reward_funcs: Vec<String>,
    /// One weight per reward function (default: all 1).
    #[arg(long, value_delimiter = ',')]
    pub reward_weights: Vec<f64>,
    /// Completions per prompt (G).
    #[arg(long, default_value_t = 8)]
    pub num_generations: usize,
    /// Longest completion in tokens.
    #[arg(long, default_value_t = 64)]
    pub max_completion_length: usize,
    /// Sampling temperature of the rollouts.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Nucleus sampling of the rollouts.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Clipping: the ratio stays above 1 − ε.
    #[arg(long, default_value_t = 0.2)]
    pub epsilon: f64,
    /// Clipping: the ratio stays below 1 + ε_high (default ε).
    #[arg(long)]
    pub epsilon_high: Option<f64>,
    /// Advantage scaling: group, batch or none.
    #[arg(long, default_value = "group", value_parser = ["group", "batch", "none"])]
    pub scale_rewards: String,
    /// Policy updates per generation batch.
    #[arg(long, default_value_t = 1)]
    pub num_iterations: usize,
    /// A failing reward sample: `fail` stops the run, `zero` scores it 0.
    #[arg(long, default_value = "fail", value_parser = ["fail", "zero"])]
    pub reward_on_error: String,
}

impl GrpoArgs {
    /// The knobs recorded in `args.json`.
    pub fn knobs(&self) -> Value {
        json!({
            "reward_funcs": self.reward_funcs, "reward_weights": self.reward_weights,
            "num_generations": self.num_generations, "max_completion_length": self.max_completion_length,
            "temperature": self.temperature, "top_p": self.top_p, "epsilon": self.epsilon,
            "epsilon_high": self.epsilon_high, "scale_rewards": self.scale_rewards,
            "num_iterations": self.num_iterations, "reward_on_error": self.reward_on_error,
        })
    }
}

/// GRPO's configuration from the flags.
pub fn grpo_config(args: &RlhfArgs) -> anyhow::Result<GrpoConfig> {
    let g = &args.grpo;
    let loss_type = match args.loss_type.as_deref().unwrap_or("grpo") {
        "grpo" => GrpoLossType::Grpo,
        "bnpo" => GrpoLossType::Bnpo,
        "dr_grpo" => GrpoLossType::DrGrpo,
        "dapo" => GrpoLossType::Dapo,
        other => bail!("--loss-type {other}: GRPO's are grpo, bnpo, dr_grpo and dapo"),
    };
    let scale_rewards = match g.scale_rewards.as_str() {
        "group" => ScaleRewards::Group,
        "batch" => ScaleRewards::Batch,
        _ => ScaleRewards::None,
    };
    let reward_weights =
        if g.reward_weights.is_empty() { vec![1.0; g.reward_funcs.len()] } else { g.reward_weights.clone() };
    Ok(GrpoConfig {
        num_generations: g.num_generations,
        max_completion_length: g.max_completion_length,
        temperature: g.temperature,
        top_p: g.top_p,
        epsilon: g.epsilon,
        epsilon_high: g.epsilon_high.unwrap_or(g.epsilon),
        beta: args.beta.unwrap_or(0.04),
        loss_type,
        scale_rewards,
        num_iterations: g.num_iterations,
        reward_funcs: g.reward_funcs.clone(),
        reward_weights,
        on_error: if g.reward_on_error == "zero" { RewardOnError::Zero } else { RewardOnError::Fail },
        seed: args.run.train.seed,
    })
}

/// A GRPO prompt from one record: its conversation (through the dataset
/// adapters, a trailing assistant turn dropped) templated with the
/// generation prompt; every raw column reaches the reward functions.
pub(super) fn encode_prompt(
    registry: &Registry,
    assets: &TextAssets,
    adapter: Option<&str>,
    record: &serde_json::Map<String, Value>,
) -> anyhow::Result<GrpoPrompt> {
    crate::align::pairs::refuse_media(record)?;
    let keys: Vec<&str> = record.keys().map(String::as_str).collect();
    let adapter = match adapter {
        Some(name) => name.to_owned(),
        None => registry.detect_adapter(&keys)?.name().to_owned(),
    };
    let row = registry.adapt(&adapter, &Value::Object(record.clone()))?;
    let mut messages = row["messages"].as_array().cloned().unwrap_or_default();
    if messages.last().and_then(|m| m["role"].as_str()) == Some("assistant") {
        messages.pop();
    }
    if messages.is_empty() {
        bail!("the row has no prompt");
    }
    let text = match &assets.template {
        Some(_) => assets.render_chat(&ChatRequest {
            messages: &messages,
            add_generation_prompt: true,
            ..Default::default()
        })?,
        None => messages.iter().filter_map(|m| m["content"].as_str()).collect::<Vec<_>>().join("\n"),
    };
    let ids = assets.tokenizer.encode(&text, assets.template.is_none())?;
    Ok(GrpoPrompt { ids, text, columns: record.clone() })
}

/// Runs `oxtune rlhf --algo grpo`.
pub fn run(global: &GlobalArgs, args: &RlhfArgs) -> anyhow::Result<()> {
    let run = &args.run;
    let config = grpo_config(args)?;
    let mut setup = set_up(global, run, "rlhf", args.knobs())?;
    let before = sample_answers(&setup.text, &run.sample_prompt, Objective::AssistantTurns)?;
    // Reward names and weights are checked before anything else runs.
    let registry = &setup.registry;
    let frozen = if config.beta != 0.0
        && (matches!(run.tuner.name.as_str(), "full" | "freeze") || run.model.adapter.is_some())
    {
        Some(run.model.load(registry)?.model)
    } else {
        None
    };
    let renames = parse_renames(&run.data.columns).map_err(anyhow::Error::msg)?;
    let (records, bad) = read_sources(&run.data.dataset, &renames, run.train.seed)?;
    if let (Some(first), false) = (bad.first(), run.data.skip_bad_records) {
        bail!("{first} (--skip-bad-records skips such records)");
    }
    let mut prompts = Vec::new();
    for record in &records {
        let encoded =
            encode_prompt(registry, &setup.text.assets, run.data.dataset_adapter.as_deref(), &record.record.value)
                .with_context(|| record.at());
        match encoded {
            Ok(prompt) if prompt.ids.len() <= run.data.max_length => prompts.push(prompt),
            Ok(_) => {}
            Err(e) if run.data.skip_bad_records => eprintln!("skipped: {e:#}"),
            Err(e) => return Err(e),
        }
    }
    if prompts.is_empty() {
        bail!("no prompt to train on");
    }
    let eos = setup.text.assets.eos_token_ids.clone();
    // Validate the rewards now (a typo must not wait for the first rollout).
    GrpoObjective::new(config.clone(), registry, &setup.text.assets.tokenizer, eos.clone(), Reference::AdapterOff)
        .map_err(anyhow::Error::msg)?;
    let train_config = setup.start(run)?;
    let reference = match &frozen {
        Some(model) => Reference::Model(model),
        None => Reference::AdapterOff,
    };
    let objective = GrpoObjective::new(config, &setup.registry, &setup.text.assets.tokenizer, eos, reference)
        .map_err(anyhow::Error::msg)?;
    eprintln!("grpo: {} prompt(s), {} completions each", prompts.len(), args.grpo.num_generations);
    let metrics = train_with(&setup.text.model, &objective, &prompts, &[], &train_config)?;
    report(&metrics, &run.output_dir);
    let after = sample_answers(&setup.text, &run.sample_prompt, Objective::AssistantTurns)?;
    print_samples(&run.sample_prompt, &before, &after);
    Ok(())
}
