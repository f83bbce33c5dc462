//! Saving a whole model as a Hugging Face folder — what full fine-tuning
//! and freeze produce: safetensors weights (sharded above a size, with
//! `model.safetensors.index.json`), `config.json`, and the tokenizer and
//! chat template, copied from the source folder or rebuilt from a GGUF
//! file, so the folder loads anywhere a Hub model does.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;

use super::{is_gguf, LoadedModel, ModelError};

/// The largest shard Hugging Face writes by default (`max_shard_size="5GB"`).
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Files of a model folder that describe its text side (and, for a
/// vision-language model, its image processor), copied as they are.
const TEXT_FILES: [&str; 10] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
];

/// Groups tensors (name order) into shards of at most `max_bytes` each (a
/// tensor larger than that gets a shard of its own).
fn shards(tensors: &BTreeMap<String, Tensor>, max_bytes: usize) -> Vec<Vec<&String>> {
    let mut out: Vec<Vec<&String>> = vec![Vec::new()];
    let mut size = 0;
    for (name, tensor) in tensors {
        let bytes = tensor.elem_count() * tensor.dtype().size_in_bytes();
        if size + bytes > max_bytes && !out.last().expect("never empty").is_empty() {
            out.push(Vec::new());
            size = 0;
        }
        out.last_mut().expect("never empty").push(name);
        size += bytes;
    }
    out
}

/// Writes `tensors` into `folder` as `model.safetensors`, or as shards
/// `model-0000i-of-0000n.safetensors` plus the index when they exceed `max_bytes`.
fn write_weights(folder: &Path, tensors: &BTreeMap<String, Tensor>, max_bytes: usize) -> std::io::Result<()> {
    let groups = shards(tensors, max_bytes);
    if groups.len() == 1 {
        let all: std::collections::HashMap<&str, Tensor> =
            tensors.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        return candle_core::safetensors::save(&all, folder.join("model.safetensors")).map_err(std::io::Error::other);
    }
    let mut weight_map = serde_json::Map::new();
    let total: usize = tensors.values().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum();
    for (i, group) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, groups.len());
        let part: std::collections::HashMap<&str, Tensor> =
            group.iter().map(|n| (n.as_str(), tensors[*n].clone())).collect();
        candle_core::safetensors::save(&part, folder.join(&file)).map_err(std::io::Error::other)?;
        for name in group {
            weight_map.insert((*name).clone(), serde_json::json!(file));
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(folder.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)
}

/// Writes the tokenizer side of the model at `source` into `folder`.
fn write_text_files(source: &Path, folder: &Path) -> std::io::Result<()> {
    if !is_gguf(source) {
        for file in TEXT_FILES {
            let from = source.join(file);
            if from.is_file() {
                std::fs::copy(&from, folder.join(file))?;
            }
        }
        return Ok(());
    }
    let gguf = super::gguf::GgufFile::open(source).map_err(std::io::Error::other)?;
    let tokenizer = gguf.tokenizer_json().map_err(std::io::Error::other)?;
    let token = |which: &str| -> serde_json::Value {
        let vocab = tokenizer["model"]["vocab"].as_object();
        gguf.special_token_id(which)
            .and_then(|id| vocab?.iter().find(|(_, v)| v.as_u64() == Some(id as u64)).map(|(t, _)| t.clone()))
            .map(serde_json::Value::from)
            .unwrap_or(serde_json::Value::Null)
    };
    let mut config = serde_json::json!({
        "bos_token": token("bos"), "eos_token": token("eos"), "pad_token": token("padding"),
        "unk_token": token("unknown"), "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(template) = gguf.chat_template() {
        config["chat_template"] = serde_json::json!(template);
    }
    std::fs::write(folder.join("tokenizer.json"), serde_json::to_string(&tokenizer)?)?;
    std::fs::write(folder.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?)?;
    if let Some(eos) = gguf.special_token_id("eos") {
        let generation = serde_json::json!({"eos_token_id": eos});
        std::fs::write(folder.join("generation_config.json"), serde_json::to_string_pretty(&generation)?)?;
    }
    Ok(())
}

impl LoadedModel {
    /// Saves the whole model (adapter-free weights, as trained) as a Hugging
    /// Face folder at `dir`, atomically; `extra` adds files (a trainer's
    /// state) before the folder is put in place.
    pub fn save_pretrained_with(
        &self,
        dir: &Path,
        max_shard_bytes: usize,
        extra: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<(), ModelError> {
        let adapter: std::collections::HashSet<&str> = self.adapter_params.iter().map(String::as_str).collect();
        // A 4-bit base is written dequantised: a full-precision folder.
        let tensors: BTreeMap<String, Tensor> = self
            .weights
            .names()
            .into_iter()
            .filter(|n| !adapter.contains(n))
            .filter_map(|n| self.weights.dense(n, self.dtype).map(|t| t.map(|t| (n.to_owned(), t.detach()))))
            .collect::<candle_core::Result<_>>()
            .map_err(|e| ModelError::Forward {
                model: self.dir.clone(),
                source: crate::backend::OpError::Candle { op: "save", source: e },
            })?;
        let mut config = self.config.clone();
        // Weights loaded from GGUF through a plugin's layout are in the
        // checkpoint's row order: the folder is an ordinary checkpoint.
        if let (Some(object), Ok(Some(_))) = (config.as_object_mut(), self.gguf_layout()) {
            object.remove(super::gguf::LEGACY_ARCHITECTURE_KEY);
        }
        // Weights are held (and saved) in full precision, 4-bit bases included.
        if let Some(object) = config.as_object_mut() {
            object.remove("quantization_config");
        }
        config["torch_dtype"] = serde_json::json!(match self.dtype {
            candle_core::DType::BF16 => "bfloat16",
            candle_core::DType::F16 => "float16",
            _ => "float32",
        });
        super::staging::write_atomically(dir, |folder| {
            write_weights(folder, &tensors, max_shard_bytes)?;
            std::fs::write(folder.join("config.json"), serde_json::to_string_pretty(&config)?)?;
            write_text_files(&self.dir, folder)?;
            extra(folder)
        })
    }

    /// Whether the attached tuner trains base parameters in place (full
    /// fine-tuning, freeze): such a run is saved as a whole model.
    pub fn trains_base(&self) -> bool {
        self.trains_base
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::{load_weights, weight_files, Trainable};
    use candle_core::{DType, Device};

    #[test]
    fn weights_over_the_shard_size_are_split_with_an_index_that_loads_back() {
        let dir = std::env::temp_dir().join(format!("oxtune-shards-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let tensors: BTreeMap<String, Tensor> =
            (0..5).map(|i| (format!("w{i}"), Tensor::full(i as f32, (10, 10), &Device::Cpu).unwrap())).collect();
        // 400 bytes each, 1000 per shard: two per shard, three shards.
        write_weights(&dir, &tensors, 1000).unwrap();
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"], 2000);
        assert_eq!(index["weight_map"]["w4"], "model-00003-of-00003.safetensors");
        let files = weight_files(&dir).unwrap();
        assert_eq!(files.len(), 3);
        let store = load_weights(&files, DType::F32, &Device::Cpu, Trainable::None, None).unwrap();
        for (name, tensor) in &tensors {
            let back = store.get(name).unwrap();
            assert_eq!(back.to_vec2::<f32>().unwrap(), tensor.to_vec2::<f32>().unwrap(), "{name}");
        }
    }
}
