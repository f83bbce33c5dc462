//! One weight row against one activation row: decoding a single sequence,
//! where every weight byte is read once per token and the loop over a
//! row's blocks is the whole cost (70% of a SmolLM2 decoding profile).
//!
//! The block kind is a compile-time parameter (no branch per block), four
//! accumulators are named registers (indexed by `b % 4` they lived on the
//! stack, a store and a load per block), and the two scales of each block
//! are multiplied ahead of the blocks, sixteen (AVX-512) or eight (AVX2)
//! at a time. The AVX-512 copy widens a block's 32 quants into one
//! register and multiplies them with the 16-bit activations in one
//! `vpmaddwd`. Both copies sum in the same order within a block (exact
//! integer sums), and add the blocks in a different order than the
//! portable code: results agree to f32 rounding.

use std::arch::x86_64::*;

use super::{ActivationRow, RowBlocks, QK};

/// A row kernel: `Σ_b scale_b · x_scale_b · (q_b · x_b)` over a weight
/// row's blocks, plus the blocks' offsets `factor · Σ_b offset_b · Σx_b`
/// (minimums, or Q4_0's `-8·scale`) where the kind has them.
pub(super) type RowKernel = unsafe fn(&RowBlocks, &ActivationRow) -> f32;

/// How a kind's 32 quants of a block are stored.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Quants {
    /// 16 bytes: value `j` in the low nibble of byte `j`, value `j + 16`
    /// in its high nibble (Q4_0, Q4_1).
    Nibbles,
    /// 32 signed bytes, one scale per block (Q8_0, Q8_1).
    Bytes,
    /// 32 signed bytes, a scale per half of 16 (Q6_K unpacked).
    Halves,
}

/// The fastest row kernel this CPU runs for `quants` with f16 (`half`) or
/// f32 scales; `None` without AVX2, FMA and F16C (the portable code then).
pub(super) fn best(quants: Quants, half: bool) -> Option<RowKernel> {
    if !has_avx2() {
        return None;
    }
    Some(if has_avx512() { avx512_kernel(quants, half) } else { None }.unwrap_or(avx2_kernel(quants, half)))
}

/// Whether the CPU runs the AVX2 kernels (AVX2, FMA, F16C).
fn has_avx2() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

/// Whether the CPU runs the AVX-512 kernels (F, BW, VL, beside AVX2's).
fn has_avx512() -> bool {
    has_avx2()
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vl")
}

/// The AVX2 kernel for `quants` and `half`.
fn avx2_kernel(quants: Quants, half: bool) -> RowKernel {
    match (quants, half) {
        (Quants::Nibbles, true) => avx2::<true, true, false>,
        (Quants::Nibbles, false) => avx2::<false, true, false>,
        (Quants::Bytes, true) => avx2::<true, false, false>,
        (Quants::Bytes, false) => avx2::<false, false, false>,
        (Quants::Halves, true) => avx2::<true, false, true>,
        (Quants::Halves, false) => avx2::<false, false, true>,
    }
}

/// The AVX-512 kernel for `quants` and `half` (none for half-block
/// scales, which keep the AVX2 one).
fn avx512_kernel(quants: Quants, half: bool) -> Option<RowKernel> {
    Some(match (quants, half) {
        (Quants::Nibbles, true) => avx512::<true, true>,
        (Quants::Nibbles, false) => avx512::<false, true>,
        (Quants::Bytes, true) => avx512::<true, false>,
        (Quants::Bytes, false) => avx512::<false, false>,
        (Quants::Halves, _) => return None,
    })
}

/// Blocks whose combined scales are computed at once (one AVX-512
/// register of f32s).
const CHUNK: usize = 16;

