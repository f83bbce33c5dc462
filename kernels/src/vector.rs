//! f32 loops of the attention and SiLU kernels and of the block kernels'
//! activation quantisation, written so the compiler vectorises them, and
//! compiled for AVX-512 or AVX2 + FMA when the CPU has them (found at run
//! time). The baseline copy is correct everywhere but slow on an x86 CPU
//! without FMA and SSE4.1, where `mul_add` and rounding are library calls.
//!
//! The exponential is a polynomial one (Cephes' `expf`: range reduction by
//! `ln 2`, a degree-7 polynomial), within 1 ulp of the correctly rounded
//! value wherever that is a normal f32 (smaller results are flushed to 0);
//! libm's `expf` is a function call per element that no loop around it can
//! vectorise (9% of a 1×1024 training step's profile before this).

/// Lanes of the explicit accumulators: one AVX-512 register of f32s.
const LANES: usize = 16;

/// Below this `exp` is 0 in f32 (the result would be subnormal: flushed).
const EXP_LOWEST: f32 = -87.336_55;
/// Above this `exp` overflows to infinity.
const EXP_HIGHEST: f32 = 88.722_83;

/// `e^x` in f32: Cephes' `expf`, branch-free so a loop over it vectorises.
/// `-inf` and inputs below [`EXP_LOWEST`] give 0, inputs above
/// [`EXP_HIGHEST`] `+inf`, NaN gives NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n · LN2_HI is exact for |n| ≤ 128.
    #[allow(clippy::excessive_precision)] // exactly an f32: 355/512
    const LN2_HI: f32 = 0.693_359_375;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // max/min (not clamp) so that NaN becomes a number here: n below must
    // be finite and in range.
    #[allow(clippy::manual_clamp)]
    let clamped = x.max(EXP_LOWEST).min(EXP_HIGHEST);
    let n = (clamped * LOG2E).round_ties_even();
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5); // Cephes' 5.0000001201e-1 in f32
    let p = p.mul_add(r * r, r) + 1.0;
    // 2ⁿ as two powers built in the exponent field (n ∈ [-126, 128] after
    // the clamp; 2¹²⁸ itself is not an f32, halves of it are).
    // SAFETY: n is an integer in [-126, 128] (clamped is finite and in
    // range); the unchecked conversion is one vector instruction where
    // `as` (saturating, NaN to 0) scalarises the loop.
    let n: i32 = unsafe { n.to_int_unchecked() };
    let half = n >> 1;
    let power = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let y = p * power(half) * power(n - half);
    if x.is_nan() {
        x
    } else if x < EXP_LOWEST {
        0.0
    } else if x > EXP_HIGHEST {
        f32::INFINITY
    } else {
        y
    }
}

