//! What a plugin author implements, and how it becomes a root module.
//!
//! An author implements some of [`ModelArchitecture`], [`Tuner`],
//! [`RewardFunction`] and [`DatasetAdapter`], lists them in a [`Plugin`],
//! and calls [`declare_plugin!`](crate::declare_plugin). The macro turns
//! the plugin into the [`PluginModRef`] root module the host calls — linked
//! in (registered with `inventory`) or exported from a cdylib — and every
//! call into it is wrapped so that a panic becomes an error naming the
//! plugin.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::nonexhaustive_enum::NonExhaustive;
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec};

use crate::abi::{
    self, ComponentDescriptor, ComponentKind, GraphRef, MediaItem, Modality, ModelBox, ModelInstance, ModelInstance_TO,
    NamedTensor, ParamInit, ParamSpec, PluginInfo, PluginMod, PluginModRef, TensorId, TunerBox, TunerInstance,
    TunerInstance_TO,
};
use crate::data::RewardSample;
use crate::gguf::GgufLayout;
use crate::graph::{with_graph, Tensor};
use crate::media::{MediaRequest, PreparedMedia};
use crate::{Error, Result, API_VERSION};

/// The description of one component, as an author writes it.
#[derive(Clone, Debug)]
pub struct Descriptor {
    kind: ComponentKind,
    name: String,
    version: String,
    description: String,
    architectures: Vec<String>,
    model_types: Vec<String>,
    modality: Modality,
    columns: Vec<String>,
    metadata: serde_json::Value,
}

impl Descriptor {
    fn new(kind: ComponentKind, name: &str, version: &str) -> Descriptor {
        Descriptor {
            kind,
            name: name.to_owned(),
            version: version.to_owned(),
            description: String::new(),
            architectures: Vec::new(),
            model_types: Vec::new(),
            modality: Modality::TEXT,
            columns: Vec::new(),
            metadata: serde_json::Value::Object(Default::default()),
        }
    }

    /// A model architecture named `name`.
    pub fn model(name: &str, version: &str) -> Descriptor {
        Descriptor::new(ComponentKind::Model, name, version)
    }

    /// A tuner named `name`.
    pub fn tuner(name: &str, version: &str) -> Descriptor {
        Descriptor::new(ComponentKind::Tuner, name, version)
    }

    /// A reward function named `name`.
    pub fn reward(name: &str, version: &str) -> Descriptor {
        Descriptor::new(ComponentKind::Reward, name, version)
    }

    /// A dataset adapter named `name`.
    pub fn dataset_adapter(name: &str, version: &str) -> Descriptor {
        Descriptor::new(ComponentKind::DatasetAdapter, name, version)
    }

    /// One line saying what the component does.
    pub fn description(mut self, text: &str) -> Descriptor {
        self.description = text.to_owned();
        self
    }

