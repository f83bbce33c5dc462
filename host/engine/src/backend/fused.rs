//! Two ops of adapter training for which candle's graph would keep several
//! activation-sized tensors alive until the backward pass: dropout (its
//! mask and its output) and a LoRA layer's low-rank update (the
//! dropped-out input, `x·Aᵀ·Bᵀ`, its scaled copy and the sum). Each runs
//! as one graph node that keeps only its inputs and its dropout mask as
//! bits (1/32 of an f32 mask), and recomputes the rank-sized `x·Aᵀ` in the
//! backward pass.
//!
//! Both compute their output with plain tensor ops on detached inputs and
//! hand it to the graph through a custom op (as a checkpointed block
//! does), so they run on any candle device.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Device, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::hand_over::{hand_over_forwards, HandOver};
use crate::rng::SplitMix64;

/// Mask words (64 elements each) one task draws or expands.
const WORDS_PER_TASK: usize = 256;

/// A dropout mask: element `i` is dropped with probability `p` when the
/// `i`-th draw of [`SplitMix64`] seeded with `seed` falls below `p` (the
/// draws are independent of each other, so the mask is drawn on every
/// thread, the same whichever thread draws what).
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct DropoutMask {
    /// The generator's seed.
    pub seed: u64,
    /// The probability of dropping an element, in `[0, 1)`.
    pub p: f64,
}

impl DropoutMask {
    /// The mask as a tensor of `shape`: 0 where an element is dropped,
    /// `1 / (1 − p)` where it is kept.
    pub fn tensor(&self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        self.draw(shape.elem_count()).tensor(shape, dtype, device)
    }

    /// The first `n` elements' fates, one bit each.
    fn draw(&self, n: usize) -> DrawnMask {
        let mut kept = vec![0u64; n.div_ceil(64)];
        kept.par_chunks_mut(WORDS_PER_TASK).enumerate().for_each(|(task, words)| {
            for (w, word) in words.iter_mut().enumerate() {
                let first = (task * WORDS_PER_TASK + w) * 64;
                for bit in 0..64.min(n.saturating_sub(first)) {
                    let draw = SplitMix64::nth_uniform(self.seed, (first + bit) as u64);
                    *word |= ((draw >= self.p) as u64) << bit;
                }
            }
        });
        DrawnMask { kept, scale: (1.0 / (1.0 - self.p)) as f32 }
    }
}

/// A drawn dropout mask, a bit per element (1: kept): what a graph node
/// keeps for its backward pass instead of an activation-sized mask (1/32
/// of an f32 mask), so the mask is drawn once per step.
struct DrawnMask {
    kept: Vec<u64>,
    /// What a kept element is multiplied by, `1 / (1 − p)`.
    scale: f32,
}

impl DrawnMask {
    /// The mask as a tensor of `shape` (0 or the scale).
    fn tensor(&self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::from_vec(self.masked(shape.elem_count(), None), shape, device)?.to_dtype(dtype)
    }

    /// `x` with the mask applied: one pass over a contiguous CPU f32 `x`
    /// (no mask tensor: this runs three times per LoRA layer per step);
    /// the mask tensor's product for any other tensor.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let direct = {
            let (storage, layout) = x.storage_and_layout();
            match (&*storage, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(all)), Some((a, b))) => Some(self.masked(b - a, Some(&all[a..b]))),
                _ => None,
            }
        };
        match direct {
            Some(values) => Tensor::from_vec(values, x.shape(), x.device()),
            None => x.mul(&self.tensor(x.shape(), x.dtype(), x.device())?),
        }
    }

    /// The first `n` elements of the mask (0 or the scale), or of
    /// `values` with the mask applied.
    fn masked(&self, n: usize, values: Option<&[f32]>) -> Vec<f32> {
        let mut out = vec![0f32; n];
        out.par_chunks_mut(WORDS_PER_TASK * 64).enumerate().for_each(|(task, out)| {
            let first = task * WORDS_PER_TASK * 64;
            for (j, v) in out.iter_mut().enumerate() {
                let i = first + j;
                if self.kept[i / 64] >> (i % 64) & 1 == 1 {
                    *v = values.map_or(self.scale, |x| x[i] * self.scale);
                }
            }
        });
        out
    }
}

/// Dropout of `x` under `mask`, differentiable in `x`; the graph keeps the
/// mask as bits.
pub fn dropout(x: &Tensor, mask: DropoutMask) -> Result<Tensor> {
    let mask = mask.draw(x.elem_count());
    let value = mask.apply(&x.detach())?;
    if !x.track_op() {
        return Ok(value);
    }
    x.apply_op1(Dropout { output: HandOver::new(value), mask })
}