/// Runs `$body` (an expression over the function's arguments) in a copy
/// of the function compiled for AVX-512, one for AVX2 + FMA, or the
/// baseline, the best the CPU has.
macro_rules! dispatch {
    (fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        pub fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) -> $ret { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret { body($($arg),*) }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the copy is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

dispatch! {
    fn max(xs: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let chunks = xs.chunks_exact(LANES);
        let tail = chunks.remainder();
        for chunk in chunks {
            for (m, &x) in lanes.iter_mut().zip(chunk) {
                *m = if x > *m { x } else { *m };
            }
        }
        lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
    }
}

dispatch! {
    fn exp_shifted_sum(xs: &mut [f32], shift: f32) -> f32 {
        let mut lanes = [0f32; LANES];
        let mut chunks = xs.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (s, x) in lanes.iter_mut().zip(chunk.iter_mut()) {
                *x = exp(*x - shift);
                *s += *x;
            }
        }
        let mut sum = 0.0;
        for x in chunks.into_remainder() {
            *x = exp(*x - shift);
            sum += *x;
        }
        lanes.iter().sum::<f32>() + sum
    }
}

/// `Σ aᵢ·bᵢ` with [`LANES`] running sums.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (ca, cb) in ca.zip(cb) {
        for ((s, x), y) in lanes.iter_mut().zip(ca).zip(cb) {
            *s = x.mul_add(*y, *s);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

dispatch! {
    fn dots(q: &[f32], rows: &[f32], out: &mut [f32]) -> () {
        let d = q.len();
        for (o, row) in out.iter_mut().zip(rows.chunks_exact(d)) {
            *o = dot_lanes(q, row);
        }
    }
}

dispatch! {
    fn weighted_sum(weights: &[f32], rows: &[f32], acc: &mut [f32]) -> () {
        let d = acc.len();
        for (&w, row) in weights.iter().zip(rows.chunks_exact(d)).filter(|(&w, _)| w != 0.0) {
            for (a, x) in acc.iter_mut().zip(row) {
                *a = w.mul_add(*x, *a);
            }
        }
    }
}

dispatch! {
    fn quantize_blocks_i16(x: &[f32], block: usize, quants: &mut [i16], scales: &mut [f32], sums: &mut [f32]) -> () {
        let blocks = x.chunks(block).zip(quants.chunks_mut(block)).zip(scales.iter_mut().zip(sums.iter_mut()));
        for ((values, quants), (scale, sum)) in blocks {
            let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            *scale = amax / 32767.0;
            let inverse = if *scale > 0.0 { 1.0 / *scale } else { 0.0 };
            for (q, &v) in quants.iter_mut().zip(values) {
                // max/min also map NaN into range for the unchecked conversion.
                #[allow(clippy::manual_clamp)]
                let rounded = (v * inverse).round_ties_even().max(-32767.0).min(32767.0);
                // SAFETY: rounded is an integer in [-32767, 32767].
                *q = unsafe { rounded.to_int_unchecked::<i32>() } as i16;
            }
            *sum = values.iter().sum();
        }
    }
}

dispatch! {
    fn silu(xs: &[f32], ys: &mut [f32]) -> () {
        for (x, y) in xs.iter().zip(ys) {
            *y = crate::float::silu(*x, exp);
        }
    }
}

dispatch! {
    fn silu_grad(xs: &[f32], grads: &[f32], dxs: &mut [f32]) -> () {
        for ((x, g), dx) in xs.iter().zip(grads).zip(dxs) {
            *dx = crate::float::silu_grad(*x, *g, exp);
        }
    }
}

/// `dst[i] = src[i]` widened to f32 (exactly): F16C's `vcvtph2ps` sixteen
/// (AVX-512) or eight values an instruction where the CPU has it.
pub fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F was just detected; both slices hold `n` values.
        done = unsafe { f16_to_f32_avx512(&src[..n], &mut dst[..n]) };
    } else if std::is_x86_feature_detected!("avx") && std::is_x86_feature_detected!("f16c") {
        // SAFETY: AVX and F16C were just detected.
        done = unsafe { f16_to_f32_f16c(&src[..n], &mut dst[..n]) };
    }
    for (h, f) in src[done..n].iter().zip(&mut dst[done..n]) {
        *f = widen_f16(*h);
    }
}

/// [`f16_to_f32`] sixteen values at a time; returns how many it did.
///
/// # Safety
/// The CPU must support AVX-512 F; `dst` must be as long as `src`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn f16_to_f32_avx512(src: &[half::f16], dst: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let whole = src.len() / 16 * 16;
    for i in (0..whole).step_by(16) {
        let h = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
        _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
    }
    whole
}

/// [`f16_to_f32`] eight values at a time; returns how many it did.
///
/// # Safety
/// The CPU must support AVX and F16C; `dst` must be as long as `src`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(src: &[half::f16], dst: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let whole = src.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
    }
    whole
}

/// `out[j] = q · rows[j]` for f16 rows of `q.len()` values (one query
/// against a tile of a KV cache's keys), widened in registers.
pub fn dots_f16(q: &[f32], rows: &[half::f16], out: &mut [f32]) {
    let d = q.len();
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(16) && std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F was just detected; rows hold out.len() rows of d.
        return unsafe { dots_f16_avx512(q, &rows[..out.len() * d], out) };
    }
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(8) && has_f16c_fma() {
        // SAFETY: AVX2, FMA and F16C were just detected; rows hold out.len() rows of d.
        return unsafe { dots_f16_f16c(q, &rows[..out.len() * d], out) };
    }
    for (o, row) in out.iter_mut().zip(rows.chunks_exact(d)) {
        *o = q.iter().zip(row).map(|(a, b)| a * widen_f16(*b)).sum();
    }
}