    /// Models: the HF `architectures` entries served.
    pub fn architectures(mut self, names: &[&str]) -> Descriptor {
        self.architectures = names.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Models: the HF `model_type`s served.
    pub fn model_types(mut self, names: &[&str]) -> Descriptor {
        self.model_types = names.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Models: what the model consumes.
    pub fn modality(mut self, modality: Modality) -> Descriptor {
        self.modality = modality;
        self
    }

    /// Dataset adapters: the columns whose presence selects this adapter.
    /// Every entry must be present; `a|b` is satisfied by either.
    pub fn columns(mut self, names: &[&str]) -> Descriptor {
        self.columns = names.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Open-ended metadata (a JSON object).
    pub fn metadata(mut self, value: serde_json::Value) -> Descriptor {
        self.metadata = value;
        self
    }

    fn to_abi(&self) -> ComponentDescriptor {
        let strings = |v: &[String]| v.iter().map(|s| RString::from(s.as_str())).collect::<RVec<_>>();
        ComponentDescriptor {
            kind: self.kind,
            name: self.name.as_str().into(),
            version: self.version.as_str().into(),
            description: self.description.as_str().into(),
            architectures: strings(&self.architectures),
            model_types: strings(&self.model_types),
            modality: self.modality,
            columns: strings(&self.columns),
            metadata_json: self.metadata.to_string().into(),
        }
    }
}

/// A model architecture: turns a `config.json` into a [`Model`].
pub trait ModelArchitecture: Send + Sync + 'static {
    /// What the registry needs to match checkpoints to this architecture.
    fn descriptor(&self) -> Descriptor;
    /// Reads a `config.json` (already parsed); loads no weights.
    fn load(&self, config: &serde_json::Value) -> Result<Box<dyn Model>>;

    /// The Hugging Face `config.json` for a llama.cpp GGUF file of this
    /// architecture, from its metadata: what the family's llama.cpp keys
    /// mean (experts, sliding-window layers, partial rotary, ...), the
    /// inverse of the metadata its [`Model::gguf_layout`] writes. `None`
    /// (the default): the host's generic translation of the keys every
    /// llama.cpp decoder shares serves.
    fn config_from_gguf(&self, metadata: &crate::gguf::GgufMetadata) -> Option<Result<serde_json::Value>> {
        let _ = metadata;
        None
    }
}

/// A configured model: its forward pass on the host's graph.
pub trait Model: Send + Sync + 'static {
    /// Computes the output (logits for a language model) from named inputs.
    fn forward(&self, inputs: &Inputs) -> Result<Tensor>;

    /// How the model reads media (`position_axes`, `image_placeholder`,
    /// `video_placeholder`); `None` for a text-only model.
    fn media_spec(&self) -> Option<serde_json::Value> {
        None
    }

    /// Preprocesses media items into model inputs (see
    /// `oxtune-helpers-vision`); `options` is the model's
    /// `preprocessor_config.json` with the run's overrides.
    fn prepare_media(&self, items: &[MediaRequest], options: &serde_json::Value) -> Result<Vec<PreparedMedia>> {
        let _ = (items, options);
        Err(Error::new("this model reads text only"))
    }

    /// How the model is stored in a llama.cpp GGUF file; `None` when
    /// llama.cpp has no such architecture. An error says why this
    /// configuration cannot be written (a RoPE scaling llama.cpp lacks).
    fn gguf_layout(&self) -> Option<Result<GgufLayout>> {
        None
    }

    /// The model's linear layers and their roles; `None` lets the host
    /// infer them from the weights (every rank-2 weight but embeddings).
    /// Declare them when a weight of that shape is not one a tuner
    /// should adapt (a mixture of experts' router).
    fn linear_layers(&self) -> Option<Vec<LinearLayer>> {
        None
    }
}

/// One linear layer of a model, as [`Model::linear_layers`] declares it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinearLayer {
    /// The layer's name: its weight without `.weight`
    /// (`model.layers.0.self_attn.q_proj`).
    pub name: String,
    /// What it does.
    pub role: LinearRole,
    /// Where transformers holds the layer in memory when it is one
    /// expert's slice of a fused parameter rather than a module of its own
    /// (how adapters name it for PEFT). Added in 1.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fused: Option<FusedSlot>,
}

impl LinearLayer {
    /// The layer `name` in `role`.
    pub fn new(name: impl Into<String>, role: LinearRole) -> LinearLayer {
        LinearLayer { name: name.into(), role, fused: None }
    }

    /// The same layer, held by transformers in the fused parameter `slot`.
    pub fn in_fused(mut self, slot: FusedSlot) -> LinearLayer {
        self.fused = Some(slot);
        self
    }
}

/// One expert's linear layer inside a fused 3-D parameter: transformers 5
/// holds a mixture's experts as `mlp.experts.gate_up_proj`
/// (`[experts, 2·inner, hidden]`, gate rows then up rows) and
/// `mlp.experts.down_proj` (`[experts, hidden, inner]`), and PEFT adapts
/// those with `target_parameters`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FusedSlot {
    /// The fused parameter's full name in memory
    /// (`model.layers.0.mlp.experts.gate_up_proj`).
    pub parameter: String,
    /// The expert: the slice along the parameter's first dimension.
    pub expert: usize,
    /// Experts in the parameter.
    pub experts: usize,
    /// The first row of the expert's slice this layer's weight fills (the
    /// up projection starts after the gate's rows).
    pub row_offset: usize,
}

