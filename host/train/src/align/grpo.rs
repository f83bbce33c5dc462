//! GRPO (DeepSeekMath's group relative policy optimisation, as TRL
//! implements it): for each prompt, G completions from the shared
//! generation engine; their rewards from reward plugins, weighted and
//! normalised within the group into advantages; and the clipped
//! policy-ratio loss with a k3 KL penalty to the reference.
//!
//! Per completion token `t`, with `ρ = exp(log π − log π_old)`:
//! `ℓ_t = −min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A) + β·(e^{log π_ref − log π} − (log π_ref − log π) − 1)`,
//! aggregated by `--loss-type`: `grpo` (mean per sequence, then over
//! sequences), `bnpo`/`dapo` (mean over all tokens), `dr_grpo` (sum over
//! tokens / (completions × max completion length)).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Tensor};
use oxtune_data::PromptRow;
use oxtune_plugin_api::RewardSample;
use oxtune_registry::Registry;

use super::objective::Reference;
use crate::objective::collate;
use crate::{Objective, ObjectiveLoss, TrainError};
use oxtune_data::preference::join;
use oxtune_data::text::{EncodedRow, TextTokenizer};
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::generate::{generate, Detokenizer, SamplingParams};
use oxtune_engine::model::LoadedModel;

/// How the loss is aggregated over tokens.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum GrpoLossType {
    /// Mean over each completion's tokens, then over completions.
    Grpo,
    /// Mean over all completion tokens of the batch.
    Bnpo,
    /// Sum over tokens divided by completions × the maximum completion length.
    DrGrpo,
    /// Mean over all completion tokens (DAPO's token-level loss).
    Dapo,
}

/// How rewards are scaled into advantages.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ScaleRewards {
    /// Divide by the group's standard deviation.
    Group,
    /// Divide by the batch's standard deviation.
    Batch,
    /// Centre only.
    None,
}

/// What happens when a reward function fails on a sample.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RewardOnError {
    /// Stop the run with the error.
    Fail,
    /// Score the sample 0 (and count it).
    Zero,
}

/// GRPO's settings.
#[derive(Clone, Debug)]
pub struct GrpoConfig {
    /// Completions per prompt (G).
    pub num_generations: usize,
    /// Longest completion, in tokens.
    pub max_completion_length: usize,
    /// Sampling temperature of the rollouts.
    pub temperature: f32,
    /// Nucleus sampling of the rollouts.
    pub top_p: f32,
    /// Lower clipping bound ε (ratio ≥ 1 − ε).
    pub epsilon: f64,
    /// Upper clipping bound ε_high (ratio ≤ 1 + ε_high).
    pub epsilon_high: f64,
    /// KL weight β (0: no reference pass).
    pub beta: f64,
    /// Token aggregation.
    pub loss_type: GrpoLossType,
    /// Advantage scaling.
    pub scale_rewards: ScaleRewards,
    /// Policy updates per generation batch (μ).
    pub num_iterations: usize,
    /// Reward function names.
    pub reward_funcs: Vec<String>,
    /// Their weights (one per function).
    pub reward_weights: Vec<f64>,
    /// Failing reward samples: stop, or score 0.
    pub on_error: RewardOnError,
    /// Seed of the rollouts' sampling.
    pub seed: u64,
}

/// Group-normalised advantages of `rewards` (groups of `group` consecutive completions).
pub fn advantages(rewards: &[f64], group: usize, scale: ScaleRewards) -> Vec<f64> {
    let stats = |values: &[f64]| {
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        // The unbiased standard deviation, as torch.std.
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len().max(2) - 1) as f64;
        (mean, var.sqrt())
    };
    let (_, batch_std) = stats(rewards);
    rewards
        .chunks(group.max(1))
        .flat_map(|g| {
            let (mean, std) = stats(g);
            let denominator = match scale {
                ScaleRewards::Group => std + 1e-4,
                ScaleRewards::Batch => batch_std + 1e-4,
                ScaleRewards::None => 1.0,
            };
            g.iter().map(move |r| (r - mean) / denominator).collect::<Vec<_>>()
        })
        .collect()
}

