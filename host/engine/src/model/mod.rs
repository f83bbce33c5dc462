//! A model ready to run: its architecture plugin (resolved through the
//! registry from `config.json`), its weights, and its forward pass on the
//! host's op backend.

pub mod adapter;
pub mod bnb;
pub mod checkpoint;
pub mod export;
pub mod gguf;
pub mod peft_experts;
pub mod staging;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use abi_stable::std_types::RString;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use oxtune_plugin_api::abi::{MediaItem, ModelBox};
use oxtune_plugin_api::gguf::GgufLayout;
use oxtune_registry::{Registry, RegistryError};

use crate::backend::{
    is_linear_weight, AuxOutputs, BatchInfo, BlockGradients, Checkpointing, ForwardContext, GraphSession, Head,
    KvCache, OpError, RowAdapters, TunerBinding, WeightStore,
};
use crate::media::{MediaInput, MediaRef, MediaSpec};
use crate::quant::QuantizeOnLoad;
use checkpoint::{load_weights, read_json, weight_files, CheckpointError, Trainable};
use oxtune_plugin_api::{LinearLayer, LinearRole};

/// An error loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The checkpoint could not be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// No plugin serves the model, or the plugin refused its config.
    #[error("{path}")]
    Architecture {
        /// The config file.
        path: PathBuf,
        /// The registry's error.
        source: Box<RegistryError>,
    },
    /// The forward pass failed (the message names the plugin and the op).
    #[error("forward pass of {model}")]
    Forward {
        /// The model folder.
        model: PathBuf,
        /// The op error.
        source: OpError,
    },
    /// A row's media no longer match what the row was encoded with.
    #[error("{model}: {message}")]
    Media {
        /// The model folder.
        model: PathBuf,
        /// What changed.
        message: String,
    },
}

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The compute dtype weights are converted to.
    pub dtype: DType,
    /// Where tensors live.
    pub device: Device,
    /// Frozen or trainable parameters.
    pub trainable: Trainable,
    /// An explicit architecture (`--model-type`), overriding `config.json`.
    pub model_type: Option<String>,
    /// Quantise the linear layers to 4 bits as they load (QLoRA's base;
    /// ms-swift's `--quant-method bnb --quant-bits 4`).
    pub quantize: Option<QuantizeOnLoad>,
    /// A GGUF file's frozen Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K weights stay quantised in
    /// memory (decoding by integer dot products; training reaches the
    /// input through dequantised panels).
    pub keep_gguf_quantized: bool,
    /// The dtype generation's KV cache stores keys and values in (`None`:
    /// the compute dtype). f16 halves an f32 model's cache (llama.cpp's
    /// default); the CPU attention kernel reads it directly.
    pub kv_cache_dtype: Option<DType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            trainable: Trainable::None,
            model_type: None,
            quantize: None,
            keep_gguf_quantized: true,
            kv_cache_dtype: None,
        }
    }
}

/// A loaded model.
pub struct LoadedModel {
    dir: PathBuf,
    architecture: String,
    config: serde_json::Value,
    instance: ModelBox,
    weights: WeightStore,
    dtype: DType,
    device: Device,
    adapter: Option<Arc<TunerBinding>>,
    /// Gradients of checkpointed blocks, when gradient checkpointing is on.
    block_gradients: Option<Arc<BlockGradients>>,
    /// The attached adapter's tuner name and PEFT-style configuration.
    adapter_config: Option<(String, serde_json::Value)>,
    /// The names of the attached adapter's own parameters.
    adapter_params: Vec<String>,
    /// Whether the attached tuner trains base parameters in place.
    trains_base: bool,
    /// How the model reads media (`None`: text only).
    media_spec: Option<MediaSpec>,
    /// `preprocessor_config.json` (with `video_preprocessor_config.json` as
    /// `video`), read once at load: training re-reads pixels every batch.
    processor_config: serde_json::Value,
    /// Parameter-name prefixes a new adapter must leave alone (`--freeze-vit`, ...).
    frozen_prefixes: Vec<String>,
    /// The linear layers the plugin declares (API 1.2); `None`: inferred
    /// from the weights.
    declared_linear: Option<Vec<LinearLayer>>,
    /// Whether training differentiates the auxiliary outputs (a router's
    /// aux loss added to the loss).
    aux_gradients: bool,
    /// What [`Self::new_kv_cache`] stores keys and values in.
    kv_cache_dtype: DType,
}

