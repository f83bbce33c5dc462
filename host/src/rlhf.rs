//! `oxtune rlhf --algo dpo|kto|cpo|simpo|orpo|grpo`: preference alignment
//! and GRPO on the shared training loop, with ms-swift's and TRL's knob
//! names. The reference model of a LoRA run is the base with the adapter
//! switched off — no second copy of the weights.

use anyhow::bail;
use oxtune_data::tokenised::TokenisedItems;
use oxtune_data::{Encoded, Objective, Prepared, Streamed};
use oxtune_engine::LoadedModel;
use oxtune_train::align::grpo::{GrpoConfig, GrpoLossType, RewardOnError, ScaleRewards};
use oxtune_train::align::losses::{DpoVariant, KtoLoss, PairLoss};
use oxtune_train::align::objective::{pack_pairs, KtoObjective, PackedPairObjective, PairObjective, Reference};
use oxtune_train::run::needs_frozen_reference;
use oxtune_train::{train_items, train_with};
use serde_json::{json, Value};

use super::sft::{
    encoder, print_samples, report, report_data, report_streamed, sample_answers_of, set_up, with_hint, SftArgs,
};
use super::GlobalArgs;

/// Arguments of `oxtune rlhf`.
#[derive(Debug, clap::Args)]
pub struct RlhfArgs {
    #[command(flatten)]
    pub run: SftArgs,
    /// The method.
    #[arg(long, alias = "rlhf-type", value_parser = ["dpo", "kto", "cpo", "simpo", "orpo", "grpo"])]
    pub algo: String,
    /// Temperature β (default: 0.1; SimPO 2.0; GRPO's KL weight 0.04).
    #[arg(long)]
    pub beta: Option<f64>,
    /// DPO/CPO: the share of preference labels assumed flipped (cDPO).
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// DPO: sigmoid, hinge or ipo. GRPO: grpo, bnpo, dr_grpo or dapo.
    #[arg(long)]
    pub loss_type: Option<String>,
    /// DPO: weight of the chosen completions' NLL (RPO).
    #[arg(long, default_value_t = 0.0)]
    pub rpo_alpha: f64,
    /// KTO: weight of desirable completions.
    #[arg(long, default_value_t = 1.0)]
    pub desirable_weight: f64,
    /// KTO: weight of undesirable completions.
    #[arg(long, default_value_t = 1.0)]
    pub undesirable_weight: f64,
    /// CPO/SimPO: weight of the chosen completions' NLL (default 1 for CPO, 0 for SimPO).
    #[arg(long)]
    pub cpo_alpha: Option<f64>,
    /// SimPO: the target reward margin γ.
    #[arg(long, default_value_t = 1.0)]
    pub simpo_gamma: f64,
    /// ORPO: weight λ of the odds-ratio term.
    #[arg(long, default_value_t = 0.1)]
    pub orpo_lambda: f64,
    #[command(flatten)]
    pub grpo: GrpoArgs,
}

impl RlhfArgs {
    /// The pairwise method the flags describe (not KTO or GRPO).
    fn pair_loss(&self) -> anyhow::Result<PairLoss> {
        let beta = self.beta.unwrap_or(if self.algo == "simpo" { 2.0 } else { 0.1 });
        if beta <= 0.0 {
            bail!("--beta must be positive, got {beta}");
        }
        Ok(match self.algo.as_str() {
            "dpo" => {
                let variant = match self.loss_type.as_deref().unwrap_or("sigmoid") {
                    "sigmoid" => DpoVariant::Sigmoid,
                    "hinge" => DpoVariant::Hinge,
                    "ipo" => DpoVariant::Ipo,
                    other => bail!("--loss-type {other}: DPO's are sigmoid, hinge and ipo"),
                };
                PairLoss::Dpo { beta, label_smoothing: self.label_smoothing, variant, rpo_alpha: self.rpo_alpha }
            }
            "cpo" => {
                PairLoss::Cpo { beta, label_smoothing: self.label_smoothing, cpo_alpha: self.cpo_alpha.unwrap_or(1.0) }
            }
            "simpo" => PairLoss::Simpo { beta, gamma: self.simpo_gamma, cpo_alpha: self.cpo_alpha.unwrap_or(0.0) },
            "orpo" => PairLoss::Orpo { lambda: self.orpo_lambda },
            other => bail!("`{other}` is not a pairwise method"),
        })
    }

    /// The knobs recorded in `args.json`.
    pub(super) fn knobs(&self) -> Value {
        json!({
            "algo": self.algo, "beta": self.beta, "label_smoothing": self.label_smoothing, "loss_type": self.loss_type,
            "rpo_alpha": self.rpo_alpha, "desirable_weight": self.desirable_weight,
            "undesirable_weight": self.undesirable_weight, "cpo_alpha": self.cpo_alpha,
            "simpo_gamma": self.simpo_gamma, "orpo_lambda": self.orpo_lambda, "grpo": self.grpo.knobs(),
        })
    }
}

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

