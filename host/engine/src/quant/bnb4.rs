//! bitsandbytes' 4-bit weights (NF4 and FP4), as transformers + bitsandbytes
//! store them and as QLoRA computes with them: quantising (exactly as
//! bitsandbytes 0.50 does on the CPU, so the codes and scales match),
//! the on-disk parts, and dequantisation.
//!
//! Layout: element `2p` of the row-major weight is the high nibble of byte
//! `p`, element `2p+1` the low one; blocks of `blocksize` (64) elements
//! share `absmax[block]` and `w = code[nibble] · absmax[block]`. With
//! double quantisation the scales themselves are stored in 8 bits:
//! `absmax[i] = dynamic[absmax_u8[i]] · nested_absmax[i / 256] + offset`,
//! `offset` being the mean of the scales.

/// bitsandbytes' NF4 code (`get_4bit_type("nf4")`).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' FP4 code (`get_4bit_type("fp4")`: e2m1 values over 12).
pub const FP4: [f32; 16] = [
    0.0,
    0.005_208_333,
    0.666_666_7,
    1.0,
    0.333_333_34,
    0.5,
    0.166_666_67,
    0.25,
    -0.0,
    -0.005_208_333,
    -0.666_666_7,
    -1.0,
    -0.333_333_34,
    -0.5,
    -0.166_666_67,
    -0.25,
];

/// bitsandbytes' signed dynamic 8-bit code (`create_dynamic_map(signed=True)`),
/// which double quantisation stores the scales in: its float32 bit
/// patterns, as bitsandbytes 0.50 writes them (`nested_quant_map`).
const DYNAMIC_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000, 0xbf616666,
    0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000,
    0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a,
    0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333,
    0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, 0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a,
    0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999,
    0xbe6f3333, 0xbe60cccd, 0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000,
    0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d, 0xbd5b851f,
    0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15,
    0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418, 0xbc0ccccd,
    0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a,
    0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d, 0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01,
    0xb9c7e283, 0xb98ce705, 0xb923d70b, 0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94,
    0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b,
    0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b,
    0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3, 0x3c8b851f,
    0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148, 0x3d166667, 0x3d21eb85, 0x3d2d70a3,
    0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d,
    0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667,
    0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000,
    0x3e526666, 0x3e60cccd, 0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc,
    0x3eaa0000, 0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a, 0x3f123334,
    0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666, 0x3f2f0000, 0x3f32999a,
    0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000,
    0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666,
    0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The signed dynamic 8-bit code as floats.
pub fn dynamic_code() -> [f32; 256] {
    DYNAMIC_BITS.map(f32::from_bits)
}

/// Elements that share a 4-bit scale.
pub const BLOCKSIZE: usize = 64;
/// Scales that share a nested (8-bit) scale.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Which 4-bit code.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Bnb4Type {
    /// NormalFloat 4 (QLoRA's).
    Nf4,
    /// 4-bit float (e2m1).
    Fp4,
}

impl Bnb4Type {
    /// `nf4` or `fp4`.
    pub fn parse(name: &str) -> Option<Bnb4Type> {
        match name {
            "nf4" => Some(Bnb4Type::Nf4),
            "fp4" => Some(Bnb4Type::Fp4),
            _ => None,
        }
    }

    /// The 16 values a code stands for.
    pub fn code(self) -> [f32; 16] {
        match self {
            Bnb4Type::Nf4 => NF4,
            Bnb4Type::Fp4 => FP4,
        }
    }

    /// `nf4` or `fp4`.
    pub fn as_str(self) -> &'static str {
        match self {
            Bnb4Type::Nf4 => "nf4",
            Bnb4Type::Fp4 => "fp4",
        }
    }
}

