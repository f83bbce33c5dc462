//! `oxtune-registry`: finds, loads and looks up plugins of all four kinds,
//! whatever their origin.
//!
//! - **built in**: plugin crates linked into the binary register themselves
//!   with `inventory` ([`oxtune_plugin_api::plugin::BuiltinPlugin`]);
//! - **dynamic**: cdylibs loaded with `abi_stable` from `--plugin PATH`,
//!   `OXTUNE_PLUGIN_PATH` and the user's plugin folder ([`dynamic`]);
//! - **wasm**: reward scripts run by wasmtime in a sandbox ([`wasm`]).
//!
//! Built-in and dynamic plugins are reached through the same root module
//! ([`PluginModRef`]), so the registry — and everything above it — treats
//! them alike. Two components of one kind with one name are an error that
//! names both sources.

mod component;
pub mod dynamic;
mod error;
mod wasm;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use abi_stable::std_types::RStr;
use oxtune_plugin_api::abi::{ComponentDescriptor, ModelBox, PluginModRef, TunerBox};
use oxtune_plugin_api::plugin::BuiltinPlugin;
use oxtune_plugin_api::{RewardSample, API_VERSION};

pub use error::RegistryError;
pub use oxtune_plugin_api::ComponentKind;
pub use wasm::{SandboxConfig, WasmReward};

/// Where a component came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Linked into the binary, from this crate.
    Builtin(String),
    /// Loaded from this cdylib.
    Dynamic(PathBuf),
    /// This wasm reward script.
    Wasm(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Builtin(krate) => write!(f, "built-in ({krate})"),
            Origin::Dynamic(path) => write!(f, "{}", path.display()),
            Origin::Wasm(path) => write!(f, "wasm {}", path.display()),
        }
    }
}

#[derive(Clone)]
enum Provider {
    Native { module: PluginModRef, plugin: String },
    Wasm(Arc<WasmReward>),
}

/// One registered component.
#[derive(Clone)]
pub struct Component {
    kind: ComponentKind,
    name: String,
    version: String,
    api_version: String,
    description: String,
    origin: Origin,
    descriptor: Option<ComponentDescriptor>,
    provider: Provider,
}

impl Component {
    /// Its kind.
    pub fn kind(&self) -> ComponentKind {
        self.kind
    }
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The component's own version.
    pub fn version(&self) -> &str {
        &self.version
    }
    /// The plugin API version its plugin was built against (`wasm-core-1` for scripts).
    pub fn api_version(&self) -> &str {
        &self.api_version
    }
    /// One line saying what it does.
    pub fn description(&self) -> &str {
        &self.description
    }
    /// Where it came from.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }
    /// The full descriptor (native plugins only).
    pub fn descriptor(&self) -> Option<&ComponentDescriptor> {
        self.descriptor.as_ref()
    }
}

/// Where to look for plugins besides the built-ins.
#[derive(Clone, Debug, Default)]
pub struct Discovery {
    /// `--plugin` paths: files (cdylibs, `.wasm`, `.wat`) or folders. Must exist.
    pub explicit: Vec<PathBuf>,
    /// Paths from `OXTUNE_PLUGIN_PATH`. Must exist.
    pub env_paths: Vec<PathBuf>,
    /// The user's plugin folder; skipped when it does not exist.
    pub user_dir: Option<PathBuf>,
    /// The sandbox for wasm reward scripts.
    pub sandbox: SandboxConfig,
}

impl Discovery {
    /// Reads `OXTUNE_PLUGIN_PATH` (a `:`-separated list; `;` on Windows)
    /// and the user folder `$OXTUNE_HOME/plugins` (default `~/.oxtune/plugins`).
    pub fn from_env(explicit: Vec<PathBuf>, sandbox: SandboxConfig) -> Discovery {
        let env_paths = std::env::var_os("OXTUNE_PLUGIN_PATH")
            .map(|v| std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()).collect())
            .unwrap_or_default();
        let home = std::env::var_os("OXTUNE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".oxtune")));
        Discovery { explicit, env_paths, user_dir: home.map(|h| h.join("plugins")), sandbox }
    }
}

/// The components known to this process.
#[derive(Clone, Default)]
pub struct Registry {
    components: Vec<Component>,
}

