//! Weight matrices in llama.cpp's block formats, repacked for decoding
//! into 32-value blocks of five kinds ([`BlockKind`]): the block scales
//! (and minimums) beside the packed quants, as f16 where the format stores
//! them so and f32 where they are products. Q4_0, Q4_1 and Q8_0 keep their
//! quants; the 5-bit formats (Q5_0, Q5_1) unpack to 8 bits; the K-quants'
//! 32-value sub-blocks (Q4_K, Q5_K) become blocks of their own, each
//! sub-scale and sub-minimum multiplied out as llama.cpp does, and Q6_K's
//! 16-value sub-blocks pairs of halves with a scale each, so every value
//! is exactly the one llama.cpp dequantises ([`GgmlFormat`]). A few rows of activations are
//! multiplied straight from the blocks: the activations in 16 bits per
//! block meet the quants in integer multiply-adds (`vpmaddwd`), then the
//! two scales; the blocks' offsets use each activation block's f32 sum.
//! Only the quantised bytes are read. (llama.cpp quantises activations to
//! 8 bits; on SmolLM2 that lost up to 8% of a `v_proj` output here and
//! changed its answers.) Split across threads by weight rows, AVX2+FMA
//! where the CPU has it (chosen at run time), the same integer sums in
//! portable code otherwise; one activation row (decoding a sequence) runs
//! the row kernels of [`one_row`], with an AVX-512 copy.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod one_row;

/// Values per block.
pub const QK: usize = 32;

/// Activation rows one pass over a weight row serves.
const ROWS_AT_ONCE: usize = 16;

/// How many weight rows ahead a row kernel prefetches (a pass over
/// SmolLM2's layers with one activation row, single thread, medians of 15:
/// none 9.4–10.3 ms, 1 row 9.0, 2 rows 7.6–7.7, 4 rows 6.9–7.2, 8 rows 8.4).
const PREFETCH_ROWS: usize = 4;

/// Multiply-adds below which a product runs on the calling thread.
const PARALLEL_MIN_PRODUCTS: usize = 1 << 16;

/// A block format.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// 4-bit, `(q - 8) · d`.
    Q4_0,
    /// 4-bit, `q · d + m`.
    Q4_1,
    /// 8-bit, `q · d`.
    Q8_0,
    /// 8-bit, `q · d + m` (the 5-bit formats with a minimum, unpacked).
    Q8_1,
    /// 8-bit, `q · d₀` for the first 16 values and `q · d₁` for the last
    /// (Q6_K, unpacked).
    Q8Halves,
}

/// A llama.cpp block format this module reads ([`BlockMatrix::read_ggml`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum GgmlFormat {
    /// 32 values: f16 `d`, 4-bit quants; `(q - 8) · d`.
    Q4_0,
    /// 32 values: f16 `d`, `m`, 4-bit quants; `q · d + m`.
    Q4_1,
    /// 32 values: f16 `d`, 32 high bits, 4-bit low quants; `(q - 16) · d`.
    Q5_0,
    /// 32 values: f16 `d`, `m`, 32 high bits, 4-bit low quants; `q · d + m`.
    Q5_1,
    /// 32 values: f16 `d`, 8-bit quants; `q · d`.
    Q8_0,
    /// 256 values: f16 `d`, `dmin`, eight 6-bit scales and minimums, 4-bit
    /// quants; sub-block `j`: `d·sc_j · q − dmin·m_j`.
    Q4K,
    /// 256 values: as Q4_K with a fifth bit per value.
    Q5K,
    /// 256 values: 6-bit quants, sixteen 8-bit scales, f16 `d`;
    /// sub-block `j` of 16: `d·sc_j · (q − 32)`.
    Q6K,
}

impl GgmlFormat {
    /// Values per stored block.
    pub fn block_values(self) -> usize {
        match self {
            GgmlFormat::Q4K | GgmlFormat::Q5K | GgmlFormat::Q6K => 256,
            _ => QK,
        }
    }

    /// Whether its scales and minimums are f16 as stored (not products).
    fn f16_factors(self) -> bool {
        matches!(self, GgmlFormat::Q4_0 | GgmlFormat::Q4_1 | GgmlFormat::Q5_0 | GgmlFormat::Q5_1 | GgmlFormat::Q8_0)
    }