/// The clipped policy-ratio loss over completion tokens: `logp`, `old`,
/// `reference` and `mask` are `[n, t]`, `advantages` `[n]`. Returns the
/// loss, the share of tokens whose ratio was clipped, and the mean k3 KL.
pub fn policy_loss(
    config: &GrpoConfig,
    logp: &Tensor,
    old: &Tensor,
    reference: Option<&Tensor>,
    mask: &Tensor,
    advantages: &Tensor,
) -> candle_core::Result<(Tensor, f64, f64)> {
    let ratio = (logp - old)?.exp()?;
    let clipped = ratio.clamp(1.0 - config.epsilon, 1.0 + config.epsilon_high)?;
    let adv = advantages.unsqueeze(1)?.broadcast_as(logp.shape())?;
    let unclipped_term = (&ratio * &adv)?;
    let clipped_term = (&clipped * &adv)?;
    let mut per_token = unclipped_term.minimum(&clipped_term)?.neg()?;
    // A token is clipped when the clipped term is the smaller one.
    let clip_active = clipped_term.lt(&unclipped_term)?.to_dtype(DType::F32)?;
    let tokens = mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
    let clip_ratio = (clip_active * mask)?.sum_all()?.to_scalar::<f32>()? as f64 / tokens;
    let mut kl_mean = 0.0;
    if let (Some(reference), true) = (reference, config.beta != 0.0) {
        let delta = (reference - logp)?;
        let kl = ((delta.exp()? - &delta)? - 1.0)?;
        kl_mean = (&kl.detach() * mask)?.sum_all()?.to_scalar::<f32>()? as f64 / tokens;
        per_token = (per_token + (kl * config.beta)?)?;
    }
    let masked = (per_token * mask)?;
    let loss = match config.loss_type {
        GrpoLossType::Grpo => {
            let lengths = mask.sum(1)?.maximum(1.0)?;
            (masked.sum(1)? / lengths)?.mean_all()?
        }
        GrpoLossType::Bnpo | GrpoLossType::Dapo => (masked.sum_all()? / tokens)?,
        GrpoLossType::DrGrpo => {
            let n = logp.dim(0)?;
            (masked.sum_all()? / (n * config.max_completion_length) as f64)?
        }
    };
    Ok((loss, clip_ratio, kl_mean))
}

/// One generation batch: prompt+completion rows, their advantages, the
/// log-probabilities of the policy that generated them, and what to log.
struct Rollout {
    rows: Vec<EncodedRow>,
    advantages: Vec<f64>,
    old_logps: Option<Tensor>,
    logged: BTreeMap<String, f64>,
    uses: usize,
}

/// GRPO as an objective of the shared training loop: each call rolls out
/// (or, within `num_iterations`, reuses) a generation batch and returns the
/// policy loss on it.
pub struct GrpoObjective<'a> {
    /// The settings.
    pub config: GrpoConfig,
    /// Where reward functions live.
    pub registry: &'a Registry,
    /// Decodes completions for the reward functions.
    pub tokenizer: &'a TextTokenizer,
    /// Tokens that end a completion.
    pub eos_token_ids: Vec<u32>,
    /// The reference (unused when β = 0).
    pub reference: Reference<'a>,
    rollout: RefCell<Option<Rollout>>,
    reference_passes: Cell<usize>,
}

