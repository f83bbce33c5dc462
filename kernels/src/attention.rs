//! Memory-efficient attention on the CPU, with its backward pass.
//!
//! The naive form builds the `[queries, keys]` score matrix of every head
//! and keeps it (and its softmax) for the backward pass: memory grows with
//! the square of the sequence. This kernel walks the keys in blocks with
//! an online softmax (FlashAttention-2), never holding more than one
//! `[BLOCK, BLOCK]` tile per thread, skips the blocks the mask rules out
//! (above the causal diagonal, outside the sliding window), and recomputes
//! the tiles in the backward pass from the saved log-sum-exp of each row.
//!
//! Query heads of a group read their key/value head in place (GQA without
//! copying K and V). Which keys a query sees is a [`KeyMask`], the same
//! rules as the host's additive mask: causal, sliding window, padding,
//! packing segments, and an offset for cached keys.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use half::slice::HalfFloatSliceExt;

use crate::float::{cpu, data, matmul, Real, Threads};
use rayon::prelude::*;

/// The op's name in errors.
const OP: &str = "flash-attention";

/// Rows (queries) and columns (keys) of one tile.
const BLOCK: usize = 64;

/// Which keys each query may attend to.
///
/// Query `i` sits at absolute position `offset + i`; key `j` at `j`. A
/// query that no rule leaves any key for (a padding row) sees only the key
/// at its own position, so its softmax stays finite, as the host's
/// additive mask arranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct KeyMask {
    /// Only keys at or before the query's position.
    pub causal: bool,
    /// Only the last `n` keys up to the query's position (0: no window).
    pub sliding_window: usize,
    /// Cached key positions before the first query.
    pub offset: usize,
    /// Per batch row, per key: whether it may be attended to (padding is
    /// `false`). Rows shorter than the keys allow the rest.
    pub padding: Option<Vec<Vec<bool>>>,
    /// Per batch row, per token: the packing segment. A query sees only
    /// keys of its own segment (used without cached keys).
    pub segments: Option<Vec<Vec<u32>>>,
}

impl KeyMask {
    /// The half-open range of keys the causal and window rules leave to
    /// the query at `pos`, among `keys`.
    fn range(&self, pos: usize, keys: usize) -> (usize, usize) {
        let hi = if self.causal { (pos + 1).min(keys) } else { keys };
        let lo = if self.sliding_window > 0 { (pos + 1).saturating_sub(self.sliding_window) } else { 0 };
        (lo.min(hi), hi)
    }

    /// Whether query `i` of batch row `row` may see key `j` (range rules
    /// aside).
    fn sees(&self, row: usize, i: usize, j: usize) -> bool {
        if let Some(p) = &self.padding {
            if !p[row].get(j).copied().unwrap_or(true) {
                return false;
            }
        }
        if let Some(s) = &self.segments {
            return s[row].get(i) == s[row].get(j);
        }
        true
    }

    /// The same rules without the per-key ones that hide nothing: padding
    /// that pads no key, and segments that put every query and key of each
    /// row in one segment (a batch without padding passes an all-ones
    /// mask; checking it key by key was 5% of a training step).
    fn without_trivial_rules(&self, queries: usize, keys: usize) -> KeyMask {
        let pads = self.padding.as_ref().is_some_and(|p| p.iter().any(|row| row.iter().any(|&seen| !seen)));
        let splits = self
            .segments
            .as_ref()
            .is_some_and(|s| s.iter().any(|row| row.len() < queries.max(keys) || row.iter().any(|&id| id != row[0])));
        KeyMask {
            causal: self.causal,
            sliding_window: self.sliding_window,
            offset: self.offset,
            padding: if pads { self.padding.clone() } else { None },
            segments: if splits { self.segments.clone() } else { None },
        }
    }

    /// For each query of batch row `row`: `None` when its rules leave it
    /// some key, else the one key it falls back to (its own position).
    fn fallbacks(&self, row: usize, queries: usize, keys: usize) -> Vec<Option<usize>> {
        (0..queries)
            .map(|i| {
                let pos = self.offset + i;
                let (lo, hi) = self.range(pos, keys);
                let any = (lo..hi).any(|j| self.sees(row, i, j));
                (!any).then(|| pos.min(keys - 1))
            })
            .collect()
    }
}

