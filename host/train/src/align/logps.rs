//! Log-probabilities of completions: the sum (and token count) of
//! `log p(token | prefix)` over each row's labelled tokens, from one
//! forward pass over a right-padded batch.

use candle_core::{Result, Tensor};

use oxtune_engine::loss::next_token_logps;

/// Per row of `logits` `[b, s, v]` (position `t` predicting `labels[:, t+1]`):
/// the summed log-probability of the labelled tokens `[b]` (f32,
/// differentiable) and how many there are `[b]`.
pub fn completion_logps(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (picked, mask) = next_token_logps(logits, labels)?;
    Ok((picked.sum(1)?, mask.sum(1)?))
}
