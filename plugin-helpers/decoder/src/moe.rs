//! Mixture-of-experts feed-forward blocks for decoder plugins (Qwen3-MoE,
//! Qwen2-MoE, Mixtral): a router picks `top_k` of `num_experts` gated
//! MLPs per token, on host ops alone — the routing never leaves the
//! device ([`Tensor::topk_indices`], [`Tensor::gather`],
//! [`grouped_linear`]), and every expert's projections pass through the
//! tuner hook, so LoRA can adapt them.
//!
//! Each layer keeps its router logits under [`ROUTER_LOGITS`];
//! [`load_balancing_loss`] turns them into transformers' router
//! auxiliary loss at the end of the forward pass, when the host asks for
//! auxiliary outputs ([`oxtune_plugin_api::abi::WANT_AUX_OUTPUTS`]).

use std::collections::BTreeMap;

use oxtune_plugin_api::abi::{Compare, DType};
use oxtune_plugin_api::gguf::{GgufTensor, GgufValue};
use oxtune_plugin_api::graph::{collect, collected, constant, grouped_linear, token_mask, Tensor};
use oxtune_plugin_api::nn::Linear;
use oxtune_plugin_api::{Error, FusedSlot, LinearLayer, LinearRole, Result};

use crate::{Activation, FeedForward, GatedMlp};

/// The key the router logits of every sparse layer are collected under
/// (`[batch · seq, num_experts]` per layer, in layer order).
pub const ROUTER_LOGITS: &str = "router_logits";

/// A sparse mixture-of-experts feed-forward part with transformers'
/// layout: the router `{prefix}.gate`, experts
/// `{prefix}.experts.{e}.{gate,up,down}_proj`; layers marked dense use the
/// gated MLP at `{prefix}.{gate,up,down}_proj` instead.
#[derive(Clone, Debug)]
pub struct SparseMoe {
    /// Experts per sparse layer.
    pub num_experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Renormalise the chosen experts' router probabilities to sum to 1
    /// (Qwen3-MoE's `norm_topk_prob`, Mixtral always).
    pub norm_topk_prob: bool,
    /// The experts' gate activation.
    pub activation: Activation,
    /// Per layer: whether it has a dense MLP instead of experts (Qwen's
    /// `mlp_only_layers` and `decoder_sparse_step`).
    pub dense_layers: Vec<bool>,
    /// Each expert's inner width (`moe_intermediate_size`), for llama.cpp's
    /// `expert_feed_forward_length`.
    pub expert_intermediate_size: usize,
}

impl SparseMoe {
    /// Checks the routing settings, naming the config field at fault.
    pub fn validate(&self) -> Result<()> {
        if self.num_experts == 0 {
            return Err(Error::new("config.json: a mixture of experts needs `num_experts` > 0"));
        }
        if self.top_k == 0 || self.top_k > self.num_experts {
            return Err(Error::new(format!(
                "config.json: `num_experts_per_tok` ({}) must be between 1 and the number of experts ({})",
                self.top_k, self.num_experts
            )));
        }
        Ok(())
    }

    /// Whether any layer routes to experts.
    pub fn has_sparse_layers(&self) -> bool {
        self.dense_layers.iter().any(|dense| !dense)
    }

    fn dense(&self) -> GatedMlp {
        GatedMlp { activation: self.activation, bias: false }
    }

    fn expert_names(&self, prefix: &str, projection: &str) -> Vec<String> {
        (0..self.num_experts).map(|e| format!("{prefix}.experts.{e}.{projection}")).collect()
    }
}

impl FeedForward for SparseMoe {
    fn forward(&self, layer: usize, prefix: &str, x: &Tensor) -> Result<Tensor> {
        if self.dense_layers.get(layer).copied().unwrap_or(false) {
            return self.dense().forward(layer, prefix, x);
        }
        let dims = x.dims()?;
        let hidden = *dims.last().ok_or_else(|| Error::new("moe: scalar input"))?;
        let tokens = dims.iter().product::<usize>() / hidden.max(1);
        let (n, k, h) = (tokens as i64, self.top_k as i64, hidden as i64);
        let flat = x.reshape(&[n, h])?;
        let logits = collect(ROUTER_LOGITS, &Linear::new(format!("{prefix}.gate")).forward(&flat)?)?;
        // Routing in f32, as transformers does.
        let probs = logits.to_dtype(DType::F32)?.softmax(-1)?;
        let chosen = probs.topk_indices(self.top_k)?;
        let mut weights = probs.gather(&chosen, -1)?;
        if self.norm_topk_prob {
            weights = weights.div(&weights.sum_keepdim(-1)?)?;
        }
        let weights = weights.to_dtype(x.dtype()?)?.reshape(&[n * k, 1])?;
        // Each token once per chosen expert (row t·k + j), then the experts over their rows.
        let rows = flat.reshape(&[n, 1, h])?.broadcast_as(&[tokens, self.top_k, hidden])?.reshape(&[n * k, h])?;
        let experts = chosen.reshape(&[n * k])?;
        let gate = grouped_linear(&self.expert_names(prefix, "gate_proj"), &rows, &experts)?;
        let up = grouped_linear(&self.expert_names(prefix, "up_proj"), &rows, &experts)?;
        let inner = self.activation.apply(&gate)?.mul(&up)?;
        let down = grouped_linear(&self.expert_names(prefix, "down_proj"), &inner, &experts)?;
        down.mul(&weights)?.reshape(&[n, k, h])?.sum(1)?.reshape(&dims.iter().map(|&d| d as i64).collect::<Vec<_>>())
    }