/// The role of a linear layer (see [`LinearLayer`]): tuners' `all-linear`
/// adapts every role but [`Router`](Self::Router) and [`Head`](Self::Head);
/// tensor parallelism splits `*Q/K/V/Gate/Up` by output rows and `*O/Down`
/// by input columns.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearRole {
    /// An attention query projection.
    AttentionQ,
    /// An attention key projection.
    AttentionK,
    /// An attention value projection.
    AttentionV,
    /// Fused query, key and value projections (Phi-3's `qkv_proj`).
    AttentionQkv,
    /// An attention output projection.
    AttentionO,
    /// An MLP's gate projection (also an expert's).
    MlpGate,
    /// An MLP's up projection (also an expert's).
    MlpUp,
    /// Fused gate and up projections (Phi-3's `gate_up_proj`).
    MlpGateUp,
    /// An MLP's down projection (also an expert's).
    MlpDown,
    /// A mixture of experts' router: never adapted by `all-linear`.
    Router,
    /// The output head over the vocabulary.
    Head,
    /// Any other linear layer (a vision projector, ...).
    Other,
}

/// The named inputs of one forward pass.
pub struct Inputs {
    tensors: Vec<(String, Tensor)>,
}

impl Inputs {
    /// The input called `name` (`input_ids`, `pixel_values`, ...).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| *t)
            .ok_or_else(|| Error::new(format!("the host passed no input named `{name}`")))
    }

    /// The input called `name`, if the host passed one.
    pub fn try_get(&self, name: &str) -> Option<Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| *t)
    }
}

/// A tuner: how a frozen linear layer is adapted.
pub trait Tuner: Send + Sync + 'static {
    /// Name and version.
    fn descriptor(&self) -> Descriptor;
    /// Reads the tuner's configuration (a JSON object).
    fn load(&self, config: &serde_json::Value) -> Result<Box<dyn TunerLayers>>;
}

/// A configured tuner, applied layer by layer at the host's `linear` hook.
pub trait TunerLayers: Send + Sync + 'static {
    /// The trainable parameters added to layer `layer`.
    fn params(&self, layer: &str, in_features: usize, out_features: usize) -> Result<Vec<TunerParam>>;
    /// The adapted output of `layer` for input `x`, given the frozen output `base`.
    fn forward(&self, layer: &str, x: &Tensor, base: &Tensor) -> Result<Tensor>;
    /// The merged weight `[out, in]` of `layer` (base weight and tuner in one matrix).
    fn merge(&self, layer: &str) -> Result<Tensor>;
    /// The merged layer's bias when the tuner changes it (a tuner scaling
    /// the layer's output scales its bias); `None` keeps the base bias.
    fn merge_bias(&self, layer: &str) -> Result<Option<Tensor>> {
        let _ = layer;
        Ok(None)
    }
    /// Whether the base parameter `name` is trained in place (full
    /// fine-tuning, freeze); such a tuner is saved as a whole model.
    fn trains_base(&self, name: &str) -> bool {
        let _ = name;
        false
    }
    /// The `adapter_config.json` to save (PEFT's keys for a PEFT tuner);
    /// `None` saves the configuration the tuner was loaded with.
    fn saved_config(&self) -> Option<serde_json::Value> {
        None
    }
}

/// Tuning in place: nothing is added at the `linear` hook and the base
/// parameters a predicate selects are trained (full fine-tuning, freeze,
/// LayerNorm tuning).
///
/// ```
/// use oxtune_plugin_api::{InPlace, TunerLayers};
/// let norms = InPlace::new(|name| name.ends_with("norm.weight"));
/// assert!(norms.trains_base("model.norm.weight"));
/// assert!(!norms.trains_base("model.layers.0.self_attn.q_proj.weight"));
/// ```
pub struct InPlace(Box<dyn Fn(&str) -> bool + Send + Sync>);

impl InPlace {
    /// Trains the base parameters for which `trains` is true.
    pub fn new(trains: impl Fn(&str) -> bool + Send + Sync + 'static) -> InPlace {
        InPlace(Box::new(trains))
    }
}

impl TunerLayers for InPlace {
    fn params(&self, _layer: &str, _in_features: usize, _out_features: usize) -> Result<Vec<TunerParam>> {
        Ok(Vec::new())
    }

    fn forward(&self, _layer: &str, _x: &Tensor, base: &Tensor) -> Result<Tensor> {
        Ok(*base)
    }

    fn merge(&self, layer: &str) -> Result<Tensor> {
        crate::graph::weight(&format!("{layer}.weight"))
    }

