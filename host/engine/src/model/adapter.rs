//! PEFT adapters: `adapter_config.json` + `adapter_model.safetensors`, as
//! PEFT saves them, attached to a loaded model through a tuner plugin.

use std::path::Path;
use std::sync::Arc;

use candle_core::Var;

use super::checkpoint::{read_json, CheckpointError, Trainable};
use super::{LoadedModel, ModelError};
use crate::backend::{ForwardContext, GraphSession, OpError, ServedAdapter, TargetModules, TunerBinding, WeightStore};
use oxtune_registry::Registry;

/// An adapter folder as read: the tuner's name and configuration, its
/// binding, and its tensors.
struct ReadAdapter {
    tuner: String,
    config: serde_json::Value,
    binding: TunerBinding,
    tensors: Vec<(String, candle_core::Tensor)>,
    file: std::path::PathBuf,
}

/// The prefix PEFT puts before module names in saved adapters.
const PEFT_PREFIX: &str = "base_model.model.";

fn config_error(path: &Path, message: String) -> ModelError {
    ModelError::Checkpoint(CheckpointError::Field { path: path.to_owned(), message })
}

/// The tuner plugin serving an `adapter_config.json`: PEFT's `LORA`
/// (`lora`, or `dora` with `use_dora`), otherwise the tuner named by
/// `peft_type` in lower case (`IA3` → `ia3`).
fn tuner_name(config: &serde_json::Value) -> String {
    match config.get("peft_type").and_then(|v| v.as_str()).unwrap_or("LORA") {
        "LORA" if config.get("use_dora").and_then(|v| v.as_bool()).unwrap_or(false) => "dora".to_owned(),
        other => other.to_ascii_lowercase(),
    }
}

