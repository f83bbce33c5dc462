//! PEFT adapters: `adapter_config.json` + `adapter_model.safetensors`, as
//! PEFT saves them, attached to a loaded model through a tuner plugin.

use std::path::Path;

use candle_core::Var;

use super::checkpoint::{read_json, CheckpointError, Trainable};
use super::{LoadedModel, ModelError};
use crate::backend::{ForwardContext, GraphSession, OpError, TargetModules, TunerBinding};
use oxtune_registry::Registry;

/// The prefix PEFT puts before module names in saved adapters.
const PEFT_PREFIX: &str = "base_model.model.";

fn config_error(path: &Path, message: String) -> ModelError {
    ModelError::Checkpoint(CheckpointError::Field { path: path.to_owned(), message })
}

/// The tuner plugin serving a PEFT config (`peft_type`, `use_dora`).
fn tuner_name(config: &serde_json::Value, path: &Path) -> Result<&'static str, ModelError> {
    match config.get("peft_type").and_then(|v| v.as_str()).unwrap_or("LORA") {
        "LORA" if config.get("use_dora").and_then(|v| v.as_bool()).unwrap_or(false) => Ok("dora"),
        "LORA" => Ok("lora"),
        other => {
            Err(config_error(path, format!("peft_type `{other}` is not supported (LORA, with or without DoRA, is)")))
        }
    }
}

/// PEFT's `target_modules`: a list of module names, or one regex.
pub fn target_modules(config: &serde_json::Value, path: &Path) -> Result<TargetModules, ModelError> {
    match config.get("target_modules") {
        Some(serde_json::Value::Array(names)) => {
            Ok(TargetModules::Names(names.iter().filter_map(|n| n.as_str().map(str::to_owned)).collect()))
        }
        Some(serde_json::Value::String(pattern)) => regex::Regex::new(pattern)
            .map(TargetModules::Regex)
            .map_err(|e| config_error(path, format!("`target_modules` is not a valid regex: {e}"))),
        _ => Err(config_error(path, "`target_modules` must be a list of names or a regex".into())),
    }
}

impl LoadedModel {
    /// Attaches the PEFT adapter in folder `dir`: its tensors join the
    /// model's parameters (trainable or not), and its tuner plugin adapts
    /// the targeted layers of every later forward pass.
    pub fn attach_adapter(&mut self, registry: &Registry, dir: &Path, trainable: Trainable) -> Result<(), ModelError> {
        let config_path = dir.join("adapter_config.json");
        let config = read_json(&config_path)?;
        let name = tuner_name(&config, &config_path)?;
        let targets = target_modules(&config, &config_path)?;
        let instance = registry
            .load_tuner(name, &config.to_string())
            .map_err(|e| ModelError::Architecture { path: config_path.clone(), cause: Box::new(e) })?;
        let file = dir.join("adapter_model.safetensors");
        let bad = |message: String| CheckpointError::Safetensors { path: file.clone(), message };
        let tensors = candle_core::safetensors::load(&file, &self.device).map_err(|e| bad(e.to_string()))?;
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort();
        for saved in names {
            let name = saved.strip_prefix(PEFT_PREFIX).unwrap_or(&saved).to_owned();
            let module = name.rsplit_once(".lora_").map(|(m, _)| m).unwrap_or(&name);
            if !self.weights.contains(&format!("{module}.weight")) {
                return Err(bad(format!("`{saved}` adapts `{module}`, which the model does not have")).into());
            }
            let tensor = tensors[&saved].to_dtype(self.dtype).map_err(|e| bad(e.to_string()))?;
            match trainable {
                Trainable::None => self.weights.insert(name, tensor),
                Trainable::All => {
                    self.weights.insert_var(name, Var::from_tensor(&tensor).map_err(|e| bad(e.to_string()))?)
                }
            }
        }
        self.adapter = Some(TunerBinding { instance, target_modules: targets });
        Ok(())
    }

    /// Merges the attached adapter into the base weights (each adapted
    /// layer's weight becomes the tuner's merged weight) and detaches it.
    pub fn merge_adapter(&mut self) -> Result<(), ModelError> {
        let Some(adapter) = self.adapter.take() else { return Ok(()) };
        let layers: Vec<String> = self
            .weights
            .names()
            .iter()
            .filter_map(|n| n.strip_suffix(".lora_A.weight").map(str::to_owned))
            .filter(|layer| adapter.targets(layer))
            .collect();
        let forward_error = |cause| ModelError::Forward { model: self.dir.clone(), cause };
        let mut merged = Vec::with_capacity(layers.len());
        {
            let batch = crate::backend::BatchInfo::default();
            let mut session =
                GraphSession::new(ForwardContext { weights: &self.weights, batch: &batch, cache: None, tuner: None });
            for layer in &layers {
                let out = adapter.instance.merge(session.as_graph_ref(), layer.as_str().into()).into_result();
                let id = out.map_err(|e| forward_error(OpError::Plugin(e.into_string())))?;
                merged.push((layer.clone(), session.get(id).map_err(forward_error)?.detach()));
            }
        }
        for (layer, weight) in merged {
            self.weights.insert(format!("{layer}.weight"), weight);
        }
        self.weights.retain(|name| !name.contains(".lora_"));
        Ok(())
    }

    /// The attached adapter, if any.
    pub fn adapter(&self) -> Option<&TunerBinding> {
        self.adapter.as_ref()
    }
}
