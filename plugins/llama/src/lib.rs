//! The Llama architecture (`LlamaForCausalLM`), on the shared decoder of
//! `oxtune-plugin-api`: GQA attention with RoPE (every scaling scheme),
//! optional attention and MLP biases, tied or separate output embedding.

use oxtune_helpers_decoder::{Decoder, DecoderConfig, GgufNaming};
use oxtune_plugin_api::serde_json::Value;
use oxtune_plugin_api::{declare_plugin, Descriptor, Model, ModelArchitecture, Plugin, Result};

/// `LlamaForCausalLM`.
pub struct Llama;

impl ModelArchitecture for Llama {
    fn descriptor(&self) -> Descriptor {
        Descriptor::model("llama", env!("CARGO_PKG_VERSION"))
            .description("Llama decoder (Llama 2/3, SmolLM, ...)")
            .architectures(&["LlamaForCausalLM"])
            .model_types(&["llama"])
    }

    fn load(&self, config: &Value) -> Result<Box<dyn Model>> {
        let mut cfg = DecoderConfig::from_hf_config(config)?;
        cfg.read_layer_types(config)?;
        let naming = GgufNaming { architecture: "llama".into(), permute_qk: true };
        Ok(Box::new(Decoder::new(cfg).with_gguf(naming, config)))
    }
}

fn plugin() -> Plugin {
    Plugin::new("oxtune-plugin-llama", env!("CARGO_PKG_VERSION")).model(Llama)
}

declare_plugin!(plugin);