impl Registry {
    /// A registry with nothing in it.
    pub fn empty() -> Registry {
        Registry::default()
    }

    /// A registry with every built-in plugin linked into this binary.
    pub fn with_builtins() -> Result<Registry, RegistryError> {
        let mut builtins: Vec<&BuiltinPlugin> = inventory::iter::<BuiltinPlugin>.into_iter().collect();
        builtins.sort_by_key(|b| b.crate_name);
        let mut registry = Registry::empty();
        for b in builtins {
            registry.add_module((b.module)(), Origin::Builtin(b.crate_name.to_owned()))?;
        }
        Ok(registry)
    }

    /// Built-ins plus everything `discovery` points at.
    pub fn discover(discovery: &Discovery) -> Result<Registry, RegistryError> {
        let mut registry = Registry::with_builtins()?;
        if let Some(dir) = &discovery.user_dir {
            if dir.is_dir() {
                registry.load_path(dir, &discovery.sandbox)?;
            }
        }
        for path in discovery.env_paths.iter().chain(&discovery.explicit) {
            registry.load_path(path, &discovery.sandbox)?;
        }
        Ok(registry)
    }

    /// Loads a plugin file (cdylib, `.wasm`, `.wat`) or every plugin file
    /// in a folder (sorted by name, not recursive).
    pub fn load_path(&mut self, path: &Path, sandbox: &SandboxConfig) -> Result<(), RegistryError> {
        if !path.exists() {
            return Err(RegistryError::NotFound(path.to_owned()));
        }
        if path.is_dir() {
            let io = |source| RegistryError::Io { path: path.to_owned(), cause: source };
            let mut files: Vec<PathBuf> =
                std::fs::read_dir(path).map_err(io)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
            files.sort();
            for file in files.iter().filter(|f| dynamic::is_library_file(f) || wasm::is_wasm_file(f)) {
                self.load_file(file, sandbox)?;
            }
            return Ok(());
        }
        self.load_file(path, sandbox)
    }

    fn load_file(&mut self, path: &Path, sandbox: &SandboxConfig) -> Result<(), RegistryError> {
        if wasm::is_wasm_file(path) {
            let reward = WasmReward::load(path, sandbox)?;
            return self.insert(Component {
                kind: ComponentKind::Reward,
                name: reward.name().to_owned(),
                version: "-".into(),
                api_version: "wasm-core-1".into(),
                description: "reward script".into(),
                origin: Origin::Wasm(path.to_owned()),
                descriptor: None,
                provider: Provider::Wasm(Arc::new(reward)),
            });
        }
        let module = dynamic::load_library(path)?;
        self.add_module(module, Origin::Dynamic(path.to_owned()))
    }

    /// Registers every component of a plugin root module.
    pub fn add_module(&mut self, module: PluginModRef, origin: Origin) -> Result<(), RegistryError> {
        let info = (module.info())();
        let descriptors = (module.components())().into_result().map_err(|e| RegistryError::Plugin(e.into()))?;
        for d in descriptors {
            self.insert(Component {
                kind: d.kind,
                name: d.name.to_string(),
                version: d.version.to_string(),
                api_version: info.api_version.to_string(),
                description: d.description.to_string(),
                origin: origin.clone(),
                provider: Provider::Native { module, plugin: info.name.to_string() },
                descriptor: Some(d),
            })?;
        }
        Ok(())
    }

    fn insert(&mut self, c: Component) -> Result<(), RegistryError> {
        if let Some(existing) = self.components.iter().find(|e| e.kind == c.kind && e.name == c.name) {
            return Err(RegistryError::Duplicate {
                kind: c.kind.as_str(),
                name: c.name,
                first: existing.origin.clone(),
                second: c.origin,
            });
        }
        let at = self.components.partition_point(|e| (e.kind, e.name.as_str()) < (c.kind, c.name.as_str()));
        self.components.insert(at, c);
        Ok(())
    }

    /// Every component, sorted by kind, then name.
    pub fn components(&self) -> &[Component] {
        &self.components
    }

    /// The component of `kind` called `name`.
    pub fn get(&self, kind: ComponentKind, name: &str) -> Result<&Component, RegistryError> {
        self.components.iter().find(|c| c.kind == kind && c.name == name).ok_or_else(|| {
            RegistryError::UnknownComponent {
                kind: kind.as_str(),
                name: name.to_owned(),
                available: self.names(kind).join(", "),
            }
        })
    }