/// Runs `oxtune rlhf` with a preference method (GRPO is `grpo::run`).
pub fn run(global: &GlobalArgs, args: &RlhfArgs) -> anyhow::Result<()> {
    let method = if args.algo == "kto" { None } else { Some(args.pair_loss()?) };
    let run = &args.run;
    if (run.data.packing || run.data.padding_free) && method.is_none() {
        anyhow::bail!(
            "--packing and --padding-free train pairs (dpo, cpo, simpo, orpo); kto compares completions across its batch"
        );
    }
    if run.data.streaming && run.data.packing {
        bail!("--packing with --streaming packs sft and pt rows; preference pairs are packed in memory");
    }
    let mut setup = set_up(global, run, "rlhf", args.knobs())?;
    let before = sample_answers_of(&setup.text, &run.sample_prompt, Objective::AssistantTurns)?;
    let options = run.data.options(run.train.seed)?;
    let encoder = encoder(&setup, run, &options);
    let stream = run.data.stream_options(true);
    let metrics = match &method {
        Some(method) => {
            let data = match run.data.streaming {
                true => PreferenceData::Streamed(
                    encoder.prepare_streamed("pairs", |e, r| e.pair(r), &stream).map_err(with_hint)?,
                ),
                false => PreferenceData::InMemory(encoder.prepare(|e, record| e.pair(record)).map_err(with_hint)?),
            };
            data.report(&run.data);
            let config = setup.start(run)?;
            let frozen = frozen_reference(&setup, run, method.needs_reference())?;
            let reference = frozen.as_ref().map_or(Reference::AdapterOff, Reference::Model);
            let (train, eval) = data.counts();
            eprintln!("{}: {train} pair(s) ({eval} held out), tuner {}", args.algo, run.tuner.name);
            let objective = PairObjective { method: method.clone(), reference, padding_free: run.data.padding_free };
            match data {
                PreferenceData::InMemory(data) if run.data.packing => {
                    let max = run.data.max_length;
                    let too_long =
                        |i: usize| anyhow::anyhow!("pair {i} is longer than --max-length {max} with both rows");
                    let train = pack_pairs(data.train, max).map_err(too_long)?;
                    let eval = pack_pairs(data.eval, max).map_err(too_long)?;
                    let pairs: usize = train.iter().map(Vec::len).sum();
                    eprintln!("packed {pairs} pair(s) into {} row(s) of at most {max} tokens", train.len());
                    train_with(&setup.text.model, &PackedPairObjective(objective), &train, &eval, &config)?
                }
                data => data.train(&setup.text.model, &objective, &config)?,
            }
        }
        None => {
            let beta = args.beta.unwrap_or(0.1);
            let method =
                KtoLoss { beta, desirable_weight: args.desirable_weight, undesirable_weight: args.undesirable_weight };
            let data = match run.data.streaming {
                true => PreferenceData::Streamed(
                    encoder.prepare_streamed("kto", |e, r| e.labelled(r), &stream).map_err(with_hint)?,
                ),
                false => PreferenceData::InMemory(encoder.prepare(|e, record| e.labelled(record)).map_err(with_hint)?),
            };
            data.report(&run.data);
            let config = setup.start(run)?;
            if config.batch_size < 2 {
                bail!("KTO needs --per-device-train-batch-size of at least 2 (its KL estimate pairs each prompt with another row's completion)");
            }
            let frozen = frozen_reference(&setup, run, true)?;
            let reference = frozen.as_ref().map_or(Reference::AdapterOff, Reference::Model);
            let (train, eval) = data.counts();
            eprintln!("kto: {train} completion(s) ({eval} held out), tuner {}", run.tuner.name);
            data.train(&setup.text.model, &KtoObjective { method, reference }, &config)?
        }
    };
    report(&metrics, &run.output_dir);
    let after = sample_answers_of(&setup.text, &run.sample_prompt, Objective::AssistantTurns)?;
    print_samples(&run.sample_prompt, &before, &after);
    Ok(())
}

/// A frozen copy of the model as the reference, when the method has one
/// and the attached tuner cannot be switched off to give it (it trains
/// base parameters, or an existing adapter is being continued).
pub(super) fn frozen_reference(
    setup: &super::sft::RunSetup,
    run: &SftArgs,
    method_has_reference: bool,
) -> anyhow::Result<Option<LoadedModel>> {
    if !method_has_reference || !needs_frozen_reference(&setup.text.model, run.model.adapter.is_some()) {
        return Ok(None);
    }
    Ok(Some(run.model.load(&setup.registry)?.model))
}

/// A preference run's items: encoded in memory, or streamed from a
/// tokenised dataset on disk (`--streaming`).
enum PreferenceData<T> {
    InMemory(Prepared<T>),
    Streamed(Streamed<T>),
}

impl<T: Encoded + Clone + Sync> PreferenceData<T>
where
    TokenisedItems<T>: oxtune_data::Items<T>,
{
    /// Prints what happened to the records on the way.
    fn report(&self, args: &super::train_args::DataArgs) {
        match self {
            PreferenceData::InMemory(data) => report_data(data, args),
            PreferenceData::Streamed(data) => report_streamed(data, args),
        }
    }

    /// Training and held-out item counts.
    fn counts(&self) -> (usize, usize) {
        use oxtune_data::Items as _;
        match self {
            PreferenceData::InMemory(data) => (data.train.len(), data.eval.len()),
            PreferenceData::Streamed(data) => (data.train.len(), data.eval.len()),
        }
    }

    /// Trains `objective` on the items.
    fn train<O: oxtune_train::Objective<Item = T>>(
        self,
        model: &LoadedModel,
        objective: &O,
        config: &oxtune_train::TrainConfig,
    ) -> anyhow::Result<Vec<oxtune_train::StepMetrics>> {
        Ok(match self {
            PreferenceData::InMemory(data) => train_items(model, objective, &data.train[..], &data.eval[..], config)?,
            PreferenceData::Streamed(data) => train_items(model, objective, &data.train, &data.eval, config)?,
        })
    }
}
