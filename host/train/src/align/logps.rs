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

/// [`completion_logps`] of sequences laid end to end in packed rows:
/// per-position label log-probabilities `[g, p]` and their mask, and which
/// sequence owns each position's label (`owners[g·p + t]`, `None` for
/// padding): per sequence `[n]`, the summed log-probability of its
/// labelled tokens and their count.
pub fn segment_logps(picked: &Tensor, mask: &Tensor, owners: &[Option<usize>], n: usize) -> Result<(Tensor, Tensor)> {
    let positions = owners.len();
    let mut indicator = vec![0f32; n * positions];
    for (t, owner) in owners.iter().enumerate() {
        if let Some(row) = owner.filter(|&r| r < n) {
            indicator[row * positions + t] = 1.0;
        }
    }
    let indicator = Tensor::from_vec(indicator, (n, positions), picked.device())?.to_dtype(picked.dtype())?;
    let flat = picked.reshape((1, positions))?;
    let sums = flat.matmul(&indicator.t()?)?.squeeze(0)?;
    let flat_mask = mask.reshape((1, positions))?.to_dtype(picked.dtype())?;
    let counts = flat_mask.matmul(&indicator.t()?)?.squeeze(0)?.to_dtype(mask.dtype())?;
    Ok((sums, counts))
}