    /// Bytes of one stored block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlFormat::Q4_0 => 18,
            GgmlFormat::Q4_1 => 20,
            GgmlFormat::Q5_0 => 22,
            GgmlFormat::Q5_1 => 24,
            GgmlFormat::Q8_0 => 34,
            GgmlFormat::Q4K => 144,
            GgmlFormat::Q5K => 176,
            GgmlFormat::Q6K => 210,
        }
    }

    /// The kind its blocks are kept as.
    pub fn kind(self) -> BlockKind {
        match self {
            GgmlFormat::Q4_0 => BlockKind::Q4_0,
            GgmlFormat::Q4_1 | GgmlFormat::Q4K => BlockKind::Q4_1,
            GgmlFormat::Q8_0 | GgmlFormat::Q5_0 => BlockKind::Q8_0,
            GgmlFormat::Q5_1 | GgmlFormat::Q5K => BlockKind::Q8_1,
            GgmlFormat::Q6K => BlockKind::Q8Halves,
        }
    }

    /// Decodes one stored block into 32-value blocks: `(scales, minimum,
    /// quants)` each (the second scale only for [`BlockKind::Q8Halves`]),
    /// the quants as the kind holds them.
    fn decode(self, block: &[u8], out: &mut Vec<([f32; 2], f32, [u8; QK])>) {
        let nibbles = |qs: &[u8], high: &dyn Fn(usize) -> u8| -> [u8; QK] {
            let mut q = [0u8; QK];
            for j in 0..QK / 2 {
                q[j] = (qs[j] & 0x0f) | high(j);
                q[j + QK / 2] = (qs[j] >> 4) | high(j + QK / 2);
            }
            q
        };
        match self {
            GgmlFormat::Q4_0 | GgmlFormat::Q4_1 | GgmlFormat::Q8_0 => {
                let (min, quants) = match self {
                    GgmlFormat::Q4_1 => (f16(&block[2..4]), &block[4..]),
                    _ => (0.0, &block[2..]),
                };
                let mut q = [0u8; QK];
                q[..quants.len()].copy_from_slice(quants);
                out.push(([f16(&block[0..2]), 0.0], min, q));
            }
            GgmlFormat::Q5_0 | GgmlFormat::Q5_1 => {
                let (min, rest) = match self {
                    GgmlFormat::Q5_1 => (f16(&block[2..4]), &block[4..]),
                    _ => (0.0, &block[2..]),
                };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let mut q = nibbles(&rest[4..], &|j| (((qh >> j) & 1) << 4) as u8);
                if self == GgmlFormat::Q5_0 {
                    // (q - 16) · d as a signed 8-bit Q8_0 value.
                    q.iter_mut().for_each(|v| *v = (*v as i8 - 16) as u8);
                }
                out.push(([f16(&block[0..2]), 0.0], min, q));
            }
            GgmlFormat::Q6K => {
                let (ql, qh, scales, d) = (&block[..128], &block[128..192], &block[192..208], f16(&block[208..210]));
                // Two halves of 128 values; in each, value l + 32·k (k = 0..4)
                // takes a nibble of ql and two bits of qh.
                for half in 0..2 {
                    let (ql, qh) = (&ql[half * 64..half * 64 + 64], &qh[half * 32..half * 32 + 32]);
                    let mut values = [0i8; 128];
                    for l in 0..32 {
                        values[l] = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i8 - 32;
                        values[l + 32] = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                        values[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                        values[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                    }
                    for k in 0..4 {
                        let sub = half * 8 + 2 * k;
                        let scale = |j: usize| d * scales[j] as i8 as f32;
                        let mut q = [0u8; QK];
                        q.iter_mut().zip(&values[k * 32..k * 32 + 32]).for_each(|(q, &v)| *q = v as u8);
                        out.push(([scale(sub), scale(sub + 1)], 0.0, q));
                    }
                }
            }
            GgmlFormat::Q4K | GgmlFormat::Q5K => {
                let (d, dmin) = (f16(&block[0..2]), f16(&block[2..4]));
                let scales = &block[4..16];
                let (qh, qs) = match self {
                    GgmlFormat::Q5K => (Some(&block[16..48]), &block[48..176]),
                    _ => (None, &block[16..144]),
                };
                // Four groups of 64 values: the low nibbles of 32 bytes, then their high nibbles.
                for group in 0..4 {
                    let bytes = &qs[group * 32..group * 32 + 32];
                    for half in 0..2 {
                        let (sc, m) = scale_min_k4(2 * group + half, scales);
                        let bit = 1u8 << (2 * group + half);
                        let mut q = [0u8; QK];
                        for (l, &byte) in bytes.iter().enumerate() {
                            let low = if half == 0 { byte & 0x0f } else { byte >> 4 };
                            let high = qh.map_or(0, |qh| if qh[l] & bit != 0 { 16 } else { 0 });
                            q[l] = low + high;
                        }
                        if self == GgmlFormat::Q4K {
                            // The Q4_1 kind packs element j low, j + 16 high.
                            let mut packed = [0u8; QK];
                            for j in 0..QK / 2 {
                                packed[j] = q[j] | (q[j + QK / 2] << 4);
                            }
                            q = packed;
                        }
                        out.push(([d * sc as f32, 0.0], -(dmin * m as f32), q));
                    }
                }
            }
        }
    }
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K / Q5_K block
/// (llama.cpp's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

impl BlockKind {
    /// Bytes of quants per block.
    fn quant_bytes(self) -> usize {
        match self {
            BlockKind::Q4_0 | BlockKind::Q4_1 => QK / 2,
            BlockKind::Q8_0 | BlockKind::Q8_1 | BlockKind::Q8Halves => QK,
        }
    }

    /// Whether its blocks carry a minimum.
    fn has_min(self) -> bool {
        matches!(self, BlockKind::Q4_1 | BlockKind::Q8_1)
    }

    /// How its quants are stored, for the row kernels.
    #[cfg(target_arch = "x86_64")]
    fn quants(self) -> one_row::Quants {
        match self {
            BlockKind::Q4_0 | BlockKind::Q4_1 => one_row::Quants::Nibbles,
            BlockKind::Q8_0 | BlockKind::Q8_1 => one_row::Quants::Bytes,
            BlockKind::Q8Halves => one_row::Quants::Halves,
        }
    }

    /// Scales per 32-value block.
    fn scales_per_block(self) -> usize {
        if self == BlockKind::Q8Halves {
            2
        } else {
            1
        }
    }
}

/// A `[rows, cols]` weight in a block format (`cols` a multiple of 32).
#[derive(Clone, Debug)]
pub struct BlockMatrix {
    /// The format.
    pub kind: BlockKind,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    scales: Factors,
    mins: Factors,
    quants: Vec<u8>,
}

/// Per-block scales or minimums: f16 when the stored format holds them so
/// (Q4_0 to Q8_0: half the bytes of f32, and exact), f32 when they are
/// products (the K-quants' `d·sc`, which f16 cannot hold exactly).
#[derive(Clone, Debug)]
enum Factors {
    Half(Vec<half::f16>),
    Full(Vec<f32>),
}

impl Factors {
    fn zeros(n: usize, half: bool) -> Factors {
        if half {
            Factors::Half(vec![half::f16::ZERO; n])
        } else {
            Factors::Full(vec![0.0; n])
        }
    }

    fn set(&mut self, i: usize, value: f32) {
        match self {
            Factors::Half(v) => v[i] = half::f16::from_f32(value),
            Factors::Full(v) => v[i] = value,
        }
    }

    fn get(&self, i: usize) -> f32 {
        match self {
            Factors::Half(v) => v[i].to_f32(),
            Factors::Full(v) => v[i],
        }
    }

    fn len(&self) -> usize {
        match self {
            Factors::Half(v) => v.len(),
            Factors::Full(v) => v.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Factors::Half(v) => 2 * v.len(),
            Factors::Full(v) => 4 * v.len(),
        }
    }

    /// A pointer to factor `i` (f16 or f32 as stored).
    fn ptr(&self, i: usize) -> *const u8 {
        match self {
            Factors::Half(v) => v[i..].as_ptr() as *const u8,
            Factors::Full(v) => v[i..].as_ptr() as *const u8,
        }
    }

    fn is_half(&self) -> bool {
        matches!(self, Factors::Half(_))
    }
}

/// Factor `i` behind `p`: f16 (`HALF`) or f32.
///
/// # Safety
/// `p` must point at at least `i + 1` factors of that type, and the CPU
/// support F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c")]
#[inline]
unsafe fn load_factor<const HALF: bool>(p: *const u8, i: usize) -> f32 {
    if HALF {
        use std::arch::x86_64::*;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(*(p as *const u16).add(i) as i32)))
    } else {
        *(p as *const f32).add(i)
    }
}

