//! The preference losses, as their papers and TRL define them, on
//! per-pair log-probabilities (differentiable candle tensors `[n]`).
//!
//! Notation: `c`, `r` are the policy's log-probabilities of the chosen and
//! rejected completions (summed over completion tokens, or averaged where
//! the method says so), `c₀`, `r₀` the reference model's, `σ` the logistic
//! function, `β` the temperature.
//!
//! | method | loss per pair | rewards logged |
//! |---|---|---|
//! | DPO sigmoid | `−(1−ε)·log σ(β·h) − ε·log σ(−β·h)`, `h = (c − r) − (c₀ − r₀)` | `β(c − c₀)`, `β(r − r₀)` |
//! | DPO hinge | `max(0, 1 − β·h)` | same |
//! | IPO | `(h − 1/(2β))²`, log-probs averaged | same |
//! | RPO | DPO + `α ·` NLL of the chosen tokens | same |
//! | CPO | `−log σ(β(c − r))` + `α ·` NLL(chosen) (no reference) | `βc`, `βr` |
//! | SimPO | `−log σ(β(c̄ − r̄) − γ)` (averaged log-probs, no reference) | `βc̄`, `βr̄` |
//! | ORPO | NLL(chosen) `− λ · log σ(log odds(c̄) − log odds(r̄))`, `odds(p) = p/(1−p)` | `λc̄`, `λr̄` |
//! | KTO | `λ_D(1 − σ(β(c − c₀ − z)))` for desirable, `λ_U(1 − σ(β(z − (r − r₀))))` for undesirable; `z = max(0, mean KL estimate)`, held constant | `β(c − c₀)`, `β(r − r₀)` |

use std::collections::BTreeMap;

use candle_core::{Result, Tensor};

use oxtune_engine::backend::ops::sigmoid;

/// `log σ(x)`, computed stably: `−log(1 + e^{−x})` where `x ≥ 0` and
/// `x − log(1 + e^{x})` where `x < 0`, each branch smooth and fed only the
/// inputs it is stable for. The derivative is `σ(−x)` everywhere, 0.5 at
/// `x = 0` — where every DPO pair sits at the first step of a fresh run.
/// (The form `min(x, 0) − log(1 + e^{−|x|})` gets 1 there from the
/// subgradients of `min` and `abs`: twice the true gradient.)
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let non_negative = x.ge(0.0)?;
    let zeros = x.zeros_like()?;
    let positive_side = non_negative.where_cond(x, &zeros)?;
    let negative_side = non_negative.where_cond(&zeros, x)?;
    let positive_branch = (positive_side.neg()?.exp()? + 1.0)?.log()?.neg()?;
    let negative_branch = (&negative_side - (negative_side.exp()? + 1.0)?.log()?)?;
    non_negative.where_cond(&positive_branch, &negative_branch)
}

/// DPO's loss variants.
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum DpoVariant {
    /// The Bradley–Terry loss of the DPO paper (with label smoothing: cDPO).
    Sigmoid,
    /// SLiC's hinge.
    Hinge,
    /// IPO's squared loss (expects averaged log-probabilities).
    Ipo,
}

/// A pairwise preference method and its knobs.
#[derive(Clone, Debug, PartialEq)]
pub enum PairLoss {
    /// DPO.
    Dpo {
        /// Temperature β.
        beta: f64,
        /// The share of labels assumed flipped (cDPO).
        label_smoothing: f64,
        /// Sigmoid, hinge or IPO.
        variant: DpoVariant,
        /// RPO's weight of the chosen completions' NLL.
        rpo_alpha: f64,
    },
    /// CPO.
    Cpo {
        /// Temperature β.
        beta: f64,
        /// The share of labels assumed flipped.
        label_smoothing: f64,
        /// The weight of the chosen completions' NLL.
        cpo_alpha: f64,
    },
    /// SimPO.
    Simpo {
        /// Temperature β.
        beta: f64,
        /// The target reward margin γ.
        gamma: f64,
        /// An optional weight of the chosen completions' NLL.
        cpo_alpha: f64,
    },
    /// ORPO.
    Orpo {
        /// The odds-ratio weight λ.
        lambda: f64,
    },
}

impl PairLoss {
    /// Whether the method compares with a reference model.
    pub fn needs_reference(&self) -> bool {
        matches!(self, PairLoss::Dpo { .. })
    }