/// [`dots_f16`] for a head size a multiple of 16.
///
/// # Safety
/// The CPU must support AVX-512 F; `d` a multiple of 16, `rows` hold
/// `out.len()` rows of `q.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_f16_avx512(q: &[f32], rows: &[half::f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = q.len();
    for (j, o) in out.iter_mut().enumerate() {
        let row = rows.as_ptr().add(j * d);
        let mut acc = _mm512_setzero_ps();
        for c in (0..d).step_by(16) {
            let k = _mm512_cvtph_ps(_mm256_loadu_si256(row.add(c) as *const __m256i));
            acc = _mm512_fmadd_ps(k, _mm512_loadu_ps(q.as_ptr().add(c)), acc);
        }
        *o = _mm512_reduce_add_ps(acc);
    }
}

/// Whether the CPU has AVX2, FMA and F16C (the 8-lane f16 loops).
#[cfg(target_arch = "x86_64")]
fn has_f16c_fma() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

/// [`dots_f16`] eight lanes wide, for a head size a multiple of 8.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `rows` hold `out.len()` rows
/// of `q.len()`, a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_f16_f16c(q: &[f32], rows: &[half::f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = q.len();
    for (j, o) in out.iter_mut().enumerate() {
        let row = rows.as_ptr().add(j * d);
        let mut acc = _mm256_setzero_ps();
        for c in (0..d).step_by(8) {
            let k = _mm256_cvtph_ps(_mm_loadu_si128(row.add(c) as *const __m128i));
            acc = _mm256_fmadd_ps(k, _mm256_loadu_ps(q.as_ptr().add(c)), acc);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        *o = lanes.iter().sum();
    }
}

/// [`weighted_sum_f16`] eight lanes wide, for a head size a multiple of 8.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `rows` hold `weights.len()`
/// rows of `acc.len()`, a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum_f16_f16c(weights: &[f32], rows: &[half::f16], acc: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = acc.len();
    for c in (0..d).step_by(8) {
        let mut sum = _mm256_loadu_ps(acc.as_ptr().add(c));
        for (j, &w) in weights.iter().enumerate() {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(rows.as_ptr().add(j * d + c) as *const __m128i));
            sum = _mm256_fmadd_ps(_mm256_set1_ps(w), v, sum);
        }
        _mm256_storeu_ps(acc.as_mut_ptr().add(c), sum);
    }
}

/// `acc += Σ_j weights[j] · rows[j]` for f16 rows of `acc.len()` values
/// (a query's attention over a tile of a KV cache's values).
pub fn weighted_sum_f16(weights: &[f32], rows: &[half::f16], acc: &mut [f32]) {
    let d = acc.len();
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(16) && std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F was just detected; rows hold weights.len() rows of d.
        return unsafe { weighted_sum_f16_avx512(weights, &rows[..weights.len() * d], acc) };
    }
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(8) && has_f16c_fma() {
        // SAFETY: AVX2, FMA and F16C were just detected; rows hold weights.len() rows of d.
        return unsafe { weighted_sum_f16_f16c(weights, &rows[..weights.len() * d], acc) };
    }
    for (&w, row) in weights.iter().zip(rows.chunks_exact(d)).filter(|(&w, _)| w != 0.0) {
        for (a, x) in acc.iter_mut().zip(row) {
            *a = w.mul_add(widen_f16(*x), *a);
        }
    }
}

/// [`weighted_sum_f16`] for a head size a multiple of 16.
///
/// # Safety
/// The CPU must support AVX-512 F; `acc.len()` a multiple of 16, `rows`
/// hold `weights.len()` rows of it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_sum_f16_avx512(weights: &[f32], rows: &[half::f16], acc: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = acc.len();
    for c in (0..d).step_by(16) {
        let mut sum = _mm512_loadu_ps(acc.as_ptr().add(c));
        for (j, &w) in weights.iter().enumerate() {
            let v = _mm512_cvtph_ps(_mm256_loadu_si256(rows.as_ptr().add(j * d + c) as *const __m256i));
            sum = _mm512_fmadd_ps(_mm512_set1_ps(w), v, sum);
        }
        _mm512_storeu_ps(acc.as_mut_ptr().add(c), sum);
    }
}

