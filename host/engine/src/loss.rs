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
    mean_token_nll(&picked, &mask)
}

/// The mean negative log-probability over the labelled positions, from
/// per-position log-probabilities (0 where unlabelled) and their mask, as
/// [`next_token_logps`] or the model's label head give them.
pub fn mean_token_nll(logps: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let count = mask.sum_all()?.to_scalar::<f32>()?;
    if count == 0.0 {
        candle_core::bail!("every label is {IGNORE_INDEX}: nothing to train on");
    }
    logps.sum_all()?.neg()? / count as f64
}

/// The label each position of a `[b, s]` batch predicts, row-major: at
/// position `t`, `labels[:, t + 1]`; `None` at the last position and
/// where the label is [`IGNORE_INDEX`]. A label outside the vocabulary of
/// `vocab` tokens is an error.
pub fn next_token_targets(labels: &Tensor, (b, s): (usize, usize), vocab: usize) -> Result<Vec<Option<u32>>> {
    if labels.dims() != [b, s] {
        candle_core::bail!("labels are {:?} but the batch is [{b}, {s}]", labels.dims());
    }
    if s < 2 {
        candle_core::bail!("next-token log-probabilities need at least two positions, got {s}");
    }
    let labels = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let mut targets = Vec::with_capacity(b * s);
    for row in &labels {
        for t in 0..s {
            let label = row.get(t + 1).copied().unwrap_or(IGNORE_INDEX);
            if label == IGNORE_INDEX {
                targets.push(None);
            } else if label < 0 || label as usize >= vocab {
                candle_core::bail!("label {label} is outside the vocabulary of {vocab} tokens");
            } else {
                targets.push(Some(label as u32));
            }
        }
    }
    Ok(targets)
}

/// The mask `[b, s − 1]` (1.0 / 0.0) of the positions that have a label
/// to predict, from `labels` `[b, s]`.
pub fn next_token_mask(labels: &Tensor) -> Result<Tensor> {
    let s = labels.dim(1)?;
    labels.narrow(1, 1, s - 1)?.to_dtype(DType::I64)?.ne(IGNORE_INDEX)?.to_dtype(DType::F32)
}

/// Per position of `logits` `[b, s, v]` (position `t` predicting
/// `labels[:, t + 1]`): the log-probability of that label `[b, s − 1]`
/// (f32, differentiable; 0 where the label is [`IGNORE_INDEX`]) and the
/// mask of labelled positions `[b, s − 1]` (1.0 / 0.0).
pub fn next_token_logps(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, s, v) = logits.dims3()?;
    let targets = next_token_targets(labels, (b, s), v)?;
    let ids: Vec<u32> = targets.iter().map(|t| t.unwrap_or(0)).collect();
    let device = logits.device();
    let ids = Tensor::from_vec(ids, (b, s, 1), device)?.narrow(1, 0, s - 1)?;
    let mask = next_token_mask(labels)?;
    let logits = logits.narrow(1, 0, s - 1)?.to_dtype(DType::F32)?;
    let log_probs = ops::log_softmax(&logits, 2)?;
    let picked = log_probs.gather(&ids.contiguous()?, D::Minus1)?.squeeze(D::Minus1)?;
    Ok(((picked * &mask)?, mask))
}