/// The block scales of a 4-bit weight.
#[derive(Clone, Debug, PartialEq)]
pub enum Scales {
    /// One float32 per block.
    Plain(Vec<f32>),
    /// Double quantisation: one byte per block in the dynamic code, one
    /// float32 per 256 blocks, and the mean of the scales.
    Nested {
        /// The scales' 8-bit codes.
        codes: Vec<u8>,
        /// One scale per `nested_blocksize` scales.
        nested_absmax: Vec<f32>,
        /// The 256 values of the 8-bit code.
        nested_code: Vec<f32>,
        /// Scales per nested scale.
        nested_blocksize: usize,
        /// Added back to every scale.
        offset: f32,
    },
}

impl Scales {
    /// One float32 scale per block.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Scales::Plain(s) => s.clone(),
            Scales::Nested { codes, nested_absmax, nested_code, nested_blocksize, offset } => codes
                .iter()
                .enumerate()
                .map(|(i, &c)| {
                    let scale = nested_absmax.get(i / nested_blocksize).copied().unwrap_or(0.0);
                    nested_code.get(c as usize).copied().unwrap_or(0.0) * scale + offset
                })
                .collect(),
        }
    }
}

/// A 4-bit weight in bitsandbytes' parts.
#[derive(Clone, Debug, PartialEq)]
pub struct Bnb4Parts {
    /// NF4 or FP4.
    pub kind: Bnb4Type,
    /// The weight's shape (`[out, in]`).
    pub shape: Vec<usize>,
    /// Elements per scale.
    pub blocksize: usize,
    /// Two codes per byte, high nibble first.
    pub packed: Vec<u8>,
    /// The 16 values of the code (as stored; bitsandbytes' table).
    pub code: [f32; 16],
    /// The block scales.
    pub scales: Scales,
}

/// Lanes of the vectors PyTorch's CPU sum accumulates in (AVX2 floats).
const LANES: usize = 8;

/// `N` interleaved running sums (element `i·N + k` into sum `k`) of
/// `size · N` elements, in the order of PyTorch's `multi_row_sum`: a
/// cascade of 4 levels, each flushed into the next every `2^power`
/// elements, which keeps rounding low on long rows.
fn multi_row_sum<const N: usize, A: Copy + Default + std::ops::AddAssign>(
    load: impl Fn(usize) -> A,
    size: usize,
) -> [A; N] {
    const LEVELS: usize = 4;
    let ceil_log2 = if size <= 1 { 0 } else { usize::BITS - (size - 1).leading_zeros() } as usize;
    let power = (ceil_log2 / LEVELS).max(4);
    let step = 1usize << power;
    let mut acc = [[A::default(); N]; LEVELS];
    let mut i = 0;
    while i + step <= size {
        for _ in 0..step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                *a += load(i * N + k);
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..N {
                let lower = acc[j - 1][k];
                acc[j][k] += lower;
                acc[j - 1][k] = A::default();
            }
            if i & ((step - 1) << (j * power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            *a += load(i * N + k);
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..N {
            let upper = acc[j][k];
            acc[0][k] += upper;
        }
    }
    acc[0]
}

/// PyTorch's `row_sum`: 4 interleaved sums, the leftover elements added
/// to the first, then the four added in order.
fn row_sum<A: Copy + Default + std::ops::AddAssign>(load: impl Fn(usize) -> A, size: usize) -> A {
    let whole = size / 4;
    let mut partial = multi_row_sum::<4, A>(&load, whole);
    for i in whole * 4..size {
        partial[0] += load(i);
    }
    let mut sum = partial[0];
    for p in &partial[1..] {
        sum += *p;
    }
    sum
}

/// 8 float lanes added lane by lane.
#[derive(Copy, Clone, Default)]
struct Lanes([f32; LANES]);

impl std::ops::AddAssign for Lanes {
    fn add_assign(&mut self, other: Lanes) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }
}

/// The float32 sum of `values` as PyTorch computes it on the CPU (its
/// vectorised inner sum: 8-lane vectors summed by [`row_sum`], the lanes
/// then added in order, then the tail): bitsandbytes' double
/// quantisation takes the scales' mean this way, so the stored offset
/// matches to the bit.
fn torch_sum_f32(values: &[f32]) -> f32 {
    let vectors = values.len() / LANES;
    let load = |v: usize| {
        let mut lanes = [0f32; LANES];
        lanes.copy_from_slice(&values[v * LANES..(v + 1) * LANES]);
        Lanes(lanes)
    };
    let summed = row_sum(load, vectors);
    let mut total = summed.0.iter().fold(0f32, |s, &x| s + x);
    let tail = &values[vectors * LANES..];
    total += row_sum(|i| tail[i], tail.len());
    total
}

/// Blockwise 4-bit quantisation as bitsandbytes' `quantize_4bit` does it
/// (its PyTorch kernel, which the CPU uses): each value times the
/// reciprocal of its block's absmax, clamped to [-1, 1], then bucketed by
/// the midpoints of the sorted code (a value on a midpoint goes below).
/// The codes (indices into `code`) and the per-block scales.
fn quantize_4bit(values: &[f32], code: &[f32; 16]) -> (Vec<u8>, Vec<f32>) {
    let mut order: Vec<usize> = (0..16).collect();
    // A stable sort: FP4's 0.0 and -0.0 compare equal and keep their order.
    order.sort_by(|&a, &b| code[a].partial_cmp(&code[b]).expect("a finite code"));
    let midpoints: Vec<f32> = order.windows(2).map(|w| (code[w[0]] + code[w[1]]) / 2.0).collect();
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len().div_ceil(BLOCKSIZE));
    for block in values.chunks(BLOCKSIZE) {
        let absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        scales.push(absmax);
        let inverse = 1.0 / absmax.max(1e-38);
        for &v in block {
            let scaled = (v * inverse).clamp(-1.0, 1.0);
            codes.push(order[midpoints.partition_point(|&m| m < scaled)] as u8);
        }
    }
    (codes, scales)
}

