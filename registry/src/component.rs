//! Reward functions as WebAssembly components: the typed WIT world in
//! `registry/wit/reward.wit` (`score: func(samples: list<sample>) ->
//! result<list<f64>, string>`). A Rust reward built for `wasm32-wasip2`
//! with `wit-bindgen` is such a component.
//!
//! The sandbox is the core modules' (fresh instance per sample, fuel
//! deadline, memory cap); every import — WASI's included — is defined as a
//! trap, so a component can load but calling the clock, the environment,
//! a file or a socket fails that sample.

use std::path::Path;

use oxtune_plugin_api::RewardSample;
use wasmtime::component::{Component, Linker};
use wasmtime::Store;

use crate::wasm::SandboxState;
use crate::RegistryError;

wasmtime::component::bindgen!({ path: "wit/reward.wit", world: "reward" });

/// Whether `bytes` are a component (not a core module): the binary
/// header's layer field says so.
pub(crate) fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[..4] == b"\0asm" && bytes[4..8] == [0x0d, 0x00, 0x01, 0x00]
}

/// A compiled reward component with its (all-trapping) imports.
pub(crate) struct ComponentScript {
    pre: RewardPre<SandboxState>,
}

impl ComponentScript {
    /// Compiles `bytes` and checks that the component exports the `reward` world.
    pub(crate) fn load(path: &Path, engine: &wasmtime::Engine, bytes: &[u8]) -> Result<ComponentScript, RegistryError> {
        let invalid = |e: wasmtime::Error| RegistryError::InvalidWasm {
            path: path.to_owned(),
            reason: e.to_string().lines().next().unwrap_or_default().to_owned(),
        };
        let bad = |e: wasmtime::Error| RegistryError::BadInterface {
            path: path.to_owned(),
            reason: format!(
                "does not match the oxtune:reward world: {}",
                e.to_string().lines().next().unwrap_or_default()
            ),
        };
        let component = Component::new(engine, bytes).map_err(invalid)?;
        let mut linker = Linker::new(engine);
        linker.define_unknown_imports_as_traps(&component).map_err(bad)?;
        let pre = linker.instantiate_pre(&component).map_err(bad)?;
        Ok(ComponentScript { pre: RewardPre::new(pre).map_err(bad)? })
    }

    /// Scores one sample in a fresh instance of `store`.
    pub(crate) fn run(&self, store: &mut Store<SandboxState>, sample: &RewardSample) -> wasmtime::Result<f64> {
        let instance = self.pre.instantiate(&mut *store)?;
        let columns = serde_json::Value::Object(sample.columns.clone()).to_string();
        let input = Sample { prompt: sample.prompt.clone(), completion: sample.completion.clone(), columns };
        match instance.call_score(&mut *store, &[input])? {
            Ok(scores) if scores.len() == 1 => Ok(scores[0]),
            Ok(scores) => Err(wasmtime::Error::msg(format!("returned {} scores for 1 sample", scores.len()))),
            Err(message) => Err(wasmtime::Error::msg(format!("the script reported: {message}"))),
        }
    }
}
