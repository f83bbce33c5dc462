//! The Qwen3 architecture (`Qwen3ForCausalLM`), on the shared decoder of
//! `oxtune-plugin-api`: RMSNorm on every query and key head before RoPE, an
//! explicit `head_dim`, and the Qwen sliding-window layout.

use oxtune_helpers_decoder::{Decoder, DecoderConfig, GgufNaming};
use oxtune_plugin_api::serde_json::Value;
use oxtune_plugin_api::{declare_plugin, Descriptor, Model, ModelArchitecture, Plugin, Result};

/// `Qwen3ForCausalLM`.
pub struct Qwen3;

impl ModelArchitecture for Qwen3 {
    fn descriptor(&self) -> Descriptor {
        Descriptor::model("qwen3", env!("CARGO_PKG_VERSION"))
            .description("Qwen3 decoder (q/k norm)")
            .architectures(&["Qwen3ForCausalLM"])
            .model_types(&["qwen3"])
    }

    fn load(&self, config: &Value) -> Result<Box<dyn Model>> {
        let mut cfg = DecoderConfig::from_hf_config(config)?;
        cfg.qk_norm = true;
        cfg.read_qwen_sliding_window(config)?;
        let naming = GgufNaming { architecture: "qwen3".into(), permute_qk: false };
        Ok(Box::new(Decoder::new(cfg).with_gguf(naming, config)))
    }
}

fn plugin() -> Plugin {
    Plugin::new("oxtune-plugin-qwen3", env!("CARGO_PKG_VERSION")).model(Qwen3)
}

declare_plugin!(plugin);