/// Bins of the lookup table bitsandbytes' CPU quantiser maps [-1, 1] to.
const LUT_BINS: usize = 65536;

/// Blockwise 8-bit quantisation to a sorted 256-entry `code` as
/// bitsandbytes' CPU kernel (`quantize_cpu`, 0.50) does it: [-1, 1] cut
/// into 65536 bins, each bin mapped to the code entry nearest its value
/// (by the midpoints between entries), a value times the reciprocal of its
/// block's absmax looked up by its bin. The codes and the per-block scales.
fn quantize_blockwise_8bit(values: &[f32], code: &[f32; 256], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let midpoints: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let mut lut = vec![0u8; LUT_BINS];
    let mut entry = 0;
    for (i, slot) in lut.iter_mut().enumerate() {
        let value = -1.0f32 + (2.0f32 * i as f32) / (LUT_BINS - 1) as f32;
        while entry < 255 && midpoints[entry] < value {
            entry += 1;
        }
        *slot = entry as u8;
    }
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len().div_ceil(blocksize));
    for block in values.chunks(blocksize) {
        let absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        scales.push(absmax);
        if absmax == 0.0 {
            codes.extend(std::iter::repeat_n(0, block.len()));
            continue;
        }
        let inverse = 1.0 / absmax;
        for &v in block {
            let normed = (v * inverse).clamp(-1.0, 1.0);
            let bin = ((normed + 1.0) * 0.5 * (LUT_BINS - 1) as f32 + 0.5) as u16;
            codes.push(lut[bin as usize]);
        }
    }
    (codes, scales)
}

