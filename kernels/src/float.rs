//! What the CPU kernels share: the float types they compute in, a tile
//! product on top of `gemm`, and access to a tensor's CPU data.

use candle_core::{bail, CpuStorage, Layout, Result, WithDType};

/// The float types the kernels compute in.
pub(crate) trait Real: WithDType + num_like::Float + Send + Sync {}
impl Real for f32 {}
impl Real for f64 {}

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

/// The CPU storage behind a tensor's storage (`op` names the kernel in
/// the error).
pub(crate) fn cpu<'a>(op: &str, storage: &'a candle_core::Storage) -> Result<&'a CpuStorage> {
    match storage {
        candle_core::Storage::Cpu(c) => Ok(c),
        _ => bail!("{op}: CPU tensors only"),
    }
}

/// The contiguous data of a storage, as `T`.
pub(crate) fn data<'a, T: Real>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("{op}: contiguous inputs only") };
    Ok(&storage.as_slice::<T>()?[start..end])
}
