//! `oxtune rlhf --algo dpo|kto|cpo|simpo|orpo|grpo`: preference alignment
//! and GRPO on the shared training loop, with ms-swift's and TRL's knob
//! names. The reference model of a LoRA run is the base with the adapter
//! switched off — no second copy of the weights.

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::sft::{print_samples, report, sample_answers, set_up, SftArgs};
use super::train_data::Objective;
use super::GlobalArgs;
use crate::align::losses::{DpoVariant, KtoLoss, PairLoss};
use crate::align::objective::{KtoObjective, PairObjective, Reference};
use crate::align::pairs::{encode_labelled, encode_pair};
use crate::data::sources::{parse_renames, read_sources, split, DatasetSource};
use crate::model::LoadedModel;
use crate::text::TextAssets;
use crate::train::train_with;

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
    pub grpo: super::grpo::GrpoArgs,
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

/// Reads and encodes `sources` with `encode`, each error naming its file
/// and line; rows longer than `max_length` are dropped (and counted).
fn encode_all<T>(
    sources: &[DatasetSource],
    args: &SftArgs,
    encode: impl Fn(&serde_json::Map<String, Value>) -> anyhow::Result<T>,
    length: impl Fn(&T) -> usize,
) -> anyhow::Result<Vec<T>> {
    let data = &args.data;
    let renames = parse_renames(&data.columns).map_err(anyhow::Error::msg)?;
    let (records, bad) = read_sources(sources, &renames, args.train.seed)?;
    if let (Some(first), false) = (bad.first(), data.skip_bad_records) {
        bail!("{first} (--skip-bad-records skips such records)");
    }
    let mut skipped = bad.len();
    let (mut out, mut dropped) = (Vec::new(), 0);
    for record in &records {
        match encode(&record.record.value).with_context(|| record.at()) {
            Ok(item) if length(&item) > data.max_length => dropped += 1,
            Ok(item) => out.push(item),
            Err(e) if data.skip_bad_records => {
                if skipped == 0 {
                    eprintln!("skipping bad records; the first: {e:#}");
                }
                skipped += 1;
            }
            Err(e) => return Err(e),
        }
    }
    if skipped > 0 {
        eprintln!("skipped {skipped} bad record(s)");
    }
    if dropped > 0 {
        eprintln!("{dropped} row(s) longer than --max-length {} were dropped", data.max_length);
    }
    Ok(out)
}

/// Training and evaluation items: `--val-dataset`, else a `--split-ratio` share.
fn train_and_eval<T>(
    args: &SftArgs,
    encode: impl Fn(&serde_json::Map<String, Value>) -> anyhow::Result<T> + Copy,
    length: impl Fn(&T) -> usize + Copy,
) -> anyhow::Result<(Vec<T>, Vec<T>)> {
    let train = encode_all(&args.data.dataset, args, encode, length)?;
    let (train, eval) = if args.data.val_dataset.is_empty() {
        split(train, args.data.split_ratio, args.train.seed)
    } else {
        (train, encode_all(&args.data.val_dataset, args, encode, length)?)
    };
    if train.is_empty() {
        bail!("no training row is left (every record was skipped or dropped)");
    }
    Ok((train, eval))
}

/// Runs `oxtune rlhf`.
pub fn run(global: &GlobalArgs, args: &RlhfArgs) -> anyhow::Result<()> {
    if args.algo == "grpo" {
        return super::grpo::run(global, args);
    }
    let method = if args.algo == "kto" { None } else { Some(args.pair_loss()?) };
    let run = &args.run;
    let mut setup = set_up(global, run, "rlhf", args.knobs())?;
    let before = sample_answers(&setup.text, &run.sample_prompt, Objective::AssistantTurns)?;
    let assets: &TextAssets = &setup.text.assets;
    // A frozen copy serves as the reference when the adapter cannot be
    // switched off: full fine-tuning, or an adapter being continued.
    let needs_copy = matches!(run.tuner.name.as_str(), "full" | "freeze") || run.model.adapter.is_some();
    let needs_reference = args.algo == "kto" || method.as_ref().is_some_and(|m| m.needs_reference());
    let frozen: Option<LoadedModel> =
        if needs_copy && needs_reference { Some(run.model.load(&setup.registry)?.model) } else { None };
    let reference = match &frozen {
        Some(model) => Reference::Model(model),
        None => Reference::AdapterOff,
    };
    let metrics = match &method {
        Some(method) => {
            let (train, eval) = train_and_eval(
                run,
                |r| encode_pair(assets, r),
                |p| p.chosen.input_ids.len().max(p.rejected.input_ids.len()),
            )?;
            let config = setup.start(run)?;
            eprintln!("{}: {} pair(s) ({} held out), tuner {}", args.algo, train.len(), eval.len(), run.tuner.name);
            let objective = PairObjective { method: method.clone(), reference };
            train_with(&setup.text.model, &objective, &train, &eval, &config)?
        }
        None => {
            let beta = args.beta.unwrap_or(0.1);
            let method =
                KtoLoss { beta, desirable_weight: args.desirable_weight, undesirable_weight: args.undesirable_weight };
            let (train, eval) = train_and_eval(run, |r| encode_labelled(assets, r), |c| c.row.input_ids.len())?;
            let config = setup.start(run)?;
            if config.batch_size < 2 {
                bail!("KTO needs --per-device-train-batch-size of at least 2 (its KL estimate pairs each prompt with another row's completion)");
            }
            eprintln!("kto: {} completion(s) ({} held out), tuner {}", train.len(), eval.len(), run.tuner.name);
            train_with(&setup.text.model, &KtoObjective { method, reference }, &train, &eval, &config)?
        }
    };
    report(&metrics, &run.output_dir);
    let after = sample_answers(&setup.text, &run.sample_prompt, Objective::AssistantTurns)?;
    print_samples(&run.sample_prompt, &before, &after);
    Ok(())
}