/// `softmax(q·kᵀ·scale + mask)·v` for `q` `[b, hq, s, d]`, `k` and `v`
/// `[b, hkv, t, d]` (`hq` a multiple of `hkv`; query head `h` reads
/// key/value head `h / (hq / hkv)`), all f32 or all f64 (or f32 queries
/// over f16 keys and values, without a gradient: a KV cache), with scores
/// capped at `softcap · tanh(score / softcap)` when given. Differentiable
/// in `q`, `k` and `v`; memory is linear in `s` and `t`.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &KeyMask,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (batch, _, queries, d) = q.dims4()?;
    let keys = k.dim(2)?;
    if keys == 0 {
        bail!("flash-attention: no keys")
    }
    let mask = mask.without_trivial_rules(queries, keys);
    // Which rows see no key: found once, read by the forward and backward passes.
    let fallbacks = (0..batch).map(|b| mask.fallbacks(b, queries, keys)).collect();
    let op = FlashAttention { mask, scale, softcap, fallbacks };
    // Keys and values are read in place when each head's rows are
    // contiguous (a KV cache's preallocated buffer narrowed to its length).
    let rows = |t: &Tensor| if head_stride(t.layout()).is_some() { Ok(t.clone()) } else { t.contiguous() };
    let packed = q.contiguous()?.apply_op3(&rows(k)?, &rows(v)?, op)?;
    packed.narrow(3, 0, d)
}

/// How keys and values are stored for a computation in `T`: as `T`
/// itself (read in place), or as f16 for an f32 computation (a KV cache
/// in half the memory, llama.cpp's default), converted a tile at a time.
/// One query (decoding) reads the stored rows directly.
trait KvElement<T>: WithDType {
    /// `src` as `T`s: itself, or converted into `scratch`.
    fn as_compute<'a>(src: &'a [Self], scratch: &'a mut Vec<T>) -> &'a [T];
    /// `out[j] = q · keys[j]` ([`Real::dots`] over stored rows).
    fn dots(q: &[T], keys: &[Self], out: &mut [T]);
    /// `acc += Σ_j weights[j] · values[j]` ([`Real::weighted_sum`] over stored rows).
    fn weighted_sum(weights: &[T], values: &[Self], acc: &mut [T]);
}

impl<T: Real + WithDType> KvElement<T> for T {
    fn as_compute<'a>(src: &'a [T], _: &'a mut Vec<T>) -> &'a [T] {
        src
    }
    fn dots(q: &[T], keys: &[T], out: &mut [T]) {
        T::dots(q, keys, out)
    }
    fn weighted_sum(weights: &[T], values: &[T], acc: &mut [T]) {
        T::weighted_sum(weights, values, acc)
    }
}

impl KvElement<f32> for half::f16 {
    fn as_compute<'a>(src: &'a [half::f16], scratch: &'a mut Vec<f32>) -> &'a [f32] {
        scratch.resize(src.len(), 0.0);
        crate::vector::f16_to_f32(src, &mut scratch[..src.len()]);
        &scratch[..src.len()]
    }
    fn dots(q: &[f32], keys: &[half::f16], out: &mut [f32]) {
        crate::vector::dots_f16(q, keys, out)
    }
    fn weighted_sum(weights: &[f32], values: &[half::f16], acc: &mut [f32]) {
        crate::vector::weighted_sum_f16(weights, values, acc)
    }
}

/// `t` in f16: on the CPU from f32 by half's slice conversion (F16C,
/// eight values an instruction; candle's conversion goes value by value),
/// else by candle. How a KV cache stores keys and values for
/// [`flash_attention`] to read.
pub fn to_f16(t: &Tensor) -> Result<Tensor> {
    if !(t.device().is_cpu() && t.dtype() == DType::F32) {
        return t.to_dtype(DType::F16);
    }
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    let mut halves = vec![half::f16::ZERO; values.len()];
    halves.convert_from_f32_slice(&values);
    Tensor::from_vec(halves, t.shape(), t.device())
}

/// The op: its output is `[b, hq, s, d + 1]`, the attention output with
/// each row's log-sum-exp appended (the backward pass reads it back from
/// the saved result; the caller narrows it away).
struct FlashAttention {
    mask: KeyMask,
    scale: f64,
    softcap: Option<f64>,
    /// Per batch row, per query: [`KeyMask::fallbacks`].
    fallbacks: Vec<Vec<Option<usize>>>,
}