    /// The names of every registered component of `kind`, sorted.
    pub fn names(&self, kind: ComponentKind) -> Vec<&str> {
        self.components.iter().filter(|c| c.kind == kind).map(|c| c.name.as_str()).collect()
    }

    /// The model architecture serving a checkpoint: the first of
    /// `architectures` any plugin lists, else its `model_type`.
    pub fn model_for(&self, architectures: &[String], model_type: Option<&str>) -> Result<&Component, RegistryError> {
        let models = || self.components.iter().filter(|c| c.kind == ComponentKind::Model);
        let serves_arch = |c: &&Component, a: &str| {
            c.descriptor.as_ref().is_some_and(|d| d.architectures.iter().any(|x| x.as_str() == a))
        };
        for arch in architectures {
            if let Some(c) = models().find(|c| serves_arch(c, arch)) {
                return Ok(c);
            }
        }
        if let Some(mt) = model_type {
            let serves_type =
                |c: &&Component| c.descriptor.as_ref().is_some_and(|d| d.model_types.iter().any(|x| x.as_str() == mt));
            if let Some(c) = models().find(serves_type) {
                return Ok(c);
            }
        }
        let mut what = format!("architectures {architectures:?}");
        if let Some(mt) = model_type {
            what.push_str(&format!(" / model_type `{mt}`"));
        }
        let available: Vec<String> = models()
            .filter_map(|c| c.descriptor.as_ref().map(|d| (c, d)))
            .map(|(c, d)| {
                let archs: Vec<&str> = d.architectures.iter().map(|a| a.as_str()).collect();
                format!("{} ({})", c.name, archs.join(", "))
            })
            .collect();
        let available = if available.is_empty() { "none".to_owned() } else { available.join("; ") };
        Err(RegistryError::NoArchitecture { what, available })
    }

    /// The dataset adapter whose declared columns a record with `keys` has
    /// (every entry present; `a|b` means either). The adapter declaring
    /// the most columns wins; a tie is an error naming both.
    pub fn detect_adapter(&self, keys: &[&str]) -> Result<&Component, RegistryError> {
        let mut best: Option<(&Component, usize)> = None;
        let mut tie: Option<&Component> = None;
        for c in self.components.iter().filter(|c| c.kind == ComponentKind::DatasetAdapter) {
            let Some(d) = &c.descriptor else { continue };
            if d.columns.is_empty() {
                continue;
            }
            let matched = d.columns.iter().all(|entry| entry.as_str().split('|').any(|col| keys.contains(&col)));
            if !matched {
                continue;
            }
            match best {
                Some((_, n)) if n > d.columns.len() => {}
                Some((_, n)) if n == d.columns.len() => tie = Some(c),
                _ => {
                    best = Some((c, d.columns.len()));
                    tie = None;
                }
            }
        }
        match (best, tie) {
            (Some((a, _)), Some(b)) => {
                Err(RegistryError::AmbiguousAdapter { first: a.name.clone(), second: b.name.clone() })
            }
            (Some((c, _)), None) => Ok(c),
            (None, _) => Err(RegistryError::NoAdapter { columns: keys.join(", ") }),
        }
    }

    /// Scores samples with the reward `name` (native or wasm).
    pub fn score(&self, name: &str, samples: &[RewardSample]) -> Result<Vec<f64>, RegistryError> {
        let c = self.get(ComponentKind::Reward, name)?;
        match &c.provider {
            Provider::Wasm(reward) => reward.score(samples),
            Provider::Native { module, plugin } => {
                let json = serde_json::to_string(samples).map_err(|e| RegistryError::Plugin(e.to_string()))?;
                let scores = (module.score())(RStr::from_str(name), RStr::from_str(&json))
                    .into_result()
                    .map_err(|e| RegistryError::Plugin(e.into()))?;
                if scores.len() != samples.len() {
                    return Err(RegistryError::BadResult {
                        plugin: plugin.clone(),
                        what: format!("reward `{name}`"),
                        reason: format!("{} scores for {} samples", scores.len(), samples.len()),
                    });
                }
                Ok(scores.into_vec())
            }
        }
    }