/// Whether `tuner` is LoRA or DoRA (PEFT's `LORA` type), whose adapters on
/// a mixture's experts take PEFT's fused layout.
fn is_lora_family(tuner: &str) -> bool {
    matches!(tuner, "lora" | "dora")
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
    /// Reads the PEFT adapter in folder `dir`: its tuner (loaded from
    /// `registry`), the layers it targets, and its tensors by the names
    /// its tuner reads (PEFT's prefix dropped), checked against the model.
    fn read_adapter(&self, registry: &Registry, dir: &Path) -> Result<ReadAdapter, ModelError> {
        let config_path = dir.join("adapter_config.json");
        let mut config = read_json(&config_path)?;
        let tuner = tuner_name(&config);
        let load_tuner = |config: &serde_json::Value| {
            registry.load_tuner(&tuner, &config.to_string()).map_err(|e| {
                let peft_type = config.get("peft_type").and_then(|v| v.as_str()).unwrap_or("LORA");
                config_error(&config_path, format!("peft_type `{peft_type}` needs the tuner `{tuner}`: {e}"))
            })
        };
        let mut instance = load_tuner(&config)?;
        let file = dir.join("adapter_model.safetensors");
        let bad = |message: String| CheckpointError::Safetensors { path: file.clone(), message };
        let saved = candle_core::safetensors::load(&file, &self.device).map_err(|e| bad(e.to_string()))?;
        let stripped =
            saved.into_iter().map(|(name, t)| (name.strip_prefix(PEFT_PREFIX).unwrap_or(&name).to_owned(), t));
        // PEFT's fused expert pairs become the per-expert layers oxtune adapts.
        let before = config.clone();
        let stripped = super::peft_experts::unfuse(&mut config, stripped.collect(), self.declared_linear.as_deref())
            .map_err(|message| config_error(&config_path, message))?;
        if config != before {
            instance = load_tuner(&config)?;
        }
        let mut tensors = Vec::with_capacity(stripped.len());
        for (name, tensor) in stripped {
            if self.adapted_layer(&name).is_none() {
                return Err(bad(format!("`{PEFT_PREFIX}{name}` adapts a layer the model does not have")).into());
            }
            tensors.push((name, tensor.to_dtype(self.dtype).map_err(|e| bad(e.to_string()))?));
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let targets = target_modules(&config, &config_path)?;
        let binding = TunerBinding { instance, target_modules: targets };
        Ok(ReadAdapter { tuner, config, binding, tensors, file })
    }

    /// Attaches the PEFT adapter in folder `dir`: its tensors join the
    /// model's parameters (trainable or not), and its tuner plugin adapts
    /// the targeted layers of every later forward pass.
    pub fn attach_adapter(&mut self, registry: &Registry, dir: &Path, trainable: Trainable) -> Result<(), ModelError> {
        let ReadAdapter { tuner, config, binding, tensors, file } = self.read_adapter(registry, dir)?;
        let bad = |message: String| CheckpointError::Safetensors { path: file.clone(), message };
        let mut adapter_params = Vec::with_capacity(tensors.len());
        for (name, tensor) in tensors {
            adapter_params.push(name.clone());
            match trainable {
                Trainable::None => self.weights.insert(name, tensor),
                Trainable::All => {
                    self.weights.insert_var(name, Var::from_tensor(&tensor).map_err(|e| bad(e.to_string()))?)
                }
            }
        }
        self.adapter = Some(Arc::new(binding));
        self.adapter_config = Some((tuner, config));
        self.adapter_params = adapter_params;
        Ok(())
    }

    /// Reads the PEFT adapter in folder `dir` for serving beside others
    /// (see [`forward_per_row`](Self::forward_per_row)): the
    /// model itself is left as it is.
    pub fn load_served_adapter(&self, registry: &Registry, dir: &Path) -> Result<ServedAdapter, ModelError> {
        let read = self.read_adapter(registry, dir)?;
        let mut weights = WeightStore::new();
        for (name, tensor) in read.tensors {
            weights.insert(name, tensor);
        }
        Ok(ServedAdapter { binding: read.binding, weights })
    }

    /// The layer an adapter parameter belongs to: the shortest dotted
    /// prefix of `param` that names one of the model's weights
    /// (`….q_proj.lora_A.weight` → `….q_proj`; the parameter itself,
    /// nested deeper, is never the answer).
    fn adapted_layer(&self, param: &str) -> Option<String> {
        let mut end = 0;
        while let Some(dot) = param[end..].find('.') {
            let head = &param[..end + dot];
            if self.weights.contains(&format!("{head}.weight")) && format!("{head}.weight") != param {
                return Some(head.to_owned());
            }
            end += dot + 1;
        }
        None
    }

    /// Merges the attached adapter into the base weights (each adapted
    /// layer's weight becomes the tuner's merged weight, and its bias the
    /// tuner's merged bias when the tuner changes it) and detaches it.
    pub fn merge_adapter(&mut self) -> Result<(), ModelError> {
        let Some(adapter) = self.adapter.take() else { return Ok(()) };
        self.adapter_config = None;
        let layers: std::collections::BTreeSet<String> =
            self.adapter_params.iter().filter_map(|p| self.adapted_layer(p)).filter(|l| adapter.targets(l)).collect();
        let forward_error = |cause| ModelError::Forward { model: self.dir.clone(), source: cause };
        let mut merged = Vec::with_capacity(layers.len());
        {
            let batch = crate::backend::BatchInfo::default();
            let mut session =
                GraphSession::new(ForwardContext { weights: &self.weights, batch: &batch, cache: None, tuner: None });
            for layer in &layers {
                let out = adapter.instance.merge(session.as_graph_ref(), layer.as_str().into()).into_result();
                let id = out.map_err(|e| forward_error(OpError::Plugin(e.into_string())))?;
                merged.push((format!("{layer}.weight"), session.get(id).map_err(forward_error)?.detach()));
                let bias = adapter.instance.merge_bias(session.as_graph_ref(), layer.as_str().into()).into_result();
                if let Some(id) = bias.map_err(|e| forward_error(OpError::Plugin(e.into_string())))?.into_option() {
                    merged.push((format!("{layer}.bias"), session.get(id).map_err(forward_error)?.detach()));
                }
            }
        }
        for (name, tensor) in merged {
            self.weights.insert(name, tensor);
        }
        let params: std::collections::HashSet<String> = std::mem::take(&mut self.adapter_params).into_iter().collect();
        self.weights.retain(|name| !params.contains(name));
        Ok(())
    }

    /// Whether the PEFT-style `config` targets an expert layer that
    /// transformers 5 holds in a fused parameter (where PEFT allows no
    /// LoRA dropout and no DoRA).
    pub fn targets_fused_experts(&self, config: &serde_json::Value) -> bool {
        let Ok(targets) = target_modules(config, Path::new("adapter config")) else { return false };
        self.declared_linear.iter().flatten().any(|layer| layer.fused.is_some() && targets.matches(&layer.name))
    }

    /// The attached adapter, if any.
    pub fn adapter(&self) -> Option<&TunerBinding> {
        self.adapter.as_deref()
    }
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
        let mut config = config;
        let mut targets = target_modules(&config, origin)?;
        let linear: Vec<String> =
            self.linear_layers().into_iter().filter(|layer| !self.is_frozen_part(layer)).collect();
        if !self.frozen_prefixes.is_empty() && matches!(targets, TargetModules::Names(_)) {
            // Module names would also match the frozen parts (a vision
            // tower has `gate_proj` too): name the adapted layers exactly,
            // as a regex PEFT reads the same way.
            let chosen: Vec<String> = linear.iter().filter(|l| targets.matches(l)).map(|l| regex::escape(l)).collect();
            if !chosen.is_empty() {
                config["target_modules"] = serde_json::Value::String(format!("(?:{})", chosen.join("|")));
                targets = target_modules(&config, origin)?;
            }
        }
        let instance = registry
            .load_tuner(tuner, &config.to_string())
            .map_err(|e| ModelError::Architecture { path: origin.to_owned(), source: Box::new(e) })?;
        let plugin_error = |e: abi_stable::std_types::RString| ModelError::Forward {
            model: self.dir.clone(),
            source: OpError::Plugin(e.into_string()),
        };
        let mut trained_base = Vec::new();
        for name in self.weights.names() {
            if !self.is_frozen_part(name) && instance.trains_base(name.into()).into_result().map_err(plugin_error)? {
                trained_base.push(name.to_owned());
            }
        }
        let layers: Vec<&String> = linear.iter().filter(|l| targets.matches(l)).collect();
        if is_lora_family(tuner) {
            let declared = self.declared_linear.as_deref();
            if let Some(expert) = layers.iter().find(|l| super::peft_experts::is_fused(declared, l)) {
                super::peft_experts::check_config(&config, expert).map_err(|m| config_error(origin, m))?;
            }
        }
        let asks_for_layers = !matches!(&targets, TargetModules::Names(names) if names.is_empty());
        if layers.is_empty() && (asks_for_layers || trained_base.is_empty()) {
            let modules: std::collections::BTreeSet<&str> =
                linear.iter().map(|l| l.rsplit('.').next().unwrap_or(l)).collect();
            let modules: Vec<&str> = modules.into_iter().collect();
            return Err(config_error(
                origin,
                format!(
                    "tuner `{tuner}`: target modules {targets:?} match no linear layer and it trains no base \
                     parameter; the model's linear layers are: {}",
                    modules.join(", ")
                ),
            ));
        }
        let mut rng = crate::rng::SplitMix64::new(seed);
        let init_error = |e: candle_core::Error| ModelError::Forward {
            model: self.dir.clone(),
            source: OpError::Candle { op: "adapter init", source: e },
        };
        let mut created = Vec::new();
        for layer in layers {
            let dims = self.weights.dims(&format!("{layer}.weight")).expect("listed above");
            let [out_features, in_features] = dims[..] else {
                return Err(init_error(candle_core::Error::Msg(format!("`{layer}.weight` is not a matrix"))));
            };
            let specs =
                instance.params(layer.as_str().into(), in_features as u64, out_features as u64).into_result().map_err(
                    |e| ModelError::Forward { model: self.dir.clone(), source: OpError::Plugin(e.into_string()) },
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
                    // DoRA's magnitude (a 4-bit base dequantised for it).
                    Ok(oxtune_plugin_api::ParamInit::WeightRowNorm) => self
                        .weights
                        .dense(&format!("{layer}.weight"), self.dtype)
                        .expect("listed above")
                        .and_then(|base| base.sqr())
                        .and_then(|t| t.sum(1))
                        .and_then(|t| t.sqrt())
                        .and_then(|t| t.to_dtype(candle_core::DType::F32))
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(init_error)?,
                    _ => {
                        return Err(ModelError::Forward {
                            model: self.dir.clone(),
                            source: OpError::Plugin(format!(
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
        self.adapter_params = created.iter().map(|(name, _)| name.clone()).collect();
        for (name, var) in created {
            self.weights.insert_var(name, var);
        }
        for name in &trained_base {
            self.weights.make_trainable(name).map_err(init_error)?;
        }
        self.trains_base = !trained_base.is_empty();
        self.adapter = Some(Arc::new(TunerBinding { instance, target_modules: targets }));
        self.adapter_config = Some((tuner.to_owned(), config));
        Ok(())
    }

    /// Saves the attached adapter in its tuner's layout — PEFT's for LoRA
    /// and DoRA: `adapter_config.json` and `adapter_model.safetensors`
    /// (names prefixed `base_model.model.`) — written into a temporary
    /// folder that replaces `dir` only when complete, so a checkpoint is
    /// never half-written.
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
        let (Some((tuner, config)), Some(binding)) = (&self.adapter_config, &self.adapter) else {
            return Err(config_error(dir, "no adapter is attached to save".into()));
        };
        let mut run_config = config.clone();
        run_config["base_model_name_or_path"] = serde_json::json!(self.dir.display().to_string());
        let saved = binding
            .instance
            .saved_config()
            .into_result()
            .map_err(|e| ModelError::Forward { model: self.dir.clone(), source: OpError::Plugin(e.into_string()) })?;
        let saved: serde_json::Value = match saved.into_option() {
            Some(text) => serde_json::from_str(&text).map_err(|e| {
                config_error(dir, format!("tuner `{tuner}` wrote an adapter config that is not JSON: {e}"))
            })?,
            None => {
                let mut plain = run_config.clone();
                if plain.get("peft_type").is_none() {
                    plain["peft_type"] = serde_json::json!(tuner.to_ascii_uppercase());
                }
                plain
            }
        };
        let mut tensors: std::collections::HashMap<String, candle_core::Tensor> = self
            .adapter_params
            .iter()
            .filter_map(|n| self.weights.get(n).map(|t| (format!("{PEFT_PREFIX}{n}"), t.detach())))
            .collect();
        let mut saved = saved;
        if let (true, Some(declared)) = (is_lora_family(tuner), self.declared_linear.as_deref()) {
            // Experts go in PEFT's fused layout (transformers 5's parameters).
            let out_features = |layer: &str| self.weights.dims(&format!("{layer}.weight")).map(|d| d[0]);
            super::peft_experts::fuse(&mut saved, &mut tensors, declared, out_features, PEFT_PREFIX)
                .map_err(|message| config_error(dir, message))?;
        }
        super::staging::write_atomically(dir, |staging| {
            let config_text = serde_json::to_string_pretty(&saved).expect("JSON values serialise");
            std::fs::write(staging.join("adapter_config.json"), config_text)?;
            candle_core::safetensors::save(&tensors, staging.join("adapter_model.safetensors"))
                .map_err(std::io::Error::other)?;
            extra(staging)
        })
    }
}
