//! Log-probabilities of completions: the sum (and token count) of
//! `log p(token | prefix)` over each row's labelled tokens, from one
//! forward pass over a right-padded batch.

use candle_core::{Result, Tensor};

/// Per row, from per-position label log-probabilities `[b, s − 1]` (0
/// where unlabelled) and their mask: the summed log-probability of the
/// labelled tokens `[b]` (f32, differentiable) and how many there are `[b]`.
pub fn completion_logps(picked: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok((picked.sum(1)?, mask.sum(1)?))
}
