//! CPU kernels for hot paths where candle's generic implementation is far
//! from the hardware's limit.
//!
//! - [`matvec`]: `x · Wᵀ` for a few rows of `x` (decoding). gemm's
//!   blocking does not pay off for one row; this streams each row of `W`
//!   once, split across threads, and runs near memory bandwidth. It has no
//!   backward pass, so the host uses it only when no gradient is needed.
//!
//! - [`frozen_linear`]: `x · Wᵀ` for a frozen `W` inside a graph that needs
//!   gradients (adapter training). candle's matmul backward computes the
//!   gradient of both operands, so every frozen weight would get a
//!   weight-sized gradient (a third of a step's FLOPs, and its memory)
//!   that is thrown away; this op's backward gives `x` its gradient only.
//!   Over bf16 or f16 weights both products run in f32, widening the
//!   weight a panel at a time (see [`narrow`]).
//!
//! - [`flash_attention`]: attention whose memory is linear in the
//!   sequence length, with its backward pass (see [`attention`]).
//!
//! - [`rms_norm`]: RMSNorm in one pass over each row, forward and
//!   backward, keeping no intermediates (see [`norm`]).
//!
//! - [`silu`]: SiLU with a vectorised exponential, its gradient in one
//!   pass (see [`activation`]).
//!
//! - [`rope()`]: rotary position embedding in one pass, forward and
//!   backward, from tables built once per forward pass (see [`rope`]).
//!
//! - [`label_log_probs`]: the output head and each label's
//!   log-probability without the `[tokens, vocab]` logits, skipping
//!   unlabelled rows (see [`head`]).
//!
//! - [`blocks::BlockMatrix`]: weights in llama.cpp's Q4_0 / Q4_1 / Q5_0 /
//!   Q5_1 / Q8_0 / Q4_K / Q5_K / Q6_K blocks (as 32-value blocks), multiplied by a few rows of activations with integer dot
//!   products (decoding from a GGUF file kept quantised).
//!
//! The crate is compiled at full optimisation even in dev builds (see the
//! workspace's `Cargo.toml`).

pub mod activation;
pub mod attention;
pub mod blocks;
mod float;
pub mod head;
mod narrow;
pub mod norm;
pub mod rope;
mod vector;

pub use activation::silu;
pub use attention::{flash_attention, to_f16, KeyMask};
pub use float::panel_product_into;
pub use head::label_log_probs;
pub use norm::rms_norm;
pub use rope::rope;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Output features one task computes.
const CHUNK: usize = 64;

/// `x · Wᵀ` for `x` `[rows, in]` and `W` `[out, in]`, both f32 (no gradient).
pub fn matvec(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(w, &MatVec)
}

struct MatVec;

/// `Some(f(a, b, args..))` stored in the dtype of `a` and `b` when both
/// hold bf16 or both f16 (a [`narrow`] product), `None` for other dtypes.
macro_rules! narrow_product {
    ($op:expr, ($a:expr, $al:expr), ($b:expr, $bl:expr), $f:path, $($arg:expr),*) => {
        match ($a, $b) {
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => Some(CpuStorage::BF16($f(
                float::data::<half::bf16>($op, $a, $al)?,
                float::data($op, $b, $bl)?,
                $($arg),*
            ))),
            (CpuStorage::F16(_), CpuStorage::F16(_)) => Some(CpuStorage::F16($f(
                float::data::<half::f16>($op, $a, $al)?,
                float::data($op, $b, $bl)?,
                $($arg),*
            ))),
            _ => None,
        }
    };
}

/// `x · Wᵀ` for `x` `[rows, in]` and a frozen `W` `[out, in]` (same float
/// dtype), differentiable in `x` only.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.apply_op2(w, FrozenLinear)
}

struct FrozenLinear;

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, inp) = xl.shape().dims2()?;
        let (out, w_in) = wl.shape().dims2()?;
        if inp != w_in {
            bail!("frozen-linear: input has {inp} features, the weight {w_in}");
        }
        let y = match narrow_product!("frozen-linear", (x, xl), (w, wl), narrow::forward, rows, inp, out) {
            Some(y) => y,
            None => x.matmul(w, (1, rows, out, inp), xl, &wl.transpose(0, 1)?)?,
        };
        Ok((y, Shape::from((rows, out))))
    }

    fn bwd(&self, _x: &Tensor, w: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let narrow = matches!(w.dtype(), candle_core::DType::BF16 | candle_core::DType::F16);
        let dx = match narrow && grad.dtype() == w.dtype() {
            true => grad.contiguous()?.apply_op2_no_bwd(w, &FrozenLinearInputGrad)?,
            false => grad.matmul(w)?,
        };
        Ok((Some(dx), None))
    }
}

/// `g · W`, the input's gradient of [`FrozenLinear`] over a bf16 or f16
/// weight (computed in f32, a panel of the weight at a time).
struct FrozenLinearInputGrad;

impl CustomOp2 for FrozenLinearInputGrad {
    fn name(&self) -> &'static str {
        "frozen-linear-input-grad"
    }

    fn cpu_fwd(&self, g: &CpuStorage, gl: &Layout, w: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, out) = gl.shape().dims2()?;
        let (w_out, inp) = wl.shape().dims2()?;
        if out != w_out {
            bail!("frozen-linear: the gradient has {out} features, the weight {w_out} rows");
        }
        let dx = narrow_product!("frozen-linear", (g, gl), (w, wl), narrow::input_grad, rows, out, inp);
        let Some(dx) = dx else {
            bail!("frozen-linear: the narrow gradient path takes bf16 or f16 tensors of one dtype")
        };
        Ok((dx, Shape::from((rows, inp))))
    }
}

