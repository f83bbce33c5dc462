//! Layer helpers named after their Hugging Face modules.
//!
//! Each holds only the module's weight prefix and hyper-parameters; the
//! weights themselves stay with the host, which resolves
//! `{prefix}.weight` from safetensors or GGUF and applies tuners.

use abi_stable::std_types::RString;

use crate::abi::Op;
use crate::graph::{apply_op, Tensor};
use crate::Result;

/// A linear layer `{prefix}.weight` (and `{prefix}.bias` if the checkpoint
/// has one): the tuner hook, so LoRA and friends reach it.
#[derive(Clone, Debug)]
pub struct Linear {
    prefix: String,
}

impl Linear {
    /// The layer whose weights are stored under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Linear {
        Linear { prefix: prefix.into() }
    }

    /// `x · W^T (+ b)`, adapted by whatever tuner targets this layer.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        apply_op(Op::Linear { name: RString::from(self.prefix.as_str()), x: x.id() })
    }
}

/// RMSNorm with weight `{prefix}.weight`.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    prefix: String,
    eps: f64,
    weight_offset: f64,
}

impl RmsNorm {
    /// The norm stored under `prefix` with epsilon `eps`.
    pub fn new(prefix: impl Into<String>, eps: f64) -> RmsNorm {
        RmsNorm { prefix: prefix.into(), eps, weight_offset: 0.0 }
    }

    /// The same norm scaling by `w + offset` instead of `w`: Gemma stores
    /// its norm weights around 0 and scales by `1 + w` (`offset` 1).
    pub fn with_weight_offset(mut self, offset: f64) -> RmsNorm {
        self.weight_offset = offset;
        self
    }

    /// `x / rms(x) * (w + offset)`, computed in f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let name = RString::from(self.prefix.as_str());
        match self.weight_offset {
            0.0 => apply_op(Op::RmsNorm { name, x: x.id(), eps: self.eps }),
            offset => apply_op(Op::RmsNormOffset { name, x: x.id(), eps: self.eps, offset }),
        }
    }
}

/// LayerNorm with `{prefix}.weight` and optional `{prefix}.bias`.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    prefix: String,
    eps: f64,
}

impl LayerNorm {
    /// The norm stored under `prefix` with epsilon `eps`.
    pub fn new(prefix: impl Into<String>, eps: f64) -> LayerNorm {
        LayerNorm { prefix: prefix.into(), eps }
    }

    /// `(x - mean) / sqrt(var + eps) * w + b` over the last dim.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        apply_op(Op::LayerNorm { name: RString::from(self.prefix.as_str()), x: x.id(), eps: self.eps })
    }
}

/// A token embedding `{prefix}.weight`.
#[derive(Clone, Debug)]
pub struct Embedding {
    prefix: String,
}

impl Embedding {
    /// The embedding stored under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Embedding {
        Embedding { prefix: prefix.into() }
    }

    /// The rows for the integer `ids`, with one trailing hidden dim added.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        apply_op(Op::Embedding { name: RString::from(self.prefix.as_str()), ids: ids.id() })
    }
}

/// The standard RoPE inverse frequencies `theta^(-2i/dim)` for `i < dim/2`.
pub fn rope_inv_freq(rotary_dim: usize, theta: f64) -> Vec<f32> {
    (0..rotary_dim / 2).map(|i| (1.0 / theta.powf(2.0 * i as f64 / rotary_dim as f64)) as f32).collect()
}