    fn trains_base(&self, name: &str) -> bool {
        (self.0)(name)
    }
}

/// A trainable parameter a tuner adds.
#[derive(Clone, Debug)]
pub struct TunerParam {
    /// Full parameter name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its initialisation.
    pub init: ParamInit,
}

/// A reward function for GRPO and evaluation.
pub trait RewardFunction: Send + Sync + 'static {
    /// Name and version.
    fn descriptor(&self) -> Descriptor;
    /// One score per sample.
    fn score(&self, samples: &[RewardSample]) -> Result<Vec<f64>>;
}

/// A dataset adapter: one raw record to the standard conversation row.
pub trait DatasetAdapter: Send + Sync + 'static {
    /// Name, version and the columns that select it.
    fn descriptor(&self) -> Descriptor;
    /// Converts one record (a JSON object) into a standard row
    /// (`{"messages": [...], ...}`).
    fn adapt(&self, record: &serde_json::Map<String, serde_json::Value>) -> Result<serde_json::Value>;
}

/// Everything one plugin library provides.
pub struct Plugin {
    name: String,
    version: String,
    models: Vec<Box<dyn ModelArchitecture>>,
    tuners: Vec<Box<dyn Tuner>>,
    rewards: Vec<Box<dyn RewardFunction>>,
    adapters: Vec<Box<dyn DatasetAdapter>>,
}

impl Plugin {
    /// An empty plugin called `name` at `version`.
    pub fn new(name: &str, version: &str) -> Plugin {
        Plugin {
            name: name.to_owned(),
            version: version.to_owned(),
            models: Vec::new(),
            tuners: Vec::new(),
            rewards: Vec::new(),
            adapters: Vec::new(),
        }
    }

    /// Adds a model architecture.
    pub fn model(mut self, m: impl ModelArchitecture) -> Plugin {
        self.models.push(Box::new(m));
        self
    }

    /// Adds a tuner.
    pub fn tuner(mut self, t: impl Tuner) -> Plugin {
        self.tuners.push(Box::new(t));
        self
    }

    /// Adds a reward function.
    pub fn reward(mut self, r: impl RewardFunction) -> Plugin {
        self.rewards.push(Box::new(r));
        self
    }

    /// Adds a dataset adapter.
    pub fn dataset_adapter(mut self, a: impl DatasetAdapter) -> Plugin {
        self.adapters.push(Box::new(a));
        self
    }

    fn find<'a, T: ?Sized>(
        &self,
        list: &'a [Box<T>],
        name: &str,
        kind: &str,
        descr: impl Fn(&T) -> Descriptor,
    ) -> Result<&'a T> {
        list.iter()
            .map(|b| &**b)
            .find(|c| descr(c).name == name)
            .ok_or_else(|| Error::new(format!("plugin `{}` has no {kind} named `{name}`", self.name)))
    }
}

/// Gives the root-module functions of one plugin access to its [`Plugin`].
/// Implemented by [`declare_plugin!`](crate::declare_plugin); not by hand.
pub trait PluginSource: 'static {
    /// The plugin, built on first use.
    fn plugin() -> &'static Plugin;
    /// The plugin's name, for error messages even when building it panicked.
    const NAME: &'static str;
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a non-string panic payload)".to_owned()
    }
}

/// Runs `f`, turning both its error and any panic into an error string that
/// names the plugin and what it was doing. Every function a plugin exports
/// goes through here: a panic must never cross the boundary.
pub fn guard<T>(plugin: &str, what: &dyn Fn() -> String, f: impl FnOnce() -> Result<T>) -> RResult<T, RString> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(format!("plugin `{plugin}`, {}: {e}", what()).into()),
        Err(payload) => {
            RResult::RErr(format!("plugin `{plugin}` panicked in {}: {}", what(), panic_message(&*payload)).into())
        }
    }
}

extern "C" fn info<P: PluginSource>() -> PluginInfo {
    // Building the plugin may panic; the name and versions never need it.
    PluginInfo { name: P::NAME.into(), version: plugin_version::<P>().into(), api_version: API_VERSION.into() }
}

fn plugin_version<P: PluginSource>() -> String {
    catch_unwind(P::plugin).map(|p| p.version.clone()).unwrap_or_else(|_| "unknown".to_owned())
}