/// The geometry of one call.
#[derive(Copy, Clone)]
struct Dims {
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
    /// Elements from one key/value head's first row to the next head's
    /// (`keys · head_dim` when contiguous; a KV cache's capacity times
    /// `head_dim` when read in place).
    kv_head_stride: usize,
}

/// The element stride between consecutive (batch row, head) pairs of a
/// `[b, h, keys, d]` layout whose heads are each `keys` contiguous rows of
/// `d`, evenly spaced (`None` for any other layout).
fn head_stride(layout: &Layout) -> Option<usize> {
    let (b, h, keys, d) = layout.shape().dims4().ok()?;
    let s = layout.stride();
    let rows = (keys <= 1 || s[2] == d) && (d <= 1 || s[3] == 1);
    let even = h <= 1 || b <= 1 || s[0] == h * s[1];
    let stride = if h > 1 {
        s[1]
    } else if b > 1 {
        s[0]
    } else {
        keys * d
    };
    (rows && even && stride >= keys * d).then_some(stride)
}

/// The data of keys or values laid out as [`head_stride`] accepts: from
/// the first head's first row to the last head's last.
fn kv_data<'a, T: WithDType>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    let Some(stride) = head_stride(layout) else { bail!("flash-attention: keys and values need contiguous rows") };
    let (b, h, keys, d) = layout.shape().dims4()?;
    let start = layout.start_offset();
    Ok(&storage.as_slice::<T>()?[start..start + (b * h - 1) * stride + keys * d])
}

impl Dims {
    fn of(q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
        let (batch, q_heads, queries, head_dim) = q.shape().dims4()?;
        let (kb, kv_heads, keys, kd) = k.shape().dims4()?;
        if k.shape() != v.shape() || kb != batch || kd != head_dim {
            bail!("flash-attention: q {:?}, k {:?}, v {:?} do not fit", q.shape(), k.shape(), v.shape())
        }
        if kv_heads == 0 || q_heads % kv_heads != 0 {
            bail!("flash-attention: {q_heads} query heads cannot share {kv_heads} key/value heads")
        }
        if keys == 0 {
            bail!("flash-attention: no keys")
        }
        let kv_head_stride = head_stride(k).unwrap_or(keys * head_dim);
        if head_stride(v) != Some(kv_head_stride) {
            bail!("flash-attention: keys and values are laid out differently")
        }
        Ok(Dims { batch, q_heads, kv_heads, queries, keys, head_dim, kv_head_stride })
    }

    /// The key/value head query head `h` reads.
    fn kv_head(&self, h: usize) -> usize {
        h / (self.q_heads / self.kv_heads)
    }
}

/// One tile's scores: `S = q_blk · k_blkᵀ · scale`, capped, and `-inf`
/// where the mask hides the key.
#[allow(clippy::too_many_arguments)]
fn scores<T: Real, KV: KvElement<T>>(
    op: &FlashAttention,
    dims: &Dims,
    row: usize,
    (i0, rows): (usize, usize),
    (j0, cols): (usize, usize),
    q: &[T],
    (k, k_scratch): (&[KV], &mut Vec<T>),
    s: &mut [T],
) {
    let d = dims.head_dim;
    if rows == 1 {
        KV::dots(&q[..d], &k[..cols * d], &mut s[..cols]);
    } else {
        let k = KV::as_compute(&k[..cols * d], k_scratch);
        // SAFETY: q holds `rows` rows of `d`, k `cols` rows of `d`, s is rows × cols.
        unsafe {
            matmul(Threads::One, (rows, cols, d), s.as_mut_ptr(), cols, false, q.as_ptr(), (d, 1), k.as_ptr(), (1, d));
        }
    }
    let scale = T::of(op.scale);
    let fallbacks = &op.fallbacks[row];
    // Padding and segments hide keys one by one; without them a row sees
    // one run of keys.
    let checked = op.mask.padding.is_some() || op.mask.segments.is_some();
    for (r, line) in s[..rows * cols].chunks_exact_mut(cols).enumerate() {
        let i = i0 + r;
        let (lo, hi) = match fallbacks[i] {
            Some(f) => (f, f + 1),
            None => op.mask.range(op.mask.offset + i, dims.keys),
        };
        let c_lo = lo.saturating_sub(j0).min(cols);
        let c_hi = hi.saturating_sub(j0).min(cols).max(c_lo);
        line[..c_lo].fill(T::neg_infinity());
        line[c_hi..].fill(T::neg_infinity());
        let span = &mut line[c_lo..c_hi];
        for x in span.iter_mut() {
            *x *= scale;
        }
        if checked && fallbacks[i].is_none() {
            for (c, x) in span.iter_mut().enumerate() {
                if !op.mask.sees(row, i, j0 + c_lo + c) {
                    *x = T::neg_infinity();
                }
            }
        }
        if let Some(cap) = op.softcap {
            let cap = T::of(cap);
            for x in span.iter_mut().filter(|x| **x != T::neg_infinity()) {
                *x = cap * (*x / cap).tanh();
            }
        }
    }
}