/// `h` as f32, exactly, in branch-free integer and float steps a loop
/// vectorises (half's own conversion calls out per eight values): the
/// exponent and mantissa moved into f32's fields and rebiased by one
/// multiplication by 2¹¹², which also normalises subnormals; infinities
/// and NaNs get f32's all-ones exponent.
#[inline(always)]
fn widen_f16(h: half::f16) -> f32 {
    let bits = h.to_bits() as u32;
    let sign = (bits & 0x8000) << 16;
    let magnitude = bits & 0x7fff;
    let rebias = f32::from_bits(0x7780_0000); // 2^112
    let finite = f32::from_bits(magnitude << 13) * rebias;
    let special = f32::from_bits((magnitude << 13) | 0x7f80_0000);
    let value = if magnitude >= 0x7c00 { special } else { finite };
    f32::from_bits(value.to_bits() | sign)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite f32s of
    /// the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    /// Within 1 ulp of the f64 exponential rounded to f32, over the
    /// range where the result is a normal number, including both ends;
    /// and the special values.
    #[test]
    fn exp_is_within_one_ulp_of_the_rounded_exponential() {
        let mut worst = 0;
        let steps = 2_000_000;
        for i in 0..=steps {
            let x = EXP_LOWEST + (EXP_HIGHEST - EXP_LOWEST) * (i as f32 / steps as f32);
            let want = (x as f64).exp() as f32;
            if want.is_finite() && want.is_normal() {
                worst = worst.max(ulps(exp(x), want));
            }
        }
        assert!(worst <= 1, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    /// Products of one row with many and weighted sums of rows agree
    /// with f64 loops, for row lengths around the lane count.
    #[test]
    fn dots_and_weighted_sums_match_f64_loops() {
        for d in [1, 15, 16, 17, 64, 100] {
            let q: Vec<f32> = (0..d).map(|i| ((i * 37) % 23) as f32 * 0.37 - 4.0).collect();
            let rows: Vec<f32> = (0..3 * d).map(|i| ((i * 11) % 19) as f32 * 0.21 - 2.0).collect();
            let mut out = [0f32; 3];
            dots(&q, &rows, &mut out);
            let mut acc = q.clone();
            weighted_sum(&[0.5, 0.0, -2.0], &rows, &mut acc);
            for (r, row) in rows.chunks(d).enumerate() {
                let want: f64 = q.iter().zip(row).map(|(x, y)| *x as f64 * *y as f64).sum();
                assert!((out[r] as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "d {d}, row {r}");
            }
            for (c, a) in acc.iter().enumerate() {
                let want = q[c] as f64 + 0.5 * rows[c] as f64 - 2.0 * rows[2 * d + c] as f64;
                assert!((*a as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "d {d}, column {c}");
            }
        }
    }

    /// Blocks scaled to ±32767: each block's largest magnitude becomes
    /// exactly ±32767, values round to even, a zero block gets scale 0,
    /// sums are the blocks' sums, and a partial last block is handled.
    #[test]
    fn activation_blocks_quantise_to_sixteen_bits() {
        let mut x: Vec<f32> = (0..70).map(|i| ((i * 37) % 23) as f32 * 0.37 - 4.0).collect();
        x[32..64].fill(0.0);
        let (mut quants, mut scales, mut sums) = (vec![0i16; 70], vec![0f32; 3], vec![0f32; 3]);
        quantize_blocks_i16(&x, 32, &mut quants, &mut scales, &mut sums);
        for (b, values) in x.chunks(32).enumerate() {
            let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(scales[b], amax / 32767.0, "block {b}");
            assert_eq!(sums[b], values.iter().sum::<f32>(), "block {b}");
            for (j, &v) in values.iter().enumerate() {
                let want = if amax > 0.0 { (v * (1.0 / scales[b])).round_ties_even() as i16 } else { 0 };
                assert_eq!(quants[b * 32 + j], want, "block {b}, value {j}");
            }
        }
        assert!(quants[..32].iter().any(|q| q.abs() == 32767));
        // A NaN activation (a model gone wrong) still gives quants in range.
        quantize_blocks_i16(&[1.0, f32::NAN, 2.0], 32, &mut quants[..3], &mut scales[..1], &mut sums[..1]);
        assert!(quants[..3].iter().all(|&q| q != i16::MIN));
    }

    /// The dispatched row loops agree with scalar loops, tails included
    /// (lengths around the lane count), and `-inf` entries give 0.
    #[test]
    fn row_loops_match_scalar_loops() {
        for len in [0, 1, 15, 16, 17, 64, 100] {
            let xs: Vec<f32> = (0..len)
                .map(|i| if i % 7 == 3 { f32::NEG_INFINITY } else { ((i * 37) % 23) as f32 * 0.37 - 4.0 })
                .collect();
            let want_max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&xs), want_max, "len {len}");
            let mut got = xs.clone();
            let sum = exp_shifted_sum(&mut got, 1.5);
            let want: Vec<f32> = xs.iter().map(|x| ((x - 1.5) as f64).exp() as f32).collect();
            for (g, w) in got.iter().zip(&want) {
                assert!(ulps(*g, *w) <= 2 || (*g == 0.0 && *w == 0.0), "len {len}: {g} vs {w}");
            }
            let want_sum: f64 = want.iter().map(|&w| w as f64).sum();
            assert!((sum as f64 - want_sum).abs() <= 1e-6 * want_sum.max(1.0), "len {len}: {sum} vs {want_sum}");
        }
    }

    /// Every one of the 65,536 f16 values widens to half's own f32 (bit
    /// for bit; NaNs stay NaN), by the vector loop and by the portable
    /// formula (its tail and fallback).
    #[test]
    fn every_f16_widens_exactly() {
        let all: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        let mut out = vec![0f32; all.len()];
        f16_to_f32(&all, &mut out);
        let portable: Vec<f32> = all.iter().map(|&h| widen_f16(h)).collect();
        for ((h, f), p) in all.iter().zip(&out).zip(&portable) {
            assert!(f.to_bits() == p.to_bits() || (f.is_nan() && p.is_nan()), "{:#06x}", h.to_bits());
            let want = h.to_f32();
            if want.is_nan() {
                assert!(f.is_nan(), "{:#06x}", h.to_bits());
            } else {
                assert_eq!(f.to_bits(), want.to_bits(), "{:#06x}: {f} vs {want}", h.to_bits());
            }
        }
    }

    /// The f16 dots and weighted sums equal their widened-f32 versions:
    /// the vector paths (head sizes 64 and 24, the AVX2 one called
    /// directly too) and the portable one (head size 12).
    #[test]
    fn f16_rows_meet_f32_queries_as_their_widened_values() {
        for d in [64usize, 24, 12] {
            let keys = 37;
            let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
            let rows: Vec<half::f16> =
                (0..keys * d).map(|i| half::f16::from_f32((i as f32 * 0.11).cos() * 3.0)).collect();
            let wide: Vec<f32> = rows.iter().map(|h| h.to_f32()).collect();
            let (mut got, mut want) = (vec![0f32; keys], vec![0f32; keys]);
            dots_f16(&q, &rows, &mut got);
            dots(&q, &wide, &mut want);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "d {d}: {a} vs {b}");
            }
            let weights: Vec<f32> = (0..keys).map(|j| if j % 5 == 0 { 0.0 } else { 1.0 / (j + 1) as f32 }).collect();
            let (mut got, mut want) = (vec![0.5f32; d], vec![0.5f32; d]);
            weighted_sum_f16(&weights, &rows, &mut got);
            weighted_sum(&weights, &wide, &mut want);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "d {d}: {a} vs {b}");
            }
            #[cfg(target_arch = "x86_64")]
            if d.is_multiple_of(8) && has_f16c_fma() {
                let (mut dots8, mut sums8) = (vec![0f32; keys], vec![0.5f32; d]);
                // SAFETY: the features were just detected; the sizes are as the functions need.
                unsafe {
                    dots_f16_f16c(&q, &rows, &mut dots8);
                    weighted_sum_f16_f16c(&weights, &rows, &mut sums8);
                }
                let mut want_dots = vec![0f32; keys];
                dots(&q, &wide, &mut want_dots);
                for (a, b) in dots8.iter().zip(&want_dots).chain(sums8.iter().zip(&want)) {
                    assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "d {d}, AVX2: {a} vs {b}");
                }
            }
        }
    }
}
