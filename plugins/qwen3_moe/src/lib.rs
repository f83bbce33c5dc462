//! The Qwen3-MoE architecture (`Qwen3MoeForCausalLM`): the Qwen3 decoder
//! (q/k norms) with a sparse mixture of experts in place of the MLP —
//! `num_experts_per_tok` of `num_experts` SwiGLU experts per token, chosen
//! by the router `mlp.gate` — and the router's load-balancing loss
//! reported as the auxiliary output `aux_loss`.

use oxtune_helpers_decoder::moe::{load_balancing_loss, SparseMoe};
use oxtune_helpers_decoder::{Activation, ConfigReader, Decoder, DecoderConfig, GgufNaming};
use oxtune_plugin_api::abi::WANT_AUX_OUTPUTS;
use oxtune_plugin_api::gguf::{GgufLayout, GgufMetadata};
use oxtune_plugin_api::graph::aux_output;
use oxtune_plugin_api::serde_json::{json, Value};
use oxtune_plugin_api::{
    declare_plugin, Descriptor, Error, Inputs, LinearLayer, Model, ModelArchitecture, Plugin, Result, Tensor,
};

/// `Qwen3MoeForCausalLM`.
pub struct Qwen3Moe;

impl ModelArchitecture for Qwen3Moe {
    fn descriptor(&self) -> Descriptor {
        Descriptor::model("qwen3_moe", env!("CARGO_PKG_VERSION"))
            .description("Qwen3 mixture-of-experts decoder (top-k routed SwiGLU experts, router aux loss)")
            .architectures(&["Qwen3MoeForCausalLM"])
            // `qwen3moe`: llama.cpp's name, which GGUF files carry.
            .model_types(&["qwen3_moe", "qwen3moe"])
    }

    fn load(&self, config: &Value) -> Result<Box<dyn Model>> {
        let mut cfg = DecoderConfig::from_hf_config(config)?;
        cfg.qk_norm = true;
        cfg.read_qwen_sliding_window(config)?;
        let r = ConfigReader::new(config);
        // transformers 5 names the expert count `num_experts`; some configs
        // carry Mixtral's `num_local_experts`.
        let num_experts = match r.get("num_experts") {
            Some(_) => r.usize("num_experts")?,
            None => r.usize("num_local_experts").map_err(|_| Error::new("config.json: `num_experts` is missing"))?,
        };
        let step = r.usize_or("decoder_sparse_step", 1)?.max(1);
        let mlp_only: Vec<u64> = match r.get("mlp_only_layers") {
            None => Vec::new(),
            Some(v) => v.as_array().and_then(|a| a.iter().map(Value::as_u64).collect()).ok_or_else(|| {
                Error::new(format!("config.json: `mlp_only_layers` must be a list of layer numbers, not {v}"))
            })?,
        };
        let dense_layers =
            (0..cfg.num_layers).map(|layer| mlp_only.contains(&(layer as u64)) || (layer + 1) % step != 0).collect();
        if cfg.activation != Activation::Silu {
            return Err(Error::new("config.json: Qwen3-MoE experts use `hidden_act` `silu`"));
        }
        let moe = SparseMoe {
            num_experts,
            top_k: r.usize("num_experts_per_tok")?,
            norm_topk_prob: r.bool_or("norm_topk_prob", false)?,
            activation: cfg.activation,
            dense_layers,
            expert_intermediate_size: r.usize("moe_intermediate_size")?,
        };
        moe.validate()?;
        let naming = GgufNaming { architecture: "qwen3moe".into(), permute_qk: false };
        let decoder = Decoder::new(cfg).with_feed_forward(Box::new(moe.clone())).with_gguf(naming, config);
        Ok(Box::new(MoeDecoder { decoder, moe }))
    }

    /// llama.cpp's `qwen3moe` keys: the expert counts and width; llama.cpp
    /// always renormalises the chosen experts' weights.
    fn config_from_gguf(&self, metadata: &GgufMetadata) -> Option<Result<Value>> {
        let translate = || -> Result<Value> {
            let mut config = metadata.generic_config().clone();
            config["model_type"] = "qwen3_moe".into();
            config["architectures"] = json!(["Qwen3MoeForCausalLM"]);
            config["num_experts"] = json!(metadata.require("expert_count")? as u64);
            config["num_experts_per_tok"] = json!(metadata.require("expert_used_count")? as u64);
            config["moe_intermediate_size"] = json!(metadata.require("expert_feed_forward_length")? as u64);
            config["norm_topk_prob"] = true.into();
            Ok(config)
        };
        Some(translate())
    }
}

/// The decoder, and the routing settings its aux loss needs.
struct MoeDecoder {
    decoder: Decoder,
    moe: SparseMoe,
}

impl Model for MoeDecoder {
    fn forward(&self, inputs: &Inputs) -> Result<Tensor> {
        let logits = Model::forward(&self.decoder, inputs)?;
        if self.moe.has_sparse_layers() && inputs.try_get(WANT_AUX_OUTPUTS).is_some() {
            aux_output("aux_loss", &load_balancing_loss(self.moe.num_experts, self.moe.top_k)?)?;
        }
        Ok(logits)
    }

    fn linear_layers(&self) -> Option<Vec<LinearLayer>> {
        Some(self.decoder.linear_layers())
    }

    fn gguf_layout(&self) -> Option<Result<GgufLayout>> {
        if !self.moe.norm_topk_prob {
            return Some(Err(Error::new(
                "llama.cpp's `qwen3moe` always renormalises the chosen experts' weights; this model sets \
                 `norm_topk_prob` false, so it has no GGUF form",
            )));
        }
        Model::gguf_layout(&self.decoder)
    }
}

fn plugin() -> Plugin {
    Plugin::new("oxtune-plugin-qwen3-moe", env!("CARGO_PKG_VERSION")).model(Qwen3Moe)
}

declare_plugin!(plugin);