extern "C" fn components<P: PluginSource>() -> RResult<RVec<ComponentDescriptor>, RString> {
    guard(P::NAME, &|| "listing its components".into(), || {
        let p = P::plugin();
        let mut out = RVec::new();
        out.extend(p.models.iter().map(|c| c.descriptor().to_abi()));
        out.extend(p.tuners.iter().map(|c| c.descriptor().to_abi()));
        out.extend(p.rewards.iter().map(|c| c.descriptor().to_abi()));
        out.extend(p.adapters.iter().map(|c| c.descriptor().to_abi()));
        Ok(out)
    })
}

extern "C" fn score<P: PluginSource>(name: RStr<'_>, samples_json: RStr<'_>) -> RResult<RVec<f64>, RString> {
    guard(P::NAME, &|| format!("reward `{name}`"), || {
        let p = P::plugin();
        let reward = p.find(&p.rewards, name.as_str(), "reward function", |r| r.descriptor())?;
        let samples: Vec<RewardSample> = serde_json::from_str(samples_json.as_str())?;
        let scores = reward.score(&samples)?;
        if scores.len() != samples.len() {
            return Err(Error::new(format!("returned {} scores for {} samples", scores.len(), samples.len())));
        }
        Ok(scores.into())
    })
}

extern "C" fn adapt<P: PluginSource>(name: RStr<'_>, record_json: RStr<'_>) -> RResult<RString, RString> {
    guard(P::NAME, &|| format!("dataset adapter `{name}`"), || {
        let p = P::plugin();
        let adapter = p.find(&p.adapters, name.as_str(), "dataset adapter", |a| a.descriptor())?;
        let record: serde_json::Value = serde_json::from_str(record_json.as_str())?;
        let serde_json::Value::Object(record) = record else {
            return Err(Error::new("a record must be a JSON object"));
        };
        Ok(adapter.adapt(&record)?.to_string().into())
    })
}

/// A [`Model`] behind the ABI's model trait object.
struct ModelAdapter<P> {
    model: Box<dyn Model>,
    name: String,
    _plugin: std::marker::PhantomData<fn() -> P>,
}

impl<P: PluginSource> ModelInstance for ModelAdapter<P> {
    fn forward(&self, mut graph: GraphRef<'_>, inputs: RSlice<'_, NamedTensor>) -> RResult<TensorId, RString> {
        guard(P::NAME, &|| format!("the forward pass of model `{}`", self.name), || {
            let inputs =
                Inputs { tensors: inputs.iter().map(|n| (n.name.to_string(), Tensor::from_id(n.id))).collect() };
            with_graph(&mut graph, || self.model.forward(&inputs)).map(|t| t.id())
        })
    }

    fn media_spec(&self) -> RResult<ROption<RString>, RString> {
        guard(P::NAME, &|| format!("the media settings of model `{}`", self.name), || {
            Ok(self.model.media_spec().map(|v| RString::from(v.to_string())).into())
        })
    }

    fn prepare_media(
        &self,
        items: RSlice<'_, MediaItem>,
        options_json: RStr<'_>,
    ) -> RResult<RVec<abi::PreparedMedia>, RString> {
        guard(P::NAME, &|| format!("model `{}` preparing media", self.name), || {
            let items = items.iter().map(MediaRequest::from_abi).collect::<Result<Vec<_>>>()?;
            let options: serde_json::Value = serde_json::from_str(options_json.as_str())?;
            Ok(self.model.prepare_media(&items, &options)?.iter().map(PreparedMedia::to_abi).collect())
        })
    }

    fn gguf_layout(&self) -> RResult<ROption<RString>, RString> {
        guard(P::NAME, &|| format!("the GGUF layout of model `{}`", self.name), || match self.model.gguf_layout() {
            None => Ok(ROption::RNone),
            Some(layout) => Ok(ROption::RSome(serde_json::to_string(&layout?)?.into())),
        })
    }

    fn linear_layers(&self) -> RResult<ROption<RString>, RString> {
        guard(P::NAME, &|| format!("the linear layers of model `{}`", self.name), || {
            Ok(match self.model.linear_layers() {
                None => ROption::RNone,
                Some(layers) => ROption::RSome(serde_json::to_string(&layers)?.into()),
            })
        })
    }
}