fn f16(bytes: &[u8]) -> f32 {
    half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32()
}

impl BlockMatrix {
    /// A `[rows, cols]` weight from its bytes as llama.cpp stores them in
    /// `format` (see [`Self::read_ggml`]).
    pub fn from_ggml(
        format: GgmlFormat,
        rows: usize,
        cols: usize,
        raw: &[u8],
        order: Option<&[usize]>,
    ) -> Result<BlockMatrix, String> {
        let want = rows * cols / format.block_values() * format.block_bytes();
        if raw.len() != want || !cols.is_multiple_of(format.block_values()) {
            return Err(format!("{} bytes for a [{rows}, {cols}] {format:?} tensor (want {want})", raw.len()));
        }
        Self::read_ggml(format, rows, cols, &mut &raw[..], order)
    }

    /// Reads a GGML tensor's blocks from `reader` (at its first byte)
    /// straight into this layout, one stored row in memory at a time, so
    /// loading a weight never holds a second copy of it. `order[r]` is the
    /// stored row that becomes row `r`.
    pub fn read_ggml(
        format: GgmlFormat,
        rows: usize,
        cols: usize,
        reader: &mut impl std::io::Read,
        order: Option<&[usize]>,
    ) -> Result<BlockMatrix, String> {
        if !cols.is_multiple_of(format.block_values()) {
            return Err(format!("{cols} columns are not whole {format:?} blocks of {}", format.block_values()));
        }
        let kind = format.kind();
        let (per_row, qb) = (cols / QK, kind.quant_bytes());
        let blocks = rows * per_row;
        let mut destination: Vec<usize> = (0..rows).collect();
        if let Some(order) = order {
            if order.len() != rows {
                return Err(format!("a row order of {} rows for a tensor of {rows}", order.len()));
            }
            for (r, &stored) in order.iter().enumerate() {
                *destination.get_mut(stored).ok_or_else(|| format!("row order names row {stored} of {rows}"))? = r;
            }
        }
        let mut m = BlockMatrix {
            kind,
            rows,
            cols,
            scales: Factors::zeros(blocks * kind.scales_per_block(), format.f16_factors()),
            mins: Factors::zeros(if kind.has_min() { blocks } else { 0 }, format.f16_factors()),
            quants: vec![0; blocks * qb],
        };
        let mut row = vec![0u8; cols / format.block_values() * format.block_bytes()];
        let mut decoded = Vec::with_capacity(per_row);
        for (stored, &r) in destination.iter().enumerate() {
            reader
                .read_exact(&mut row)
                .map_err(|e| format!("row {stored} of a [{rows}, {cols}] {format:?} tensor: {e}"))?;
            decoded.clear();
            for block in row.chunks(format.block_bytes()) {
                format.decode(block, &mut decoded);
            }
            let spb = kind.scales_per_block();
            for (b, (scales, min, quants)) in decoded.iter().enumerate() {
                let i = r * per_row + b;
                for (k, &scale) in scales[..spb].iter().enumerate() {
                    m.scales.set(i * spb + k, scale);
                }
                if kind.has_min() {
                    m.mins.set(i, *min);
                }
                m.quants[i * qb..(i + 1) * qb].copy_from_slice(&quants[..qb]);
            }
        }
        Ok(m)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.quants.len() + self.scales.bytes() + self.mins.bytes()
    }