    fn gguf_tensors(&self, layer: usize, prefix: &str, blk: &str) -> Result<Vec<GgufTensor>> {
        if self.dense_layers.get(layer).copied().unwrap_or(false) {
            return Err(Error::new(format!(
                "layer {layer} has a dense MLP among expert layers, which llama.cpp's MoE architectures cannot hold"
            )));
        }
        let mut tensors =
            vec![GgufTensor::renamed(format!("{prefix}.gate.weight"), format!("{blk}.ffn_gate_inp.weight"))];
        for (projection, gguf) in
            [("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")]
        {
            let stacked: Vec<String> =
                self.expert_names(prefix, projection).into_iter().map(|e| format!("{e}.weight")).collect();
            tensors.push(GgufTensor {
                stacked: stacked.clone(),
                ..GgufTensor::renamed(stacked[0].clone(), format!("{blk}.{gguf}.weight"))
            });
        }
        Ok(tensors)
    }

    fn gguf_metadata(&self, arch: &str, metadata: &mut BTreeMap<String, GgufValue>) -> Result<()> {
        for (key, value) in [
            ("expert_count", self.num_experts),
            ("expert_used_count", self.top_k),
            ("expert_feed_forward_length", self.expert_intermediate_size),
        ] {
            metadata.insert(format!("{arch}.{key}"), GgufValue::U32(value as u32));
        }
        Ok(())
    }

    fn linear_layers(&self, layer: usize, prefix: &str) -> Vec<LinearLayer> {
        if self.dense_layers.get(layer).copied().unwrap_or(false) {
            return self.dense().linear_layers(layer, prefix);
        }
        let mut layers = vec![LinearLayer::new(format!("{prefix}.gate"), LinearRole::Router)];
        // transformers 5 holds the experts as `experts.gate_up_proj` (gate
        // rows, then up rows) and `experts.down_proj`.
        let inner = self.expert_intermediate_size;
        for e in 0..self.num_experts {
            for (projection, role, fused, row_offset) in [
                ("gate_proj", LinearRole::MlpGate, "gate_up_proj", 0),
                ("up_proj", LinearRole::MlpUp, "gate_up_proj", inner),
                ("down_proj", LinearRole::MlpDown, "down_proj", 0),
            ] {
                let slot = FusedSlot {
                    parameter: format!("{prefix}.experts.{fused}"),
                    expert: e,
                    experts: self.num_experts,
                    row_offset,
                };
                layers.push(LinearLayer::new(format!("{prefix}.experts.{e}.{projection}"), role).in_fused(slot));
            }
        }
        layers
    }
}

/// transformers' `load_balancing_loss_func` over the router logits every
/// sparse layer collected: `num_experts · Σ_e f_e · P_e`, where `f_e` is
/// the fraction of (token, choice) slots routed to expert `e` and `P_e`
/// the mean router probability of `e`, both over the batch's real tokens
/// (padding left out, as transformers does with the attention mask) and
/// every layer. A scalar, differentiable through the probabilities.
pub fn load_balancing_loss(num_experts: usize, top_k: usize) -> Result<Tensor> {
    let logits = collected(ROUTER_LOGITS)?;
    let slots = logits.dim(0)?;
    let mask = token_mask()?;
    let tokens = mask.dims()?.iter().product::<usize>();
    if tokens == 0 || slots % tokens != 0 {
        return Err(Error::new(format!("moe: {slots} router rows for a batch of {tokens} tokens")));
    }
    let mask = Tensor::cat(&vec![mask.reshape(&[tokens as i64])?; slots / tokens], 0)?;
    let (n, k, e) = (slots as i64, top_k as i64, num_experts as i64);
    let probs = logits.to_dtype(DType::F32)?.softmax(-1)?;
    let chosen = probs.topk_indices(top_k)?.reshape(&[n, k, 1])?;
    let expert_ids = constant((0..num_experts).map(|e| e as f32).collect(), &[1, 1, num_experts], DType::U32)?;
    let one_hot = chosen.compare(&expert_ids, Compare::EQ)?.to_dtype(DType::F32)?;
    let real = mask.sum(0)?;
    let routed = one_hot.mul(&mask.reshape(&[n, 1, 1])?)?.sum(0)?.div(&real)?;
    let probability = probs.mul(&mask.reshape(&[n, 1])?)?.sum(0)?.div(&real)?;
    routed.mul(&probability.reshape(&[1, e])?)?.sum(1)?.sum(0)?.scale(num_experts as f64)
}
