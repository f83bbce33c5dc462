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
        self.adapter_config = Some((name.to_owned(), config));
        Ok(())
    }

    /// Merges the attached adapter into the base weights (each adapted
    /// layer's weight becomes the tuner's merged weight) and detaches it.
    pub fn merge_adapter(&mut self) -> Result<(), ModelError> {
        let Some(adapter) = self.adapter.take() else { return Ok(()) };
        self.adapter_config = None;
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

/// The `adapter_config.json` PEFT 0.21 writes for a LoRA adapter, with its
/// defaults; [`LoadedModel::save_adapter`] fills in the run's values.
fn peft_config_template() -> serde_json::Value {
    serde_json::json!({
        "alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null, "auto_mapping": null,
        "base_model_name_or_path": null, "bias": "none", "corda_config": null, "ensure_weight_tying": false,
        "eva_config": null, "exclude_modules": null, "fan_in_fan_out": false, "inference_mode": true,
        "init_lora_weights": true, "kasa_config": null, "layer_replication": null, "layers_pattern": null,
        "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 8, "lora_bias": false, "lora_dropout": 0.0,
        "lora_ga_config": null, "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": null,
        "monteclora_config": null, "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": 8,
        "rank_pattern": {}, "revision": null, "target_modules": [], "target_parameters": null, "task_type": "CAUSAL_LM",
        "trainable_token_indices": null, "use_bdlora": null, "use_dora": false, "use_qalora": false,
        "use_rslora": false, "velora_config": null
    })
}

impl LoadedModel {
    /// Adds a new adapter: the tuner `tuner` on the layers PEFT-style
    /// `config` targets, its parameters trainable and initialised as the
    /// tuner asks (seeded).
    pub fn add_adapter(
        &mut self,
        registry: &Registry,
        tuner: &str,
        config: serde_json::Value,
        seed: u64,
    ) -> Result<(), ModelError> {
        let origin = Path::new("adapter config");
        let targets = target_modules(&config, origin)?;
        let linear: Vec<String> = self
            .weights
            .names()
            .iter()
            .filter_map(|n| n.strip_suffix(".weight"))
            .filter(|layer| self.weights.get(&format!("{layer}.weight")).is_some_and(|w| w.rank() == 2))
            .filter(|layer| !layer.ends_with("embed_tokens") && !layer.contains(".lora_"))
            .map(str::to_owned)
            .collect();
        let layers: Vec<&String> = linear.iter().filter(|l| targets.matches(l)).collect();
        if layers.is_empty() {
            let modules: std::collections::BTreeSet<&str> =
                linear.iter().map(|l| l.rsplit('.').next().unwrap_or(l)).collect();
            let modules: Vec<&str> = modules.into_iter().collect();
            return Err(config_error(
                origin,
                format!("target modules {targets:?} match no linear layer; the model's are: {}", modules.join(", ")),
            ));
        }
        let instance = registry
            .load_tuner(tuner, &config.to_string())
            .map_err(|e| ModelError::Architecture { path: origin.to_owned(), cause: Box::new(e) })?;
        let mut rng = crate::rng::SplitMix64::new(seed);
        let init_error = |e: candle_core::Error| ModelError::Forward {
            model: self.dir.clone(),
            cause: OpError::Candle { op: "adapter init", cause: e },
        };
        let mut created = Vec::new();
        for layer in layers {
            let base = &self.weights.get(&format!("{layer}.weight")).expect("listed above");
            let (out_features, in_features) = base.dims2().map_err(init_error)?;
            let specs =
                instance.params(layer.as_str().into(), in_features as u64, out_features as u64).into_result().map_err(
                    |e| ModelError::Forward { model: self.dir.clone(), cause: OpError::Plugin(e.into_string()) },
                )?;
            for spec in specs.iter() {
                let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
                let count: usize = shape.iter().product();
                let values: Vec<f32> = match spec.init.as_enum() {
                    Ok(oxtune_plugin_api::ParamInit::Zeros) => vec![0.0; count],
                    Ok(oxtune_plugin_api::ParamInit::Ones) => vec![1.0; count],
                    Ok(oxtune_plugin_api::ParamInit::Normal { std }) => {
                        (0..count).map(|_| (rng.normal() * std) as f32).collect()
                    }
                    Ok(oxtune_plugin_api::ParamInit::Uniform { bound }) => {
                        (0..count).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect()
                    }
                    Ok(oxtune_plugin_api::ParamInit::WeightRowNorm) => base
                        .sqr()
                        .and_then(|t| t.sum(1))
                        .and_then(|t| t.sqrt())
                        .and_then(|t| t.to_dtype(candle_core::DType::F32))
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(init_error)?,
                    _ => {
                        return Err(ModelError::Forward {
                            model: self.dir.clone(),
                            cause: OpError::Plugin(format!(
                                "tuner `{tuner}` asks for an initialisation of `{}` this host does not know",
                                spec.name
                            )),
                        })
                    }
                };
                let tensor = candle_core::Tensor::from_vec(values, shape, &self.device)
                    .and_then(|t| t.to_dtype(self.dtype))
                    .map_err(init_error)?;
                created.push((spec.name.to_string(), Var::from_tensor(&tensor).map_err(init_error)?));
            }
        }
        for (name, var) in created {
            self.weights.insert_var(name, var);
        }
        self.adapter = Some(TunerBinding { instance, target_modules: targets });
        self.adapter_config = Some((tuner.to_owned(), config));
        Ok(())
    }

    /// Saves the attached adapter in PEFT's layout: `adapter_config.json`
    /// and `adapter_model.safetensors` (names prefixed `base_model.model.`),
    /// written into a temporary folder that replaces `dir` only when
    /// complete, so a checkpoint is never half-written.
    pub fn save_adapter(&self, dir: &Path) -> Result<(), ModelError> {
        self.save_adapter_with(dir, |_| Ok(()))
    }

    /// [`LoadedModel::save_adapter`], with `extra` writing more files (a
    /// trainer's state) into the staging folder before it is put in place.
    pub fn save_adapter_with(
        &self,
        dir: &Path,
        extra: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<(), ModelError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |cause| ModelError::Checkpoint(CheckpointError::Io { path, cause })
        };
        let Some((tuner, config)) = &self.adapter_config else {
            return Err(config_error(dir, "no adapter is attached to save".into()));
        };
        let mut peft = peft_config_template();
        for key in ["r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "init_lora_weights"] {
            if let Some(v) = config.get(key) {
                peft[key] = v.clone();
            }
        }
        peft["use_dora"] = serde_json::json!(tuner == "dora");
        peft["base_model_name_or_path"] = serde_json::json!(self.dir.display().to_string());
        let tensors: std::collections::HashMap<String, candle_core::Tensor> = self
            .weights
            .names()
            .iter()
            .filter(|n| n.contains(".lora_"))
            .filter_map(|n| self.weights.get(n).map(|t| (format!("{PEFT_PREFIX}{n}"), t.detach())))
            .collect();
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("adapter");
        let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(io(&staging))?;
        let config_text = serde_json::to_string_pretty(&peft).expect("JSON values serialise");
        std::fs::write(staging.join("adapter_config.json"), config_text).map_err(io(&staging))?;
        candle_core::safetensors::save(&tensors, staging.join("adapter_model.safetensors")).map_err(|e| {
            ModelError::Checkpoint(CheckpointError::Safetensors { path: staging.clone(), message: e.to_string() })
        })?;
        extra(&staging).map_err(io(&staging))?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io(dir))?;
        }
        std::fs::rename(&staging, dir).map_err(io(dir))
    }
}