/// The AVX-512 row kernel for whole-block scales (`NIBBLES`: Q4_0/Q4_1
/// quants, else 8-bit ones); `HALF`: f16 scales.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL, AVX2, FMA and F16C; `blocks`
/// must describe whole blocks in range and `x` hold `per_row` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn avx512<const HALF: bool, const NIBBLES: bool>(blocks: &RowBlocks, x: &ActivationRow) -> f32 {
    let RowBlocks { per_row, qb, quants, scales, offsets, offset_factor, .. } = *blocks;
    assert!(x.quants.len() >= per_row * QK && x.scales.len() >= per_row && x.sums.len() >= per_row);
    let (xq, xs) = (x.quants.as_ptr(), x.scales.as_ptr());
    let mut combined = [0f32; CHUNK];
    let (mut a0, mut a1, mut a2, mut a3) =
        (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
    let mut offset_sum = _mm512_setzero_ps();
    let load_factors = |p: *const u8, start: usize, mask: __mmask16| {
        if HALF {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, (p as *const i16).add(start)))
        } else {
            _mm512_maskz_loadu_ps(mask, (p as *const f32).add(start))
        }
    };
    let block = |acc: __m512, b: usize, scale: f32| -> __m512 {
        let q = quants.add(b * qb);
        let w = if NIBBLES {
            let packed = _mm_loadu_si128(q as *const __m128i);
            let both = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(packed), _mm_srli_epi16::<4>(packed));
            _mm512_cvtepu8_epi16(_mm256_and_si256(both, _mm256_set1_epi8(0x0f)))
        } else {
            _mm512_cvtepi8_epi16(_mm256_loadu_si256(q as *const __m256i))
        };
        let sums = _mm512_madd_epi16(w, _mm512_loadu_si512(xq.add(b * QK) as *const __m512i));
        _mm512_fmadd_ps(_mm512_set1_ps(scale), _mm512_cvtepi32_ps(sums), acc)
    };
    let mut start = 0;
    while start < per_row {
        let n = (per_row - start).min(CHUNK);
        let mask: __mmask16 = if n == CHUNK { u16::MAX } else { (1u16 << n) - 1 };
        let d = load_factors(scales, start, mask);
        _mm512_storeu_ps(combined.as_mut_ptr(), _mm512_mul_ps(d, _mm512_maskz_loadu_ps(mask, xs.add(start))));
        if !offsets.is_null() {
            let sums = _mm512_maskz_loadu_ps(mask, x.sums.as_ptr().add(start));
            offset_sum = _mm512_fmadd_ps(load_factors(offsets, start, mask), sums, offset_sum);
        }
        let mut i = 0;
        while i + 4 <= n {
            let b = start + i;
            a0 = block(a0, b, combined[i]);
            a1 = block(a1, b + 1, combined[i + 1]);
            a2 = block(a2, b + 2, combined[i + 2]);
            a3 = block(a3, b + 3, combined[i + 3]);
            i += 4;
        }
        while i < n {
            a0 = block(a0, start + i, combined[i]);
            i += 1;
        }
        start += n;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)))
        + _mm512_reduce_add_ps(offset_sum) * offset_factor
}

/// The AVX2 row kernel (`NIBBLES`: Q4_0/Q4_1 quants, else 8-bit ones;
/// `HALVES`: a scale per half block; `HALF`: f16 scales).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `blocks` must describe whole
/// blocks in range and `x` hold `per_row` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2<const HALF: bool, const NIBBLES: bool, const HALVES: bool>(
    blocks: &RowBlocks,
    x: &ActivationRow,
) -> f32 {
    let RowBlocks { per_row, qb, quants, scales, offsets, offset_factor, .. } = *blocks;
    assert!(x.quants.len() >= per_row * QK && x.scales.len() >= per_row && x.sums.len() >= per_row);
    let (xq, xs) = (x.quants.as_ptr(), x.scales.as_ptr());
    let factor = |i: usize| super::load_factor::<HALF>(scales, i);
    // Eight running sums of the offsets (one would chain every block).
    let mut offset_lanes = [0f32; 8];
    // Per block: the quants times the activations, as two 8-lane sums of
    // 32-bit products (values 0..16 and 16..32).
    let products = |b: usize| -> (__m256i, __m256i) {
        let q = quants.add(b * qb);
        let (w0, w1) = if NIBBLES {
            let nibbles = _mm_set1_epi8(0x0f);
            let packed = _mm_loadu_si128(q as *const __m128i);
            (
                _mm256_cvtepu8_epi16(_mm_and_si128(packed, nibbles)),
                _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(packed), nibbles)),
            )
        } else {
            (
                _mm256_cvtepi8_epi16(_mm_loadu_si128(q as *const __m128i)),
                _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(16) as *const __m128i)),
            )
        };
        let x = xq.add(b * QK);
        (
            _mm256_madd_epi16(w0, _mm256_loadu_si256(x as *const __m256i)),
            _mm256_madd_epi16(w1, _mm256_loadu_si256(x.add(16) as *const __m256i)),
        )
    };
    let fma =
        |acc: __m256, scale: f32, sums: __m256i| _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(sums), acc);
    let (mut a0, mut a1, mut a2, mut a3) =
        (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
    const HALF_CHUNK: usize = CHUNK / 2;
    let mut combined = [0f32; CHUNK];
    let mut start = 0;
    while start < per_row {
        let n = (per_row - start).min(HALF_CHUNK);
        for i in 0..n {
            if !offsets.is_null() {
                offset_lanes[i] += super::load_factor::<HALF>(offsets, start + i) * *x.sums.get_unchecked(start + i);
            }
            let s = *xs.add(start + i);
            if HALVES {
                combined[2 * i] = factor(2 * (start + i)) * s;
                combined[2 * i + 1] = factor(2 * (start + i) + 1) * s;
            } else {
                combined[i] = factor(start + i) * s;
            }
        }
        let mut i = 0;
        if HALVES {
            while i + 2 <= n {
                let ((s0, s1), (s2, s3)) = (products(start + i), products(start + i + 1));
                a0 = fma(a0, combined[2 * i], s0);
                a1 = fma(a1, combined[2 * i + 1], s1);
                a2 = fma(a2, combined[2 * i + 2], s2);
                a3 = fma(a3, combined[2 * i + 3], s3);
                i += 2;
            }
            if i < n {
                let (s0, s1) = products(start + i);
                a0 = fma(a0, combined[2 * i], s0);
                a1 = fma(a1, combined[2 * i + 1], s1);
            }
        } else {
            let sum = |(s0, s1): (__m256i, __m256i)| _mm256_add_epi32(s0, s1);
            while i + 4 <= n {
                let b = start + i;
                a0 = fma(a0, combined[i], sum(products(b)));
                a1 = fma(a1, combined[i + 1], sum(products(b + 1)));
                a2 = fma(a2, combined[i + 2], sum(products(b + 2)));
                a3 = fma(a3, combined[i + 3], sum(products(b + 3)));
                i += 4;
            }
            while i < n {
                a0 = fma(a0, combined[i], sum(products(start + i)));
                i += 1;
            }
        }
        start += n;
    }
    super::sum_lanes(&[a0, a1, a2, a3]) + offset_lanes.iter().sum::<f32>() * offset_factor
}