/// What a training forward pass gives: per position the log-probability
/// of the next label, which positions have one, and the model's
/// auxiliary outputs (a mixture of experts' `aux_loss`).
#[derive(Clone, Debug)]
pub struct LabelLogps {
    /// `[batch, seq − 1]` f32, 0 where the label is ignored.
    pub logps: Tensor,
    /// `[batch, seq − 1]`, 1 where a label counts.
    pub mask: Tensor,
    /// The model's auxiliary outputs.
    pub aux: AuxOutputs,
}

/// What one run of the plugin's forward pass gave.
struct RunOutput {
    /// The output head's result, or every position's logits.
    out: Tensor,
    /// Whether it went through the output-head op.
    ran_head: bool,
    /// The auxiliary outputs.
    aux: AuxOutputs,
}

/// The linear layers a model instance declares (API 1.2), parsed.
fn instance_linear_layers(instance: &ModelBox) -> Result<Option<Vec<LinearLayer>>, RegistryError> {
    let json = instance.linear_layers().into_result().map_err(|e| RegistryError::Plugin(e.into_string()))?;
    json.into_option()
        .map(|json| serde_json::from_str(json.as_str()))
        .transpose()
        .map_err(|e| RegistryError::Plugin(format!("the model's linear layers are not valid: {e}")))
}

/// A model folder's `preprocessor_config.json` (an empty object if absent),
/// with its `video_preprocessor_config.json`, if any, under `video`.
fn read_processor_config(dir: &Path) -> Result<serde_json::Value, ModelError> {
    let mut options = match dir.join("preprocessor_config.json") {
        path if path.is_file() => read_json(&path)?,
        _ => serde_json::json!({}),
    };
    let video_config = dir.join("video_preprocessor_config.json");
    if let (true, Some(options)) = (video_config.is_file(), options.as_object_mut()) {
        options.insert("video".into(), read_json(&video_config)?);
    }
    Ok(options)
}

/// A model's config and architecture plugin instance, before any weight.
struct ResolvedModel {
    config: serde_json::Value,
    config_path: PathBuf,
    architecture: String,
    instance: ModelBox,
}

/// Reads the config of the model at `dir` (from `gguf` when it is a GGUF
/// file) and instantiates the architecture the registry resolves for it
/// (or `model_type`).
fn resolve(
    registry: &Registry,
    dir: &Path,
    gguf: Option<&gguf::GgufFile>,
    model_type: Option<&str>,
) -> Result<ResolvedModel, ModelError> {
    let config_path = if gguf.is_some() { dir.to_owned() } else { dir.join("config.json") };
    let config = match gguf {
        Some(file) => file.hf_config()?,
        None => read_json(&config_path)?,
    };
    bnb::check_quantization_config(&config)
        .map_err(|message| CheckpointError::Field { path: config_path.clone(), message })?;
    let architecture_error = |source| ModelError::Architecture { path: config_path.clone(), source: Box::new(source) };
    let architecture = match model_type {
        Some(name) => registry.get(oxtune_plugin_api::ComponentKind::Model, name).map_err(architecture_error)?,
        None => {
            let architectures = string_list(config.get("architectures"));
            let model_type = config.get("model_type").and_then(|v| v.as_str());
            registry.model_for(&architectures, model_type).map_err(architecture_error)?
        }
    }
    .name()
    .to_owned();
    // A GGUF file's architecture plugin may translate llama.cpp's keys itself.
    let config = match gguf {
        Some(file) => {
            let mut metadata = file.architecture_metadata()?;
            metadata["config"] = config.clone();
            let metadata = metadata.to_string();
            match registry.config_from_gguf(&architecture, &metadata).map_err(architecture_error)? {
                Some(text) => serde_json::from_str(&text).map_err(|e| {
                    architecture_error(RegistryError::Plugin(format!(
                        "the config `{architecture}` gave for the GGUF metadata is not JSON: {e}"
                    )))
                })?,
                None => config,
            }
        }
        None => config,
    };
    let instance = registry.load_model(&architecture, &config.to_string()).map_err(architecture_error)?;
    Ok(ResolvedModel { config, config_path, architecture, instance })
}

