//! Linear layers over weights held in bf16 or f16, computed in f32.
//!
//! The CPU has no bf16 GEMM here (candle widens both operands of a bf16
//! matmul to f32 whole, on every call: a weight-sized f32 copy per layer
//! per step, and its conversion). These products widen the weight a panel
//! of rows at a time instead and multiply with the f32 GEMM, writing
//! each panel's columns straight into the output (forward) or summing the
//! panels' contributions in place (the input's gradient); the input is
//! widened once and the result rounded once. Mixed precision as PyTorch
//! runs it: narrow storage, f32 accumulation.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::float::{matmul, panel_product_into, Threads};

/// Weight values widened at once: a panel of rows of about this many values.
const PANEL_VALUES: usize = 1 << 20;

/// Values one task widens or rounds.
const CONVERT_CHUNK: usize = 1 << 14;

/// A float type stored narrower than f32.
pub(crate) trait Narrow: Copy + Send + Sync + 'static {
    /// This value as f32 (exact).
    fn widen(self) -> f32;
    /// `x` rounded to this type (to nearest, ties to even).
    fn round(x: f32) -> Self;
}

impl Narrow for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn round(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Narrow for f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn round(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// `values` as f32, converted on every thread.
fn widen<T: Narrow>(values: &[T]) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    out.par_chunks_mut(CONVERT_CHUNK).zip(values.par_chunks(CONVERT_CHUNK)).for_each(|(o, v)| {
        o.iter_mut().zip(v).for_each(|(o, v)| *o = v.widen());
    });
    out
}

/// `values` rounded to `T`, converted on every thread.
fn round<T: Narrow>(values: &[f32]) -> Vec<T> {
    let mut out = vec![T::round(0.0); values.len()];
    out.par_chunks_mut(CONVERT_CHUNK).zip(values.par_chunks(CONVERT_CHUNK)).for_each(|(o, v)| {
        o.iter_mut().zip(v).for_each(|(o, &x)| *o = T::round(x));
    });
    out
}

/// Row ranges of `rows` rows of `cols` values, about [`PANEL_VALUES`] each.
fn panels(rows: usize, cols: usize) -> impl Iterator<Item = (usize, usize)> {
    let step = (PANEL_VALUES / cols.max(1)).max(1);
    (0..rows).step_by(step).map(move |start| (start, (start + step).min(rows)))
}

/// `x · Wᵀ` for `x` `rows × k` and `W` `n × k`, row-major, computed in f32
/// and rounded to `T` once.
pub(crate) fn forward<T: Narrow>(x: &[T], w: &[T], rows: usize, k: usize, n: usize) -> Vec<T> {
    let x = widen(x);
    let mut y = vec![0f32; rows * n];
    for (first, end) in panels(n, k) {
        panel_product_into(&x, k, &widen(&w[first * k..end * k]), &mut y, n, first);
    }
    round(&y)
}

/// `g · W` (the input's gradient of [`forward`]) for `g` `rows × n` and
/// `W` `n × k`, computed in f32 and rounded to `T` once.
pub(crate) fn input_grad<T: Narrow>(g: &[T], w: &[T], rows: usize, n: usize, k: usize) -> Vec<T> {
    let g = widen(g);
    let mut dx = vec![0f32; rows * k];
    if rows > 0 && k > 0 {
        for (first, end) in panels(n, k) {
            let panel = widen(&w[first * k..end * k]);
            // SAFETY: g's columns first..end of every row (row stride n),
            // the panel's (end - first) × k values and dx's rows × k all
            // lie inside their buffers; dx is distinct from both.
            unsafe {
                matmul(
                    Threads::All,
                    (rows, k, end - first),
                    dx.as_mut_ptr(),
                    k,
                    first > 0,
                    g.as_ptr().add(first),
                    (n, 1),
                    panel.as_ptr(),
                    (k, 1),
                )
            }
        }
    }
    round(&dx)
}
