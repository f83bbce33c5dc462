//! GGUF files (llama.cpp's format): the model config, the weights
//! (dequantized: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the
//! K-quants), the tokenizer and the chat template, all from one file.
//!
//! GGUF names config keys by llama.cpp's conventions, shared by every
//! decoder architecture; this module reads them into a Hugging Face style
//! config. Tensor names and row orders are the model plugin's
//! [`GgufLayout`] (API 1.2): weights come out under their checkpoint names
//! and in the checkpoint's row order (llama.cpp stores Llama's q/k rows
//! permuted for pairwise RoPE), so a model loaded from GGUF trains
//! adapters and saves folders that transformers and PEFT read. For a
//! plugin without a layout (API 1.1) the host's table of llama.cpp's
//! standard names applies, the rows stay as stored, and the config
//! carries [`LEGACY_ARCHITECTURE_KEY`] for the plugin to rotate pairs.

use std::fs::File;
use std::io::{BufReader, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor, Var};
use oxtune_plugin_api::gguf::{gguf_row_order, GgufLayout, GgufTensor};
use serde_json::json;

use super::checkpoint::{CheckpointError, Trainable};
use crate::backend::WeightStore;
use crate::quant::{QuantizeOnLoad, QuantizedWeight};
use oxtune_kernels::blocks::{BlockMatrix, GgmlFormat};

/// The config key naming the GGUF file's architecture, for plugins that
/// read llama.cpp's row order themselves (API 1.1).
pub const LEGACY_ARCHITECTURE_KEY: &str = "gguf_architecture";

/// A parsed GGUF header: metadata and tensor directory.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

fn corrupt(path: &Path, message: String) -> CheckpointError {
    CheckpointError::Safetensors { path: path.to_owned(), message }
}

/// A GGUF metadata value as JSON.
fn metadata_json(value: &Value) -> serde_json::Value {
    match value {
        Value::U8(v) => json!(v),
        Value::I8(v) => json!(v),
        Value::U16(v) => json!(v),
        Value::I16(v) => json!(v),
        Value::U32(v) => json!(v),
        Value::I32(v) => json!(v),
        Value::U64(v) => json!(v),
        Value::I64(v) => json!(v),
        Value::F32(v) => json!(v),
        Value::F64(v) => json!(v),
        Value::Bool(v) => json!(v),
        Value::String(v) => json!(v),
        Value::Array(items) => serde_json::Value::Array(items.iter().map(metadata_json).collect()),
    }
}