/// Quantises a weight (row-major `values` of `shape`) to 4 bits as
/// bitsandbytes' `quantize_4bit` does (blocks of 64; with `double_quant`,
/// the scales in 8 bits as `compress_statistics=True` stores them).
pub fn quantize(values: &[f32], shape: &[usize], kind: Bnb4Type, double_quant: bool) -> Bnb4Parts {
    let code = kind.code();
    let (codes, absmax) = quantize_4bit(values, &code);
    let packed = codes.chunks(2).map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0)).collect();
    let scales = if double_quant {
        // bitsandbytes subtracts the scales' mean, then quantises them
        // blockwise (256) to the signed dynamic code.
        let offset = torch_sum_f32(&absmax) / absmax.len().max(1) as f32;
        let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let nested_code = dynamic_code();
        let (codes, nested_absmax) = quantize_blockwise_8bit(&centered, &nested_code, NESTED_BLOCKSIZE);
        Scales::Nested {
            codes,
            nested_absmax,
            nested_code: nested_code.to_vec(),
            nested_blocksize: NESTED_BLOCKSIZE,
            offset,
        }
    } else {
        Scales::Plain(absmax)
    };
    Bnb4Parts { kind, shape: shape.to_vec(), blocksize: BLOCKSIZE, packed, code, scales }
}

/// A 4-bit weight as oxtune computes with it: the packed codes and one
/// float32 scale per block (the nested scales resolved once, at load).
#[derive(Clone, Debug)]
pub struct Bnb4Weight {
    /// NF4 or FP4.
    pub kind: Bnb4Type,
    /// Output features (rows).
    pub rows: usize,
    /// Input features (columns).
    pub cols: usize,
    blocksize: usize,
    packed: Vec<u8>,
    code: [f32; 16],
    absmax: Vec<f32>,
}

impl Bnb4Weight {
    /// The weight of `parts` (a `[out, in]` matrix); an error when the
    /// parts do not hold as many codes and scales as its shape needs.
    pub fn new(parts: &Bnb4Parts) -> Result<Bnb4Weight, String> {
        let [rows, cols] = parts.shape[..] else {
            return Err(format!("a 4-bit weight must be a matrix, not {:?}", parts.shape));
        };
        let count = rows * cols;
        let absmax = parts.scales.to_f32();
        if parts.packed.len() * 2 < count || absmax.len() < count.div_ceil(parts.blocksize.max(1)) {
            return Err(format!(
                "{} codes and {} scales do not make a [{rows}, {cols}] weight",
                parts.packed.len() * 2,
                absmax.len()
            ));
        }
        Ok(Bnb4Weight {
            kind: parts.kind,
            rows,
            cols,
            blocksize: parts.blocksize,
            packed: parts.packed.clone(),
            code: parts.code,
            absmax,
        })
    }

    /// Bytes held (codes and scales).
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.absmax.len() * 4
    }

    /// Rows `start..end` dequantised, row-major.
    pub fn dequantize_rows(&self, start: usize, end: usize) -> Vec<f32> {
        (start * self.cols..end * self.cols)
            .map(|i| {
                let byte = self.packed[i / 2];
                let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
                self.code[nibble as usize] * self.absmax[i / self.blocksize]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_bitsandbytes_own() {
        let dynamic = dynamic_code();
        assert_eq!((dynamic[0], dynamic[127], dynamic[255]), (-0.992_968_75, 0.0, 1.0));
        assert!(dynamic.windows(2).all(|w| w[0] <= w[1]), "sorted");
        assert_eq!(FP4[3], 1.0);
        assert_eq!(NF4[7], 0.0);
    }

    #[test]
    fn quantising_then_dequantising_keeps_values_within_a_code_step() {
        let values: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
        for kind in [Bnb4Type::Nf4, Bnb4Type::Fp4] {
            for double in [false, true] {
                let parts = quantize(&values, &[4, 64], kind, double);
                let weight = Bnb4Weight::new(&parts).unwrap();
                let back = weight.dequantize_rows(0, 4);
                for (block, (v, b)) in values.chunks(64).zip(back.chunks(64)).enumerate() {
                    let absmax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                    for (x, y) in v.iter().zip(b) {
                        // The widest gap between neighbouring codes is 1/3 (FP4), so half of it bounds the error.
                        assert!((x - y).abs() <= absmax * 0.17 + 1e-3, "{kind:?} {double} block {block}: {x} -> {y}");
                    }
                }
                assert_eq!(weight.bytes(), 128 + 4 * 4);
            }
        }
    }
}
