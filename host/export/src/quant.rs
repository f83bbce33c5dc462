//! The `--quant-type`s of a GGUF export and which ggml type each tensor
//! gets under them, following llama.cpp's `llama-quantize` rules
//! (`llama_tensor_get_type` in `src/llama-quant.cpp`): 1-D tensors stay
//! F32; the `_M` mixes give the output head and some `attn_v` /
//! `ffn_down` layers Q6_K; rows whose length is not a multiple of a
//! K-quant's 256-value super-block fall back to the legacy type llama.cpp
//! picks.

use std::fmt;
use std::str::FromStr;

use candle_core::quantized::GgmlDType;

/// The file types `oxtune export --to-gguf --quant-type` writes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum QuantType {
    /// Every tensor F32.
    F32,
    /// Matrices F16, vectors F32.
    F16,
    /// Matrices BF16, vectors F32.
    Bf16,
    /// Matrices Q8_0.
    Q8_0,
    /// Matrices Q4_0, the output head Q6_K.
    Q4_0,
    /// Matrices Q4_K; the output head and every few `attn_v` / `ffn_down` Q6_K.
    Q4KM,
    /// Matrices Q5_K; the output head and every few `attn_v` / `ffn_down` Q6_K.
    Q5KM,
    /// Matrices Q6_K.
    Q6K,
}

impl QuantType {
    /// Every type, by its command-line name.
    pub const ALL: [QuantType; 8] = [
        QuantType::F32,
        QuantType::F16,
        QuantType::Bf16,
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4KM,
        QuantType::Q5KM,
        QuantType::Q6K,
    ];

    /// The command-line name (`q4_k_m`), also used in file names.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::F32 => "f32",
            QuantType::F16 => "f16",
            QuantType::Bf16 => "bf16",
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4_0 => "q4_0",
            QuantType::Q4KM => "q4_k_m",
            QuantType::Q5KM => "q5_k_m",
            QuantType::Q6K => "q6_k",
        }
    }

    /// `general.file_type`: llama.cpp's `llama_ftype`.
    pub fn file_type(self) -> u32 {
        match self {
            QuantType::F32 => 0,
            QuantType::F16 => 1,
            QuantType::Q4_0 => 2,
            QuantType::Q8_0 => 7,
            QuantType::Q4KM => 15,
            QuantType::Q5KM => 17,
            QuantType::Q6K => 18,
            QuantType::Bf16 => 32,
        }
    }

    /// Whether some tensors are block-quantized (then the file states
    /// `general.quantization_version`).
    pub fn is_quantized(self) -> bool {
        !matches!(self, QuantType::F32 | QuantType::F16 | QuantType::Bf16)
    }

    /// The ggml type of the tensor `name` of shape `dims` (outermost
    /// first) in a model of `layers` blocks; `has_output` says whether the
    /// model has its own `output.weight` (otherwise the token embedding is
    /// the output head).
    pub fn tensor_type(self, name: &str, dims: &[usize], layers: usize, has_output: bool) -> GgmlDType {
        if dims.len() < 2 {
            return GgmlDType::F32;
        }
        let row = *dims.last().expect("two or more dims");
        let chosen = match self {
            QuantType::F32 => return GgmlDType::F32,
            QuantType::F16 => return GgmlDType::F16,
            QuantType::Bf16 => return GgmlDType::BF16,
            QuantType::Q8_0 => GgmlDType::Q8_0,
            _ if name == "output.weight" || (!has_output && name == "token_embd.weight") => {
                // llama.cpp: Q6_K for the output head, Q8_0 when its rows
                // do not fill whole super-blocks.
                if !row.is_multiple_of(256) {
                    GgmlDType::Q8_0
                } else {
                    GgmlDType::Q6K
                }
            }
            QuantType::Q4_0 => GgmlDType::Q4_0,
            QuantType::Q6K => GgmlDType::Q6K,
            QuantType::Q4KM | QuantType::Q5KM => {
                let more_bits = layer_of(name).is_some_and(|i| use_more_bits(i, layers))
                    && (name.ends_with(".attn_v.weight") || name.ends_with(".ffn_down.weight"));
                match (more_bits, self) {
                    (true, _) => GgmlDType::Q6K,
                    (false, QuantType::Q4KM) => GgmlDType::Q4K,
                    _ => GgmlDType::Q5K,
                }
            }
        };
        fallback(chosen, row)
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers
/// and every third layer in between.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    let (first, last) = (layers / 8, 7 * layers / 8);
    layer < first || layer >= last || (layer - first) % 3 == 2
}

/// The block index of a `blk.N.*` tensor.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// The type llama.cpp uses instead of `chosen` when rows of `row` values
/// do not fill its blocks.
fn fallback(chosen: GgmlDType, row: usize) -> GgmlDType {
    if row.is_multiple_of(chosen.block_size()) {
        return chosen;
    }
    let legacy = match chosen {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    if row.is_multiple_of(legacy.block_size()) {
        legacy
    } else {
        GgmlDType::F16
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for QuantType {
    type Err = String;

    fn from_str(s: &str) -> Result<QuantType, String> {
        QuantType::ALL.into_iter().find(|q| q.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            let names: Vec<&str> = QuantType::ALL.iter().map(|q| q.name()).collect();
            format!("unknown quant type `{s}` (one of: {})", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_follow_llama_quantize() {
        let q = QuantType::Q4KM;
        // 32 layers: layers 0-3 and 28-31 and every third from 6 get more bits.
        let more: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(more, vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
        assert_eq!(q.tensor_type("blk.6.attn_v.weight", &[1024, 4096], 32, true), GgmlDType::Q6K);
        assert_eq!(q.tensor_type("blk.7.attn_v.weight", &[1024, 4096], 32, true), GgmlDType::Q4K);
        assert_eq!(q.tensor_type("blk.7.attn_q.weight", &[4096, 4096], 32, true), GgmlDType::Q4K);
        assert_eq!(q.tensor_type("output.weight", &[32000, 4096], 32, true), GgmlDType::Q6K);
        assert_eq!(q.tensor_type("token_embd.weight", &[32000, 4096], 32, true), GgmlDType::Q4K);
        // Tied: the embedding is the head; 576-value rows take Q8_0.
        assert_eq!(q.tensor_type("token_embd.weight", &[49152, 576], 30, false), GgmlDType::Q8_0);
        assert_eq!(q.tensor_type("blk.1.attn_q.weight", &[576, 576], 30, false), GgmlDType::Q5_0);
        assert_eq!(QuantType::Q5KM.tensor_type("blk.1.attn_q.weight", &[576, 576], 30, false), GgmlDType::Q5_1);
        assert_eq!(QuantType::Q6K.tensor_type("blk.1.attn_q.weight", &[576, 576], 30, false), GgmlDType::Q8_0);
        assert_eq!(QuantType::Q4_0.tensor_type("blk.0.attn_norm.weight", &[576], 30, false), GgmlDType::F32);
        assert_eq!(QuantType::F16.tensor_type("blk.0.attn_q.weight", &[64, 64], 2, true), GgmlDType::F16);
    }

    #[test]
    fn names_parse_and_unknown_names_are_listed() {
        assert_eq!("Q4_K_M".parse::<QuantType>().unwrap(), QuantType::Q4KM);
        let err = "q3_k".parse::<QuantType>().unwrap_err();
        assert!(err.contains("q3_k") && err.contains("q4_k_m"), "{err}");
    }
}