    /// Rows `start..end` as f32, row-major.
    pub fn dequantize_rows(&self, start: usize, end: usize) -> Vec<f32> {
        let per_row = self.cols / QK;
        let qb = self.kind.quant_bytes();
        let mut out = Vec::with_capacity((end - start) * self.cols);
        for b in start * per_row..end * per_row {
            let q = &self.quants[b * qb..(b + 1) * qb];
            let d = self.scales.get(b * self.kind.scales_per_block());
            match self.kind {
                BlockKind::Q8_0 => out.extend(q.iter().map(|&v| v as i8 as f32 * d)),
                BlockKind::Q8Halves => {
                    let halves = [self.scales.get(2 * b), self.scales.get(2 * b + 1)];
                    out.extend(q.iter().enumerate().map(|(j, &v)| v as i8 as f32 * halves[j / 16]));
                }
                BlockKind::Q8_1 => out.extend(q.iter().map(|&v| v as i8 as f32 * d + self.mins.get(b))),
                BlockKind::Q4_0 | BlockKind::Q4_1 => {
                    let (offset, min) = match self.kind {
                        BlockKind::Q4_0 => (8.0, 0.0),
                        _ => (0.0, self.mins.get(b)),
                    };
                    out.extend(q.iter().map(|&v| ((v & 0x0f) as f32 - offset) * d + min));
                    out.extend(q.iter().map(|&v| ((v >> 4) as f32 - offset) * d + min));
                }
            }
        }
        out
    }

