//! Reading checkpoints saved by transformers + bitsandbytes in 4 bits
//! (`quantization_config.quant_method = "bitsandbytes"`, NF4 or FP4, with
//! or without double quantisation): each quantised `<layer>.weight` is a
//! packed `uint8` tensor with its block scales and code table beside it
//! (`.absmax`, `.quant_map`, `.nested_absmax`, `.nested_quant_map`,
//! `.quant_state.bitsandbytes__nf4|fp4`). The weight is dequantised on
//! load exactly as bitsandbytes' `dequantize_4bit` does.
//!
//! Layout (checked byte for byte against bitsandbytes 0.50): element `2p`
//! of the row-major weight is the high nibble of byte `p`, element `2p+1`
//! the low one; blocks of `blocksize` elements share `absmax[block]`; with
//! double quantisation `absmax[i] = nested_quant_map[absmax_u8[i]] ·
//! nested_absmax[i / nested_blocksize] + nested_offset`.

use std::collections::HashSet;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

/// The suffixes of the tensors that describe a quantised weight.
const STATE_SUFFIXES: [&str; 4] = [".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"];

/// The quant-state tensor names bitsandbytes writes for `weight`.
fn state_names(weight: &str) -> [String; 2] {
    [format!("{weight}.quant_state.bitsandbytes__nf4"), format!("{weight}.quant_state.bitsandbytes__fp4")]
}

/// Whether `name` is part of a quantised weight's state rather than a weight.
pub fn is_quant_state(name: &str) -> bool {
    name.contains(".quant_state.bitsandbytes__") || STATE_SUFFIXES.iter().any(|s| name.ends_with(s))
}

fn f32s(tensors: &MmapedSafetensors, name: &str) -> Result<Vec<f32>, String> {
    tensors
        .load(name, &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
        .map_err(|e| format!("`{name}`: {e}"))
}

fn u8s(tensors: &MmapedSafetensors, name: &str) -> Result<Vec<u8>, String> {
    tensors
        .load(name, &Device::Cpu)
        .and_then(|t| t.flatten_all()?.to_vec1::<u8>())
        .map_err(|e| format!("`{name}`: {e}"))
}

/// The dequantised weight `name` if it is stored in 4 bits in `tensors`
/// (`None` for an ordinary tensor), as f32 on the CPU; `names` is the set
/// of the file's tensor names (gathered once per file by the caller).
pub fn dequantize(tensors: &MmapedSafetensors, names: &HashSet<String>, name: &str) -> Result<Option<Tensor>, String> {
    let Some(state_name) = state_names(name).into_iter().find(|s| names.contains(s)) else { return Ok(None) };
    let state: serde_json::Value = serde_json::from_slice(&u8s(tensors, &state_name)?)
        .map_err(|e| format!("`{state_name}` is not the JSON bitsandbytes writes: {e}"))?;
    let field = |key: &str| state.get(key).ok_or_else(|| format!("`{state_name}` has no `{key}`"));
    let shape: Vec<usize> = field("shape")?
        .as_array()
        .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
        .ok_or_else(|| format!("`{state_name}`: `shape` must be a list of sizes"))?;
    let blocksize = field("blocksize")?.as_u64().filter(|&b| b > 0).ok_or("`blocksize` must be positive")? as usize;
    let count: usize = shape.iter().product();
    let packed = u8s(tensors, name)?;
    if packed.len() * 2 < count {
        return Err(format!("`{name}` holds {} values, its state says {count}", packed.len() * 2));
    }
    let quant_map = f32s(tensors, &format!("{name}.quant_map"))?;
    if quant_map.len() != 16 {
        return Err(format!("`{name}.quant_map` has {} entries, not 16", quant_map.len()));
    }
    let absmax_name = format!("{name}.absmax");
    let absmax: Vec<f32> = if names.contains(&format!("{name}.nested_absmax")) {
        let codes = u8s(tensors, &absmax_name)?;
        let nested = f32s(tensors, &format!("{name}.nested_absmax"))?;
        let nested_map = f32s(tensors, &format!("{name}.nested_quant_map"))?;
        let nested_block = state.get("nested_blocksize").and_then(|v| v.as_u64()).unwrap_or(256).max(1) as usize;
        let offset = state.get("nested_offset").and_then(|v| v.as_f64()).unwrap_or(0.0) as f32;
        codes
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let scale = nested.get(i / nested_block).copied().unwrap_or(0.0);
                nested_map.get(c as usize).copied().unwrap_or(0.0) * scale + offset
            })
            .collect()
    } else {
        f32s(tensors, &absmax_name)?
    };
    if absmax.len() < count.div_ceil(blocksize) {
        return Err(format!("`{absmax_name}` has {} scales for {} blocks", absmax.len(), count.div_ceil(blocksize)));
    }
    let values: Vec<f32> = (0..count)
        .map(|i| {
            let byte = packed[i / 2];
            let code = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
            quant_map[code as usize] * absmax[i / blocksize]
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).map(Some).map_err(|e| format!("`{name}`: {e}"))
}

/// Checks a config's `quantization_config`: bitsandbytes 4-bit is read
/// (and dequantised); anything else is refused with its name.
pub fn check_quantization_config(config: &serde_json::Value) -> Result<(), String> {
    let Some(q) = config.get("quantization_config").filter(|q| !q.is_null()) else { return Ok(()) };
    let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("unknown");
    let four_bit = q.get("load_in_4bit").and_then(|v| v.as_bool()).unwrap_or(false)
        || q.get("_load_in_4bit").and_then(|v| v.as_bool()).unwrap_or(false);
    match (method, four_bit) {
        ("bitsandbytes", true) => Ok(()),
        ("bitsandbytes", false) => Err("`quantization_config`: bitsandbytes 8-bit checkpoints are not supported (4-bit NF4/FP4 are)".into()),
        (other, _) => Err(format!(
            "`quantization_config`: quant_method `{other}` is not supported (bitsandbytes 4-bit is; GGUF files load directly)"
        )),
    }
}
