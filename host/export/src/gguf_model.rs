//! `--to-gguf`: a whole model (its adapter merged first, if any) as one
//! GGUF file llama.cpp loads — `general.*`, the plugin's hyperparameters,
//! the tokenizer, then every weight under its llama.cpp name and row
//! order, each converted to the type the `--quant-type` mix gives it.
//! Without an adapter the weights stream from the memory-mapped source
//! one at a time ([`write_model_gguf_streaming`]); an adapter is merged in
//! a loaded model ([`write_model_gguf`]).

use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use oxtune_engine::model::checkpoint::weight_files;
use oxtune_engine::model::gguf::{gguf_rows, GgufFile};
use oxtune_engine::model::{gguf_layout_of, is_gguf, LoadedModel};
use oxtune_plugin_api::gguf::{GgufLayout, GgufValue};
use oxtune_registry::Registry;

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

/// A weight as llama.cpp stores its values: rows permuted and values
/// offset as the layout says, f32, contiguous.
pub fn gguf_values(tensor: &Tensor, permute_heads: Option<u32>, offset: Option<f32>) -> candle_core::Result<Tensor> {
    let tensor = tensor.detach().to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let tensor = match permute_heads {
        Some(heads) => gguf_rows(&tensor, heads as usize)?,
        None => tensor,
    };
    let tensor = match offset {
        Some(offset) => tensor.affine(1.0, offset as f64)?,
        None => tensor,
    };
    tensor.contiguous()
}

/// The bytes of `tensor` stored as `dtype`.
pub fn encode(tensor: &Tensor, dtype: GgmlDType) -> candle_core::Result<Vec<u8>> {
    Ok(QTensor::quantize(tensor, dtype)?.data()?.into_owned())
}

/// The model's name for `general.name`: its folder or file stem.
fn model_name(source: &Path) -> String {
    source.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}

/// One weight to write: where it is read from and how it is stored.
struct Planned {
    /// Its name in the source (checkpoint name, or GGUF name for a GGUF
    /// source); several checkpoint names when the layout stacks them.
    sources: Vec<String>,
    /// Its GGUF name and shape, and its position in the layout.
    gguf: String,
    dims: Vec<usize>,
    position: usize,
    /// Rows to permute into llama.cpp's order (a checkpoint-order source).
    permute_heads: Option<u32>,
    /// Added to the values (a checkpoint-valued source).
    offset: Option<f32>,
}

impl Planned {
    /// The plan for layout entry `position` from a checkpoint-named source
    /// whose first (or only) tensor has `dims`.
    fn from_checkpoint(layout: &GgufLayout, position: usize, dims: Vec<usize>) -> Planned {
        let entry = &layout.tensors[position];
        let sources: Vec<String> = entry.sources().into_iter().map(str::to_owned).collect();
        let dims = if entry.stacked.is_empty() { dims } else { [vec![sources.len()], dims].concat() };
        Planned {
            sources,
            gguf: entry.gguf.clone(),
            dims,
            position,
            permute_heads: entry.permute_heads,
            offset: entry.offset,
        }
    }
}

/// Plans the checkpoint-named weights `names` (with their dims): one plan
/// per layout entry, a stacked entry once, at its first tensor, after
/// checking that the source has every tensor it stacks.
fn plan_checkpoint(
    layout: &GgufLayout,
    names: impl Iterator<Item = (String, Vec<usize>)>,
) -> Result<Vec<Planned>, ExportError> {
    let by_hf_name = layout.index_by_hf_name();
    let (mut planned, mut seen) = (Vec::new(), std::collections::HashSet::new());
    for (name, dims) in names {
        let position = *by_hf_name.get(name.as_str()).ok_or_else(|| unmapped(&name, layout))?;
        seen.insert(name.clone());
        if layout.tensors[position].sources()[0] == name {
            planned.push(Planned::from_checkpoint(layout, position, dims));
        }
    }
    for plan in &planned {
        if let Some(missing) = plan.sources.iter().find(|s| !seen.contains(*s)) {
            return Err(ExportError::Unsupported {
                what: format!("GGUF tensor `{}`", plan.gguf),
                message: format!("stacks `{missing}`, which the model does not have"),
            });
        }
    }
    Ok(planned)
}