/// The key blocks query rows `[i0, i1)` can see at all.
fn key_span(mask: &KeyMask, fallbacks: &[Option<usize>], (i0, i1): (usize, usize), keys: usize) -> (usize, usize) {
    let (lo, _) = mask.range(mask.offset + i0, keys);
    let (_, hi) = mask.range(mask.offset + i1 - 1, keys);
    let (mut lo, mut hi) = (lo, hi);
    for f in fallbacks[i0..i1].iter().flatten() {
        lo = lo.min(*f);
        hi = hi.max(*f + 1);
    }
    (lo, hi.max(lo))
}

impl FlashAttention {
    fn forward<T: Real, KV: KvElement<T>>(&self, dims: Dims, q: &[T], k: &[KV], v: &[KV]) -> Vec<T> {
        let Dims { batch, q_heads, queries, head_dim: d, .. } = dims;
        let width = d + 1;
        let mut out = vec![T::of(0.0); batch * q_heads * queries * width];
        out.par_chunks_mut(queries * width).enumerate().for_each(|(bh, head)| {
            let (b, h) = (bh / q_heads, bh % q_heads);
            head.par_chunks_mut(BLOCK * width).enumerate().for_each(|(block, out)| {
                let rows = out.len() / width;
                self.forward_block(&dims, b, h, (block * BLOCK, rows), q, k, v, out);
            });
        });
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_block<T: Real, KV: KvElement<T>>(
        &self,
        dims: &Dims,
        b: usize,
        h: usize,
        (i0, rows): (usize, usize),
        q: &[T],
        k: &[KV],
        v: &[KV],
        out: &mut [T],
    ) {
        let d = dims.head_dim;
        let fallbacks = &self.fallbacks[b];
        let kvh = dims.kv_head(h);
        let q_at = ((b * dims.q_heads + h) * dims.queries + i0) * d;
        let kv_at = (b * dims.kv_heads + kvh) * dims.kv_head_stride;
        let q = &q[q_at..q_at + rows * d];
        let (k, v) = (&k[kv_at..kv_at + dims.keys * d], &v[kv_at..kv_at + dims.keys * d]);
        let mut acc = vec![T::of(0.0); rows * d];
        let mut max = vec![T::neg_infinity(); rows];
        let mut sum = vec![T::of(0.0); rows];
        let mut s = vec![T::of(0.0); rows * BLOCK];
        let (mut k_tile, mut v_tile) = (Vec::new(), Vec::new());
        let (lo, hi) = key_span(&self.mask, fallbacks, (i0, i0 + rows), dims.keys);
        let mut j0 = lo / BLOCK * BLOCK;
        while j0 < hi {
            let cols = BLOCK.min(dims.keys - j0);
            let tile = &mut s[..rows * cols];
            scores(self, dims, b, (i0, rows), (j0, cols), q, (&k[j0 * d..(j0 + cols) * d], &mut k_tile), tile);
            for r in 0..rows {
                let line = &mut tile[r * cols..(r + 1) * cols];
                let tile_max = T::max_of(line);
                if tile_max == T::neg_infinity() {
                    line.fill(T::of(0.0));
                    continue;
                }
                let new_max = if tile_max > max[r] { tile_max } else { max[r] };
                let rescale = (max[r] - new_max).exp();
                let line_sum = T::exp_shifted_sum(line, new_max);
                sum[r] = sum[r] * rescale + line_sum;
                max[r] = new_max;
                for a in &mut acc[r * d..(r + 1) * d] {
                    *a *= rescale;
                }
            }
            let values = &v[j0 * d..(j0 + cols) * d];
            if rows == 1 {
                KV::weighted_sum(tile, values, &mut acc[..d]);
            } else {
                let values = KV::as_compute(values, &mut v_tile);
                // SAFETY: tile is rows × cols, v from j0 holds cols rows of d, acc rows × d.
                unsafe {
                    matmul(
                        Threads::One,
                        (rows, d, cols),
                        acc.as_mut_ptr(),
                        d,
                        true,
                        tile.as_ptr(),
                        (cols, 1),
                        values.as_ptr(),
                        (d, 1),
                    );
                }
            }
            j0 += BLOCK;
        }
        for r in 0..rows {
            let line = &mut out[r * (d + 1)..(r + 1) * (d + 1)];
            for c in 0..d {
                line[c] = acc[r * d + c] / sum[r];
            }
            line[d] = max[r] + sum[r].ln();
        }
    }

    fn backward<T: Real>(
        &self,
        dims: Dims,
        q: &[T],
        k: &[T],
        v: &[T],
        packed: &[T],
        grad: &[T],
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let Dims { batch, q_heads, kv_heads, queries, keys, head_dim: d, .. } = dims;
        // Per query row: its log-sum-exp and D = rowsum(dO ∘ O).
        let rows_total = batch * q_heads * queries;
        let mut lse = vec![T::of(0.0); rows_total];
        let mut delta = vec![T::of(0.0); rows_total];
        let mut d_out = vec![T::of(0.0); rows_total * d];
        for r in 0..rows_total {
            let o = &packed[r * (d + 1)..(r + 1) * (d + 1)];
            let g = &grad[r * (d + 1)..r * (d + 1) + d];
            lse[r] = o[d];
            let mut dot = T::of(0.0);
            for c in 0..d {
                dot += g[c] * o[c];
            }
            delta[r] = dot;
            d_out[r * d..(r + 1) * d].copy_from_slice(g);
        }
        let ctx = Backward { op: self, dims, q, k, v, d_out: &d_out, lse: &lse, delta: &delta };
        // dK and dV: tasks own a key block of one key/value head and read
        // every query row of its query heads.
        let mut dk = vec![T::of(0.0); batch * kv_heads * keys * d];
        let mut dv = vec![T::of(0.0); batch * kv_heads * keys * d];
        let key_blocks = keys.div_ceil(BLOCK);
        dk.par_chunks_mut(keys * d).zip(dv.par_chunks_mut(keys * d)).enumerate().for_each(|(bkv, (dk, dv))| {
            (0..key_blocks).for_each(|kb| {
                let j0 = kb * BLOCK;
                let cols = BLOCK.min(keys - j0);
                ctx.key_block(bkv, (j0, cols), &mut dk[j0 * d..(j0 + cols) * d], &mut dv[j0 * d..(j0 + cols) * d]);
            });
        });
        // dQ: tasks own a query block of one query head.
        let mut dq = vec![T::of(0.0); rows_total * d];
        dq.par_chunks_mut(queries * d).enumerate().for_each(|(bh, head)| {
            head.par_chunks_mut(BLOCK * d).enumerate().for_each(|(block, dq)| {
                ctx.query_block(bh, (block * BLOCK, dq.len() / d), dq);
            });
        });
        (dq, dk, dv)
    }
}

/// What both halves of the backward pass read.
struct Backward<'a, T> {
    op: &'a FlashAttention,
    dims: Dims,
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    d_out: &'a [T],
    lse: &'a [T],
    delta: &'a [T],
}

