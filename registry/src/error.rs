//! Errors of discovery, loading and lookup. Each message says what is wrong
//! and what to do, in one or two lines.

use std::path::PathBuf;

use crate::Origin;

/// Everything that can go wrong finding, loading or calling a plugin.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A `--plugin` path (or a path in `OXTUNE_PLUGIN_PATH`) does not exist.
    #[error("plugin path {0} does not exist; check the --plugin argument or OXTUNE_PLUGIN_PATH")]
    NotFound(PathBuf),

    /// The file is not a dynamic library the system can load.
    #[error("{path} is not a loadable plugin library: {reason}")]
    NotALibrary {
        /// The file.
        path: PathBuf,
        /// The loader's reason.
        reason: String,
    },

    /// The library loads but was not built as an oxtune plugin.
    #[error(
        "{0} is not an oxtune plugin (it has no OXTUNE_PLUGIN_API_VERSION symbol); \
         build it with oxtune_plugin_api::declare_plugin! and its `cdylib` feature"
    )]
    NotAPlugin(PathBuf),

    /// The plugin was built against an API version this host cannot serve.
    #[error("{path} was built against oxtune-plugin-api {plugin}, but this oxtune provides {host}; {advice}")]
    IncompatibleApi {
        /// The plugin file.
        path: PathBuf,
        /// The API version the plugin was built against.
        plugin: String,
        /// The host's API version.
        host: String,
        /// What to do about it.
        advice: String,
    },

    /// The plugin declares the host's API version but its types differ
    /// (abi_stable's layout check failed; its full report is in the logs).
    #[error(
        "{path} claims oxtune-plugin-api {plugin} (this oxtune provides {host}) but its types do not match; \
         rebuild the plugin against the released oxtune-plugin-api {host}"
    )]
    IncompatibleLayout {
        /// The plugin file.
        path: PathBuf,
        /// The API version the plugin claims.
        plugin: String,
        /// The host's API version.
        host: String,
    },

    /// The library lacks a symbol every plugin exports.
    #[error("{path} is missing the symbol `{symbol}`; rebuild it with oxtune_plugin_api::declare_plugin!")]
    MissingSymbol {
        /// The plugin file.
        path: PathBuf,
        /// The symbol.
        symbol: String,
    },

    /// Two components of one kind share a name.
    #[error("two plugins provide the {kind} `{name}`: {first} and {second}; remove one of them from the plugin path")]
    Duplicate {
        /// The kind, as listed.
        kind: &'static str,
        /// The shared name.
        name: String,
        /// Where the first came from.
        first: Origin,
        /// Where the second came from.
        second: Origin,
    },

    /// No component of this kind and name is registered.
    #[error("no {kind} named `{name}` is registered (registered: {available}); --plugin PATH loads more")]
    UnknownComponent {
        /// The kind, as listed.
        kind: &'static str,
        /// The name asked for.
        name: String,
        /// The registered names of that kind.
        available: String,
    },

    /// No model architecture serves a checkpoint.
    #[error(
        "no model plugin serves {what}; registered: {available}. Load one with --plugin PATH (or --model-type NAME)"
    )]
    NoArchitecture {
        /// The architectures / model_type looked for.
        what: String,
        /// The registered architectures, for the message.
        available: String,
    },

    /// No dataset adapter recognises a record's columns.
    #[error("no dataset adapter recognises a record with columns [{columns}]; rename columns or pick an adapter")]
    NoAdapter {
        /// The record's columns.
        columns: String,
    },

    /// Two dataset adapters recognise a record equally well.
    #[error("dataset adapters `{first}` and `{second}` both recognise the record; pick one")]
    AmbiguousAdapter {
        /// One adapter.
        first: String,
        /// The other.
        second: String,
    },

    /// A plugin's function returned an error or panicked (the message names the plugin).
    #[error("{0}")]
    Plugin(String),

    /// A plugin returned something the host cannot use.
    #[error("plugin `{plugin}` returned an invalid result from {what}: {reason}")]
    BadResult {
        /// The plugin's name.
        plugin: String,
        /// The call.
        what: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A wasm file is not a valid module.
    #[error("wasm reward {path} is not a valid WebAssembly module: {reason}")]
    InvalidWasm {
        /// The file.
        path: PathBuf,
        /// The parser's reason.
        reason: String,
    },

    /// A wasm module imports something the sandbox does not grant.
    #[error("wasm reward {path} imports `{module}::{name}`, which the sandbox does not grant; {advice}")]
    ForbiddenImport {
        /// The file.
        path: PathBuf,
        /// The import's module.
        module: String,
        /// The import's name.
        name: String,
        /// What to do about it.
        advice: String,
    },

    /// A wasm module does not follow the reward script interface.
    #[error("wasm reward {path} {reason} (see \"Reward scripts\" in the README for the interface)")]
    BadInterface {
        /// The file.
        path: PathBuf,
        /// What is missing or mistyped.
        reason: String,
    },

    /// A wasm reward failed on one sample (trap, deadline, memory cap, bad result).
    #[error("wasm reward `{script}` failed on sample {index}: {reason}")]
    WasmSample {
        /// The script's name.
        script: String,
        /// The sample's index in the batch.
        index: usize,
        /// What happened.
        reason: String,
    },

    /// Reading a plugin folder or file failed.
    #[error("cannot read {path}: {cause}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
}