/// `base + scale · dropout(x) · aᵀ · bᵀ` for `x` `[.., in]`, `base`
/// `[.., out]`, `a` `[r, in]` and `b` `[out, r]` (a LoRA layer: `a` is
/// `lora_A`, `b` `lora_B`), differentiable in all four; the graph keeps
/// nothing beyond the inputs.
pub fn low_rank_update(
    base: &Tensor,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<DropoutMask>,
) -> Result<Tensor> {
    let (r, inp) = a.dims2()?;
    let (out, rb) = b.dims2()?;
    let x_in = x.dim(candle_core::D::Minus1)?;
    let base_out = base.dim(candle_core::D::Minus1)?;
    if rb != r || x_in != inp || base_out != out {
        candle_core::bail!(
            "low-rank update: x {:?}, a {:?}, b {:?} and base {:?} do not chain",
            x.dims(),
            a.dims(),
            b.dims(),
            base.dims()
        );
    }
    let rows = x.elem_count() / inp.max(1);
    let shape = base.shape().clone();
    let (x2, base2) = (x.reshape((rows, inp))?, base.reshape((rows, out))?);
    let mask = mask.map(|m| m.draw(x.elem_count()));
    let update = LowRank { r, inp, out, scale, mask };
    let value = update.value(&x2.detach(), &base2.detach(), &a.detach(), &b.detach())?;
    if ![&x2, &base2, a, b].iter().any(|t| t.track_op()) {
        return value.reshape(shape);
    }
    // A and B enter as one small tensor (rank × (in + out) values), so the
    // node has three inputs; the concatenation routes their gradients back.
    let ab = Tensor::cat(&[a.flatten_all()?, b.flatten_all()?], 0)?;
    let node = LowRankNode { output: HandOver::new(value), update };
    x2.apply_op3(&base2, &ab, node)?.reshape(shape)
}

/// The shapes and settings of one [`low_rank_update`].
struct LowRank {
    r: usize,
    inp: usize,
    out: usize,
    scale: f64,
    mask: Option<DrawnMask>,
}

impl LowRank {
    /// `dropout(x)` for `x` `[rows, in]`.
    fn dropped(&self, x: &Tensor) -> Result<Tensor> {
        match &self.mask {
            Some(mask) => mask.apply(x),
            None => Ok(x.clone()),
        }
    }

    /// The output for detached inputs.
    fn value(&self, x: &Tensor, base: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let update = self.dropped(x)?.matmul(&a.t()?)?.matmul(&b.t()?)?;
        base + (update * self.scale)?
    }

    /// `a` and `b` out of their concatenation.
    fn split(&self, ab: &Tensor) -> Result<(Tensor, Tensor)> {
        let a = ab.narrow(0, 0, self.r * self.inp)?.reshape((self.r, self.inp))?;
        let b = ab.narrow(0, self.r * self.inp, self.out * self.r)?.reshape((self.out, self.r))?;
        Ok((a, b))
    }
}

/// The graph node of [`dropout`].
struct Dropout {
    output: HandOver,
    mask: DrawnMask,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    hand_over_forwards!(1);

    fn bwd(&self, _x: &Tensor, _output: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.mask.apply(grad)?))
    }
}

/// The graph node of [`low_rank_update`], on `(x, base, a ‖ b)`.
struct LowRankNode {
    output: HandOver,
    update: LowRank,
}

impl CustomOp3 for LowRankNode {
    fn name(&self) -> &'static str {
        "low-rank-update"
    }

    hand_over_forwards!(3);

    fn bwd(
        &self,
        x: &Tensor,
        _base: &Tensor,
        ab: &Tensor,
        _output: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let u = &self.update;
        let (a, b) = u.split(&ab.detach())?;
        let grad = grad.detach();
        let dropped = u.dropped(&x.detach())?;
        // y = base + s·(d·Aᵀ)·Bᵀ with d = dropout(x), h = d·Aᵀ:
        // dB = s·gᵀ·h, dh = s·g·B, dA = dhᵀ·d, dx = dropout'(dh·A).
        let h = dropped.matmul(&a.t()?)?;
        let grad_b = (grad.t()?.matmul(&h)? * u.scale)?;
        let grad_h = (grad.matmul(&b)? * u.scale)?;
        let grad_a = grad_h.t()?.matmul(&dropped)?;
        let grad_ab = Tensor::cat(&[grad_a.flatten_all()?, grad_b.flatten_all()?], 0)?;
        let grad_x = match x.track_op() {
            true => Some(u.dropped(&grad_h.matmul(&a)?)?),
            false => None,
        };
        Ok((grad_x, Some(grad), Some(grad_ab)))
    }
}
