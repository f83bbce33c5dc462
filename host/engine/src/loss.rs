//! Training losses computed on the host.

use candle_core::{DType, Result, Tensor, D};

use crate::backend::ops;

/// The label that marks a position as not trained on (as in transformers).
pub const IGNORE_INDEX: i64 = -100;

/// Mean next-token cross-entropy, as transformers' causal-LM loss: logits
/// `[batch, seq, vocab]` at position `t` predict `labels[:, t + 1]`;
/// positions labelled [`IGNORE_INDEX`] are left out of the mean. Computed
/// in f32 whatever the logits' dtype.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (picked, mask) = next_token_logps(logits, labels)?;
    let count = mask.sum_all()?.to_scalar::<f32>()?;
    if count == 0.0 {
        candle_core::bail!("every label is {IGNORE_INDEX}: nothing to train on");
    }
    picked.sum_all()?.neg()? / count as f64
}

/// Per position of `logits` `[b, s, v]` (position `t` predicting
/// `labels[:, t + 1]`): the log-probability of that label `[b, s − 1]`
/// (f32, differentiable; 0 where the label is [`IGNORE_INDEX`]) and the
/// mask of labelled positions `[b, s − 1]` (1.0 / 0.0).
pub fn next_token_logps(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, s, v) = logits.dims3()?;
    if s < 2 {
        candle_core::bail!("next-token log-probabilities need at least two positions, got {s}");
    }
    let logits = logits.narrow(1, 0, s - 1)?.to_dtype(DType::F32)?;
    let labels = labels.narrow(1, 1, s - 1)?.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    let mut targets = Vec::with_capacity(labels.len());
    let mut mask = Vec::with_capacity(labels.len());
    for &label in &labels {
        let keep = label != IGNORE_INDEX;
        if keep && (label < 0 || label as usize >= v) {
            candle_core::bail!("label {label} is outside the vocabulary of {v} tokens");
        }
        targets.push(if keep { label as u32 } else { 0 });
        mask.push(if keep { 1f32 } else { 0.0 });
    }
    let device = logits.device();
    let targets = Tensor::from_vec(targets, (b, s - 1, 1), device)?;
    let mask = Tensor::from_vec(mask, (b, s - 1), device)?;
    let log_probs = ops::log_softmax(&logits, 2)?;
    let picked = log_probs.gather(&targets, D::Minus1)?.squeeze(D::Minus1)?;
    Ok(((picked * &mask)?, mask))
}