/// The Hugging Face name of a llama.cpp tensor name, if it is a standard one.
pub fn hf_tensor_name(gguf: &str) -> Option<String> {
    let (stem, suffix) = gguf.rsplit_once('.')?;
    let top = match stem {
        "token_embd" => Some("model.embed_tokens".to_owned()),
        "output_norm" => Some("model.norm".to_owned()),
        "output" => Some("lm_head".to_owned()),
        _ => None,
    };
    if let Some(top) = top {
        return Some(format!("{top}.{suffix}"));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let module = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{suffix}"))
}

impl GgufFile {
    /// Reads the header of `path`.
    pub fn open(path: &Path) -> Result<GgufFile, CheckpointError> {
        let file = File::open(path).map_err(|cause| CheckpointError::Io { path: path.to_owned(), source: cause })?;
        let content = Content::read(&mut BufReader::new(file))
            .map_err(|e| corrupt(path, format!("not a readable GGUF file: {e}")))?;
        Ok(GgufFile { path: path.to_owned(), content })
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn string(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.to_string().ok()).map(String::as_str)
    }

    fn number(&self, key: &str) -> Option<f64> {
        let v = self.get(key)?;
        v.to_f64()
            .or_else(|_| v.to_f32().map(f64::from))
            .or_else(|_| v.to_u64().map(|n| n as f64))
            .or_else(|_| v.to_i64().map(|n| n as f64))
            .or_else(|_| v.to_u32().map(f64::from))
            .or_else(|_| v.to_i32().map(f64::from))
            .ok()
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, CheckpointError> {
        let bad = || corrupt(&self.path, format!("metadata `{key}` is missing or not a list of strings"));
        let values = self.get(key).and_then(|v| v.to_vec().ok()).ok_or_else(bad)?;
        values.iter().map(|v| v.to_string().cloned().map_err(|_| bad())).collect()
    }

    /// Forgets the `tokenizer.ggml.*` metadata (the vocabulary and merges
    /// as some 100,000 strings: 6 MB for SmolLM2), for a caller that loads
    /// the weights and has no use for it.
    pub fn drop_tokenizer_metadata(&mut self) {
        self.content.metadata.retain(|key, _| !key.starts_with("tokenizer.ggml."));
    }

    /// `general.architecture` (`llama`, `qwen2`, ...).
    pub fn architecture(&self) -> Result<&str, CheckpointError> {
        self.string("general.architecture")
            .ok_or_else(|| corrupt(&self.path, "metadata `general.architecture` is missing".into()))
    }

    /// The metadata of the file's architecture as a model plugin reads it
    /// (`{"architecture": "qwen3moe", "values": {key: value}}`: every key
    /// under `{architecture}.`, see `oxtune_plugin_api::gguf::GgufMetadata`).
    pub fn architecture_metadata(&self) -> Result<serde_json::Value, CheckpointError> {
        let arch = self.architecture()?.to_owned();
        let prefix = format!("{arch}.");
        let values: serde_json::Map<String, serde_json::Value> = self
            .content
            .metadata
            .iter()
            .filter(|(key, _)| key.starts_with(&prefix))
            .map(|(key, value)| (key.clone(), metadata_json(value)))
            .collect();
        Ok(json!({"architecture": arch, "values": values}))
    }

    /// A Hugging Face style `config.json` built from the metadata.
    pub fn hf_config(&self) -> Result<serde_json::Value, CheckpointError> {
        let arch = self.architecture()?.to_owned();
        let key = |k: &str| format!("{arch}.{k}");
        let need = |k: &str| {
            self.number(&key(k)).ok_or_else(|| corrupt(&self.path, format!("metadata `{}` is missing", key(k))))
        };
        let heads = need("attention.head_count")?;
        let hidden = need("embedding_length")?;
        let vocab = match self.number(&key("vocab_size")) {
            Some(v) => v,
            None => self.strings("tokenizer.ggml.tokens")?.len() as f64,
        };
        let mut config = json!({
            "model_type": arch,
            LEGACY_ARCHITECTURE_KEY: arch,
            "hidden_size": hidden as u64,
            "intermediate_size": need("feed_forward_length")? as u64,
            "num_hidden_layers": need("block_count")? as u64,
            "num_attention_heads": heads as u64,
            "num_key_value_heads": self.number(&key("attention.head_count_kv")).unwrap_or(heads) as u64,
            "head_dim": self.number(&key("attention.key_length")).unwrap_or(hidden / heads) as u64,
            "rms_norm_eps": self.number(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
            "max_position_embeddings": self.number(&key("context_length")).unwrap_or(2048.0) as u64,
            "rope_theta": self.number(&key("rope.freq_base")).unwrap_or(10_000.0),
            "vocab_size": vocab as u64,
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
        });
        if let Some(kind) = self.string(&key("rope.scaling.type")).filter(|k| *k != "none") {
            let mut scaling =
                json!({"rope_type": kind, "factor": self.number(&key("rope.scaling.factor")).unwrap_or(1.0)});
            if let Some(original) = self.number(&key("rope.scaling.original_context_length")) {
                scaling["original_max_position_embeddings"] = json!(original as u64);
            }
            config["rope_scaling"] = scaling;
        }
        if let Some(window) = self.number(&key("attention.sliding_window")) {
            config["sliding_window"] = json!(window as u64);
        }
        Ok(config)
    }

    /// Every tensor, dequantized to `dtype`, under its checkpoint name and
    /// in the checkpoint's row order as `layout` says (without one: under
    /// llama.cpp's standard names, rows as stored); linear layers
    /// requantised to 4 bits one by one when `quantize` asks. With
    /// `keep_quantized`, frozen Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K matrices
    /// stay in blocks (other formats are dequantised).
    pub fn load_weights(
        &self,
        layout: Option<&GgufLayout>,
        dtype: DType,
        device: &Device,
        trainable: Trainable,
        quantize: Option<QuantizeOnLoad>,
        keep_quantized: bool,
    ) -> Result<WeightStore, CheckpointError> {
        let file =
            File::open(&self.path).map_err(|cause| CheckpointError::Io { path: self.path.clone(), source: cause })?;
        let mut reader = BufReader::new(file);
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        let by_gguf_name = layout.map(GgufLayout::index_by_gguf_name);
        let mut store = WeightStore::new();
        for name in names {
            // llama.cpp's precomputed llama3 RoPE factors: the config's rope
            // scaling already describes them.
            if name == "rope_freqs.weight" {
                continue;
            }
            let entry = match (layout, &by_gguf_name) {
                (Some(layout), Some(index)) => {
                    index.get(name.as_str()).map(|&i| layout.tensors[i].clone()).ok_or_else(|| {
                        corrupt(&self.path, format!("tensor `{name}` is not part of a `{}` model", layout.architecture))
                    })?
                }
                _ => GgufTensor::renamed(
                    hf_tensor_name(name).ok_or_else(|| {
                        corrupt(&self.path, format!("tensor `{name}` has no Hugging Face equivalent"))
                    })?,
                    name.as_str(),
                ),
            };
            let (hf, permute_heads) = (entry.hf.clone(), entry.permute_heads);
            let info = &self.content.tensor_infos[name];
            let plain = entry.stacked.is_empty() && entry.offset.is_none();
            if let (true, true, Trainable::None, Some(kind), [rows, cols]) =
                (keep_quantized, plain, trainable, block_kind(info.ggml_dtype), info.shape.dims())
            {
                // Kept in its blocks, read straight from the file into them
                // (no second copy), rows reordered as the checkpoint has them.
                let (rows, cols) = (*rows, *cols);
                let order = permute_heads.map(|heads| {
                    let mut inverse = vec![0; rows];
                    for (gguf_row, hf_row) in gguf_row_order(rows, heads as usize).into_iter().enumerate() {
                        inverse[hf_row] = gguf_row;
                    }
                    inverse
                });
                let at = self.content.tensor_data_offset + info.offset;
                reader
                    .seek(std::io::SeekFrom::Start(at))
                    .map_err(|cause| CheckpointError::Io { path: self.path.clone(), source: cause })?;
                let blocks = BlockMatrix::read_ggml(kind, rows, cols, &mut reader, order.as_deref())
                    .map_err(|m| corrupt(&self.path, format!("tensor `{name}`: {m}")))?;
                store.insert_quantized(hf, QuantizedWeight::Blocks(blocks));
                continue;
            }
            let stored = self
                .content
                .tensor(&mut reader, name, device)
                .map_err(|e| corrupt(&self.path, format!("tensor `{name}`: {e}")))?;
            let tensor = Ok(stored)
                .and_then(|q| q.dequantize(device))
                .and_then(|t| match permute_heads {
                    Some(heads) => checkpoint_rows(&t, heads as usize),
                    None => Ok(t),
                })
                .and_then(|t| match entry.offset {
                    Some(offset) => t.affine(1.0, -offset as f64),
                    None => Ok(t),
                })
                .and_then(|t| t.to_dtype(dtype))
                .map_err(|e| corrupt(&self.path, format!("tensor `{name}`: {e}")))?;
            let parts = match entry.stacked.len() {
                0 => vec![(hf, tensor)],
                n if tensor.dims().first() == Some(&n) => entry
                    .stacked
                    .iter()
                    .enumerate()
                    .map(|(i, hf)| tensor.get(i).map(|t| (hf.clone(), t)))
                    .collect::<candle_core::Result<_>>()
                    .map_err(|e| corrupt(&self.path, format!("tensor `{name}`: {e}")))?,
                n => {
                    return Err(corrupt(
                        &self.path,
                        format!(
                            "tensor `{name}` has shape {:?}; its plugin's layout stacks {n} tensors",
                            tensor.dims()
                        ),
                    ))
                }
            };
            for (hf, tensor) in parts {
                match trainable {
                    Trainable::None => store
                        .insert_loaded(hf, tensor, quantize)
                        .map_err(|e| corrupt(&self.path, format!("tensor `{name}`: {e}")))?,
                    Trainable::All => {
                        let var = Var::from_tensor(&tensor).map_err(|e| corrupt(&self.path, e.to_string()))?;
                        store.insert_var(hf, var)
                    }
                }
            }
        }
        Ok(store)
    }

    /// The tokenizer, rebuilt from `tokenizer.ggml.*` as a `tokenizer.json` document.
    pub fn tokenizer_json(&self) -> Result<serde_json::Value, CheckpointError> {
        let model = self.string("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            return Err(corrupt(
                &self.path,
                format!("tokenizer model `{model}` is not supported yet (byte-level BPE, `gpt2`, is)"),
            ));
        }
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let merges = self.strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = self
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|t| t.to_i32().map(i64::from).unwrap_or(1)).collect())
            .unwrap_or_default();
        let vocab: serde_json::Map<String, serde_json::Value> =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        // Control (3) and user-defined (4) tokens match as whole strings.
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3 | 4)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": types.get(i) == Some(&3)})
            })
            .collect();
        let pre = self.string("tokenizer.ggml.pre").unwrap_or("default");
        let pre_tokenizer = pre_tokenizer_json(pre).ok_or_else(|| {
            corrupt(&self.path, format!("pre-tokenizer `{pre}` (tokenizer.ggml.pre) is not supported yet"))
        })?;
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        }))
    }

    /// `tokenizer.chat_template`, if present.
    pub fn chat_template(&self) -> Option<&str> {
        self.string("tokenizer.chat_template")
    }

    /// The id of a special token (`bos`, `eos`, `padding`, `unknown`).
    pub fn special_token_id(&self, which: &str) -> Option<u32> {
        self.number(&format!("tokenizer.ggml.{which}_token_id")).map(|v| v as u32)
    }

    /// Every tensor's name and shape (outermost first), in file order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut infos: Vec<_> = self.content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, info)| info.offset);
        infos.into_iter().map(|(name, info)| (name.clone(), info.shape.dims().to_vec())).collect()
    }

    /// One tensor, dequantized to f32 on the CPU, rows as stored.
    pub fn read_tensor(&self, name: &str) -> Result<Tensor, CheckpointError> {
        let file =
            File::open(&self.path).map_err(|cause| CheckpointError::Io { path: self.path.clone(), source: cause })?;
        self.content
            .tensor(&mut BufReader::new(file), name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .map_err(|e| corrupt(&self.path, format!("tensor `{name}`: {e}")))
    }

    /// Every metadata entry whose key starts with `prefix` (`tokenizer.`).
    pub fn metadata_with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a Value)> + 'a {
        self.content.metadata.iter().filter(move |(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.as_str(), v))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The `tokenizer.json` pre-tokenizer of llama.cpp's byte-level BPE