impl<'a> GrpoObjective<'a> {
    /// A GRPO objective; checks the reward functions and weights now, before any training.
    pub fn new(
        config: GrpoConfig,
        registry: &'a Registry,
        tokenizer: &'a TextTokenizer,
        eos_token_ids: Vec<u32>,
        reference: Reference<'a>,
    ) -> Result<GrpoObjective<'a>, String> {
        if config.reward_funcs.is_empty() {
            return Err("GRPO needs at least one --reward-funcs".into());
        }
        for name in &config.reward_funcs {
            registry.get(oxtune_plugin_api::ComponentKind::Reward, name).map_err(|e| e.to_string())?;
        }
        if config.reward_weights.len() != config.reward_funcs.len() {
            return Err(format!(
                "--reward-weights has {} value(s) for {} reward function(s)",
                config.reward_weights.len(),
                config.reward_funcs.len()
            ));
        }
        if config.num_generations < 2 {
            return Err("--num-generations must be at least 2 (advantages compare completions of one prompt)".into());
        }
        Ok(GrpoObjective {
            config,
            registry,
            tokenizer,
            eos_token_ids,
            reference,
            rollout: RefCell::new(None),
            reference_passes: Cell::new(0),
        })
    }

    /// How many reference forward passes have run (none when β = 0).
    pub fn reference_passes(&self) -> usize {
        self.reference_passes.get()
    }

    /// Weighted total reward per completion, and per-function statistics
    /// (a failing sample stops the run or scores 0, as configured).
    pub fn rewards(&self, samples: &[RewardSample]) -> Result<(Vec<f64>, BTreeMap<String, f64>), TrainError> {
        let mut total = vec![0.0; samples.len()];
        let mut logged = BTreeMap::new();
        for (name, weight) in self.config.reward_funcs.iter().zip(&self.config.reward_weights) {
            let mut scores = Vec::with_capacity(samples.len());
            let mut failed = 0;
            for (index, result) in self.registry.score_each(name, samples).into_iter().enumerate() {
                match (result, self.config.on_error) {
                    (Ok(score), _) => scores.push(score),
                    (Err(e), RewardOnError::Zero) => {
                        if failed == 0 {
                            tracing::warn!("reward `{name}` failed on sample {index}, scored 0: {e}");
                        }
                        failed += 1;
                        scores.push(0.0);
                    }
                    (Err(e), RewardOnError::Fail) => {
                        return Err(TrainError::Setup(format!(
                        "reward `{name}` failed on sample {index}: {e} (--reward-on-error zero scores such samples 0)"
                    )))
                    }
                }
            }
            let mean = scores.iter().sum::<f64>() / scores.len() as f64;
            let std = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / scores.len() as f64).sqrt();
            logged.insert(format!("rewards/{name}/mean"), mean);
            logged.insert(format!("rewards/{name}/std"), std);
            if failed > 0 {
                logged.insert(format!("rewards/{name}/failed"), failed as f64);
            }
            for (t, s) in total.iter_mut().zip(&scores) {
                *t += weight * s;
            }
        }
        Ok((total, logged))
    }

    /// Generates G completions for each prompt and scores them.
    fn roll_out(&self, model: &LoadedModel, batch: &[&PromptRow], step: usize) -> Result<Rollout, TrainError> {
        let started = Instant::now();
        let g = self.config.num_generations;
        let prompts: Vec<Vec<u32>> = batch.iter().flat_map(|p| std::iter::repeat_n(p.ids.clone(), g)).collect();
        let params = SamplingParams {
            max_new_tokens: self.config.max_completion_length,
            temperature: self.config.temperature,
            top_p: self.config.top_p,
            seed: self.config.seed ^ (step as u64).wrapping_mul(0x9E37_79B9),
            eos_token_ids: self.eos_token_ids.clone(),
            ..Default::default()
        };
        let generations = generate(model, Some(self.tokenizer as &dyn Detokenizer), &prompts, &params, |_, _| {})
            .map_err(Box::new)?;
        let generated: usize = generations.iter().map(|c| c.tokens.len()).sum();
        let rollout_s = started.elapsed().as_secs_f64();
        let samples: Vec<RewardSample> = generations
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let prompt = batch[i / g];
                RewardSample {
                    prompt: prompt.text.clone(),
                    completion: c.text.clone(),
                    columns: prompt.columns.clone(),
                }
            })
            .collect();
        let (rewards, mut logged) = self.rewards(&samples)?;
        let advantages = advantages(&rewards, g, self.config.scale_rewards);
        let mean = rewards.iter().sum::<f64>() / rewards.len() as f64;
        let group_std: f64 = rewards
            .chunks(g)
            .map(|c| {
                let m = c.iter().sum::<f64>() / c.len() as f64;
                (c.iter().map(|r| (r - m).powi(2)).sum::<f64>() / c.len() as f64).sqrt()
            })
            .sum::<f64>()
            / batch.len() as f64;
        let lengths: Vec<usize> = generations.iter().map(|c| c.tokens.len()).collect();
        let truncated =
            generations.iter().filter(|c| !c.tokens.last().is_some_and(|t| self.eos_token_ids.contains(t))).count();
        logged.insert("reward".into(), mean);
        logged.insert("reward_std".into(), group_std);
        logged.insert("completions/mean_length".into(), lengths.iter().sum::<usize>() as f64 / lengths.len() as f64);
        logged.insert("completions/clipped_ratio".into(), truncated as f64 / lengths.len() as f64);
        logged.insert("rollout_s".into(), rollout_s);
        logged.insert("rollout_tokens_per_s".into(), generated as f64 / rollout_s.max(1e-9));
        let rows: Vec<EncodedRow> = generations
            .iter()
            .enumerate()
            .map(|(i, c)| {
                // A completion that produced nothing still scores its end.
                let tokens = if c.tokens.is_empty() {
                    self.eos_token_ids.iter().take(1).copied().collect()
                } else {
                    c.tokens.clone()
                };
                join(&batch[i / g].ids, &tokens)
            })
            .collect();
        Ok(Rollout { rows, advantages, old_logps: None, logged, uses: 0 })
    }
}