/// Most rows of `x` one pass over a weight row serves.
const MAX_ROWS: usize = 8;

/// [`dot_rows`] compiled for AVX2 (8-wide lanes).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2(wrow: &[f32], x: &[f32], inp: usize, out: &mut [f32]) {
    dot_rows(wrow, x, inp, out)
}

/// [`dot_rows`] with the widest instructions this CPU has.
fn dot_rows_best(wrow: &[f32], x: &[f32], inp: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: both features were just detected.
        return unsafe { dot_rows_avx2(wrow, x, inp, out) };
    }
    dot_rows(wrow, x, inp, out)
}

/// `out[r] = wrow · x[r]` for every row of `x` (`rows × inp`), reading
/// `wrow` once: each 8-wide slice of it meets every row while in registers.
#[inline(always)]
fn dot_rows(wrow: &[f32], x: &[f32], inp: usize, out: &mut [f32]) {
    let rows = out.len();
    let mut acc = [[0f32; 8]; MAX_ROWS];
    let full = inp / 8 * 8;
    for base in (0..full).step_by(8) {
        let w: [f32; 8] = wrow[base..base + 8].try_into().expect("8 lanes");
        for (r, a) in acc.iter_mut().enumerate().take(rows) {
            let xr = &x[r * inp + base..r * inp + base + 8];
            for k in 0..8 {
                a[k] += w[k] * xr[k];
            }
        }
    }
    for (r, y) in out.iter_mut().enumerate() {
        let tail: f32 = (full..inp).map(|i| wrow[i] * x[r * inp + i]).sum();
        *y = acc[r].iter().sum::<f32>() + tail;
    }
}

impl CustomOp2 for MatVec {
    fn name(&self) -> &'static str {
        "oxtune-matvec"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else { bail!("matvec: f32 inputs only") };
        let (Some((xs, xe)), Some((ws, we))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            bail!("matvec: contiguous inputs only")
        };
        let (rows, inp) = l1.shape().dims2()?;
        let (out, w_in) = l2.shape().dims2()?;
        if inp != w_in {
            bail!("matvec: x has {inp} features, W has {w_in}");
        }
        if rows > MAX_ROWS {
            bail!("matvec: at most {MAX_ROWS} rows, got {rows}");
        }
        let (x, w) = (&x[xs..xe], &w[ws..we]);
        // Computed transposed ([out, rows]) so each task owns a slice.
        let mut yt = vec![0f32; out * rows];
        yt.par_chunks_mut(CHUNK * rows).enumerate().for_each(|(c, chunk)| {
            for (j, cell) in chunk.chunks_mut(rows).enumerate() {
                let o = c * CHUNK + j;
                dot_rows_best(&w[o * inp..(o + 1) * inp], x, inp, cell);
            }
        });
        let y = if rows == 1 { yt } else { (0..rows * out).map(|i| yt[(i % out) * rows + i / out]).collect() };
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    #[test]
    fn matches_matmul() {
        for rows in [1, 3, 8] {
            let x = Tensor::randn(0f32, 1.0, (rows, 77), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 1.0, (130, 77), &Device::Cpu).unwrap();
            let fast = super::matvec(&x, &w).unwrap();
            let slow = x.matmul(&w.t().unwrap()).unwrap();
            let diff = (fast - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{diff}");
        }
    }

    /// The largest |a − b| over two tensors, in f64.
    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
        d.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn frozen_linear_over_narrow_weights_computes_in_f32() {
        // 2100 output rows of 700 inputs: three panels of the weight, the
        // last one partial, so the panel seams are crossed.
        for dtype in [DType::BF16, DType::F16] {
            let x = Tensor::randn(0f32, 1.0, (37, 700), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let w = Tensor::randn(0f32, 0.05, (2100, 700), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let x = Var::from_tensor(&x).unwrap();
            let y = super::frozen_linear(x.as_tensor(), &w).unwrap();
            assert_eq!(y.dtype(), dtype);
            // The reference: the same narrow values, multiplied in f64.
            let (x64, w64) = (x.as_tensor().to_dtype(DType::F64).unwrap(), w.to_dtype(DType::F64).unwrap());
            let want = x64.matmul(&w64.t().unwrap()).unwrap();
            // One rounding of the f32 result to the narrow type: half an
            // ulp of values of magnitude ~4 (bf16: 2^-8·4·… ≤ 0.02).
            let tol = if dtype == DType::BF16 { 0.02 } else { 0.003 };
            assert!(max_diff(&y, &want) < tol, "{dtype:?} forward {}", max_diff(&y, &want));
            // The input's gradient of Σ y·c is c · W; the weight gets none.
            let c = Tensor::randn(0f32, 1.0, (37, 2100), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let grads = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads.get(x.as_tensor()).unwrap();
            let want = c.to_dtype(DType::F64).unwrap().matmul(&w64).unwrap();
            let tol = if dtype == DType::BF16 { 0.05 } else { 0.01 };
            assert!(max_diff(dx, &want) < tol, "{dtype:?} input gradient {}", max_diff(dx, &want));
            assert!(grads.get(&w).is_none());
        }
    }
}