/// pre-tokenizer type `pre` (`tokenizer.ggml.pre`), if known.
pub fn pre_tokenizer_json(pre: &str) -> Option<serde_json::Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Some(match pre {
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        "smollm" | "starcoder" | "refact" | "codeshell" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "qwen2" | "deepseek-r1-qwen" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        _ => return None,
    })
}

/// The pre-tokenizer types [`pre_tokenizer_json`] knows, one name per
/// distinct pre-tokenizer (the name llama.cpp's converter writes).
pub const PRE_TOKENIZERS: [&str; 4] = ["gpt-2", "smollm", "qwen2", "llama-bpe"];

/// The block format of a ggml dtype the decoding kernels keep (the 2-
/// and 3-bit K-quants are dequantised).
fn block_kind(dtype: candle_core::quantized::GgmlDType) -> Option<GgmlFormat> {
    use candle_core::quantized::GgmlDType;
    match dtype {
        GgmlDType::Q4_0 => Some(GgmlFormat::Q4_0),
        GgmlDType::Q4_1 => Some(GgmlFormat::Q4_1),
        GgmlDType::Q5_0 => Some(GgmlFormat::Q5_0),
        GgmlDType::Q5_1 => Some(GgmlFormat::Q5_1),
        GgmlDType::Q8_0 => Some(GgmlFormat::Q8_0),
        GgmlDType::Q4K => Some(GgmlFormat::Q4K),
        GgmlDType::Q5K => Some(GgmlFormat::Q5K),
        GgmlDType::Q6K => Some(GgmlFormat::Q6K),
        _ => None,
    }
}