    /// Whether log-probabilities are averaged over completion tokens
    /// (rather than summed).
    pub fn averages_logps(&self) -> bool {
        match self {
            PairLoss::Dpo { variant, .. } => *variant == DpoVariant::Ipo,
            PairLoss::Cpo { .. } => false,
            PairLoss::Simpo { .. } | PairLoss::Orpo { .. } => true,
        }
    }
}

/// What a pair loss needs: policy (and reference) log-probabilities of
/// the chosen and rejected completions, and the NLL of the chosen tokens.
pub struct PairInputs<'a> {
    /// Policy, chosen `[n]`.
    pub chosen: &'a Tensor,
    /// Policy, rejected `[n]`.
    pub rejected: &'a Tensor,
    /// Reference, chosen and rejected `[n]` (methods with a reference).
    pub reference: Option<(&'a Tensor, &'a Tensor)>,
    /// Mean next-token cross-entropy over the chosen completions' tokens.
    pub chosen_nll: &'a Tensor,
}

/// The mean loss over pairs and the metrics TRL logs
/// (`rewards/chosen`, `rewards/rejected`, `rewards/margins`,
/// `rewards/accuracies`, `logps/chosen`, `logps/rejected`).
pub fn pair_loss(method: &PairLoss, x: &PairInputs<'_>) -> Result<(Tensor, BTreeMap<String, f64>)> {
    let smoothed = |logits: &Tensor, eps: f64| -> Result<Tensor> {
        let pos = (log_sigmoid(logits)? * (1.0 - eps))?;
        let neg = (log_sigmoid(&logits.neg()?)? * eps)?;
        (pos + neg)?.neg()
    };
    let (losses, chosen_rewards, rejected_rewards) = match *method {
        PairLoss::Dpo { beta, label_smoothing, variant, .. } => {
            let (c0, r0) =
                x.reference.ok_or_else(|| candle_core::Error::Msg("DPO needs the reference model".into()))?;
            let h = ((x.chosen - x.rejected)? - (c0 - r0)?)?;
            let losses = match variant {
                DpoVariant::Sigmoid => smoothed(&(&h * beta)?, label_smoothing)?,
                DpoVariant::Hinge => ((&h * beta)?.neg()? + 1.0)?.relu()?,
                DpoVariant::Ipo => (&h - 1.0 / (2.0 * beta))?.sqr()?,
            };
            (losses, ((x.chosen - c0)? * beta)?, ((x.rejected - r0)? * beta)?)
        }
        PairLoss::Cpo { beta, label_smoothing, .. } => {
            let logits = ((x.chosen - x.rejected)? * beta)?;
            (smoothed(&logits, label_smoothing)?, (x.chosen * beta)?, (x.rejected * beta)?)
        }
        PairLoss::Simpo { beta, gamma, .. } => {
            let logits = (((x.chosen - x.rejected)? * beta)? - gamma)?;
            (smoothed(&logits, 0.0)?, (x.chosen * beta)?, (x.rejected * beta)?)
        }
        PairLoss::Orpo { lambda } => {
            // log odds(p) = log p − log(1 − p), with p = exp(mean log-prob).
            let log_one_minus = |lp: &Tensor| -> Result<Tensor> { (lp.exp()?.neg()? + 1.0)?.maximum(1e-30)?.log() };
            let log_odds = ((x.chosen - x.rejected)? - (log_one_minus(x.chosen)? - log_one_minus(x.rejected)?)?)?;
            let ratio = log_sigmoid(&log_odds)?;
            ((ratio * lambda)?.neg()?, (x.chosen * lambda)?, (x.rejected * lambda)?)
        }
    };
    let nll_weight = match *method {
        PairLoss::Dpo { rpo_alpha, .. } => rpo_alpha,
        PairLoss::Cpo { cpo_alpha, .. } | PairLoss::Simpo { cpo_alpha, .. } => cpo_alpha,
        PairLoss::Orpo { .. } => 1.0,
    };
    let mut loss = losses.mean_all()?;
    if nll_weight != 0.0 {
        loss = (loss + (x.chosen_nll * nll_weight)?)?;
    }
    let mean =
        |t: &Tensor| -> Result<f64> { t.detach().mean_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>() };
    let margins = (&chosen_rewards - &rejected_rewards)?;
    let accuracies = margins.gt(0.0)?.to_dtype(candle_core::DType::F32)?;
    let logged = BTreeMap::from([
        ("rewards/chosen".to_owned(), mean(&chosen_rewards)?),
        ("rewards/rejected".to_owned(), mean(&rejected_rewards)?),
        ("rewards/margins".to_owned(), mean(&margins)?),
        ("rewards/accuracies".to_owned(), mean(&accuracies)?),
        ("logps/chosen".to_owned(), mean(x.chosen)?),
        ("logps/rejected".to_owned(), mean(x.rejected)?),
        ("nll_loss".to_owned(), mean(x.chosen_nll)?),
    ]);
    Ok((loss, logged))
}