/// Writes `planned` weights, read by `read`, with the layout's and the
/// tokenizer's metadata, as `quant` at `path`.
fn write_planned(
    layout: &GgufLayout,
    mut planned: Vec<Planned>,
    name: String,
    text_source: &Path,
    quant: QuantType,
    path: &Path,
    mut read: impl FnMut(&str) -> Result<Tensor, ExportError>,
) -> Result<Written, ExportError> {
    planned.sort_by_key(|p| p.position);
    let has_output = planned.iter().any(|p| p.gguf == "output.weight");
    let layers = match layout.metadata.get(&format!("{}.block_count", layout.architecture)) {
        Some(GgufValue::U32(n)) => *n as usize,
        _ => 0,
    };
    let entries: Vec<TensorEntry> = planned
        .iter()
        .map(|p| TensorEntry {
            name: p.gguf.clone(),
            dtype: quant.tensor_type(&p.gguf, &p.dims, layers, has_output),
            dims: p.dims.clone(),
        })
        .collect();
    let vocab_size = planned.iter().find(|p| p.gguf == "token_embd.weight").map_or(0, |p| p.dims[0]);
    let mut metadata = vec![
        ("general.architecture".to_owned(), GgufValue::Str(layout.architecture.clone())),
        ("general.type".to_owned(), GgufValue::Str("model".into())),
        ("general.name".to_owned(), GgufValue::Str(name)),
        ("general.file_type".to_owned(), GgufValue::U32(quant.file_type())),
        ("general.quantization_version".to_owned(), GgufValue::U32(2)),
    ];
    metadata.extend(layout.metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
    metadata.extend(tokenizer_metadata(text_source, vocab_size)?);
    let bytes = write_gguf(path, &metadata, &entries, |i| {
        let p = &planned[i];
        let parts = p.sources.iter().map(|s| read(s)).collect::<Result<Vec<_>, _>>()?;
        let what = || format!("weight `{}`", p.sources.join("`, `"));
        let tensor = match parts.as_slice() {
            [one] => one.clone(),
            _ => Tensor::stack(&parts, 0)
                .map_err(|e| ExportError::Unsupported { what: what(), message: format!("cannot be stacked: {e}") })?,
        };
        gguf_values(&tensor, p.permute_heads, p.offset).and_then(|t| encode(&t, entries[i].dtype)).map_err(|e| {
            ExportError::Unsupported {
                what: what(),
                message: format!("cannot be stored as {:?}: {e}", entries[i].dtype),
            }
        })
    })?;
    Ok(Written { path: path.to_owned(), bytes })
}

fn unmapped(name: &str, layout: &GgufLayout) -> ExportError {
    ExportError::Unsupported {
        what: format!("weight `{name}`"),
        message: format!("the `{}` GGUF layout of its plugin has no name for it", layout.architecture),
    }
}

/// Writes `model` (its adapter merged first) to the GGUF file `path` as `quant`.
pub fn write_model_gguf(model: &mut LoadedModel, quant: QuantType, path: &Path) -> Result<Written, ExportError> {
    let layout = layout_of(model)?;
    model.merge_adapter().map_err(|e| ExportError::source(model.dir(), e))?;
    let weights = model.weights();
    let names =
        weights.names().into_iter().map(|name| (name.to_owned(), weights.dims(name).expect("listed by the store")));
    let planned = plan_checkpoint(&layout, names)?;
    write_planned(&layout, planned, model_name(model.dir()), model.dir(), quant, path, |name| {
        // A 4-bit base is written from its dequantised values.
        weights
            .dense(name, candle_core::DType::F32)
            .expect("listed by the store")
            .map_err(|e| ExportError::source(model.dir(), e))
    })
}

/// Writes the model at `source` (a Hugging Face folder or a GGUF file) to
/// the GGUF file `path` as `quant`, reading one weight at a time from the
/// memory-mapped source, so memory holds a tensor, not the model.
pub fn write_model_gguf_streaming(
    registry: &Registry,
    source: &Path,
    model_type: Option<&str>,
    quant: QuantType,
    path: &Path,
) -> Result<Written, ExportError> {
    let layout = match gguf_layout_of(registry, source, model_type) {
        Ok(Some(layout)) => layout,
        Ok(None) => {
            return Err(ExportError::Unsupported {
                what: format!("model `{}`", source.display()),
                message: "its plugin gives it no GGUF form (llama.cpp may not know the architecture)".into(),
            })
        }
        Err(e) => return Err(ExportError::source(source, e)),
    };
    let name = model_name(source);
    if is_gguf(source) {
        // A GGUF source is already in llama.cpp's names and row order.
        let file = GgufFile::open(source).map_err(|e| ExportError::source(source, e))?;
        let by_gguf_name = layout.index_by_gguf_name();
        let mut planned = Vec::new();
        for (stored, dims) in file.tensor_shapes() {
            let position = *by_gguf_name.get(stored.as_str()).ok_or_else(|| unmapped(&stored, &layout))?;
            let sources = vec![stored.clone()];
            planned.push(Planned { sources, gguf: stored, dims, position, permute_heads: None, offset: None });
        }
        return write_planned(&layout, planned, name, source, quant, path, |stored| {
            file.read_tensor(stored).map_err(|e| ExportError::source(source, e))
        });
    }
    let files = weight_files(source).map_err(|e| ExportError::source(source, e))?;
    // SAFETY: the files are only read; a file changed while mapped gives
    // wrong values, as it would to any reader.
    let mapped = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| ExportError::source(source, e))?;
    let planned =
        plan_checkpoint(&layout, mapped.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec())))?;
    write_planned(&layout, planned, name, source, quant, path, |stored| {
        mapped.load(stored, &Device::Cpu).map_err(|e| ExportError::source(source, e))
    })
}