    /// `x · Wᵀ` for `rows` rows of `x` (`rows × cols`, f32; a few — it is
    /// the decoding path): `[rows, self.rows]`, row-major.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let activations: Vec<ActivationRow> = x.chunks(self.cols).take(rows).map(ActivationRow::new).collect();
        let mut out = vec![0f32; rows * self.rows];
        let mut by_weight_row = vec![0f32; self.rows * rows];
        let one_row = self.one_row_kernel(rows);
        let work = |first: usize, slot: &mut [f32]| {
            for (i, y) in slot.chunks_mut(rows).enumerate() {
                match one_row {
                    // SAFETY: the kernel is one this CPU runs; the matrix's
                    // rows and the activations hold whole blocks.
                    #[cfg(target_arch = "x86_64")]
                    Some(kernel) => unsafe { self.dot_row_each(kernel, first + i, &activations, y) },
                    _ => self.dot_row_best(first + i, &activations, y),
                }
            }
        };
        if self.rows * self.cols * rows < PARALLEL_MIN_PRODUCTS {
            // Small: handing it to the pool (a wake-up and a wait) costs more than it saves.
            work(0, &mut by_weight_row);
        } else {
            // One task per thread, a chunk of weight rows for every activation row.
            let chunk = self.rows.div_ceil(rayon::current_num_threads()).max(1);
            by_weight_row.par_chunks_mut(chunk * rows).enumerate().for_each(|(c, slot)| work(c * chunk, slot));
        }
        for (o, ys) in by_weight_row.chunks(rows).enumerate() {
            for (r, &v) in ys.iter().enumerate() {
                out[r * self.rows + o] = v;
            }
        }
        out
    }

    fn dot_row_best(&self, row: usize, xs: &[ActivationRow], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: AVX2, FMA and F16C were just detected.
            return unsafe {
                match (self.kind, self.scales.is_half()) {
                    (BlockKind::Q8Halves, _) => match one_row::best(self.kind.quants(), self.scales.is_half()) {
                        Some(kernel) => self.dot_row_each(kernel, row, xs, out),
                        None => self.dot_row(row, xs, out),
                    },
                    (_, false) => self.dot_row_avx2::<false>(row, xs, out),
                    (_, true) => self.dot_row_avx2::<true>(row, xs, out),
                }
            };
        }
        self.dot_row(row, xs, out)
    }

    /// [`Self::dot_row`] in AVX2 and FMA, on the activations in 16 bits:
    /// per block the quants widened to 16 bits meet the activations'
    /// 16-bit values in `vpmaddwd` (32-bit sums, exact), and the block's
    /// sum, scaled by the two scales, joins an f32 accumulator.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_row_avx2<const HALF: bool>(&self, row: usize, xs: &[ActivationRow], out: &mut [f32]) {
        use std::arch::x86_64::*;
        let RowBlocks { first, per_row, qb, quants, scales, .. } = self.row_blocks(row);
        for (xs, out) in xs.chunks(ROWS_AT_ONCE).zip(out.chunks_mut(ROWS_AT_ONCE)) {
            for x in xs {
                assert!(x.quants.len() >= per_row * QK && x.scales.len() >= per_row && x.sums.len() >= per_row);
            }
            // Four accumulators per activation row, one per block in turn
            // (one alone would wait on the previous block's FMA); each
            // block's quants are widened once for all the rows.
            let mut accs = [_mm256_setzero_ps(); 4 * ROWS_AT_ONCE];
            for b in 0..per_row {
                let (w0, w1) = widen(self.kind, quants.add(b * qb));
                let d = load_factor::<HALF>(scales, b);
                for (r, x) in xs.iter().enumerate() {
                    let xq = x.quants.as_ptr().add(b * QK);
                    let x0 = _mm256_loadu_si256(xq as *const __m256i);
                    let x1 = _mm256_loadu_si256(xq.add(16) as *const __m256i);
                    let sums = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
                    let scale = _mm256_set1_ps(d * *x.scales.get_unchecked(b));
                    let k = r * 4 + b % 4;
                    accs[k] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), accs[k]);
                }
            }
            for (r, (x, y)) in xs.iter().zip(out.iter_mut()).enumerate() {
                *y = sum_lanes(&accs[r * 4..r * 4 + 4]) + self.offsets_avx2::<HALF>(first, per_row, x);
            }
        }
    }

    /// The row kernel for a product of `rows` activation rows, when each
    /// runs alone: one row (decoding a sequence), or any count for
    /// [`BlockKind::Q8Halves`] (whose multi-row loop has no vector copy);
    /// `None` for the shared-widening loop of [`Self::dot_row_best`].
    fn one_row_kernel(&self, rows: usize) -> Option<OneRowKernel> {
        #[cfg(target_arch = "x86_64")]
        if rows == 1 || self.kind == BlockKind::Q8Halves {
            return one_row::best(self.kind.quants(), self.scales.is_half());
        }
        let _ = rows;
        None
    }

    /// `out[r] = W[row] · x[r]` by `kernel`, one activation row at a time.
    ///
    /// # Safety
    /// `kernel` must be one [`one_row::best`] chose for this matrix on this
    /// CPU (so AVX2, FMA and F16C are present).
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_row_each(&self, kernel: OneRowKernel, row: usize, xs: &[ActivationRow], out: &mut [f32]) {
        let blocks = self.row_blocks(row);
        if row + PREFETCH_ROWS < self.rows {
            self.prefetch_row(row + PREFETCH_ROWS);
        }
        for (x, y) in xs.iter().zip(out.iter_mut()) {
            *y = kernel(&blocks, x);
        }
    }

    /// Asks the CPU to bring weight row `row`'s quants, scales and
    /// minimums into cache (three streams the hardware prefetcher follows
    /// too late: a row kernel otherwise waits on its first loads).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn prefetch_row(&self, row: usize) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let per_row = self.cols / QK;
        let (qb, spb) = (self.kind.quant_bytes(), self.kind.scales_per_block());
        let quants = &self.quants[row * per_row * qb..(row + 1) * per_row * qb];
        let lines = |start: *const u8, bytes: usize| {
            for offset in (0..bytes).step_by(64) {
                // SAFETY: prefetching reads nothing; the addresses are in the arrays.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(offset) as *const i8) };
            }
        };
        lines(quants.as_ptr(), quants.len());
        let factor_bytes = if self.scales.is_half() { 2 } else { 4 };
        lines(self.scales.ptr(row * per_row * spb), per_row * spb * factor_bytes);
        if self.kind.has_min() {
            lines(self.mins.ptr(row * per_row), per_row * factor_bytes);
        }
    }

    /// [`Self::offsets`] eight blocks at a time: the factors (converted
    /// from f16 by F16C when `HALF`) meet the activation sums in one FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `first + per_row` blocks
    /// must be in range and `x` hold `per_row` sums.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn offsets_avx2<const HALF: bool>(&self, first: usize, per_row: usize, x: &ActivationRow) -> f32 {
        use std::arch::x86_64::*;
        let Some((factors, factor)) = self.offset_factors() else { return 0.0 };
        assert!(factors.len() >= first + per_row && x.sums.len() >= per_row);
        let p = factors.ptr(first);
        let mut acc = _mm256_setzero_ps();
        let mut b = 0;
        while b + 8 <= per_row {
            let m = if HALF {
                _mm256_cvtph_ps(_mm_loadu_si128((p as *const u16).add(b) as *const __m128i))
            } else {
                _mm256_loadu_ps((p as *const f32).add(b))
            };
            acc = _mm256_fmadd_ps(m, _mm256_loadu_ps(x.sums.as_ptr().add(b)), acc);
            b += 8;
        }
        let zero = _mm256_setzero_ps();
        let mut total = sum_lanes(&[acc, zero, zero, zero]);
        while b < per_row {
            total += load_factor::<HALF>(p, b) * x.sums[b];
            b += 1;
        }
        total * factor
    }

    /// Where weight row `row`'s blocks are, checked against the arrays'
    /// lengths (the kernels read through these pointers). Inlined: it runs
    /// once per weight row, and as a call it was 5% of a decoding profile.
    #[inline(always)]
    fn row_blocks(&self, row: usize) -> RowBlocks {
        let per_row = self.cols / QK;
        let first = row * per_row;
        let (qb, spb) = (self.kind.quant_bytes(), self.kind.scales_per_block());
        assert!(self.quants.len() >= (first + per_row) * qb && self.scales.len() >= (first + per_row) * spb);
        assert!(!self.kind.has_min() || self.mins.len() >= first + per_row);
        let (offsets, offset_factor) = match self.offset_factors() {
            Some((factors, factor)) => {
                assert!(factors.len() >= first + per_row && factors.is_half() == self.scales.is_half());
                (factors.ptr(first), factor)
            }
            None => (std::ptr::null(), 0.0),
        };
        RowBlocks {
            first,
            per_row,
            qb,
            quants: self.quants[first * qb..].as_ptr(),
            scales: self.scales.ptr(first * spb),
            offsets,
            offset_factor,
        }
    }

    /// What the blocks' offsets multiply each activation block's sum by:
    /// the minimums (Q4_1, Q8_1, factor 1) or Q4_0's scales (factor −8);
    /// `None` for kinds without offsets.
    fn offset_factors(&self) -> Option<(&Factors, f32)> {
        match self.kind {
            BlockKind::Q8_0 | BlockKind::Q8Halves => None,
            BlockKind::Q4_0 => Some((&self.scales, -8.0)),
            BlockKind::Q4_1 | BlockKind::Q8_1 => Some((&self.mins, 1.0)),
        }
    }

    /// The blocks' offsets of weight row from block `first` for `x`
    /// (`Σ min·Σx` for Q4_1 and Q8_1, `-8·Σ d·Σx` for Q4_0), summed apart
    /// from the products: in their loop they would chain every block on
    /// one scalar.
    fn offsets(&self, first: usize, per_row: usize, x: &ActivationRow) -> f32 {
        let Some((factors, factor)) = self.offset_factors() else { return 0.0 };
        let mut lanes = [0f32; 8];
        for (i, s) in x.sums.iter().take(per_row).enumerate() {
            lanes[i % 8] += factors.get(first + i) * s;
        }
        lanes.iter().sum::<f32>() * factor
    }

    /// `out[r] = W[row] · x[r]` for every activation row.
    #[inline(always)]
    fn dot_row(&self, row: usize, xs: &[ActivationRow], out: &mut [f32]) {
        let per_row = self.cols / QK;
        let qb = self.kind.quant_bytes();
        let first = row * per_row;
        for (x, y) in xs.iter().zip(out.iter_mut()) {
            let mut sum = 0f32;
            for b in 0..per_row {
                let q: &[u8] = &self.quants[(first + b) * qb..(first + b + 1) * qb];
                let xb: &[i16; QK] = x.quants[b * QK..(b + 1) * QK].try_into().expect("a whole block");
                let scaled = |scale: f32, products: i32| scale * x.scales[b] * products as f32;
                sum += match self.kind {
                    BlockKind::Q8Halves => (0..2)
                        .map(|h| {
                            let products = (h * 16..h * 16 + 16).map(|j| q[j] as i8 as i32 * xb[j] as i32).sum();
                            scaled(self.scales.get(2 * (first + b) + h), products)
                        })
                        .sum(),
                    BlockKind::Q8_0 | BlockKind::Q8_1 => {
                        scaled(self.scales.get(first + b), dot_i8(q.try_into().expect("32 bytes"), xb))
                    }
                    BlockKind::Q4_0 | BlockKind::Q4_1 => {
                        scaled(self.scales.get(first + b), dot_nibbles(q.try_into().expect("16 bytes"), xb))
                    }
                };
            }
            *y = sum + self.offsets(first, per_row, x);
        }
    }
}