extern "C" fn load_model<P: PluginSource>(name: RStr<'_>, config_json: RStr<'_>) -> RResult<ModelBox, RString> {
    guard(P::NAME, &|| format!("loading model `{name}`"), || {
        let p = P::plugin();
        let arch = p.find(&p.models, name.as_str(), "model architecture", |m| m.descriptor())?;
        let config: serde_json::Value = serde_json::from_str(config_json.as_str())?;
        let model = arch.load(&config)?;
        let adapter = ModelAdapter::<P> { model, name: name.to_string(), _plugin: Default::default() };
        Ok(ModelInstance_TO::from_value(adapter, TD_Opaque))
    })
}

extern "C" fn config_from_gguf<P: PluginSource>(
    name: RStr<'_>,
    metadata_json: RStr<'_>,
) -> RResult<ROption<RString>, RString> {
    guard(P::NAME, &|| format!("the config of model `{name}` from GGUF metadata"), || {
        let p = P::plugin();
        let arch = p.find(&p.models, name.as_str(), "model architecture", |m| m.descriptor())?;
        let request: serde_json::Value = serde_json::from_str(metadata_json.as_str())?;
        let architecture = request.get("architecture").and_then(serde_json::Value::as_str).unwrap_or_default();
        let values = request.get("values").and_then(serde_json::Value::as_object).cloned().unwrap_or_default();
        let config = request.get("config").cloned().unwrap_or_else(|| serde_json::json!({}));
        let metadata = crate::gguf::GgufMetadata::new(architecture, values, config);
        Ok(match arch.config_from_gguf(&metadata) {
            None => ROption::RNone,
            Some(config) => ROption::RSome(config?.to_string().into()),
        })
    })
}

/// A [`TunerLayers`] behind the ABI's tuner trait object.
struct TunerAdapter<P> {
    layers: Box<dyn TunerLayers>,
    name: String,
    _plugin: std::marker::PhantomData<fn() -> P>,
}

impl<P: PluginSource> TunerInstance for TunerAdapter<P> {
    fn params(&self, layer: RStr<'_>, in_features: u64, out_features: u64) -> RResult<RVec<ParamSpec>, RString> {
        guard(P::NAME, &|| format!("tuner `{}` on layer `{layer}`", self.name), || {
            let params = self.layers.params(layer.as_str(), in_features as usize, out_features as usize)?;
            Ok(params
                .into_iter()
                .map(|p| ParamSpec {
                    name: p.name.into(),
                    shape: p.shape.iter().map(|&d| d as u64).collect(),
                    init: NonExhaustive::new(p.init),
                })
                .collect())
        })
    }

    fn forward(
        &self,
        mut graph: GraphRef<'_>,
        layer: RStr<'_>,
        x: TensorId,
        base: TensorId,
    ) -> RResult<TensorId, RString> {
        guard(P::NAME, &|| format!("tuner `{}` on layer `{layer}`", self.name), || {
            with_graph(&mut graph, || self.layers.forward(layer.as_str(), &Tensor::from_id(x), &Tensor::from_id(base)))
                .map(|t| t.id())
        })
    }

    fn merge(&self, mut graph: GraphRef<'_>, layer: RStr<'_>) -> RResult<TensorId, RString> {
        guard(P::NAME, &|| format!("merging tuner `{}` into layer `{layer}`", self.name), || {
            with_graph(&mut graph, || self.layers.merge(layer.as_str())).map(|t| t.id())
        })
    }

    fn trains_base(&self, name: RStr<'_>) -> RResult<bool, RString> {
        guard(P::NAME, &|| format!("tuner `{}` on parameter `{name}`", self.name), || {
            Ok(self.layers.trains_base(name.as_str()))
        })
    }

    fn merge_bias(&self, mut graph: GraphRef<'_>, layer: RStr<'_>) -> RResult<ROption<TensorId>, RString> {
        guard(P::NAME, &|| format!("merging tuner `{}` into the bias of `{layer}`", self.name), || {
            with_graph(&mut graph, || self.layers.merge_bias(layer.as_str())).map(|t| t.map(|t| t.id()).into())
        })
    }

    fn saved_config(&self) -> RResult<ROption<RString>, RString> {
        guard(P::NAME, &|| format!("tuner `{}` writing its config", self.name), || {
            Ok(self.layers.saved_config().map(|c| RString::from(c.to_string())).into())
        })
    }
}

