//! What the CPU kernels share: the float types they compute in, a tile
//! product on top of `gemm`, and access to a tensor's CPU data.

use candle_core::{bail, CpuStorage, Layout, Result, WithDType};

/// The float types the kernels compute in, with the loops of the
/// attention and SiLU kernels (vectorised for f32, plain loops for f64);
/// one query row (decoding) takes `dots` and `weighted_sum` instead of a
/// matrix product, whose set-up costs more than the product at that size.
pub(crate) trait Real: WithDType + num_like::Float + Send + Sync {
    /// The largest of `xs` (`-inf` when empty).
    fn max_of(xs: &[Self]) -> Self {
        xs.iter().copied().fold(Self::neg_infinity(), |m, x| if x > m { x } else { m })
    }

    /// `out[r] = q · rows[r]` for the rows of `q.len()` values in `rows`.
    fn dots(q: &[Self], rows: &[Self], out: &mut [Self]) {
        for (o, row) in out.iter_mut().zip(rows.chunks_exact(q.len())) {
            *o = q.iter().zip(row).fold(Self::of(0.0), |s, (&x, &y)| s + x * y);
        }
    }

    /// `acc += Σ_r weights[r] · rows[r]` for the rows of `acc.len()`
    /// values in `rows`.
    fn weighted_sum(weights: &[Self], rows: &[Self], acc: &mut [Self]) {
        for (&w, row) in weights.iter().zip(rows.chunks_exact(acc.len())) {
            for (a, &x) in acc.iter_mut().zip(row) {
                *a += w * x;
            }
        }
    }

    /// `ys = silu(xs)` element-wise.
    fn silu_into(xs: &[Self], ys: &mut [Self]) {
        for (x, y) in xs.iter().zip(ys) {
            *y = silu(*x, Self::exp);
        }
    }

    /// `dxs = grads · silu'(xs)` element-wise.
    fn silu_grad_into(xs: &[Self], grads: &[Self], dxs: &mut [Self]) {
        for ((x, g), dx) in xs.iter().zip(grads).zip(dxs) {
            *dx = silu_grad(*x, *g, Self::exp);
        }
    }

    /// `x ← exp(x − shift)` for every `x` (`-inf` becomes 0); returns
    /// their sum.
    fn exp_shifted_sum(xs: &mut [Self], shift: Self) -> Self {
        let mut sum = Self::of(0.0);
        for x in xs {
            *x = (*x - shift).exp();
            sum += *x;
        }
        sum
    }
}

impl Real for f32 {
    fn dots(q: &[f32], rows: &[f32], out: &mut [f32]) {
        crate::vector::dots(q, rows, out)
    }

    fn weighted_sum(weights: &[f32], rows: &[f32], acc: &mut [f32]) {
        crate::vector::weighted_sum(weights, rows, acc)
    }

    fn max_of(xs: &[f32]) -> f32 {
        crate::vector::max(xs)
    }

    fn silu_into(xs: &[f32], ys: &mut [f32]) {
        crate::vector::silu(xs, ys)
    }

    fn silu_grad_into(xs: &[f32], grads: &[f32], dxs: &mut [f32]) {
        crate::vector::silu_grad(xs, grads, dxs)
    }

    fn exp_shifted_sum(xs: &mut [f32], shift: f32) -> f32 {
        crate::vector::exp_shifted_sum(xs, shift)
    }
}

impl Real for f64 {}

/// `x · σ(x)`, with the exponential `exp` (the f32 loops pass the
/// vectorisable one).
#[inline(always)]
pub(crate) fn silu<T: Real>(x: T, exp: impl Fn(T) -> T) -> T {
    x / (T::of(1.0) + exp(T::of(0.0) - x))
}

/// `g · silu'(x) = g · σ(x) · (1 + x · (1 − σ(x)))`, with the exponential
/// `exp`.
#[inline(always)]
pub(crate) fn silu_grad<T: Real>(x: T, g: T, exp: impl Fn(T) -> T) -> T {
    let s = T::of(1.0) / (T::of(1.0) + exp(T::of(0.0) - x));
    g * s * (T::of(1.0) + x * (T::of(1.0) - s))
}