/// KTO's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct KtoLoss {
    /// Temperature β.
    pub beta: f64,
    /// λ_D, the weight of desirable completions.
    pub desirable_weight: f64,
    /// λ_U, the weight of undesirable completions.
    pub undesirable_weight: f64,
}

/// KTO over a batch: policy and reference log-probabilities `[n]` of each
/// completion, whether each is desirable, and those of mismatched
/// (prompt, completion) pairs `[m]` for the KL estimate `z`.
pub fn kto_loss(
    method: &KtoLoss,
    policy: &Tensor,
    reference: &Tensor,
    desirable: &[bool],
    kl_policy: &Tensor,
    kl_reference: &Tensor,
) -> Result<(Tensor, BTreeMap<String, f64>)> {
    let z = (kl_policy - kl_reference)?.mean_all()?.maximum(0.0)?.detach();
    let ratio = (policy - reference)?;
    let beta = method.beta;
    let device = policy.device();
    let signs: Vec<f32> = desirable.iter().map(|&d| if d { 1.0 } else { -1.0 }).collect();
    let weights: Vec<f32> =
        desirable.iter().map(|&d| if d { method.desirable_weight } else { method.undesirable_weight } as f32).collect();
    let signs = Tensor::from_vec(signs, desirable.len(), device)?.to_dtype(policy.dtype())?;
    let weights = Tensor::from_vec(weights, desirable.len(), device)?.to_dtype(policy.dtype())?;
    // Desirable: 1 − σ(β(ratio − z)); undesirable: 1 − σ(β(z − ratio)).
    let centred = ratio.broadcast_sub(&z)?;
    let losses = ((sigmoid(&((centred * signs)? * beta)?)?.neg()? + 1.0)? * weights)?;
    let loss = losses.mean_all()?;
    let rewards = (ratio.detach() * beta)?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
    let side = |want: bool| -> f64 {
        let picked: Vec<f64> = rewards.iter().zip(desirable).filter(|(_, &d)| d == want).map(|(r, _)| *r).collect();
        if picked.is_empty() {
            f64::NAN
        } else {
            picked.iter().sum::<f64>() / picked.len() as f64
        }
    };
    let logged = BTreeMap::from([
        ("rewards/chosen".to_owned(), side(true)),
        ("rewards/rejected".to_owned(), side(false)),
        ("kl".to_owned(), z.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?),
    ]);
    Ok((loss, logged))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(values: &[f64]) -> Tensor {
        Tensor::new(values, &Device::Cpu).unwrap()
    }

    fn scalar(x: &Tensor) -> f64 {
        x.to_scalar::<f64>().unwrap()
    }

    fn ln_sigmoid(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    // Two pairs of hand-made log-probabilities used by every case below.
    const C: [f64; 2] = [-10.0, -4.0];
    const R: [f64; 2] = [-12.0, -3.0];
    const C0: [f64; 2] = [-11.0, -4.5];
    const R0: [f64; 2] = [-11.5, -3.5];
    const NLL: f64 = 1.25;

    fn inputs<'a>(c: &'a Tensor, r: &'a Tensor, c0: &'a Tensor, r0: &'a Tensor, nll: &'a Tensor) -> PairInputs<'a> {
        PairInputs { chosen: c, rejected: r, reference: Some((c0, r0)), chosen_nll: nll }
    }

    fn run(method: &PairLoss) -> (f64, BTreeMap<String, f64>) {
        let (c, r, c0, r0, nll) = (t(&C), t(&R), t(&C0), t(&R0), Tensor::new(NLL, &Device::Cpu).unwrap());
        let (loss, logged) = pair_loss(method, &inputs(&c, &r, &c0, &r0, &nll)).unwrap();
        (scalar(&loss), logged)
    }

    #[test]
    fn dpo_sigmoid_with_label_smoothing_and_rpo() {
        // h = (c − r) − (c₀ − r₀): pair 1: 2 − 0.5 = 1.5; pair 2: −1 − (−1) = 0.
        let (beta, eps, alpha) = (0.1, 0.2, 0.5);
        let per_pair = |h: f64| -(1.0 - eps) * ln_sigmoid(beta * h) - eps * ln_sigmoid(-beta * h);
        let expected = (per_pair(1.5) + per_pair(0.0)) / 2.0 + alpha * NLL;
        let method = PairLoss::Dpo { beta, label_smoothing: eps, variant: DpoVariant::Sigmoid, rpo_alpha: alpha };
        let (loss, logged) = run(&method);
        assert!((loss - expected).abs() < 1e-12, "{loss} vs {expected}");
        // rewards: β(c − c₀) = (0.1, 0.05); β(r − r₀) = (−0.05, 0.05).
        assert!((logged["rewards/chosen"] - 0.075).abs() < 1e-12);
        assert!((logged["rewards/rejected"] - 0.0).abs() < 1e-12);
        assert!((logged["rewards/margins"] - 0.075).abs() < 1e-12);
        assert_eq!(logged["rewards/accuracies"], 0.5, "pair 2 has margin 0: not counted as correct");
    }

    #[test]
    fn dpo_hinge_and_ipo() {
        let beta = 0.5;
        // hinge: max(0, 1 − β h) = (1 − 0.75, 1 − 0) → mean 0.625.
        let hinge = PairLoss::Dpo { beta, label_smoothing: 0.0, variant: DpoVariant::Hinge, rpo_alpha: 0.0 };
        assert!((run(&hinge).0 - 0.625).abs() < 1e-12);
        // IPO: (h − 1/(2β))² = (1.5 − 1)², (0 − 1)² → mean 0.625.
        let ipo = PairLoss::Dpo { beta, label_smoothing: 0.0, variant: DpoVariant::Ipo, rpo_alpha: 0.0 };
        assert!((run(&ipo).0 - 0.625).abs() < 1e-12);
    }

    #[test]
    fn policy_equal_to_reference_gives_ln_2() {
        let (c, r, nll) = (t(&C), t(&R), Tensor::new(0.0, &Device::Cpu).unwrap());
        let method = PairLoss::Dpo { beta: 0.1, label_smoothing: 0.0, variant: DpoVariant::Sigmoid, rpo_alpha: 0.0 };
        let x = PairInputs { chosen: &c, rejected: &r, reference: Some((&c, &r)), chosen_nll: &nll };
        let (loss, logged) = pair_loss(&method, &x).unwrap();
        assert!((scalar(&loss) - std::f64::consts::LN_2).abs() < 1e-12);
        assert_eq!(logged["rewards/accuracies"], 0.0);
    }

    #[test]
    fn cpo_simpo_and_orpo() {
        // CPO: −log σ(β(c − r)) + α·NLL; c − r = (2, −1).
        let (beta, alpha) = (0.1, 1.0);
        let expected = -(ln_sigmoid(0.2) + ln_sigmoid(-0.1)) / 2.0 + alpha * NLL;
        let cpo = PairLoss::Cpo { beta, label_smoothing: 0.0, cpo_alpha: alpha };
        assert!((run(&cpo).0 - expected).abs() < 1e-12);
        // SimPO: −log σ(β(c − r) − γ) with β = 2, γ = 0.5: logits (3.5, −2.5).
        let simpo = PairLoss::Simpo { beta: 2.0, gamma: 0.5, cpo_alpha: 0.0 };
        let expected = -(ln_sigmoid(3.5) + ln_sigmoid(-2.5)) / 2.0;
        assert!((run(&simpo).0 - expected).abs() < 1e-12);
        // ORPO on mean log-probs a, b: log odds = (a − b) − (ln(1 − eᵃ) − ln(1 − eᵇ)).
        let (a, b) = (-0.5f64, -1.5f64);
        let log_odds = (a - b) - ((1.0 - a.exp()).ln() - (1.0 - b.exp()).ln());
        let lambda = 0.25;
        let expected = NLL - lambda * ln_sigmoid(log_odds);
        let (c, r, nll) = (t(&[a]), t(&[b]), Tensor::new(NLL, &Device::Cpu).unwrap());
        let x = PairInputs { chosen: &c, rejected: &r, reference: None, chosen_nll: &nll };
        let (loss, _) = pair_loss(&PairLoss::Orpo { lambda }, &x).unwrap();
        assert!((scalar(&loss) - expected).abs() < 1e-12, "{} vs {expected}", scalar(&loss));
    }

    #[test]
    fn kto_with_its_kl_term() {
        // Completions: desirable (policy −5, ref −6), undesirable (−7, −6.5).
        // KL pairs: policy (−8, −9), reference (−8.5, −9.1): z = mean(0.5, 0.1) = 0.3.
        let method = KtoLoss { beta: 0.5, desirable_weight: 1.0, undesirable_weight: 2.0 };
        let sigma = |x: f64| 1.0 / (1.0 + (-x).exp());
        let z = 0.3;
        let desirable = 1.0 * (1.0 - sigma(0.5 * (1.0 - z)));
        let undesirable = 2.0 * (1.0 - sigma(0.5 * (z - (-0.5))));
        let expected = (desirable + undesirable) / 2.0;
        let (loss, logged) = kto_loss(
            &method,
            &t(&[-5.0, -7.0]),
            &t(&[-6.0, -6.5]),
            &[true, false],
            &t(&[-8.0, -9.0]),
            &t(&[-8.5, -9.1]),
        )
        .unwrap();
        assert!((scalar(&loss) - expected).abs() < 1e-12, "{} vs {expected}", scalar(&loss));
        assert!((logged["kl"] - z).abs() < 1e-12);
        // A KL estimate below zero is clamped to 0.
        let (_, logged) = kto_loss(&method, &t(&[-5.0]), &t(&[-6.0]), &[true], &t(&[-9.0]), &t(&[-8.0])).unwrap();
        assert_eq!(logged["kl"], 0.0);
    }

    fn sigma(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn log_sigmoid_has_the_true_derivative_everywhere_including_zero() {
        let points = [-40.0f32, -3.0, -1e-3, 0.0, 1e-3, 2.5, 40.0];
        let x = candle_core::Var::new(&points[..], &Device::Cpu).unwrap();
        let y = log_sigmoid(x.as_tensor()).unwrap();
        let values = y.to_vec1::<f32>().unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let grad = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        for ((&p, &v), &g) in points.iter().zip(&values).zip(&grad) {
            let p = p as f64;
            assert!((v as f64 - sigma(p).ln()).abs() < 1e-5, "log σ({p}) = {v}");
            assert!((g as f64 - sigma(-p)).abs() < 1e-6, "d/dx log σ at {p} = {g}, want {}", sigma(-p));
        }
    }

    #[test]
    fn dpo_at_the_first_step_has_half_the_subgradient_slope() {
        // Policy = reference: h = 0 for every pair. The mean DPO loss is
        // ln 2 and d loss / d c_i = −β σ(0) / n = −β / (2n).
        let beta = 0.1;
        let c = candle_core::Var::new(&[-5.0f32, -7.0][..], &Device::Cpu).unwrap();
        let r = candle_core::Var::new(&[-6.0f32, -4.0][..], &Device::Cpu).unwrap();
        let (c0, r0) = (c.as_tensor().detach(), r.as_tensor().detach());
        let nll = Tensor::new(0f32, &Device::Cpu).unwrap();
        let method = PairLoss::Dpo { beta, label_smoothing: 0.0, variant: DpoVariant::Sigmoid, rpo_alpha: 0.0 };
        let inputs = PairInputs {
            chosen: c.as_tensor(),
            rejected: r.as_tensor(),
            reference: Some((&c0, &r0)),
            chosen_nll: &nll,
        };
        let (loss, _) = pair_loss(&method, &inputs).unwrap();
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - 2f64.ln()).abs() < 1e-6);
        let grads = loss.backward().unwrap();
        let dc = grads.get(c.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let dr = grads.get(r.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        for (gc, gr) in dc.iter().zip(&dr) {
            assert!((*gc as f64 + beta / 4.0).abs() < 1e-7, "d/dc = {gc}, want {}", -beta / 4.0);
            assert!((*gr as f64 - beta / 4.0).abs() < 1e-7, "d/dr = {gr}, want {}", beta / 4.0);
        }
    }
}
