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

/// [`completion_logps`] of the sequences laid end to end in one row
/// (padding-free): per-position label log-probabilities `[1, s − 1]` and
/// their mask, and the sequence each row token belongs to (`segments`,
/// `[s]`): per sequence `[n]`, the summed log-probability of its labelled
/// tokens and their count.
pub fn segment_logps(picked: &Tensor, mask: &Tensor, segments: &[u32], n: usize) -> Result<(Tensor, Tensor)> {
    // Position t predicts token t + 1: it counts for token t + 1's sequence.
    let positions = segments.len().saturating_sub(1);
    let mut indicator = vec![0f32; n * positions];
    for (t, &segment) in segments.iter().skip(1).enumerate() {
        if (segment as usize) < n {
            indicator[segment as usize * positions + t] = 1.0;
        }
    }
    let indicator = Tensor::from_vec(indicator, (n, positions), picked.device())?.to_dtype(picked.dtype())?;
    let sums = picked.matmul(&indicator.t()?)?.squeeze(0)?;
    let counts = mask.to_dtype(picked.dtype())?.matmul(&indicator.t()?)?.squeeze(0)?.to_dtype(mask.dtype())?;
    Ok((sums, counts))
}
