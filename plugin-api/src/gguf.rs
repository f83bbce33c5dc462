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
    /// name (build once, look up per weight).
    pub fn index_by_hf_name(&self) -> std::collections::HashMap<&str, usize> {
        self.tensors.iter().enumerate().map(|(i, t)| (t.hf.as_str(), i)).collect()
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
