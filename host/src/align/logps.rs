//! Log-probabilities of completions: the sum (and token count) of
//! `log p(token | prefix)` over each row's labelled tokens, from one
//! forward pass over a right-padded batch.

use candle_core::{DType, Result, Tensor, D};

use crate::backend::ops;
use crate::loss::IGNORE_INDEX;

/// Per row of `logits` `[b, s, v]` (position `t` predicting `labels[:, t+1]`):
/// the summed log-probability of the labelled tokens `[b]` (f32,
/// differentiable) and how many there are `[b]`.
pub fn completion_logps(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (picked, mask) = token_logps(logits, labels)?;
    Ok(((picked * &mask)?.sum(1)?, mask.sum(1)?))
}

/// Per position of `logits` `[b, s, v]`: the log-probability of the next
/// label `[b, s − 1]` (0 where unlabelled) and the mask of labelled
/// positions `[b, s − 1]` (1.0 / 0.0).
pub fn token_logps(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, s, v) = logits.dims3()?;
    if s < 2 {
        candle_core::bail!("completion log-probabilities need at least two positions, got {s}");
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
