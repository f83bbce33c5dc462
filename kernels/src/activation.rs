//! SiLU (`x · σ(x)`) in one pass each way.
//!
//! candle's SiLU calls libm's `exp` per element, and its backward pass is
//! composed of eight element-wise ops (negate, exponentiate, add, invert,
//! subtract, two products, a sum), each a pass over the MLP's widest
//! activation. This kernel computes the forward pass with a vectorised
//! exponential and the gradient `g · σ(x) · (1 + x · (1 − σ(x)))` in one
//! pass from `x`, keeping nothing but `x`.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::float::{cpu, data, Real};

/// The op's name in errors.
const OP: &str = "silu";

/// Elements one task computes.
const PER_TASK: usize = 1 << 14;

/// `x · σ(x)` element-wise, for `x` f32 or f64 (CPU), differentiable.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[-1f32, 0.0, 2.0], &Device::Cpu)?;
/// let y = oxtune_kernels::silu(&x)?.to_vec1::<f32>()?;
/// let want = [-1.0 / (1.0 + 1f32.exp()), 0.0, 2.0 / (1.0 + (-2f32).exp())];
/// assert!(y.iter().zip(want).all(|(y, w)| (y - w).abs() < 1e-6));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Silu)
}

struct Silu;

/// `silu(x)` of every element, [`PER_TASK`] elements a task.
fn forward<T: Real>(xs: &[T]) -> Vec<T> {
    let mut ys = vec![T::of(0.0); xs.len()];
    ys.par_chunks_mut(PER_TASK).zip(xs.par_chunks(PER_TASK)).for_each(|(ys, xs)| T::silu_into(xs, ys));
    ys
}

/// `g · silu'(x)` of every element, [`PER_TASK`] elements a task.
fn backward<T: Real>(xs: &[T], grads: &[T]) -> Vec<T> {
    let mut dxs = vec![T::of(0.0); xs.len()];
    dxs.par_chunks_mut(PER_TASK)
        .zip(xs.par_chunks(PER_TASK).zip(grads.par_chunks(PER_TASK)))
        .for_each(|(dxs, (xs, grads))| T::silu_grad_into(xs, grads, dxs));
    dxs
}

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match xs.dtype() {
            DType::F32 => CpuStorage::F32(forward::<f32>(data(OP, xs, xl)?)),
            DType::F64 => CpuStorage::F64(forward::<f64>(data(OP, xs, xl)?)),
            other => bail!("{OP}: f32 or f64 input, got {other:?}"),
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (xs, gs) = (cpu(OP, &xs)?, cpu(OP, &gs)?);
        let dx = match x.dtype() {
            DType::F32 => {
                Tensor::from_vec(backward::<f32>(data(OP, xs, xl)?, data(OP, gs, gl)?), x.shape(), x.device())
            }
            DType::F64 => {
                Tensor::from_vec(backward::<f64>(data(OP, xs, xl)?, data(OP, gs, gl)?), x.shape(), x.device())
            }
            other => bail!("{OP}: f32 or f64 input, got {other:?}"),
        }?;
        Ok(Some(dx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and gradients equal candle's composed SiLU: exactly in f64
    /// up to rounding, within f32 rounding in f32 — over values that
    /// reach both tails, and a length that leaves a partial task.
    #[test]
    fn matches_candles_silu_and_its_gradient() {
        let n = PER_TASK + 37;
        let values: Vec<f64> = (0..n).map(|i| ((i * 7919) % 2001) as f64 / 20.0 - 50.0).collect();
        for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
            let x = Var::from_tensor(&Tensor::new(values.as_slice(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap())
                .unwrap();
            let weights = Tensor::new(values.iter().map(|v| v.sin()).collect::<Vec<_>>().as_slice(), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let (ours, theirs) = (silu(x.as_tensor()).unwrap(), x.as_tensor().silu().unwrap());
            let grad = |y: &Tensor| {
                let loss = (y * &weights).unwrap().sum_all().unwrap();
                loss.backward().unwrap().get(x.as_tensor()).unwrap().clone()
            };
            let worst = |a: &Tensor, b: &Tensor| {
                let (a, b) = (
                    a.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap(),
                    b.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap(),
                );
                a.iter().zip(&b).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0, f64::max)
            };
            assert!(worst(&ours, &theirs) < tolerance, "{dtype:?} values: {}", worst(&ours, &theirs));
            let (g_ours, g_theirs) = (grad(&ours), grad(&theirs));
            assert!(worst(&g_ours, &g_theirs) < tolerance, "{dtype:?} gradients: {}", worst(&g_ours, &g_theirs));
        }
    }
}