/// `stored` (rows in llama.cpp's order, grouped in `heads` heads) with its
/// rows in the checkpoint's order.
pub fn checkpoint_rows(stored: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let order = gguf_row_order(stored.dim(0)?, heads);
    let mut inverse = vec![0u32; order.len()];
    for (gguf_row, &hf_row) in order.iter().enumerate() {
        inverse[hf_row] = gguf_row as u32;
    }
    let index = Tensor::new(inverse, stored.device())?;
    stored.index_select(&index, 0)
}

/// `checkpoint` with its rows in llama.cpp's order (the inverse of
/// [`checkpoint_rows`]).
pub fn gguf_rows(checkpoint: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let order: Vec<u32> = gguf_row_order(checkpoint.dim(0)?, heads).into_iter().map(|r| r as u32).collect();
    let index = Tensor::new(order, checkpoint.device())?;
    checkpoint.index_select(&index, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_permutations_are_inverse() {
        let w = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().reshape((12, 2)).unwrap();
        let stored = gguf_rows(&w, 2).unwrap();
        // Head 0 holds rows 0..6: halves [0,1,2] and [3,4,5] interleave.
        assert_eq!(stored.get(1).unwrap().to_vec1::<f32>().unwrap(), vec![6.0, 7.0]);
        assert_eq!(checkpoint_rows(&stored, 2).unwrap().to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn llama_cpp_names_map_to_hugging_face_names() {
        assert_eq!(hf_tensor_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert_eq!(hf_tensor_name("blk.12.attn_q.bias").unwrap(), "model.layers.12.self_attn.q_proj.bias");
        assert_eq!(hf_tensor_name("blk.0.ffn_norm.weight").unwrap(), "model.layers.0.post_attention_layernorm.weight");
        assert_eq!(hf_tensor_name("blk.3.attn_k_norm.weight").unwrap(), "model.layers.3.self_attn.k_norm.weight");
        assert_eq!(hf_tensor_name("output.weight").unwrap(), "lm_head.weight");
        assert!(hf_tensor_name("blk.x.attn_q.weight").is_none());
        assert!(hf_tensor_name("rope_freqs.weight").is_none());
    }
}