/// A row kernel ([`one_row`]); a stand-in type where there are none.
#[cfg(target_arch = "x86_64")]
type OneRowKernel = one_row::RowKernel;
#[cfg(not(target_arch = "x86_64"))]
type OneRowKernel = std::convert::Infallible;

/// A weight row's blocks: the first block's index, blocks per row, quant
/// bytes per block, and pointers to its first quant and scale.
#[derive(Copy, Clone)]
struct RowBlocks {
    first: usize,
    per_row: usize,
    qb: usize,
    quants: *const u8,
    /// f16 or f32, as the matrix stores them.
    scales: *const u8,
    /// The factors of the blocks' offsets ([`BlockMatrix::offset_factors`],
    /// stored as the scales are), null for kinds without offsets.
    offsets: *const u8,
    /// What the offsets' sum is multiplied by.
    offset_factor: f32,
}

/// One block's 32 quants widened to 16-bit integers (two 16-lane vectors,
/// elements 0..16 and 16..32).
///
/// # Safety
/// The CPU must support AVX2, and `q` point at a whole block's quants.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen(kind: BlockKind, q: *const u8) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
    use std::arch::x86_64::*;
    match kind {
        BlockKind::Q8_0 | BlockKind::Q8_1 | BlockKind::Q8Halves => (
            _mm256_cvtepi8_epi16(_mm_loadu_si128(q as *const __m128i)),
            _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(16) as *const __m128i)),
        ),
        BlockKind::Q4_0 | BlockKind::Q4_1 => {
            let nibbles = _mm_set1_epi8(0x0f);
            let packed = _mm_loadu_si128(q as *const __m128i);
            (
                _mm256_cvtepu8_epi16(_mm_and_si128(packed, nibbles)),
                _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), nibbles)),
            )
        }
    }
}