extern "C" fn load_tuner<P: PluginSource>(name: RStr<'_>, config_json: RStr<'_>) -> RResult<TunerBox, RString> {
    guard(P::NAME, &|| format!("loading tuner `{name}`"), || {
        let p = P::plugin();
        let tuner = p.find(&p.tuners, name.as_str(), "tuner", |t| t.descriptor())?;
        let config: serde_json::Value = serde_json::from_str(config_json.as_str())?;
        let layers = tuner.load(&config)?;
        let adapter = TunerAdapter::<P> { layers, name: name.to_string(), _plugin: Default::default() };
        Ok(TunerInstance_TO::from_value(adapter, TD_Opaque))
    })
}

/// Builds the root module of plugin `P` (called once, by the macro's code).
pub fn root_module<P: PluginSource>() -> PluginModRef {
    PluginMod {
        info: info::<P>,
        components: components::<P>,
        score: score::<P>,
        adapt: adapt::<P>,
        load_model: load_model::<P>,
        load_tuner: load_tuner::<P>,
        config_from_gguf: config_from_gguf::<P>,
    }
    .leak_into_prefix()
}

/// A plugin linked into the host binary, collected with `inventory`.
pub struct BuiltinPlugin {
    /// The crate that declared it (its "origin" in listings).
    pub crate_name: &'static str,
    /// Its root module, the same one its cdylib build exports.
    pub module: fn() -> PluginModRef,
}

inventory::collect!(BuiltinPlugin);

/// The name of the static through which `abi_stable` finds a library's
/// root module (`abi_stable::library::ROOT_MODULE_LOADER_NAME`); spelled out
/// because `#[export_name]` needs a literal.
#[doc(hidden)]
pub const LIB_HEADER_EXPORT_NAME: &str = "_1as_0lib_1header_0root_bmodule_bloader";

/// Declares a plugin crate's [`Plugin`].
///
/// `declare_plugin!(build)` with `fn build() -> Plugin`:
///
/// - registers the plugin with `inventory`, so a host that links the crate
///   (as an rlib) has it built in;
/// - with the crate's `cdylib` feature enabled, exports the root module and
///   the API version symbol, so the host can load the crate's cdylib build.
///
/// The crate must declare `[features] cdylib = []` and
/// `crate-type = ["rlib", "cdylib"]`.
#[macro_export]
macro_rules! declare_plugin {
    ($build:path) => {
        #[doc(hidden)]
        pub struct __OxtunePluginSource;

        impl $crate::plugin::PluginSource for __OxtunePluginSource {
            fn plugin() -> &'static $crate::plugin::Plugin {
                static PLUGIN: ::std::sync::OnceLock<$crate::plugin::Plugin> = ::std::sync::OnceLock::new();
                PLUGIN.get_or_init($build)
            }
            const NAME: &'static str = env!("CARGO_PKG_NAME");
        }

        #[doc(hidden)]
        pub fn __oxtune_root_module() -> $crate::abi::PluginModRef {
            static MODULE: ::std::sync::OnceLock<$crate::abi::PluginModRef> = ::std::sync::OnceLock::new();
            *MODULE.get_or_init($crate::plugin::root_module::<__OxtunePluginSource>)
        }

        $crate::inventory::submit! {
            $crate::plugin::BuiltinPlugin { crate_name: env!("CARGO_PKG_NAME"), module: __oxtune_root_module }
        }

        #[cfg(feature = "cdylib")]
        #[doc(hidden)]
        #[no_mangle]
        pub static OXTUNE_PLUGIN_API_VERSION: [u8; 32] = $crate::abi::encode_api_version($crate::API_VERSION);

        #[cfg(feature = "cdylib")]
        #[doc(hidden)]
        #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
        pub static __OXTUNE_LIB_HEADER: $crate::abi_stable::library::LibHeader = {
            extern "C" fn erased_root_module() -> $crate::abi_stable::library::RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader(__oxtune_root_module)
            }
            // SAFETY: the constructor returns the root module of type
            // `PluginModRef`, as `from_constructor` requires.
            unsafe {
                $crate::abi_stable::library::LibHeader::from_constructor::<$crate::abi::PluginModRef>(
                    erased_root_module,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            }
        };
    };
}
