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
    let (b, s, v) = logits.dims3()?;
    if s < 2 {
        candle_core::bail!("a causal-LM loss needs at least two positions, got {s}");
    }
    let logits = logits.narrow(1, 0, s - 1)?.reshape((b * (s - 1), v))?;
    let labels = labels.narrow(1, 1, s - 1)?.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
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
    let count = mask.iter().filter(|&&m| m > 0.0).count();
    if count == 0 {
        candle_core::bail!("every label is {IGNORE_INDEX}: nothing to train on");
    }
    let device = logits.device();
    let targets = Tensor::from_vec(targets, (b * (s - 1), 1), device)?;
    let mask = Tensor::from_vec(mask, b * (s - 1), device)?;
    let log_probs = ops::log_softmax(&logits.to_dtype(DType::F32)?, 1)?;
    let picked = log_probs.gather(&targets, D::Minus1)?.squeeze(1)?;
    (picked * mask)?.sum_all()?.neg()? / count as f64
}