    /// Scores samples with the reward `name`, one result per sample: a wasm
    /// script fails sample by sample (a trap, a timeout), a native plugin
    /// for the whole batch (its error is repeated for every sample).
    pub fn score_each(&self, name: &str, samples: &[RewardSample]) -> Vec<Result<f64, RegistryError>> {
        let every = |e: RegistryError| {
            let message = e.to_string();
            samples.iter().map(|_| Err(RegistryError::Plugin(message.clone()))).collect()
        };
        let component = match self.get(ComponentKind::Reward, name) {
            Ok(c) => c,
            Err(e) => return every(e),
        };
        match &component.provider {
            Provider::Wasm(reward) => reward.score_each(samples),
            Provider::Native { .. } => match self.score(name, samples) {
                Ok(scores) => scores.into_iter().map(Ok).collect(),
                Err(e) => every(e),
            },
        }
    }

    /// Converts one raw record with the dataset adapter `name`.
    pub fn adapt(&self, name: &str, record: &serde_json::Value) -> Result<serde_json::Value, RegistryError> {
        let (module, plugin) = self.native(ComponentKind::DatasetAdapter, name)?;
        let out = (module.adapt())(RStr::from_str(name), RStr::from_str(&record.to_string()))
            .into_result()
            .map_err(|e| RegistryError::Plugin(e.into()))?;
        let bad = |reason: String| RegistryError::BadResult {
            plugin: plugin.to_owned(),
            what: format!("dataset adapter `{name}`"),
            reason,
        };
        let row: serde_json::Value = serde_json::from_str(out.as_str()).map_err(|e| bad(e.to_string()))?;
        let has = |key: &str| row.get(key).is_some_and(|m| m.is_array());
        if !has("messages") && !has("input_ids") {
            return Err(bad("a standard row needs a `messages` array (or, pre-tokenized, `input_ids`)".into()));
        }
        Ok(row)
    }

    /// Instantiates the model architecture `name` from a `config.json` text.
    pub fn load_model(&self, name: &str, config_json: &str) -> Result<ModelBox, RegistryError> {
        let (module, _) = self.native(ComponentKind::Model, name)?;
        (module.load_model())(RStr::from_str(name), RStr::from_str(config_json))
            .into_result()
            .map_err(|e| RegistryError::Plugin(e.into()))
    }

    /// The `config.json` model architecture `name` gives for a GGUF file's
    /// architecture metadata (`{"architecture", "values"}`, see
    /// [`oxtune_plugin_api::gguf::GgufMetadata`]); `None` when the plugin
    /// leaves it to the host (or predates API 1.2).
    pub fn config_from_gguf(&self, name: &str, metadata_json: &str) -> Result<Option<String>, RegistryError> {
        let (module, _) = self.native(ComponentKind::Model, name)?;
        let Some(translate) = module.config_from_gguf() else { return Ok(None) };
        translate(RStr::from_str(name), RStr::from_str(metadata_json))
            .into_result()
            .map(|c| c.into_option().map(|c| c.into_string()))
            .map_err(|e| RegistryError::Plugin(e.into()))
    }

    /// Instantiates the tuner `name` from its configuration (JSON).
    pub fn load_tuner(&self, name: &str, config_json: &str) -> Result<TunerBox, RegistryError> {
        let (module, _) = self.native(ComponentKind::Tuner, name)?;
        (module.load_tuner())(RStr::from_str(name), RStr::from_str(config_json))
            .into_result()
            .map_err(|e| RegistryError::Plugin(e.into()))
    }

    fn native(&self, kind: ComponentKind, name: &str) -> Result<(PluginModRef, &str), RegistryError> {
        match &self.get(kind, name)?.provider {
            Provider::Native { module, plugin } => Ok((*module, plugin)),
            Provider::Wasm(_) => Err(RegistryError::UnknownComponent {
                kind: kind.as_str(),
                name: name.to_owned(),
                available: format!("`{name}` is a wasm script, which can only score"),
            }),
        }
    }
}

impl fmt::Debug for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}` {} from {}", self.kind.as_str(), self.name, self.version, self.origin)
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.components).finish()
    }
}

/// The plugin API version this registry (and host) provides.
pub fn host_api_version() -> &'static str {
    API_VERSION
}