/// The GGUF layout of the model at `path` (a folder or a GGUF file) as its
/// architecture plugin states it, without loading its weights; `None`
/// when the plugin gives it no GGUF form.
pub fn gguf_layout_of(
    registry: &Registry,
    path: &Path,
    model_type: Option<&str>,
) -> Result<Option<GgufLayout>, ModelError> {
    let gguf = if is_gguf(path) { Some(gguf::GgufFile::open(path)?) } else { None };
    let resolved = resolve(registry, path, gguf.as_ref(), model_type)?;
    instance_gguf_layout(&resolved.instance)
        .map_err(|source| ModelError::Architecture { path: resolved.config_path, source: Box::new(source) })
}

/// The GGUF layout a model instance states (API 1.2), parsed.
fn instance_gguf_layout(instance: &ModelBox) -> Result<Option<GgufLayout>, RegistryError> {
    let json = instance.gguf_layout().into_result().map_err(|e| RegistryError::Plugin(e.into_string()))?;
    json.into_option()
        .map(|json| serde_json::from_str(json.as_str()))
        .transpose()
        .map_err(|e| RegistryError::Plugin(format!("the model's GGUF layout is not valid: {e}")))
}

/// The output layer's name in Hugging Face checkpoints; PEFT's
/// `all-linear` leaves it out.
pub use crate::backend::OUTPUT_LAYER;