/// The sum of every lane of four 8-lane accumulators.
///
/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn sum_lanes(accs: &[std::arch::x86_64::__m256]) -> f32 {
    use std::arch::x86_64::*;
    let acc = _mm256_add_ps(_mm256_add_ps(accs[0], accs[1]), _mm256_add_ps(accs[2], accs[3]));
    let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)))
}

/// `Σ q[i] · x[i]` over 32 signed bytes and 16-bit activations (exact).
#[inline(always)]
fn dot_i8(q: &[u8; QK], x: &[i16; QK]) -> i32 {
    q.iter().zip(x).map(|(&q, &x)| q as i8 as i32 * x as i32).sum()
}

/// `Σ n[i] · x[i]` over 32 nibbles (byte `j`: element `j` low, `j + 16`
/// high) and 16-bit activations (exact).
#[inline(always)]
fn dot_nibbles(q: &[u8; QK / 2], x: &[i16; QK]) -> i32 {
    (0..QK / 2).map(|j| (q[j] & 0x0f) as i32 * x[j] as i32 + (q[j] >> 4) as i32 * x[j + 16] as i32).sum()
}

/// A row of activations in 16 bits per block (`x ≈ q · scale`, `scale = amax / 32767`: a relative error of
/// 2^-15 of the block's largest value; int8, as llama.cpp uses, loses 2^-7
/// and visibly changed SmolLM2's answers), with each block's f32 sum (for
/// the blocks' offsets).
struct ActivationRow {
    quants: Vec<i16>,
    scales: Vec<f32>,
    sums: Vec<f32>,
}

