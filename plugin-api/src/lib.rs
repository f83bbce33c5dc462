//! `oxtune-plugin-api`: the one crate an oxtune plugin is built against.
//!
//! A plugin provides model architectures, tuners, reward functions and
//! dataset adapters (see [`plugin`]). It never owns a tensor: the host does,
//! and a model's forward pass is a sequence of host operations on opaque
//! handles ([`abi::Op`]), written with the ordinary-looking wrappers of
//! [`graph`] and [`nn`]. The same plugin crate links into the `oxtune`
//! binary as a built-in or builds as a cdylib the host loads at run time;
//! `abi_stable` checks the layout of every type in [`abi`] on load.
//!
//! The API is versioned 1.x: a plugin built against 1.a loads in any host
//! of 1.b with b ≥ a.

pub mod abi;
pub mod data;
pub mod gguf;
pub mod graph;
pub mod media;
pub mod nn;
pub mod plugin;

#[doc(hidden)]
pub use abi_stable;
#[doc(hidden)]
pub use inventory;

pub use abi::{ComponentKind, DType, Modality, ParamInit};
pub use data::RewardSample;
pub use graph::{attention, constant, has_weight, scope, weight, AttentionSpec, Tensor};
pub use plugin::{
    DatasetAdapter, Descriptor, FusedSlot, InPlace, Inputs, LinearLayer, LinearRole, Model, ModelArchitecture, Plugin,
    RewardFunction, Tuner, TunerLayers, TunerParam,
};
pub use serde_json;

/// The version of this API a plugin is built against (this crate's version).
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// An error a plugin reports to the host: a message, shown to the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error(String);

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Error {
        Error(message.into())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(s: String) -> Error {
        Error(s)
    }
}

impl From<&str> for Error {
    fn from(s: &str) -> Error {
        Error(s.to_owned())
    }
}

impl From<abi_stable::std_types::RString> for Error {
    fn from(s: abi_stable::std_types::RString) -> Error {
        Error(s.into_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Error {
        Error(e.to_string())
    }
}

/// The result type of plugin code.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    #[test]
    fn lib_header_export_name_matches_abi_stable() {
        assert_eq!(crate::plugin::LIB_HEADER_EXPORT_NAME, abi_stable::library::ROOT_MODULE_LOADER_NAME);
    }

    #[test]
    fn api_version_symbol_round_trips() {
        let encoded = crate::abi::encode_api_version("1.2.3");
        let end = encoded.iter().position(|&b| b == 0).unwrap();
        assert_eq!(&encoded[..end], b"1.2.3");
    }
}