/// Whether `path` names a GGUF file rather than a model folder.
pub fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn string_list(value: Option<&serde_json::Value>) -> Vec<String> {
    value
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

impl LoadedModel {
    /// Loads a Hugging Face model folder, or a `.gguf` file, with the
    /// architecture the registry resolves for it.
    pub fn load(registry: &Registry, dir: &Path, options: &LoadOptions) -> Result<LoadedModel, ModelError> {
        if options.quantize.is_some() && options.trainable != Trainable::None {
            return Err(ModelError::Forward {
                model: dir.to_owned(),
                source: OpError::Invalid {
                    op: "quantize",
                    message: "4-bit weights are frozen: train an adapter on them (QLoRA), not the weights".into(),
                },
            });
        }
        let mut gguf = if is_gguf(dir) { Some(gguf::GgufFile::open(dir)?) } else { None };
        let ResolvedModel { config, config_path, architecture, instance } =
            resolve(registry, dir, gguf.as_ref(), options.model_type.as_deref())?;
        if let Some(file) = &mut gguf {
            // The vocabulary is the tokenizer's (loaded apart): freed
            // before the weights arrive, its memory is theirs to reuse.
            file.drop_tokenizer_metadata();
        }
        let architecture_error =
            |source| ModelError::Architecture { path: config_path.clone(), source: Box::new(source) };
        let media_spec = match instance.media_spec().into_result() {
            Ok(spec) => spec.into_option().map(|json| serde_json::from_str(json.as_str())).transpose(),
            Err(e) => return Err(architecture_error(RegistryError::Plugin(e.into_string()))),
        }
        .map_err(|e| architecture_error(RegistryError::Plugin(format!("media settings are not JSON: {e}"))))?
        .map(|v: serde_json::Value| MediaSpec::from_json(&v));
        let processor_config = match &media_spec {
            Some(_) => read_processor_config(dir)?,
            None => serde_json::json!({}),
        };
        let weights = match &gguf {
            Some(file) => {
                let layout = instance_gguf_layout(&instance).map_err(architecture_error)?;
                // Requantising to 4 bits (`quantize`) starts from the dequantised values.
                let keep = options.keep_gguf_quantized && options.quantize.is_none();
                file.load_weights(
                    layout.as_ref(),
                    options.dtype,
                    &options.device,
                    options.trainable,
                    options.quantize,
                    keep,
                )?
            }
            None => {
                load_weights(&weight_files(dir)?, options.dtype, &options.device, options.trainable, options.quantize)?
            }
        };
        let declared_linear = instance_linear_layers(&instance).map_err(architecture_error)?;
        if let Some(missing) =
            declared_linear.iter().flatten().find(|layer| weights.dims(&format!("{}.weight", layer.name)).is_none())
        {
            return Err(architecture_error(RegistryError::Plugin(format!(
                "the plugin declares the linear layer `{}`, but the checkpoint has no `{}.weight`",
                missing.name, missing.name
            ))));
        }
        Ok(LoadedModel {
            declared_linear,
            aux_gradients: false,
            kv_cache_dtype: options.kv_cache_dtype.unwrap_or(options.dtype),
            dir: dir.to_owned(),
            architecture,
            config,
            instance,
            weights,
            dtype: options.dtype,
            device: options.device.clone(),
            adapter: None,
            block_gradients: None,
            adapter_config: None,
            adapter_params: Vec::new(),
            trains_base: false,
            media_spec,
            processor_config,
            frozen_prefixes: Vec::new(),
        })
    }

    /// How the model is stored in a llama.cpp GGUF file, as its plugin
    /// states it; `None` when the plugin gives it no GGUF form.
    pub fn gguf_layout(&self) -> Result<Option<GgufLayout>, ModelError> {
        instance_gguf_layout(&self.instance)
            .map_err(|source| ModelError::Architecture { path: self.dir.clone(), source: Box::new(source) })
    }

    /// How the model reads images and videos; `None` for a text-only model.
    pub fn media_spec(&self) -> Option<&MediaSpec> {
        self.media_spec.as_ref()
    }

    /// Rows of `position_ids` the model wants (1, or 3 for M-RoPE).
    pub fn position_axes(&self) -> usize {
        self.media_spec.as_ref().map_or(1, |s| s.position_axes)
    }

    /// Has the model plugin preprocess `items`, with the model folder's
    /// `preprocessor_config.json` (and `video_preprocessor_config.json`,
    /// as `video`) and `overrides` (`min_pixels`, ...) on top.
    pub fn prepare_media(
        &self,
        items: &[MediaRef],
        overrides: &serde_json::Value,
    ) -> Result<Vec<MediaInput>, ModelError> {
        let mut options = self.processor_config.clone();
        if let (Some(options), Some(overrides)) = (options.as_object_mut(), overrides.as_object()) {
            options.extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let abi_items: Vec<MediaItem> = items
            .iter()
            .map(|m| MediaItem {
                kind: m.kind.as_str().into(),
                sources: m.sources.iter().map(|p| RString::from(p.display().to_string())).collect(),
            })
            .collect();
        let prepared = self.instance.prepare_media(abi_items.as_slice().into(), options.to_string().as_str().into());
        let prepared = prepared
            .into_result()
            .map_err(|e| ModelError::Forward { model: self.dir.clone(), source: OpError::Plugin(e.into_string()) })?;
        Ok(prepared.iter().map(MediaInput::from_abi).collect())
    }

    /// Keeps parameters under these name prefixes out of any adapter added
    /// later: neither adapted nor trained in place (`--freeze-vit`, ...).
    pub fn freeze_prefixes(&mut self, prefixes: Vec<String>) {
        self.frozen_prefixes = prefixes;
    }

    /// Whether `name` lies under a prefix kept frozen by [`Self::freeze_prefixes`].
    pub fn is_frozen_part(&self, name: &str) -> bool {
        self.frozen_prefixes
            .iter()
            .any(|p| name == p || name.strip_prefix(p.as_str()).is_some_and(|r| r.starts_with('.')))
    }

    /// The model folder (or GGUF file) the model was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every linear layer of the model, by parameter name without
    /// `.weight` (`model.layers.0.self_attn.q_proj`): each rank-2 `.weight`
    /// that is not an embedding table or an adapter's own parameter. The
    /// output layer (`lm_head`) is included; see [`Self::all_linear_modules`].
    /// A plugin that declares its layers (API 1.2) decides; otherwise this
    /// is the one place the host infers which weights are linear.
    pub fn linear_layers(&self) -> Vec<String> {
        if let Some(declared) = &self.declared_linear {
            return declared.iter().map(|layer| layer.name.clone()).collect();
        }
        self.weights
            .names()
            .iter()
            .filter(|n| self.weights.dims(n).is_some_and(|d| is_linear_weight(n, &d)))
            .filter_map(|n| n.strip_suffix(".weight"))
            .filter(|layer| !layer.contains(".lora_"))
            .filter(|layer| !self.adapter_params.iter().any(|p| p.starts_with(&format!("{layer}."))))
            .map(str::to_owned)
            .collect()
    }

    /// The module names (`q_proj`, ...) PEFT's `all-linear` stands for: the
    /// last name component of every linear layer but the output layer.
    /// A declared router or head is left out too.
    pub fn all_linear_modules(&self) -> Vec<String> {
        let excluded: Vec<&str> = self
            .declared_linear
            .iter()
            .flatten()
            .filter(|layer| matches!(layer.role, LinearRole::Router | LinearRole::Head))
            .map(|layer| layer.name.as_str())
            .collect();
        let modules: std::collections::BTreeSet<String> = self
            .linear_layers()
            .iter()
            .filter(|layer| layer.as_str() != OUTPUT_LAYER && !excluded.contains(&layer.as_str()))
            .filter_map(|layer| layer.rsplit('.').next().map(str::to_owned))
            .collect();
        modules.into_iter().collect()
    }

    /// The architecture plugin's component name (`qwen3`).
    pub fn architecture(&self) -> &str {
        &self.architecture
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// Rows of the model's embedding table (`vocab_size` of `config.json`,
    /// or of its `text_config` for a vision-language model): the ids the
    /// model accepts. Checkpoints pad it past the tokenizer's vocabulary
    /// (Qwen: 151 936 rows for 151 665 tokens).
    pub fn vocab_size(&self) -> Option<usize> {
        self.text_config_u64("vocab_size").map(|v| v as usize)
    }

    /// The integer `key` of `config.json`, or of its `text_config` (a
    /// vision-language model's language half).
    fn text_config_u64(&self, key: &str) -> Option<u64> {
        let read = |config: &serde_json::Value| config.get(key).and_then(serde_json::Value::as_u64);
        read(&self.config).or_else(|| self.config.get("text_config").and_then(read))
    }

    /// A lower bound on the memory a training forward pass keeps for the
    /// backward pass, per token of a micro-batch, before any tuner's own
    /// share: without gradient checkpointing every layer's activations
    /// (taken as 14 hidden-size and 5 intermediate-size vectors per layer,
    /// in the model's dtype); with it, 2.5 hidden-size vectors per layer
    /// (its input, kept) and one layer's activations. Read from
    /// `config.json`'s `hidden_size`, `intermediate_size` and
    /// `num_hidden_layers` (or its `text_config`'s); `None` when it lacks
    /// them. Measured on SmolLM2-135M in f32 (LoRA r 8 on q/v, no dropout,
    /// peak memory of 1024 against 2048 tokens): 1.99 MB per token without
    /// checkpointing, where this gives 1.89 MB; 0.26 MB with it, where this
    /// gives 0.24 MB. A tuner's own share comes on top, so the estimate
    /// errs towards letting a shape run.
    pub fn activation_bytes_per_token(&self) -> Option<u64> {
        let read = |key: &str| self.text_config_u64(key);
        let (hidden, intermediate, layers) =
            (read("hidden_size")?, read("intermediate_size")?, read("num_hidden_layers")?);
        let bytes = self.dtype.size_in_bytes() as u64;
        let layer = (14 * hidden + 5 * intermediate) * bytes;
        Some(match self.block_gradients {
            Some(_) => layers * hidden * bytes * 5 / 2 + layer,
            None => layers * layer,
        })
    }

    /// The parameters.
    pub fn weights(&self) -> &WeightStore {
        &self.weights
    }

    /// The device tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits `[batch, seq, vocab]` for `input_ids` (`[batch, seq]`), after
    /// the tokens already in `cache`, with `tuner` (else the attached
    /// adapter, if any) at the linear hook.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        batch: &BatchInfo,
        cache: Option<&mut KvCache>,
        tuner: Option<&TunerBinding>,
    ) -> Result<Tensor, ModelError> {
        Ok(self.run(input_ids, batch, cache, tuner.or(self.adapter.as_deref()), Head::Logits, false)?.out)
    }

    /// [`forward`](Self::forward) with the attached adapter, and the
    /// model's auxiliary outputs (a mixture of experts' `aux_loss`).
    pub fn forward_with_aux(&self, input_ids: &Tensor, batch: &BatchInfo) -> Result<(Tensor, AuxOutputs), ModelError> {
        let run = self.run(input_ids, batch, None, self.adapter.as_deref(), Head::Logits, true)?;
        Ok((run.out, run.aux))
    }

    /// Logits of the base model alone, the attached adapter switched off:
    /// the reference model of preference training, with no second copy of
    /// the weights.
    pub fn forward_without_adapter(&self, input_ids: &Tensor, batch: &BatchInfo) -> Result<Tensor, ModelError> {
        Ok(self.run(input_ids, batch, None, None, Head::Logits, false)?.out)
    }

    /// An empty KV cache for generating with this model, storing keys and
    /// values in the dtype the model was loaded with
    /// ([`LoadOptions::kv_cache_dtype`]).
    pub fn new_kv_cache(&self) -> KvCache {
        KvCache::with_dtype(self.kv_cache_dtype)
    }

    /// The dtype [`Self::new_kv_cache`] stores keys and values in.
    pub fn kv_cache_dtype(&self) -> DType {
        self.kv_cache_dtype
    }

    /// Logits `[batch, 1, vocab]` of the last position only, as
    /// [`forward`](Self::forward) otherwise: a prompt's prefill projects
    /// one row per sequence onto the vocabulary, not all of them.
    pub fn forward_last(
        &self,
        input_ids: &Tensor,
        batch: &BatchInfo,
        cache: Option<&mut KvCache>,
        tuner: Option<&TunerBinding>,
    ) -> Result<Tensor, ModelError> {
        let RunOutput { out: logits, ran_head, .. } =
            self.run(input_ids, batch, cache, tuner.or(self.adapter.as_deref()), Head::LastLogits, false)?;
        if ran_head {
            return Ok(logits);
        }
        let s = logits.dim(1).map_err(|e| self.head_error(e))?;
        logits.narrow(1, s.saturating_sub(1), 1).map_err(|e| self.head_error(e))
    }

    /// Logits with an adapter chosen per row (`adapters`: each served
    /// adapter with the rows it serves; rows in no group get the base
    /// model; the attached adapter is ignored): of the last position only
    /// (`[batch, 1, vocab]`) when `last_only`, as
    /// [`forward_last`](Self::forward_last), else of every position, as
    /// [`forward`](Self::forward).
    pub fn forward_per_row(
        &self,
        input_ids: &Tensor,
        batch: &BatchInfo,
        cache: Option<&mut KvCache>,
        adapters: &RowAdapters<'_>,
        last_only: bool,
    ) -> Result<Tensor, ModelError> {
        let head = if last_only { Head::LastLogits } else { Head::Logits };
        let RunOutput { out: logits, ran_head, .. } =
            self.run_with(input_ids, batch, cache, None, Some(adapters), head, false)?;
        if ran_head || !last_only {
            return Ok(logits);
        }
        let s = logits.dim(1).map_err(|e| self.head_error(e))?;
        logits.narrow(1, s.saturating_sub(1), 1).map_err(|e| self.head_error(e))
    }

    /// Per position `t` of `input_ids`, the log-probability of
    /// `labels[:, t + 1]` (`[batch, seq − 1]`, f32, differentiable; 0
    /// where the label is [`IGNORE_INDEX`](crate::loss::IGNORE_INDEX)) and
    /// the mask of labelled positions, with the attached adapter. What
    /// training computes instead of the logits: on the CPU the output head
    /// runs chunk by chunk and only over labelled positions (see
    /// [`oxtune_kernels::label_log_probs`]).
    pub fn label_logps(
        &self,
        input_ids: &Tensor,
        batch: &BatchInfo,
        labels: &Tensor,
    ) -> Result<LabelLogps, ModelError> {
        self.label_logps_with(input_ids, batch, labels, self.adapter.as_deref(), true)
    }

    /// [`label_logps`](Self::label_logps) of the base model alone, the
    /// attached adapter switched off (the reference of preference training:
    /// its auxiliary outputs are not asked for, as nothing reads them).
    pub fn label_logps_without_adapter(
        &self,
        input_ids: &Tensor,
        batch: &BatchInfo,
        labels: &Tensor,
    ) -> Result<LabelLogps, ModelError> {
        self.label_logps_with(input_ids, batch, labels, None, false)
    }

    /// [`label_logps`](Self::label_logps) with the attached adapter, for a
    /// frozen reference model: its auxiliary outputs are not asked for.
    pub fn reference_label_logps(
        &self,
        input_ids: &Tensor,
        batch: &BatchInfo,
        labels: &Tensor,
    ) -> Result<LabelLogps, ModelError> {
        self.label_logps_with(input_ids, batch, labels, self.adapter.as_deref(), false)
    }

    fn label_logps_with(
        &self,
        input_ids: &Tensor,
        batch: &BatchInfo,
        labels: &Tensor,
        tuner: Option<&TunerBinding>,
        want_aux: bool,
    ) -> Result<LabelLogps, ModelError> {
        let RunOutput { out, ran_head, aux } =
            self.run(input_ids, batch, None, tuner, Head::LabelLogProbs(labels), want_aux)?;
        let (logps, mask) = match ran_head {
            true => (out, crate::loss::next_token_mask(labels).map_err(|e| self.head_error(e))?),
            // A plugin without the output-head op returned every position's logits.
            false => crate::loss::next_token_logps(&out, labels).map_err(|e| self.head_error(e))?,
        };
        Ok(LabelLogps { logps, mask, aux })
    }

    /// Has training differentiate the model's auxiliary outputs (the
    /// trainer adds a router's `aux_loss` to the loss): with gradient
    /// checkpointing, blocks that collect router logits then stay in the
    /// graph so the aux loss's gradient reaches the layers below.
    pub fn set_aux_gradients(&mut self, on: bool) {
        self.aux_gradients = on;
    }

    fn head_error(&self, source: candle_core::Error) -> ModelError {
        ModelError::Forward { model: self.dir.clone(), source: OpError::Candle { op: "output_head", source: source } }
    }

    /// Turns gradient checkpointing on or off: with it, each block the
    /// plugin marks (a transformer layer) keeps only its input and output
    /// while training, and recomputes the rest in the backward pass (see
    /// [`crate::backend::checkpoint`]). After each `backward()`, pass the
    /// gradients through [`merge_block_gradients`](Self::merge_block_gradients).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.block_gradients = on.then(|| Arc::new(BlockGradients::new()));
    }

    /// Whether gradient checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.block_gradients.is_some()
    }

    /// Adds the gradients that checkpointed blocks produced during the
    /// last backward pass to `grads` (nothing without checkpointing).
    pub fn merge_block_gradients(&self, grads: &mut GradStore) -> candle_core::Result<()> {
        match &self.block_gradients {
            Some(pending) => pending.merge_into(grads),
            None => Ok(()),
        }
    }

    /// Runs the plugin's forward pass (asking for its auxiliary outputs
    /// when `want_aux`); the output, whether it went through the
    /// output-head op (else it is every position's logits), and the
    /// auxiliary outputs.
    fn run(
        &self,
        input_ids: &Tensor,
        batch: &BatchInfo,
        cache: Option<&mut KvCache>,
        tuner: Option<&TunerBinding>,
        head: Head<'_>,
        want_aux: bool,
    ) -> Result<RunOutput, ModelError> {
        self.run_with(input_ids, batch, cache, tuner, None, head, want_aux)
    }

    /// [`run`](Self::run) with, optionally, adapters chosen per row.
    #[allow(clippy::too_many_arguments)]
    fn run_with(
        &self,
        input_ids: &Tensor,
        batch: &BatchInfo,
        cache: Option<&mut KvCache>,
        tuner: Option<&TunerBinding>,
        row_adapters: Option<&RowAdapters<'_>>,
        head: Head<'_>,
        want_aux: bool,
    ) -> Result<RunOutput, ModelError> {
        let forward_error = |source| ModelError::Forward { model: self.dir.clone(), source: source };
        let candle_error = |source| forward_error(OpError::Candle { op: "positions", source: source });
        let (b, s) = input_ids.dims2().map_err(candle_error)?;
        let positions = match &batch.position_ids {
            Some(p) => p.clone(),
            None => {
                let start = cache.as_ref().map_or(0, |c| c.seq_len()) as u32;
                Tensor::arange(start, start + s as u32, &self.device)
                    .and_then(|t| t.unsqueeze(0)?.broadcast_as((b, s))?.contiguous())
                    .map_err(candle_error)?
            }
        };
        let ids = input_ids.to_dtype(DType::U32).map_err(candle_error)?;
        // Checkpointing replays blocks with an owned tuner: the attached
        // adapter's (or none), not one lent for this call.
        let own_tuner = match tuner {
            None => Some(None),
            Some(t) => self.adapter.as_ref().filter(|a| std::ptr::eq(a.as_ref(), t)).map(|a| Some(a.clone())),
        };
        let checkpointing = match (&self.block_gradients, own_tuner) {
            (Some(grads), Some(tuner)) if cache.is_none() => Some(Checkpointing { grads: grads.clone(), tuner }),
            _ => None,
        };
        let mut session = GraphSession::new(ForwardContext { weights: &self.weights, batch, cache, tuner })
            .with_head(head)
            .with_checkpointing(checkpointing)
            .with_row_adapters(row_adapters)
            .with_aux_gradients(self.aux_gradients);
        let mut inputs: Vec<(&str, Tensor)> = vec![("input_ids", ids), ("position_ids", positions)];
        inputs.extend(batch.media.iter().map(|(name, t)| (name.as_str(), t.clone())));
        if want_aux {
            let flag = Tensor::ones((), DType::U8, &self.device).map_err(candle_error)?;
            inputs.push((oxtune_plugin_api::abi::WANT_AUX_OUTPUTS, flag));
        }
        let out = session.run_model(&self.instance, &inputs).map_err(forward_error)?;
        Ok(RunOutput { out, ran_head: session.ran_output_head(), aux: session.take_aux_outputs() })
    }
}