impl<T: Real> Backward<'_, T> {
    /// The tile's `dS` (the gradient of the scores before scaling), with
    /// `p` its probabilities, for query rows `[i0, i0 + rows)` of head
    /// `bh` (batch · heads + head) and keys `[j0, j0 + cols)`.
    fn tile(&self, bh: usize, (i0, rows): (usize, usize), (j0, cols): (usize, usize), p: &mut [T], ds: &mut [T]) {
        let d = self.dims.head_dim;
        let (b, h) = (bh / self.dims.q_heads, bh % self.dims.q_heads);
        let kv_at = (b * self.dims.kv_heads + self.dims.kv_head(h)) * self.dims.keys * d;
        let q_row = bh * self.dims.queries + i0;
        let q = &self.q[q_row * d..(q_row + rows) * d];
        let keys = &self.k[kv_at + j0 * d..kv_at + (j0 + cols) * d];
        scores(self.op, &self.dims, b, (i0, rows), (j0, cols), q, (keys, &mut Vec::new()), p);
        // dP = dO · Vᵀ.
        // SAFETY: d_out rows × d, v cols rows of d, ds rows × cols.
        unsafe {
            matmul(
                Threads::One,
                (rows, cols, d),
                ds.as_mut_ptr(),
                cols,
                false,
                self.d_out[q_row * d..].as_ptr(),
                (d, 1),
                self.v[kv_at + j0 * d..].as_ptr(),
                (1, d),
            );
        }
        let scale = T::of(self.op.scale);
        for (r, (p, ds)) in p.chunks_exact_mut(cols).zip(ds.chunks_exact_mut(cols)).enumerate() {
            let (lse, delta) = (self.lse[q_row + r], self.delta[q_row + r]);
            // The softcap's derivative reads the capped scores, so it is
            // taken before the exponential overwrites them.
            if let Some(cap) = self.op.softcap {
                for (s, ds) in p.iter().zip(ds.iter_mut()) {
                    let t = *s / T::of(cap);
                    *ds = (*ds - delta) * (T::of(1.0) - t * t);
                }
            } else {
                for ds in ds.iter_mut() {
                    *ds -= delta;
                }
            }
            // Hidden keys (-inf) get probability 0, hence gradient 0.
            T::exp_shifted_sum(p, lse);
            for (p, ds) in p.iter().zip(ds.iter_mut()) {
                *ds = if *p == T::of(0.0) { T::of(0.0) } else { *p * *ds * scale };
            }
        }
    }

    /// Accumulates `dK`, `dV` of keys `[j0, j0 + cols)` of key/value head
    /// `bkv` (batch · kv heads + head) over all query rows that see them.
    fn key_block(&self, bkv: usize, (j0, cols): (usize, usize), dk: &mut [T], dv: &mut [T]) {
        let Dims { q_heads, kv_heads, queries, head_dim: d, .. } = self.dims;
        let (b, kvh) = (bkv / kv_heads, bkv % kv_heads);
        let rep = q_heads / kv_heads;
        let mut p = vec![T::of(0.0); BLOCK * cols];
        let mut ds = vec![T::of(0.0); BLOCK * cols];
        for h in kvh * rep..(kvh + 1) * rep {
            let bh = b * q_heads + h;
            for i0 in (0..queries).step_by(BLOCK) {
                let rows = BLOCK.min(queries - i0);
                let (lo, hi) = key_span(&self.op.mask, &self.op.fallbacks[b], (i0, i0 + rows), self.dims.keys);
                if j0 + cols <= lo || j0 >= hi {
                    continue;
                }
                let (p, ds) = (&mut p[..rows * cols], &mut ds[..rows * cols]);
                self.tile(bh, (i0, rows), (j0, cols), p, ds);
                let q_row = bh * queries + i0;
                // SAFETY: p, ds are rows × cols; d_out, q rows × d; dv, dk cols × d.
                unsafe {
                    // dV += Pᵀ · dO; dK += dSᵀ · Q.
                    matmul(
                        Threads::One,
                        (cols, d, rows),
                        dv.as_mut_ptr(),
                        d,
                        true,
                        p.as_ptr(),
                        (1, cols),
                        self.d_out[q_row * d..].as_ptr(),
                        (d, 1),
                    );
                    matmul(
                        Threads::One,
                        (cols, d, rows),
                        dk.as_mut_ptr(),
                        d,
                        true,
                        ds.as_ptr(),
                        (1, cols),
                        self.q[q_row * d..].as_ptr(),
                        (d, 1),
                    );
                }
            }
        }
    }

    /// Accumulates `dQ` of query rows `[i0, i0 + rows)` of head `bh`.
    fn query_block(&self, bh: usize, (i0, rows): (usize, usize), dq: &mut [T]) {
        let Dims { q_heads, kv_heads, keys, head_dim: d, .. } = self.dims;
        let (b, h) = (bh / q_heads, bh % q_heads);
        let kv_at = (b * kv_heads + self.dims.kv_head(h)) * keys * d;
        let mut p = vec![T::of(0.0); rows * BLOCK];
        let mut ds = vec![T::of(0.0); rows * BLOCK];
        let (lo, hi) = key_span(&self.op.mask, &self.op.fallbacks[b], (i0, i0 + rows), keys);
        let mut j0 = lo / BLOCK * BLOCK;
        while j0 < hi {
            let cols = BLOCK.min(keys - j0);
            let (p, ds) = (&mut p[..rows * cols], &mut ds[..rows * cols]);
            self.tile(bh, (i0, rows), (j0, cols), p, ds);
            // dQ += dS · K.
            // SAFETY: ds rows × cols, k from j0 cols rows of d, dq rows × d.
            unsafe {
                matmul(
                    Threads::One,
                    (rows, d, cols),
                    dq.as_mut_ptr(),
                    d,
                    true,
                    ds.as_ptr(),
                    (cols, 1),
                    self.k[kv_at + j0 * d..].as_ptr(),
                    (d, 1),
                );
            }
            j0 += BLOCK;
        }
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::of(ql, kl, vl)?;
        let shape = Shape::from((dims.batch, dims.q_heads, dims.queries, dims.head_dim + 1));
        if ks.dtype() != vs.dtype() {
            bail!("flash-attention: keys in {:?}, values in {:?}", ks.dtype(), vs.dtype())
        }
        let q = qs;
        let out = match (q.dtype(), ks.dtype()) {
            (DType::F32, DType::F16) => CpuStorage::F32(self.forward::<f32, half::f16>(
                dims,
                data(OP, q, ql)?,
                kv_data(ks, kl)?,
                kv_data(vs, vl)?,
            )),
            (DType::F32, _) => {
                CpuStorage::F32(self.forward::<f32, f32>(dims, data(OP, q, ql)?, kv_data(ks, kl)?, kv_data(vs, vl)?))
            }
            (DType::F64, _) => {
                CpuStorage::F64(self.forward::<f64, f64>(dims, data(OP, q, ql)?, kv_data(ks, kl)?, kv_data(vs, vl)?))
            }
            (other, _) => bail!("flash-attention: f32 or f64 inputs, got {other:?}"),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        packed: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if k.dtype() != q.dtype() {
            bail!("flash-attention: no gradient through {:?} keys and values (a KV cache's)", k.dtype())
        }
        // The backward pass reads keys and values contiguous (only a KV
        // cache, which is never differentiated, passes them in place).
        let (k, v) = (&k.contiguous()?, &v.contiguous()?);
        let grad = grad.contiguous()?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (ps, pl) = packed.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (qs, ks, vs, ps, gs) = (cpu(OP, &qs)?, cpu(OP, &ks)?, cpu(OP, &vs)?, cpu(OP, &ps)?, cpu(OP, &gs)?);
        let dims = Dims::of(ql, kl, vl)?;
        let device = q.device();
        macro_rules! run {
            ($t:ty) => {{
                let (dq, dk, dv) = self.backward::<$t>(
                    dims,
                    data(OP, qs, ql)?,
                    data(OP, ks, kl)?,
                    data(OP, vs, vl)?,
                    data(OP, ps, pl)?,
                    data(OP, gs, gl)?,
                );
                (
                    Tensor::from_vec(dq, q.shape(), device)?,
                    Tensor::from_vec(dk, k.shape(), device)?,
                    Tensor::from_vec(dv, v.shape(), device)?,
                )
            }};
        }
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            other => bail!("flash-attention: f32 or f64 inputs, got {other:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Padding that pads nothing and one segment per row are dropped
    /// (the output is bit for bit the rule-free one); a padded key or a
    /// second segment keeps its rule.
    #[test]
    fn rules_that_hide_nothing_are_dropped() {
        let (batch, heads, s, d) = (2, 2, 70, 8);
        let q = Tensor::randn(0f32, 1., (batch, heads, s, d), &Device::Cpu).unwrap();
        let k = Tensor::randn(0.5f32, 1., (batch, heads, s, d), &Device::Cpu).unwrap();
        let v = Tensor::randn(-0.5f32, 1., (batch, heads, s, d), &Device::Cpu).unwrap();
        let plain = KeyMask { causal: true, ..Default::default() };
        let trivial = KeyMask {
            padding: Some(vec![vec![true; s]; batch]),
            segments: Some(vec![vec![3; s]; batch]),
            ..plain.clone()
        };
        assert_eq!(trivial.without_trivial_rules(s, s), plain);
        let flat = |m: &KeyMask| {
            flash_attention(&q, &k, &v, m, 0.35, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert_eq!(flat(&trivial), flat(&plain));
        let mut padded = trivial.clone();
        padded.padding.as_mut().unwrap()[1][0] = false;
        assert!(padded.without_trivial_rules(s, s).padding.is_some());
        let mut split = trivial.clone();
        split.segments.as_mut().unwrap()[0][40] = 4;
        assert!(split.without_trivial_rules(s, s).segments.is_some());
        let short = KeyMask { segments: Some(vec![vec![3; s - 1]; batch]), ..plain.clone() };
        assert!(short.without_trivial_rules(s, s).segments.is_some());
    }

    /// Keys and values read in place from a longer buffer (as a KV cache
    /// passes them) give exactly what their contiguous copies give, for
    /// several heads and for one head over several batch rows.
    #[test]
    fn keys_and_values_in_a_longer_buffer_are_read_in_place() {
        for (batch, kv_heads) in [(1, 2), (2, 1), (2, 2)] {
            let (q_heads, queries, keys, capacity, d) = (2 * kv_heads, 3, 70, 90, 8);
            let q = Tensor::randn(0f32, 1., (batch, q_heads, queries, d), &Device::Cpu).unwrap();
            let buffer = |seed: f32| {
                let t = Tensor::randn(seed, 1., (batch, kv_heads, capacity, d), &Device::Cpu).unwrap();
                t.narrow(2, 0, keys).unwrap()
            };
            let (k, v) = (buffer(0.5), buffer(-0.5));
            assert!(!k.is_contiguous() && head_stride(k.layout()) == Some(capacity * d));
            let mask =
                KeyMask { causal: true, sliding_window: 0, offset: keys - queries, padding: None, segments: None };
            let in_place = flash_attention(&q, &k, &v, &mask, 0.35, None).unwrap();
            let copied =
                flash_attention(&q, &k.contiguous().unwrap(), &v.contiguous().unwrap(), &mask, 0.35, None).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(&in_place), flat(&copied), "batch {batch}, {kv_heads} kv heads");
        }
    }

    /// f16 keys and values (a KV cache's) give what their values widened
    /// to f32 give: one query (decoding) and a prompt over several key
    /// tiles, query heads sharing key/value heads; and no gradient flows
    /// through them (an error, not a wrong one).
    #[test]
    fn half_keys_and_values_read_as_their_f32_values() {
        for queries in [1usize, 70] {
            let (batch, q_heads, kv_heads, keys, d) = (1, 4, 2, 150, 16);
            let q = Tensor::randn(0f32, 1., (batch, q_heads, queries, d), &Device::Cpu).unwrap();
            let k = to_f16(&Tensor::randn(0.5f32, 1., (batch, kv_heads, keys, d), &Device::Cpu).unwrap()).unwrap();
            let v = to_f16(&Tensor::randn(-0.5f32, 1., (batch, kv_heads, keys, d), &Device::Cpu).unwrap()).unwrap();
            assert_eq!(k.dtype(), DType::F16);
            let mask = KeyMask { causal: true, offset: keys - queries, ..Default::default() };
            let half = flash_attention(&q, &k, &v, &mask, 0.25, None).unwrap();
            let [k32, v32] = [&k, &v].map(|t| t.to_dtype(DType::F32).unwrap());
            let full = flash_attention(&q, &k32, &v32, &mask, 0.25, None).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in flat(&half).iter().zip(flat(&full)) {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{queries} queries: {a} vs {b}");
            }
        }
        // to_f16 rounds as candle's conversion does.
        let x = Tensor::new(&[1.0f32, -2.5e-3, 65504.0, 1e-8, 3.0517578e-5], &Device::Cpu).unwrap();
        assert_eq!(
            to_f16(&x).unwrap().to_vec1::<half::f16>().unwrap(),
            x.to_dtype(DType::F16).unwrap().to_vec1::<half::f16>().unwrap()
        );
        let q = candle_core::Var::randn(0f32, 1., (1, 2, 3, 8), &Device::Cpu).unwrap();
        let kv = to_f16(&Tensor::randn(0f32, 1., (1, 2, 3, 8), &Device::Cpu).unwrap()).unwrap();
        let out = flash_attention(q.as_tensor(), &kv, &kv, &KeyMask::default(), 0.3, None).unwrap();
        let err = out.sum_all().unwrap().backward().unwrap_err().to_string();
        assert!(err.contains("no gradient through F16 keys"), "{err}");
    }
}
