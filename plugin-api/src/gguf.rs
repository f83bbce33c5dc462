//! How a model is stored in llama.cpp's GGUF format: llama.cpp's name for
//! the architecture, its hyperparameters under llama.cpp's keys, and each
//! weight's GGUF name and row order.
//!
//! A model plugin states this ([`crate::Model::gguf_layout`]); the host
//! writes GGUF files with it (`oxtune export --to-gguf`, GGUF LoRA
//! adapters) and turns weights loaded from a GGUF file back into the
//! checkpoint's layout. The layout crosses the ABI as JSON, so new fields
//! can be added without a layout change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One GGUF metadata value, with the exact GGUF type llama.cpp reads it as
/// (llama.cpp refuses `llama.block_count` stored as a float).
///
/// In JSON: `{"type": "u32", "value": 30}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", content = "value", rename_all = "lowercase")]
pub enum GgufValue {
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `uint64`.
    U64(u64),
    /// `float32`.
    F32(f32),
    /// `float64`.
    F64(f64),
    /// `bool`.
    Bool(bool),
    /// `string`.
    Str(String),
    /// `array`, all of one type.
    Array(Vec<GgufValue>),
}

/// One weight: its checkpoint name, its GGUF name, and how llama.cpp
/// orders its rows.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GgufTensor {
    /// The checkpoint's (Hugging Face) name: `model.layers.0.self_attn.q_proj.weight`.
    pub hf: String,
    /// llama.cpp's name: `blk.0.attn_q.weight`.
    pub gguf: String,
    /// When llama.cpp stores the rows permuted so that RoPE rotates
    /// adjacent pairs (Llama's q and k projections): the number of heads
    /// the rows are grouped in. See [`gguf_row_order`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permute_heads: Option<u32>,
    /// llama.cpp stores the checkpoint's values plus this (Gemma's norms,
    /// whose checkpoints hold `w` for a scale of `1 + w`). Added in 1.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<f32>,
    /// When not empty: the checkpoint tensors this one GGUF tensor stacks
    /// along a new first dimension, in order (llama.cpp's `ffn_*_exps`
    /// hold every expert of a layer); `hf` is then the first of them.
    /// Added in 1.2.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stacked: Vec<String>,
}

impl GgufTensor {
    /// A weight stored as it is, under another name.
    pub fn renamed(hf: impl Into<String>, gguf: impl Into<String>) -> GgufTensor {
        GgufTensor { hf: hf.into(), gguf: gguf.into(), permute_heads: None, offset: None, stacked: Vec::new() }
    }

    /// The checkpoint tensors it holds: the stacked ones, or `hf` alone.
    pub fn sources(&self) -> Vec<&str> {
        if self.stacked.is_empty() {
            vec![self.hf.as_str()]
        } else {
            self.stacked.iter().map(String::as_str).collect()
        }
    }
}

/// A model's GGUF form.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GgufLayout {
    /// `general.architecture`: `llama`, `qwen2`, `qwen3`, ...
    pub architecture: String,
    /// The architecture's hyperparameters under their full keys
    /// (`llama.block_count`, `llama.rope.freq_base`, ...).
    pub metadata: BTreeMap<String, GgufValue>,
    /// Every weight of the model.
    pub tensors: Vec<GgufTensor>,
}

impl GgufLayout {
    /// Each tensor's position in [`GgufLayout::tensors`] by its checkpoint
    /// name, stacked ones included (build once, look up per weight).
    pub fn index_by_hf_name(&self) -> std::collections::HashMap<&str, usize> {
        self.tensors.iter().enumerate().flat_map(|(i, t)| t.sources().into_iter().map(move |hf| (hf, i))).collect()
    }

    /// Each tensor's position by its GGUF name.
    pub fn index_by_gguf_name(&self) -> std::collections::HashMap<&str, usize> {
        self.tensors.iter().enumerate().map(|(i, t)| (t.gguf.as_str(), i)).collect()
    }
}

/// For each row of a weight as llama.cpp stores it, the checkpoint row it
/// holds, for a weight of `rows` rows grouped in `heads` heads.
///
/// This is `LlamaModel.permute` of llama.cpp's `convert_hf_to_gguf.py`:
/// within each head, the first and second halves of the features are
/// interleaved, so GGUF row `2i + j` of a head is checkpoint row
/// `j · half + i`.
///
/// ```
/// use oxtune_plugin_api::gguf::gguf_row_order;
/// // One head of 4 rows: halves [0, 1] and [2, 3] interleave.
/// assert_eq!(gguf_row_order(4, 1), vec![0, 2, 1, 3]);
/// ```
pub fn gguf_row_order(rows: usize, heads: usize) -> Vec<usize> {
    let per_head = rows / heads.max(1);
    let half = per_head / 2;
    (0..rows)
        .map(|r| {
            let (head, within) = (r / per_head, r % per_head);
            head * per_head + (within % 2) * half + within / 2
        })
        .collect()
}

/// The metadata of a GGUF file's architecture, as the host hands it to a
/// model plugin to translate into a `config.json`
/// ([`crate::ModelArchitecture::config_from_gguf`]): every key under the
/// file's `general.architecture` (`qwen3moe.expert_count`, ...), the
/// values as JSON numbers, strings, booleans or arrays, and the host's
/// generic translation of the keys every llama.cpp decoder shares, for the
/// plugin to complete.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufMetadata {
    architecture: String,
    values: serde_json::Map<String, serde_json::Value>,
    config: serde_json::Value,
}

impl GgufMetadata {
    /// The metadata of `architecture` from its keys (full names) and the
    /// host's generic `config`.
    pub fn new(
        architecture: impl Into<String>,
        values: serde_json::Map<String, serde_json::Value>,
        config: serde_json::Value,
    ) -> GgufMetadata {
        GgufMetadata { architecture: architecture.into(), values, config }
    }

    /// The host's translation of the shared keys (`hidden_size`,
    /// `num_hidden_layers`, `rope_theta`, ...), as a `config.json` object.
    pub fn generic_config(&self) -> &serde_json::Value {
        &self.config
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> &str {
        &self.architecture
    }

    /// The value of `{architecture}.{key}`.
    pub fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.values.get(&format!("{}.{key}", self.architecture))
    }

    /// A number at `{architecture}.{key}`, if present.
    pub fn number(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(serde_json::Value::as_f64)
    }

    /// A required number, or an error naming the key.
    pub fn require(&self, key: &str) -> crate::Result<f64> {
        self.number(key)
            .ok_or_else(|| crate::Error::new(format!("GGUF metadata `{}.{key}` is missing", self.architecture)))
    }
}