impl Objective for GrpoObjective<'_> {
    type Item = PromptRow;

    fn trainable(&self, item: &PromptRow) -> bool {
        !item.ids.is_empty()
    }

    fn loss(
        &self,
        model: &LoadedModel,
        batch: &[&PromptRow],
        dropout_seed: Option<u64>,
        step: usize,
    ) -> Result<ObjectiveLoss, TrainError> {
        let compute = |cause| TrainError::Compute { step, source: cause };
        let mut slot = self.rollout.borrow_mut();
        if slot.as_ref().is_none_or(|r| r.uses >= self.config.num_iterations.max(1)) {
            *slot = Some(self.roll_out(model, batch, step)?);
        }
        let rollout = slot.as_mut().expect("set above");
        let rows: Vec<&EncodedRow> = rollout.rows.iter().collect();
        let (ids, labels, mask) = collate(&rows, model.device()).map_err(compute)?;
        let info = BatchInfo { attention_mask: Some(mask.clone()), dropout_seed, ..Default::default() };
        let policy = model.label_logps(&ids, &info, &labels).map_err(Box::new)?;
        let (logp, token_mask, aux) = (policy.logps, policy.mask, policy.aux);
        // The policy that generated the batch: this one on its first use
        // (ratio 1, gradient intact), remembered for later iterations.
        let old = match &rollout.old_logps {
            Some(old) => old.clone(),
            None => {
                let old = logp.detach();
                if self.config.num_iterations > 1 {
                    rollout.old_logps = Some(old.clone());
                }
                old
            }
        };
        let reference = if self.config.beta != 0.0 {
            self.reference_passes.set(self.reference_passes.get() + 1);
            let plain = BatchInfo { attention_mask: Some(mask), ..Default::default() };
            let reference = match &self.reference {
                Reference::AdapterOff => model.label_logps_without_adapter(&ids, &plain, &labels),
                Reference::Model(frozen) => frozen.reference_label_logps(&ids, &plain, &labels),
            }
            .map_err(Box::new)?;
            Some(reference.logps.detach())
        } else {
            None
        };
        let advantages = Tensor::from_vec(
            rollout.advantages.iter().map(|&a| a as f32).collect::<Vec<f32>>(),
            rollout.advantages.len(),
            model.device(),
        )
        .map_err(compute)?;
        let (loss, clip_ratio, kl) =
            policy_loss(&self.config, &logp, &old, reference.as_ref(), &token_mask, &advantages).map_err(compute)?;
        rollout.uses += 1;
        let mut logged = rollout.logged.clone();
        if rollout.uses > 1 {
            // Rollout time was spent on the first use only.
            logged.insert("rollout_s".into(), 0.0);
        }
        logged.insert("clip_ratio".into(), clip_ratio);
        logged.insert("kl".into(), kl);
        Ok(ObjectiveLoss {
            loss,
            tokens: rows.iter().map(|r| r.input_ids.len()).sum(),
            weight: rows.len() as f64,
            logged,
            aux,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn config(loss_type: GrpoLossType) -> GrpoConfig {
        GrpoConfig {
            num_generations: 2,
            max_completion_length: 4,
            temperature: 1.0,
            top_p: 1.0,
            epsilon: 0.2,
            epsilon_high: 0.28,
            beta: 0.0,
            loss_type,
            scale_rewards: ScaleRewards::Group,
            num_iterations: 1,
            reward_funcs: vec![],
            reward_weights: vec![],
            on_error: RewardOnError::Fail,
            seed: 0,
        }
    }

    #[test]
    fn a_group_with_identical_rewards_has_zero_advantages() {
        let adv = advantages(&[0.5, 0.5, 0.5, 1.0, 0.0, 2.0], 3, ScaleRewards::Group);
        assert_eq!(&adv[..3], &[0.0, 0.0, 0.0]);
        // Group 2: mean 1, unbiased std 1: advantages (0, −1, 1) up to the 1e-4 guard.
        assert!((adv[4] + 1.0 / 1.0001).abs() < 1e-12 && (adv[5] - 1.0 / 1.0001).abs() < 1e-12);
        assert_eq!(advantages(&[1.0, 3.0], 2, ScaleRewards::None), vec![-1.0, 1.0]);
    }

    fn one_token(values: &[f64]) -> Tensor {
        Tensor::new(values.iter().map(|&v| v as f32).collect::<Vec<f32>>(), &Device::Cpu).unwrap().unsqueeze(1).unwrap()
    }

    #[test]
    fn the_ratio_is_clipped_at_its_bounds() {
        // Four one-token completions; old log-prob 0, so ρ = e^{logp}.
        // ρ = 1.5 with A = +1: clipped to 1.28 (min picks it): loss −1.28.
        // ρ = 0.5 with A = −1: clipped to 0.8: −min(−0.5, −0.8) = 0.8.
        // ρ = 1.1 with A = +1 (inside): −1.1. ρ = 0.7 with A = +1: −0.7 (the unclipped term is smaller).
        let ratios = [1.5f64, 0.5, 1.1, 0.7];
        let logp = one_token(&ratios.iter().map(|r| r.ln()).collect::<Vec<_>>());
        let old = one_token(&[0.0; 4]);
        let mask = one_token(&[1.0; 4]);
        let adv = Tensor::new(&[1f32, -1.0, 1.0, 1.0], &Device::Cpu).unwrap();
        let (loss, clip_ratio, _) = policy_loss(&config(GrpoLossType::Grpo), &logp, &old, None, &mask, &adv).unwrap();
        let expected = (-1.28 + 0.8 - 1.1 - 0.7) / 4.0;
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - expected).abs() < 1e-5);
        assert_eq!(clip_ratio, 0.5, "two of four tokens clipped");
    }

    #[test]
    fn loss_types_aggregate_tokens_as_defined() {
        // Completion 1 has two tokens and A = 1, completion 2 one token and
        // A = 4; with ρ = 1 every token's loss is −A.
        let logp = Tensor::new(&[[0f32, 0.0], [0.0, 0.0]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1f32, 1.0], [1.0, 0.0]], &Device::Cpu).unwrap();
        let adv = Tensor::new(&[1f32, 4.0], &Device::Cpu).unwrap();
        let run = |t| policy_loss(&config(t), &logp, &logp, None, &mask, &adv).unwrap().0.to_scalar::<f32>().unwrap();
        // grpo: mean(−1, −4) over sequences of per-sequence means (−1, −4) = −2.5.
        assert!((run(GrpoLossType::Grpo) + 2.5).abs() < 1e-6);
        // bnpo: (−1 −1 −4) / 3 tokens.
        assert!((run(GrpoLossType::Bnpo) + 2.0).abs() < 1e-6);
        // dr_grpo: −6 / (2 completions × 4 max tokens).
        assert!((run(GrpoLossType::DrGrpo) + 0.75).abs() < 1e-6);
    }

    #[test]
    fn a_gradient_step_makes_rewarded_completions_likelier() {
        // A one-token policy over two tokens; completion 0 chose token 0
        // (advantage +1), completion 1 token 1 (advantage −1).
        let theta = candle_core::Var::new(&[0.3f32, 0.1], &Device::Cpu).unwrap();
        let step = |theta: &candle_core::Var| {
            let logp = oxtune_engine::backend::ops::log_softmax(theta.as_tensor(), 0).unwrap().unsqueeze(1).unwrap();
            let old = logp.detach();
            let mask = one_token(&[1.0, 1.0]);
            let adv = Tensor::new(&[1f32, -1.0], &Device::Cpu).unwrap();
            let (loss, _, _) = policy_loss(&config(GrpoLossType::Grpo), &logp, &old, None, &mask, &adv).unwrap();
            let grads = loss.backward().unwrap();
            let g = grads.get(theta.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            assert!(g[0] < 0.0 && g[1] > 0.0, "descent raises token 0: {g:?}");
        };
        step(&theta);
    }

    #[test]
    fn k3_kl_is_zero_at_the_reference_and_positive_away() {
        let mut c = config(GrpoLossType::Bnpo);
        c.beta = 0.5;
        let logp = one_token(&[-1.0]);
        let mask = one_token(&[1.0]);
        let adv = Tensor::new(&[0f32], &Device::Cpu).unwrap();
        let (_, _, kl) = policy_loss(&c, &logp, &logp, Some(&logp), &mask, &adv).unwrap();
        assert_eq!(kl, 0.0);
        // ref − logp = 0.5: e^{0.5} − 0.5 − 1.
        let reference = one_token(&[-0.5]);
        let (loss, _, kl) = policy_loss(&c, &logp, &logp, Some(&reference), &mask, &adv).unwrap();
        let k3 = 0.5f64.exp() - 0.5 - 1.0;
        assert!((kl - k3).abs() < 1e-6);
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - 0.5 * k3).abs() < 1e-6);
    }
}
