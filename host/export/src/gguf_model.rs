//! `--to-gguf`: a whole model (its adapter merged first, if any) as one
//! GGUF file llama.cpp loads — `general.*`, the plugin's hyperparameters,
//! the tokenizer, then every weight under its llama.cpp name and row
//! order, each converted to the type the `--quant-type` mix gives it.

use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use oxtune_engine::model::gguf::gguf_rows;
use oxtune_engine::model::LoadedModel;
use oxtune_plugin_api::gguf::{GgufLayout, GgufValue};

use crate::quant::QuantType;
use crate::tokenizer::tokenizer_metadata;
use crate::writer::{write_gguf, TensorEntry};
use crate::{ExportError, Written};

/// The plugin's GGUF layout of `model`, or an error naming the architecture.
pub fn layout_of(model: &LoadedModel) -> Result<GgufLayout, ExportError> {
    let what = || format!("model `{}` (architecture `{}`)", model.dir().display(), model.architecture());
    match model.gguf_layout() {
        Ok(Some(layout)) => Ok(layout),
        Ok(None) => Err(ExportError::Unsupported {
            what: what(),
            message: "its plugin gives it no GGUF form (llama.cpp may not know the architecture)".into(),
        }),
        Err(e) => Err(ExportError::Unsupported { what: what(), message: oxtune_engine::error_chain(&e) }),
    }
}

/// A weight as llama.cpp stores its values: rows permuted as the layout
/// says, f32, contiguous.
pub fn gguf_values(tensor: &Tensor, permute_heads: Option<u32>) -> candle_core::Result<Tensor> {
    let tensor = tensor.detach().to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let tensor = match permute_heads {
        Some(heads) => gguf_rows(&tensor, heads as usize)?,
        None => tensor,
    };
    tensor.contiguous()
}

/// The bytes of `tensor` stored as `dtype`.
pub fn encode(tensor: &Tensor, dtype: GgmlDType) -> candle_core::Result<Vec<u8>> {
    Ok(QTensor::quantize(tensor, dtype)?.data()?.into_owned())
}

/// The model's name for `general.name`: its folder or file stem.
fn model_name(model: &LoadedModel) -> String {
    model.dir().file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}

/// Writes `model` (adapter merged) to the GGUF file `path` as `quant`.
pub fn write_model_gguf(model: &mut LoadedModel, quant: QuantType, path: &Path) -> Result<Written, ExportError> {
    let layout = layout_of(model)?;
    model.merge_adapter().map_err(|e| ExportError::source(model.dir(), e))?;
    let mut names: Vec<(&str, usize)> = Vec::new();
    for name in model.weights().names() {
        let position = layout.tensors.iter().position(|t| t.hf == name).ok_or_else(|| ExportError::Unsupported {
            what: format!("weight `{name}`"),
            message: format!("the `{}` GGUF layout of its plugin has no name for it", layout.architecture),
        })?;
        names.push((name, position));
    }
    names.sort_by_key(|(_, position)| *position);
    let has_output = names.iter().any(|(_, p)| layout.tensors[*p].gguf == "output.weight");
    let layers = match layout.metadata.get(&format!("{}.block_count", layout.architecture)) {
        Some(GgufValue::U32(n)) => *n as usize,
        _ => 0,
    };
    let entries: Vec<TensorEntry> = names
        .iter()
        .map(|(name, p)| {
            let gguf = &layout.tensors[*p].gguf;
            let dims = model.weights().get(name).expect("listed by the store").dims().to_vec();
            TensorEntry { name: gguf.clone(), dtype: quant.tensor_type(gguf, &dims, layers, has_output), dims }
        })
        .collect();
    let vocab_size = names
        .iter()
        .find(|(_, p)| layout.tensors[*p].gguf == "token_embd.weight")
        .map(|(name, _)| model.weights().get(name).expect("listed").dim(0).unwrap_or(0))
        .unwrap_or(0);
    let mut metadata = vec![
        ("general.architecture".to_owned(), GgufValue::Str(layout.architecture.clone())),
        ("general.type".to_owned(), GgufValue::Str("model".into())),
        ("general.name".to_owned(), GgufValue::Str(model_name(model))),
        ("general.file_type".to_owned(), GgufValue::U32(quant.file_type())),
        ("general.quantization_version".to_owned(), GgufValue::U32(2)),
    ];
    metadata.extend(layout.metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
    metadata.extend(tokenizer_metadata(model.dir(), vocab_size)?);
    let bytes = write_gguf(path, &metadata, &entries, |i| {
        let (name, p) = names[i];
        let tensor = model.weights().get(name).expect("listed by the store");
        gguf_values(tensor, layout.tensors[p].permute_heads).and_then(|t| encode(&t, entries[i].dtype)).map_err(|e| {
            ExportError::Unsupported {
                what: format!("weight `{name}`"),
                message: format!("cannot be stored as {:?}: {e}", entries[i].dtype),
            }
        })
    })?;
    Ok(Written { path: path.to_owned(), bytes })
}
