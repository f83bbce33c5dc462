//! GGUF files (llama.cpp's format): the model config, the weights
//! (dequantized: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the
//! K-quants), the tokenizer and the chat template, all from one file.
//!
//! GGUF names tensors and config keys by llama.cpp's conventions, shared
//! by every decoder architecture. This module translates them to the
//! Hugging Face names the architecture plugins use, so a plugin serves a
//! GGUF file with no code of its own; the config carries
//! `gguf_architecture` for the conventions that differ per architecture
//! (llama.cpp stores Llama's q/k projections permuted for pairwise RoPE).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Var};
use serde_json::json;

use super::checkpoint::{CheckpointError, Trainable};
use crate::backend::WeightStore;

/// A parsed GGUF header: metadata and tensor directory.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

fn corrupt(path: &Path, message: String) -> CheckpointError {
    CheckpointError::Safetensors { path: path.to_owned(), message }
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

    /// `general.architecture` (`llama`, `qwen2`, ...).
    pub fn architecture(&self) -> Result<&str, CheckpointError> {
        self.string("general.architecture")
            .ok_or_else(|| corrupt(&self.path, "metadata `general.architecture` is missing".into()))
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
            "gguf_architecture": arch,
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

    /// Every tensor, dequantized to `dtype`, under its Hugging Face name.
    pub fn load_weights(
        &self,
        dtype: DType,
        device: &Device,
        trainable: Trainable,
    ) -> Result<WeightStore, CheckpointError> {
        let file =
            File::open(&self.path).map_err(|cause| CheckpointError::Io { path: self.path.clone(), source: cause })?;
        let mut reader = BufReader::new(file);
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        let mut store = WeightStore::new();
        for name in names {
            // llama.cpp's precomputed llama3 RoPE factors: the config's rope
            // scaling already describes them.
            if name == "rope_freqs.weight" {
                continue;
            }
            let hf = hf_tensor_name(name)
                .ok_or_else(|| corrupt(&self.path, format!("tensor `{name}` has no Hugging Face equivalent")))?;
            let tensor = self
                .content
                .tensor(&mut reader, name, device)
                .and_then(|q| q.dequantize(device))
                .and_then(|t| t.to_dtype(dtype))
                .map_err(|e| corrupt(&self.path, format!("tensor `{name}`: {e}")))?;
            match trainable {
                Trainable::None => store.insert(hf, tensor),
                Trainable::All => {
                    let var = Var::from_tensor(&tensor).map_err(|e| corrupt(&self.path, e.to_string()))?;
                    store.insert_var(hf, var)
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
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
        let pre = self.string("tokenizer.ggml.pre").unwrap_or("default");
        let pre_tokenizer = match pre {
            "default" | "gpt-2" | "gpt2" => byte_level(true),
            "smollm" | "starcoder" | "refact" | "codeshell" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            "qwen2" | "deepseek-r1-qwen" => json!({"type": "Sequence", "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                byte_level(false)]}),
            "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                byte_level(false)]}),
            other => {
                return Err(corrupt(
                    &self.path,
                    format!("pre-tokenizer `{other}` (tokenizer.ggml.pre) is not supported yet"),
                ))
            }
        };
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

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::hf_tensor_name;

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
