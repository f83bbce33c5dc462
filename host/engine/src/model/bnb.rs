//! Reading checkpoints saved by transformers + bitsandbytes in 4 bits
//! (`quantization_config.quant_method = "bitsandbytes"`, NF4 or FP4, with
//! or without double quantisation): each quantised `<layer>.weight` is a
//! packed `uint8` tensor with its block scales and code table beside it
//! (`.absmax`, `.quant_map`, `.nested_absmax`, `.nested_quant_map`,
//! `.quant_state.bitsandbytes__nf4|fp4`). The parts are read as they are
//! ([`Bnb4Parts`]) and the weight is kept in 4 bits (see
//! [`crate::quant::bnb4`] for the layout).

use std::collections::HashSet;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};

use crate::quant::bnb4::{Bnb4Parts, Bnb4Type, Scales};

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

/// The 4-bit parts of weight `name` if it is stored in 4 bits in
/// `tensors` (`None` for an ordinary tensor); `names` is the set of the
/// file's tensor names (gathered once per file by the caller).
pub fn read_parts(
    tensors: &MmapedSafetensors,
    names: &HashSet<String>,
    name: &str,
) -> Result<Option<Bnb4Parts>, String> {
    let Some(state_name) = state_names(name).into_iter().find(|s| names.contains(s)) else { return Ok(None) };
    let state: serde_json::Value = serde_json::from_slice(&u8s(tensors, &state_name)?)
        .map_err(|e| format!("`{state_name}` is not the JSON bitsandbytes writes: {e}"))?;
    let field = |key: &str| state.get(key).ok_or_else(|| format!("`{state_name}` has no `{key}`"));
    let shape: Vec<usize> = field("shape")?
        .as_array()
        .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
        .ok_or_else(|| format!("`{state_name}`: `shape` must be a list of sizes"))?;
    let blocksize = field("blocksize")?.as_u64().filter(|&b| b > 0).ok_or("`blocksize` must be positive")? as usize;
    let kind = field("quant_type")?
        .as_str()
        .and_then(Bnb4Type::parse)
        .ok_or_else(|| format!("`{state_name}`: `quant_type` must be nf4 or fp4"))?;
    let count: usize = shape.iter().product();
    let packed = u8s(tensors, name)?;
    if packed.len() * 2 < count {
        return Err(format!("`{name}` holds {} values, its state says {count}", packed.len() * 2));
    }
    let code: [f32; 16] = f32s(tensors, &format!("{name}.quant_map"))?
        .try_into()
        .map_err(|v: Vec<f32>| format!("`{name}.quant_map` has {} entries, not 16", v.len()))?;
    let absmax_name = format!("{name}.absmax");
    let scales = if names.contains(&format!("{name}.nested_absmax")) {
        Scales::Nested {
            codes: u8s(tensors, &absmax_name)?,
            nested_absmax: f32s(tensors, &format!("{name}.nested_absmax"))?,
            nested_code: f32s(tensors, &format!("{name}.nested_quant_map"))?,
            nested_blocksize: state.get("nested_blocksize").and_then(|v| v.as_u64()).unwrap_or(256).max(1) as usize,
            offset: state.get("nested_offset").and_then(|v| v.as_f64()).unwrap_or(0.0) as f32,
        }
    } else {
        Scales::Plain(f32s(tensors, &absmax_name)?)
    };
    Ok(Some(Bnb4Parts { kind, shape, blocksize, packed, code, scales }))
}

/// Checks a config's `quantization_config`: bitsandbytes 4-bit is read
/// (and kept in 4 bits); anything else is refused with its name.
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
