//! RMSNorm in one pass, with its backward pass.
//!
//! Composed of candle ops, `x / sqrt(mean(x²) + ε) · w` is five passes
//! over the activations forward, about twice that backward, and keeps
//! three activation-sized intermediates for the backward pass. This
//! kernel reads each row once forward and once backward and keeps
//! nothing: the backward pass recomputes the row's scale from `x`.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::float::{cpu, data, Real};

/// The op's name in errors.
const OP: &str = "rms-norm";

/// Rows one task normalises.
const ROWS_PER_TASK: usize = 32;

/// RMSNorm over the last dim: `x / sqrt(mean(x²) + eps) · weight`, for
/// `x` of any shape and `weight` of the last dim's size, both f32 or both
/// f64 (CPU). Differentiable in `x` and, when it is a variable, `weight`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[3f32, 4.0]], &Device::Cpu)?;
/// let w = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
/// // mean(x²) = 12.5: x / √12.5 · w
/// let y = oxtune_kernels::rms_norm(&x, &w, 0.0)?.to_vec2::<f32>()?;
/// assert!((y[0][0] - 3.0 / 12.5f32.sqrt()).abs() < 1e-6);
/// assert!((y[0][1] - 8.0 / 12.5f32.sqrt()).abs() < 1e-6);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let hidden = x.dim(D::Minus1)?;
    if weight.dims() != [hidden] {
        bail!("{OP}: the weight is {:?} but the input's last dim is {hidden}", weight.dims());
    }
    let rows = x.elem_count() / hidden.max(1);
    let flat = x.contiguous()?.reshape((rows, hidden))?;
    flat.apply_op2(&weight.contiguous()?, RmsNorm { eps })?.reshape(x.shape())
}

struct RmsNorm {
    eps: f64,
}

/// `1 / sqrt(mean(row²) + eps)`.
fn inverse_rms<T: Real>(row: &[T], eps: f64) -> T {
    let sum = row.iter().fold(T::of(0.0), |s, &v| s + v * v);
    let mean = sum / T::of(row.len() as f64);
    T::of(1.0) / (mean + T::of(eps)).sqrt()
}

impl RmsNorm {
    fn forward<T: Real>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let hidden = w.len();
        let mut y = vec![T::of(0.0); x.len()];
        y.par_chunks_mut(ROWS_PER_TASK * hidden).zip(x.par_chunks(ROWS_PER_TASK * hidden)).for_each(|(ys, xs)| {
            for (yr, xr) in ys.chunks_mut(hidden).zip(xs.chunks(hidden)) {
                let r = inverse_rms(xr, self.eps);
                for ((o, &v), &wi) in yr.iter_mut().zip(xr).zip(w) {
                    *o = v * r * wi;
                }
            }
        });
        y
    }

    /// `dx` and the weight's gradient (summed over rows) for the incoming
    /// gradient `g`. Each task sums its rows' share of the weight's
    /// gradient; the shares are then added in task order, so the sum is
    /// the same bits whichever thread ran what (rayon's `reduce` pairs
    /// shares as its work-stealing split them, which made full
    /// fine-tuning differ run to run in the last bits, then further).
    fn backward<T: Real>(&self, x: &[T], w: &[T], g: &[T]) -> (Vec<T>, Vec<T>) {
        let hidden = w.len();
        let mut dx = vec![T::of(0.0); x.len()];
        let shares: Vec<Vec<T>> = dx
            .par_chunks_mut(ROWS_PER_TASK * hidden)
            .zip(x.par_chunks(ROWS_PER_TASK * hidden).zip(g.par_chunks(ROWS_PER_TASK * hidden)))
            .map(|(dxs, (xs, gs))| {
                let mut dw = vec![T::of(0.0); hidden];
                for ((dxr, xr), gr) in dxs.chunks_mut(hidden).zip(xs.chunks(hidden)).zip(gs.chunks(hidden)) {
                    let r = inverse_rms(xr, self.eps);
                    // y = x·r·w: dx = r·(g⊙w) − x·r³·Σ(g⊙w⊙x)/n
                    let dot = xr.iter().zip(gr).zip(w).fold(T::of(0.0), |s, ((&xv, &gv), &wv)| s + xv * gv * wv);
                    let k = r * r * r * dot / T::of(hidden as f64);
                    for i in 0..hidden {
                        dxr[i] = r * gr[i] * w[i] - xr[i] * k;
                        dw[i] += gr[i] * xr[i] * r;
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![T::of(0.0); hidden];
        for share in shares {
            dw.iter_mut().zip(share).for_each(|(a, b)| *a += b);
        }
        (dx, dw)
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match (xs.dtype(), ws.dtype()) {
            (DType::F32, DType::F32) => CpuStorage::F32(self.forward::<f32>(data(OP, xs, xl)?, data(OP, ws, wl)?)),
            (DType::F64, DType::F64) => CpuStorage::F64(self.forward::<f64>(data(OP, xs, xl)?, data(OP, ws, wl)?)),
            (x, w) => bail!("{OP}: f32 or f64 input and weight of one dtype, got {x:?} and {w:?}"),
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (xs, ws, gs) = (cpu(OP, &xs)?, cpu(OP, &ws)?, cpu(OP, &gs)?);
        macro_rules! run {
            ($t:ty) => {{
                let (dx, dw) = self.backward::<$t>(data(OP, xs, xl)?, data(OP, ws, wl)?, data(OP, gs, gl)?);
                (Tensor::from_vec(dx, x.shape(), x.device())?, Tensor::from_vec(dw, w.shape(), w.device())?)
            }};
        }
        let (dx, dw) = match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            other => bail!("{OP}: f32 or f64 inputs, got {other:?}"),
        };
        Ok((x.track_op().then_some(dx), w.track_op().then_some(dw)))
    }
}
