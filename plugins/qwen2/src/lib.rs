//! The Qwen2 architecture (`Qwen2ForCausalLM`, also Qwen2.5's text models),
//! on the shared decoder of `oxtune-plugin-api`: biases on q/k/v, and the
//! Qwen sliding-window layout (`use_sliding_window`, `max_window_layers`).

use oxtune_helpers_decoder::{Decoder, DecoderConfig, GgufNaming};
use oxtune_plugin_api::serde_json::Value;
use oxtune_plugin_api::{declare_plugin, Descriptor, Model, ModelArchitecture, Plugin, Result};

/// `Qwen2ForCausalLM`.
pub struct Qwen2;

impl ModelArchitecture for Qwen2 {
    fn descriptor(&self) -> Descriptor {
        Descriptor::model("qwen2", env!("CARGO_PKG_VERSION"))
            .description("Qwen2 / Qwen2.5 decoder")
            .architectures(&["Qwen2ForCausalLM"])
            .model_types(&["qwen2"])
    }

    fn load(&self, config: &Value) -> Result<Box<dyn Model>> {
        let mut cfg = DecoderConfig::from_hf_config(config)?;
        // Qwen2 always has q/k/v biases; its configs do not say so.
        cfg.attention_bias = true;
        cfg.read_qwen_sliding_window(config)?;
        let naming = GgufNaming { architecture: "qwen2".into(), permute_qk: false };
        Ok(Box::new(Decoder::new(cfg).with_gguf(naming, config)))
    }
}

fn plugin() -> Plugin {
    Plugin::new("oxtune-plugin-qwen2", env!("CARGO_PKG_VERSION")).model(Qwen2)
}

declare_plugin!(plugin);
