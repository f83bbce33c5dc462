//! Rotary position embedding in one pass, with its backward pass.
//!
//! Composed of candle ops, RoPE is two narrows, four broadcast products,
//! a sum, a difference and a concatenation per call, each a pass over
//! `q` or `k` that the backward pass walks again. The rotation is
//! orthogonal, so its backward pass is the same rotation by the opposite
//! angle: this kernel does each in one pass and keeps nothing but the
//! tables.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::float::{cpu, data, Real};

/// The op's name in errors.
const OP: &str = "rope";

/// The cos and sin of every (batch row, position, frequency), shared by
/// the calls of one forward pass (every layer's `q` and `k`).
#[derive(Clone, Debug)]
pub struct RopeTables {
    batch: usize,
    seq: usize,
    half: usize,
    /// `[batch, seq, half]`, already multiplied by the attention scale.
    cos: Arc<Vec<f64>>,
    /// Same layout as `cos`.
    sin: Arc<Vec<f64>>,
}

impl RopeTables {
    /// Tables for `positions` (`[batch][seq]`) and the frequencies
    /// `inv_freq`, with cos and sin multiplied by `scale`. Computed in f32
    /// as transformers does (an f64 model sees the same rounded tables).
    pub fn new(positions: &[Vec<f64>], inv_freq: &[f32], scale: f32) -> RopeTables {
        let (batch, seq, half) = (positions.len(), positions.first().map_or(0, Vec::len), inv_freq.len());
        let mut cos = Vec::with_capacity(batch * seq * half);
        let mut sin = Vec::with_capacity(batch * seq * half);
        for row in positions {
            for &p in row {
                for &f in inv_freq {
                    let angle = p as f32 * f;
                    cos.push((angle.cos() * scale) as f64);
                    sin.push((angle.sin() * scale) as f64);
                }
            }
        }
        RopeTables { batch, seq, half, cos: Arc::new(cos), sin: Arc::new(sin) }
    }
}

/// Rotates the first `2 · half` features of `x` (`[batch, heads, seq,
/// head_dim]`, f32 or f64, CPU) by the tables' angles: the two halves
/// paired (NeoX) or, when `interleaved`, features `(2i, 2i + 1)`. The rest
/// pass through. Differentiable in `x`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use oxtune_kernels::rope::RopeTables;
/// // One position at angle π/2: (a, b) turns into (−b, a).
/// let tables = RopeTables::new(&[vec![1.0]], &[std::f32::consts::FRAC_PI_2], 1.0);
/// let x = Tensor::new(&[1f32, 2.0], &Device::Cpu)?.reshape((1, 1, 1, 2))?;
/// let y = oxtune_kernels::rope(&x, &tables, false)?.flatten_all()?.to_vec1::<f32>()?;
/// assert!((y[0] + 2.0).abs() < 1e-6 && (y[1] - 1.0).abs() < 1e-6);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn rope(x: &Tensor, tables: &RopeTables, interleaved: bool) -> Result<Tensor> {
    let (b, _, s, d) = x.dims4()?;
    if (b, s) != (tables.batch, tables.seq) {
        bail!("{OP}: the input is [{b}, _, {s}, _] but the tables are for {} rows of {}", tables.batch, tables.seq);
    }
    if 2 * tables.half > d {
        bail!("{OP}: {} frequencies need {} features but head_dim is {d}", tables.half, 2 * tables.half);
    }
    x.contiguous()?.apply_op1(Rope { tables: tables.clone(), interleaved, inverse: false })
}

struct Rope {
    tables: RopeTables,
    interleaved: bool,
    /// Rotate by the opposite angle (the backward pass).
    inverse: bool,
}

impl Rope {
    fn run<T: Real>(&self, x: &[T], (heads, d): (usize, usize)) -> Vec<T> {
        let RopeTables { seq, half, .. } = self.tables;
        let mut y = x.to_vec();
        let sign = if self.inverse { -1.0 } else { 1.0 };
        y.par_chunks_mut(seq * d).enumerate().for_each(|(bh, rows)| {
            let b = bh / heads;
            for (t, row) in rows.chunks_mut(d).enumerate() {
                let at = (b * seq + t) * half;
                for i in 0..half {
                    let (c, s) = (T::of(self.tables.cos[at + i]), T::of(sign * self.tables.sin[at + i]));
                    let (p, q) = if self.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                    let (u, v) = (row[p], row[q]);
                    row[p] = u * c - v * s;
                    row[q] = v * c + u * s;
                }
            }
        });
        y
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, heads, _, d) = xl.shape().dims4()?;
        let out = match xs.dtype() {
            DType::F32 => CpuStorage::F32(self.run::<f32>(data(OP, xs, xl)?, (heads, d))),
            DType::F64 => CpuStorage::F64(self.run::<f64>(data(OP, xs, xl)?, (heads, d))),
            other => bail!("{OP}: f32 or f64 input, got {other:?}"),
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rope { tables: self.tables.clone(), interleaved: self.interleaved, inverse: !self.inverse };
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let (_, heads, _, d) = gl.shape().dims4()?;
        let gs = cpu(OP, &gs)?;
        let dx = match grad.dtype() {
            DType::F32 => {
                Tensor::from_vec(inverse.run::<f32>(data(OP, gs, gl)?, (heads, d)), grad.shape(), grad.device())
            }
            DType::F64 => {
                Tensor::from_vec(inverse.run::<f64>(data(OP, gs, gl)?, (heads, d)), grad.shape(), grad.device())
            }
            other => bail!("{OP}: f32 or f64 input, got {other:?}"),
        }?;
        Ok(Some(dx))
    }
}
