//! `--to-gguf` of a LoRA adapter alone, as llama.cpp's
//! `convert_lora_to_gguf.py` writes it and `llama-cli --lora` / Ollama's
//! `ADAPTER` load it: `general.type = adapter`, `adapter.type = lora`,
//! `adapter.lora.alpha`, and per adapted weight `<gguf name>.lora_a`
//! (PEFT's `lora_A`, `[r, in]`) and `.lora_b` (`lora_B`, `[out, r]`, its
//! rows permuted like the base weight's where llama.cpp permutes them).

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use oxtune_engine::model::LoadedModel;
use oxtune_plugin_api::gguf::GgufValue;
use serde_json::Value;

use crate::gguf_model::{encode, gguf_values, layout_of};
use crate::writer::{write_gguf, TensorEntry};
use crate::{ExportError, Written};

/// The PEFT prefix of every saved adapter tensor name.
const PEFT_PREFIX: &str = "base_model.model.";

/// The scale numerator llama.cpp should use: it scales by `alpha / r`, so
/// rsLoRA's `alpha / √r` is stated as `alpha · √r`.
fn effective_alpha(config: &Value, config_path: &Path) -> Result<f32, ExportError> {
    let unsupported = |message: String| ExportError::Unsupported { what: config_path.display().to_string(), message };
    if config["peft_type"].as_str() != Some("LORA") {
        return Err(unsupported(format!(
            "`peft_type` is {}; llama.cpp loads LoRA adapters only (merge other tuners with --merge-lora)",
            config["peft_type"]
        )));
    }
    if config["use_dora"] == true {
        return Err(unsupported(
            "llama.cpp has no DoRA: merge the adapter (--merge-lora --to-gguf) to export the model instead".into(),
        ));
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if config[key].as_object().is_some_and(|o| !o.is_empty()) {
            return Err(unsupported(format!(
                "`{key}` gives layers their own scale, which a GGUF adapter cannot state"
            )));
        }
    }
    if config["modules_to_save"].as_array().is_some_and(|a| !a.is_empty()) {
        return Err(unsupported(
            "`modules_to_save` trains whole modules, which a GGUF LoRA adapter cannot hold: merge it (--merge-lora)"
                .into(),
        ));
    }
    let rank = config["r"].as_f64().ok_or_else(|| unsupported("`r` is missing".into()))?;
    let alpha = config["lora_alpha"].as_f64().unwrap_or(rank);
    Ok(if config["use_rslora"] == true { alpha * rank.sqrt() } else { alpha } as f32)
}

/// Writes the LoRA adapter in `adapter_dir` (PEFT's files) for the base
/// model `base` as the GGUF adapter `path`.
pub fn write_adapter_gguf(base: &LoadedModel, adapter_dir: &Path, path: &Path) -> Result<Written, ExportError> {
    let layout = layout_of(base)?;
    let config_path = adapter_dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|source| ExportError::Io { path: config_path.clone(), source })?;
    let config: Value = serde_json::from_str(&text).map_err(|e| ExportError::source(&config_path, e))?;
    let alpha = effective_alpha(&config, &config_path)?;
    let weights_path = adapter_dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu)
        .map_err(|e| ExportError::source(&weights_path, e))?;
    let mismatch = |name: &str, message: String| ExportError::Unsupported {
        what: format!("{}: tensor `{name}`", weights_path.display()),
        message,
    };
    let by_hf_name = layout.index_by_hf_name();
    let mut out: Vec<(usize, TensorEntry, Tensor)> = Vec::new();
    for (name, tensor) in &tensors {
        let inner = name.strip_prefix(PEFT_PREFIX).unwrap_or(name);
        let (layer, suffix, is_b) = if let Some(layer) = inner.strip_suffix(".lora_A.weight") {
            (layer, "lora_a", false)
        } else if let Some(layer) = inner.strip_suffix(".lora_B.weight") {
            (layer, "lora_b", true)
        } else {
            return Err(mismatch(name, "is not a LoRA A or B matrix, which is all a GGUF adapter holds".into()));
        };
        let weight = format!("{layer}.weight");
        let position = by_hf_name.get(weight.as_str()).copied();
        let (Some(position), Some(dims)) = (position, base.weights().dims(&weight)) else {
            return Err(mismatch(name, format!("adapts `{weight}`, which the base model does not have")));
        };
        let [out_features, in_features] = dims[..] else {
            return Err(mismatch(name, format!("adapts `{weight}`, which is not a matrix")));
        };
        let (rows, cols) = tensor.dims2().map_err(|e| mismatch(name, e.to_string()))?;
        let fits = if is_b { rows == out_features } else { cols == in_features };
        if !fits {
            return Err(mismatch(
                name,
                format!("its shape [{rows}, {cols}] does not fit the base weight's [{out_features}, {in_features}]"),
            ));
        }
        let entry = &layout.tensors[position];
        if !entry.stacked.is_empty() {
            return Err(mismatch(
                name,
                format!(
                    "adapts `{weight}`, which llama.cpp stores stacked with others in `{}`: a GGUF adapter cannot \
                     adapt one expert",
                    entry.gguf
                ),
            ));
        }
        let values = gguf_values(tensor, if is_b { entry.permute_heads } else { None }, None)
            .map_err(|e| mismatch(name, e.to_string()))?;
        let gguf =
            TensorEntry { name: format!("{}.{suffix}", entry.gguf), dims: vec![rows, cols], dtype: GgmlDType::F32 };
        out.push((position * 2 + usize::from(is_b), gguf, values));
    }
    if out.is_empty() {
        return Err(mismatch("*", "the adapter holds no LoRA matrices".into()));
    }
    out.sort_by_key(|(order, _, _)| *order);
    let name = adapter_dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
    let metadata = vec![
        ("general.architecture".to_owned(), GgufValue::Str(layout.architecture.clone())),
        ("general.type".to_owned(), GgufValue::Str("adapter".into())),
        ("general.name".to_owned(), GgufValue::Str(name)),
        ("general.quantization_version".to_owned(), GgufValue::U32(2)),
        ("adapter.type".to_owned(), GgufValue::Str("lora".into())),
        ("adapter.lora.alpha".to_owned(), GgufValue::F32(alpha)),
    ];
    let entries: Vec<TensorEntry> = out.iter().map(|(_, e, _)| e.clone()).collect();
    let bytes = write_gguf(path, &metadata, &entries, |i| {
        encode(&out[i].2, GgmlDType::F32).map_err(|e| ExportError::Internal(e.to_string()))
    })?;
    Ok(Written { path: path.to_owned(), bytes })
}