/// The few float operations the kernels need, for f32 and f64.
pub(crate) mod num_like {
    /// Float arithmetic beyond candle's `WithDType`.
    pub trait Float: Sized {
        fn exp(self) -> Self;
        fn ln(self) -> Self;
        fn tanh(self) -> Self;
        fn sqrt(self) -> Self;
        fn neg_infinity() -> Self;
        fn of(x: f64) -> Self;
    }
    macro_rules! float {
        ($t:ty) => {
            impl Float for $t {
                fn exp(self) -> Self {
                    <$t>::exp(self)
                }
                fn ln(self) -> Self {
                    <$t>::ln(self)
                }
                fn tanh(self) -> Self {
                    <$t>::tanh(self)
                }
                fn sqrt(self) -> Self {
                    <$t>::sqrt(self)
                }
                fn neg_infinity() -> Self {
                    <$t>::NEG_INFINITY
                }
                fn of(x: f64) -> Self {
                    x as $t
                }
            }
        };
    }
    float!(f32);
    float!(f64);
}

/// Whether a product runs on the calling thread alone (inside a parallel
/// loop) or spreads over rayon's threads.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Threads {
    /// This thread only.
    One,
    /// Every thread of the rayon pool.
    All,
}

/// `dst (m×n) = [dst +] a (m×k) · b (k×n)`, each matrix given by its
/// pointer and (row, column) strides.
///
/// # Safety
/// Every index the strides reach must be inside the matrices' buffers,
/// and `dst` must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul<T: Real>(
    threads: Threads,
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    a: *const T,
    (a_rs, a_cs): (usize, usize),
    b: *const T,
    (b_rs, b_cs): (usize, usize),
) {
    let parallelism = match threads {
        Threads::One => gemm::Parallelism::None,
        Threads::All => gemm::Parallelism::Rayon(rayon::current_num_threads()),
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        T::of(1.0),
        T::of(1.0),
        false,
        false,
        false,
        parallelism,
    )
}

/// `y[r][first + j] = Σₖ x[r][k] · w[j][k]`: the product of `x` (rows of
/// `k` values) with a panel of a weight's rows `w` (each `k` values),
/// written straight into columns `first..` of `y`, whose rows are
/// `y_stride` long — no copy of the input and no separate product buffer.
///
/// # Panics
/// When the slices' lengths disagree with `k`, `y_stride` and `first`.
pub fn panel_product_into(x: &[f32], k: usize, w: &[f32], y: &mut [f32], y_stride: usize, first: usize) {
    assert!(k > 0 && x.len().is_multiple_of(k) && w.len().is_multiple_of(k), "x and w must hold whole rows of {k}");
    let (rows, n) = (x.len() / k, w.len() / k);
    assert!(first + n <= y_stride && y.len() >= rows * y_stride, "y cannot hold {rows} rows of {first} + {n} columns");
    if rows == 0 || n == 0 {
        return;
    }
    // SAFETY: x is rows×k (row stride k), wᵀ is read as k×n with element
    // (kk, j) at w[j·k + kk], and y's rows × columns first..first+n lie in
    // y (checked above); y is a distinct mutable slice.
    unsafe {
        matmul(
            Threads::All,
            (rows, n, k),
            y.as_mut_ptr().add(first),
            y_stride,
            false,
            x.as_ptr(),
            (k, 1),
            w.as_ptr(),
            (1, k),
        )
    }
}

/// The CPU storage behind a tensor's storage (`op` names the kernel in
/// the error).
pub(crate) fn cpu<'a>(op: &str, storage: &'a candle_core::Storage) -> Result<&'a CpuStorage> {
    match storage {
        candle_core::Storage::Cpu(c) => Ok(c),
        _ => bail!("{op}: CPU tensors only"),
    }
}

/// The contiguous data of a storage, as `T`.
pub(crate) fn data<'a, T: WithDType>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("{op}: contiguous inputs only") };
    Ok(&storage.as_slice::<T>()?[start..end])
}