impl ActivationRow {
    /// Each block of `x` scaled to ±32767 and rounded (to even), with its
    /// scale and its values' sum.
    fn new(x: &[f32]) -> ActivationRow {
        let blocks = x.len().div_ceil(QK);
        let mut row = ActivationRow { quants: vec![0; x.len()], scales: vec![0.0; blocks], sums: vec![0.0; blocks] };
        crate::vector::quantize_blocks_i16(x, QK, &mut row.quants, &mut row.scales, &mut row.sums);
        row
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format_of(kind: BlockKind) -> GgmlFormat {
        match kind {
            BlockKind::Q4_0 => GgmlFormat::Q4_0,
            BlockKind::Q4_1 => GgmlFormat::Q4_1,
            _ => GgmlFormat::Q8_0,
        }
    }

    #[test]
    fn five_bit_and_k_quant_blocks_hold_exactly_what_llama_cpp_dequantises() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        // 4 rows of 512 values: two 256-value super-blocks per row.
        let (rows, cols) = (4, 512);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3).collect();
        let dense = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap();
        let x: Vec<f32> = (0..2 * cols).map(|i| (i * 104_729 % 997) as f32 / 498.0 - 1.0).collect();
        for (dtype, format) in [
            (GgmlDType::Q5_0, GgmlFormat::Q5_0),
            (GgmlDType::Q5_1, GgmlFormat::Q5_1),
            (GgmlDType::Q4K, GgmlFormat::Q4K),
            (GgmlDType::Q5K, GgmlFormat::Q5K),
            (GgmlDType::Q6K, GgmlFormat::Q6K),
        ] {
            let q = QTensor::quantize(&dense, dtype).unwrap();
            let want: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let m = BlockMatrix::from_ggml(format, rows, cols, &q.data().unwrap(), None).unwrap();
            assert_eq!(m.dequantize_rows(0, rows), want, "{format:?}: every value as candle's ggml dequantises it");
            let y = m.matmul(&x, 2);
            for r in 0..2 {
                for o in 0..rows {
                    let exact: f32 = (0..cols).map(|i| want[o * cols + i] * x[r * cols + i]).sum();
                    let scale: f32 = (0..cols).map(|i| (want[o * cols + i] * x[r * cols + i]).abs()).sum();
                    let got = y[r * rows + o];
                    assert!((got - exact).abs() <= 1e-4 * scale + 1e-6, "{format:?} [{r}, {o}]: {got} vs {exact}");
                }
            }
        }
        // Q6_K's halves: the portable path gives what the vector one gives.
        let q = QTensor::quantize(&dense, GgmlDType::Q6K).unwrap();
        let m = BlockMatrix::from_ggml(GgmlFormat::Q6K, rows, cols, &q.data().unwrap(), None).unwrap();
        let acts: Vec<ActivationRow> = x.chunks(cols).map(ActivationRow::new).collect();
        for o in 0..rows {
            let (mut best, mut portable) = ([0f32; 2], [0f32; 2]);
            m.dot_row_best(o, &acts, &mut best);
            m.dot_row(o, &acts, &mut portable);
            for (a, b) in best.iter().zip(&portable) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "row {o}: {a} vs {b}");
            }
        }
        let short = BlockMatrix::from_ggml(GgmlFormat::Q4K, 1, 32, &[0; 20], None).unwrap_err();
        assert!(short.contains("Q4K"), "{short}");
    }

    /// llama.cpp's bytes of one row of `values` in `kind` (a reference
    /// quantiser, for the tests).
    fn ggml_bytes(kind: BlockKind, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for block in values.chunks(QK) {
            match kind {
                BlockKind::Q8_0 | BlockKind::Q8_1 | BlockKind::Q8Halves => {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    out.extend(half::f16::from_f32(d).to_le_bytes());
                    out.extend(block.iter().map(|&v| (v / d).round() as i8 as u8));
                }
                BlockKind::Q4_0 | BlockKind::Q4_1 => {
                    let (lo, hi) = block.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                    let (d, min) = match kind {
                        BlockKind::Q4_0 => (hi.abs().max(lo.abs()) / 7.0, 0.0),
                        _ => ((hi - lo) / 15.0, lo),
                    };
                    out.extend(half::f16::from_f32(d).to_le_bytes());
                    if kind == BlockKind::Q4_1 {
                        out.extend(half::f16::from_f32(min).to_le_bytes());
                    }
                    let offset = if kind == BlockKind::Q4_0 { 8.0 } else { 0.0 };
                    let q = |v: f32| (((v - min) / d + offset).round().clamp(0.0, 15.0)) as u8;
                    out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
                }
            }
        }
        out
    }

    #[test]
    fn integer_dots_match_the_dequantised_product() {
        // Large enough (700 × 96 × 3 products) to be split across threads.
        let (rows, cols) = (700, 96);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3).collect();
        let x: Vec<f32> = (0..3 * cols).map(|i| (i * 104_729 % 997) as f32 / 498.0 - 1.0).collect();
        for kind in [BlockKind::Q4_0, BlockKind::Q4_1, BlockKind::Q8_0] {
            let raw: Vec<u8> = w.chunks(cols).flat_map(|r| ggml_bytes(kind, r)).collect();
            let m = BlockMatrix::from_ggml(format_of(kind), rows, cols, &raw, None).unwrap();
            let dense = m.dequantize_rows(0, rows);
            // Dequantised values sit within a step of the originals.
            let step = if kind == BlockKind::Q8_0 { 0.003 } else { 0.05 };
            assert!(dense.iter().zip(&w).all(|(a, b)| (a - b).abs() < step), "{kind:?}");
            let y = m.matmul(&x, 3);
            for r in 0..3 {
                for o in 0..rows {
                    let exact: f32 = (0..cols).map(|i| dense[o * cols + i] * x[r * cols + i]).sum();
                    let got = y[r * rows + o];
                    // 16-bit activations: within 1e-4 of the products' magnitude.
                    let scale: f32 = (0..cols).map(|i| (dense[o * cols + i] * x[r * cols + i]).abs()).sum();
                    assert!((got - exact).abs() <= 1e-4 * scale + 1e-6, "{kind:?} [{r}, {o}]: {got} vs {exact}");
                }
            }
        }
        // The portable path (CPUs without AVX2) gives what the vector one gives.
        let raw: Vec<u8> = w.chunks(cols).flat_map(|r| ggml_bytes(BlockKind::Q4_1, r)).collect();
        let m = BlockMatrix::from_ggml(GgmlFormat::Q4_1, rows, cols, &raw, None).unwrap();
        let acts: Vec<ActivationRow> = x.chunks(cols).map(ActivationRow::new).collect();
        for o in [0, 1, rows - 1] {
            let (mut best, mut portable) = ([0f32; 3], [0f32; 3]);
            m.dot_row_best(o, &acts, &mut best);
            m.dot_row(o, &acts, &mut portable);
            for (a, b) in best.iter().zip(&portable) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "row {o}: {a} vs {b}");
            }
        }
        // Rows taken in another order.
        let raw: Vec<u8> = w.chunks(cols).flat_map(|r| ggml_bytes(BlockKind::Q8_0, r)).collect();
        let order: Vec<usize> = (0..rows).rev().collect();
        let flipped = BlockMatrix::from_ggml(GgmlFormat::Q8_0, rows, cols, &raw, Some(&order)).unwrap();
        let plain = BlockMatrix::from_ggml(GgmlFormat::Q8_0, rows, cols, &raw, None).unwrap();
        assert_eq!(flipped.dequantize_rows(0, 1), plain.dequantize_rows(rows - 1, rows));
    }
}
