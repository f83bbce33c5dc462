//! A streaming GGUF writer: the header, metadata and tensor directory
//! first (every tensor's size is known from its shape and type), then
//! each tensor's bytes as the caller produces them, so a model is never
//! held in memory twice. Written to a temporary file beside the target and
//! renamed into place, so a failed export leaves nothing half-written.

use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use oxtune_plugin_api::gguf::GgufValue;

use crate::ExportError;

/// GGUF's alignment of the tensor data (`general.alignment`'s default).
pub const ALIGNMENT: u64 = 32;

/// One tensor of the directory.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// Its GGUF name.
    pub name: String,
    /// Its shape, outermost first (as candle and PyTorch state it; GGUF
    /// stores the reverse).
    pub dims: Vec<usize>,
    /// How its values are stored.
    pub dtype: GgmlDType,
}

impl TensorEntry {
    /// Bytes of its data.
    pub fn size_in_bytes(&self) -> u64 {
        let elements: usize = self.dims.iter().product();
        (elements / self.dtype.block_size() * self.dtype.type_size()) as u64
    }
}

/// ggml's numeric code of a tensor type (`enum ggml_type`).
pub fn ggml_type_code(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn write_string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// GGUF's numeric code of a metadata value type.
fn value_type(value: &GgufValue) -> u32 {
    match value {
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::Str(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::F64(_) => 12,
    }
}

fn write_value(w: &mut impl Write, key: &str, value: &GgufValue) -> Result<(), std::io::Error> {
    match value {
        GgufValue::U32(v) => w.write_all(&v.to_le_bytes()),
        GgufValue::I32(v) => w.write_all(&v.to_le_bytes()),
        GgufValue::U64(v) => w.write_all(&v.to_le_bytes()),
        GgufValue::F32(v) => w.write_all(&v.to_le_bytes()),
        GgufValue::F64(v) => w.write_all(&v.to_le_bytes()),
        GgufValue::Bool(v) => w.write_all(&[u8::from(*v)]),
        GgufValue::Str(v) => write_string(w, v),
        GgufValue::Array(items) => {
            let item_type = items.first().map_or(4, value_type);
            if items.iter().any(|i| value_type(i) != item_type || matches!(i, GgufValue::Array(_))) {
                return Err(std::io::Error::other(format!(
                    "metadata `{key}`: an array must hold values of one type (and no arrays)"
                )));
            }
            w.write_all(&item_type.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|item| write_value(w, key, item))
        }
    }
}

fn padding(position: u64) -> usize {
    ((ALIGNMENT - position % ALIGNMENT) % ALIGNMENT) as usize
}

/// Where a file being written lives until it is complete.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Writes a GGUF file (version 3) at `path`: `metadata` in order, then
/// `tensors`, the bytes of tensor `i` coming from `data(i)` (which must
/// give exactly [`TensorEntry::size_in_bytes`]). Returns the file's size.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, GgufValue)],
    tensors: &[TensorEntry],
    mut data: impl FnMut(usize) -> Result<Vec<u8>, ExportError>,
) -> Result<u64, ExportError> {
    let partial = partial_path(path);
    let io = |source: std::io::Error| ExportError::Io { path: path.to_owned(), source };
    let result = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&partial).map_err(io)?);
        w.write_all(b"GGUF").map_err(io)?;
        w.write_all(&3u32.to_le_bytes()).map_err(io)?;
        w.write_all(&(tensors.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&(metadata.len() as u64).to_le_bytes()).map_err(io)?;
        for (key, value) in metadata {
            write_string(&mut w, key).map_err(io)?;
            w.write_all(&value_type(value).to_le_bytes()).map_err(io)?;
            write_value(&mut w, key, value).map_err(io)?;
        }
        let mut offset = 0u64;
        for t in tensors {
            write_string(&mut w, &t.name).map_err(io)?;
            w.write_all(&(t.dims.len() as u32).to_le_bytes()).map_err(io)?;
            for &d in t.dims.iter().rev() {
                w.write_all(&(d as u64).to_le_bytes()).map_err(io)?;
            }
            w.write_all(&ggml_type_code(t.dtype).to_le_bytes()).map_err(io)?;
            w.write_all(&offset.to_le_bytes()).map_err(io)?;
            offset += t.size_in_bytes();
            offset += padding(offset) as u64;
        }
        let position = w.stream_position().map_err(io)?;
        w.write_all(&vec![0u8; padding(position)]).map_err(io)?;
        for (i, t) in tensors.iter().enumerate() {
            let bytes = data(i)?;
            if bytes.len() as u64 != t.size_in_bytes() {
                return Err(ExportError::Internal(format!(
                    "tensor `{}` has {} bytes, its directory entry says {}",
                    t.name,
                    bytes.len(),
                    t.size_in_bytes()
                )));
            }
            w.write_all(&bytes).map_err(io)?;
            w.write_all(&vec![0u8; padding(bytes.len() as u64)]).map_err(io)?;
        }
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(file.metadata().map_err(io)?.len())
    })();
    match result {
        Ok(size) => {
            std::fs::rename(&partial, path).map_err(io)?;
            Ok(size)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}