/// Every row kernel this CPU runs for `quants` and `half`, by name (the
/// tests check each against the portable loop, not only the one chosen).
#[cfg(test)]
fn all_available(quants: Quants, half: bool) -> Vec<(&'static str, RowKernel)> {
    let mut kernels = Vec::new();
    if has_avx2() {
        kernels.push(("avx2", avx2_kernel(quants, half)));
    }
    if let (true, Some(kernel)) = (has_avx512(), avx512_kernel(quants, half)) {
        kernels.push(("avx512", kernel));
    }
    kernels
}

#[cfg(test)]
mod tests {
    use super::super::{ActivationRow, BlockMatrix, GgmlFormat};
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Each row kernel of each kind (f16 scales: Q4_0, Q4_1, Q8_0, Q5_1 as
    /// 8-bit with a minimum; f32 products: Q4_K, Q6_K's halves) against the
    /// portable loop, over rows whose block count leaves every remainder
    /// of the unrolled loops (1 to 19 blocks: 16 + 3, 4 + 3, ...).
    #[test]
    fn every_row_kernel_gives_the_portable_sums() {
        for blocks in [1usize, 3, 4, 5, 8, 9, 16, 17, 19, 24] {
            let cols = blocks * QK;
            // K-quants need whole 256-value super-blocks.
            let formats: &[(GgmlDType, GgmlFormat)] = if cols.is_multiple_of(256) {
                &[(GgmlDType::Q4K, GgmlFormat::Q4K), (GgmlDType::Q6K, GgmlFormat::Q6K)]
            } else {
                &[
                    (GgmlDType::Q4_0, GgmlFormat::Q4_0),
                    (GgmlDType::Q4_1, GgmlFormat::Q4_1),
                    (GgmlDType::Q8_0, GgmlFormat::Q8_0),
                    (GgmlDType::Q5_1, GgmlFormat::Q5_1),
                ]
            };
            let rows = 5;
            let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3).collect();
            let dense = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
            let x: Vec<f32> = (0..cols).map(|i| (i * 104_729 % 997) as f32 / 498.0 - 1.0).collect();
            let act = ActivationRow::new(&x);
            for &(dtype, format) in formats {
                let q = QTensor::quantize(&dense, dtype).unwrap();
                let m = BlockMatrix::from_ggml(format, rows, cols, &q.data().unwrap(), None).unwrap();
                let kernels = all_available(m.kind.quants(), m.scales.is_half());
                for o in 0..rows {
                    let mut portable = [0f32];
                    m.dot_row(o, std::slice::from_ref(&act), &mut portable);
                    for &(name, kernel) in &kernels {
                        let mut got = [0f32];
                        // SAFETY: `all_available` lists only kernels this CPU runs.
                        unsafe { m.dot_row_each(kernel, o, std::slice::from_ref(&act), &mut got) };
                        let tolerance = 1e-5 * portable[0].abs().max(1.0);
                        assert!(
                            (got[0] - portable[0]).abs() <= tolerance,
                            "{format:?}, {blocks} blocks, row {o}, {name}: {} vs {}",
                            got[0],
                            portable[0]
                        );
                    }
                }
                // A product of one activation row takes the row kernel.
                let y = m.matmul(&x, 1);
                for (o, &got) in y.iter().enumerate() {
                    let mut portable = [0f32];
                    m.dot_row(o, std::slice::from_ref(&act), &mut portable);
                    assert!((got - portable[0]).abs() <= 1e-5 * portable[0].abs().max(1.0), "{format:?} row {o}");
                }
            }
        }
    }
}
