//! Loading plugin cdylibs with `abi_stable`.
//!
//! Loading goes in three steps, each with its own short error:
//!
//! 1. the file must be a loadable library (`libloading`);
//! 2. it must export `OXTUNE_PLUGIN_API_VERSION`, and that version must be
//!    servable: the same major as the host and a minor no newer than the
//!    host's (a 1.0 plugin loads in a 1.3 host, not the reverse);
//! 3. `abi_stable`'s layout checker must accept every type the root module
//!    reaches. Its detailed report goes to the debug log, the user gets one
//!    line.
//!
//! abi_stable assumes the loaded library is the *newer* side: its version
//! check wants the library's minor at least the host's, and its layout
//! check wants the library to have at least the host's prefix fields and
//! enum variants. In oxtune the plugin is the older side (a 1.0 plugin in a
//! 1.3 host), so the host skips abi_stable's version check (step 2 replaces
//! it) and runs the layout check the other way round: the plugin's layout
//! is the interface the host's must satisfy. The host may then know more
//! ops and root-module functions than the plugin, never fewer, and every
//! type both know must match exactly.

use std::path::Path;

use abi_stable::abi_stability::abi_checking::check_layout_compatibility;
use abi_stable::library::{lib_header_from_path, LibraryError};
use abi_stable::StableAbi;
use oxtune_plugin_api::abi::{PluginModRef, API_VERSION_SYMBOL};
use oxtune_plugin_api::API_VERSION;

use crate::RegistryError;

/// A `major.minor.patch` version.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Version {
    major: u64,
    minor: u64,
}

fn parse_version(text: &str) -> Option<Version> {
    let mut parts = text.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some(Version { major, minor })
}

/// Whether a host of API `host` can serve a plugin built against `plugin`;
/// `Err` holds the advice for the user.
fn check_api_version(plugin: &str, host: &str) -> Result<(), String> {
    let (Some(p), Some(h)) = (parse_version(plugin), parse_version(host)) else {
        return Err("its version string is malformed; rebuild it against a released oxtune-plugin-api".into());
    };
    if p.major != h.major {
        return Err(format!("rebuild the plugin against oxtune-plugin-api {}.x", h.major));
    }
    if p.minor > h.minor {
        return Err("upgrade oxtune, or rebuild the plugin against the host's API version".into());
    }
    Ok(())
}

fn read_api_version(path: &Path) -> Result<String, RegistryError> {
    // SAFETY: loading a library runs its initialisers; that is the point of
    // a plugin, and the user asked for this file.
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| RegistryError::NotALibrary { path: path.to_owned(), reason: e.to_string() })?;
    // SAFETY: the symbol is a `[u8; 32]` static written by declare_plugin!.
    let bytes = unsafe {
        let sym =
            lib.get::<*const [u8; 32]>(API_VERSION_SYMBOL).map_err(|_| RegistryError::NotAPlugin(path.to_owned()))?;
        **sym
    };
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    // Plugins are never unloaded: their code may back trait objects the
    // host still holds (abi_stable does the same).
    std::mem::forget(lib);
    Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// Loads the plugin library at `path` and returns its root module.
pub fn load_library(path: &Path) -> Result<PluginModRef, RegistryError> {
    if !path.exists() {
        return Err(RegistryError::NotFound(path.to_owned()));
    }
    let plugin_api = read_api_version(path)?;
    check_api_version(&plugin_api, API_VERSION).map_err(|advice| RegistryError::IncompatibleApi {
        path: path.to_owned(),
        plugin: plugin_api.clone(),
        host: API_VERSION.to_owned(),
        advice,
    })?;
    let incompatible = || RegistryError::IncompatibleLayout {
        path: path.to_owned(),
        plugin: plugin_api.clone(),
        host: API_VERSION.to_owned(),
    };
    let load_error = |e: LibraryError| match e {
        LibraryError::GetSymbolError { symbol, .. } => RegistryError::MissingSymbol {
            path: path.to_owned(),
            symbol: String::from_utf8_lossy(&symbol).trim_end_matches('\0').to_owned(),
        },
        other => RegistryError::NotALibrary {
            path: path.to_owned(),
            reason: other.to_string().lines().next().unwrap_or_default().to_owned(),
        },
    };
    let header = lib_header_from_path(path).map_err(load_error)?;
    let plugin_layout = header.layout().ok_or_else(incompatible)?;
    check_layout_compatibility(plugin_layout, <PluginModRef as StableAbi>::LAYOUT).map_err(|report| {
        tracing::debug!("abi_stable layout report for {}:\n{report}", path.display());
        incompatible()
    })?;
    // SAFETY: the layout of the root module and everything it reaches was
    // checked just above.
    unsafe { header.unchecked_layout::<PluginModRef>() }
        .map_err(|e| RegistryError::Plugin(format!("{}: its root module failed to initialise: {e}", path.display())))
}

/// Whether a file name looks like a dynamic library on this platform.
pub fn is_library_file(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("so" | "dylib" | "dll"))
}

#[cfg(test)]
mod tests {
    use super::check_api_version;

    #[test]
    fn older_minor_loads_newer_minor_and_other_major_do_not() {
        assert!(check_api_version("1.0.0", "1.3.0").is_ok());
        assert!(check_api_version("1.3.2", "1.3.0").is_ok());
        assert!(check_api_version("1.4.0", "1.3.0").unwrap_err().contains("upgrade oxtune"));
        assert!(check_api_version("2.0.0", "1.3.0").unwrap_err().contains("1.x"));
        assert!(check_api_version("0.9.0", "1.0.0").is_err());
        assert!(check_api_version("garbage", "1.0.0").unwrap_err().contains("malformed"));
    }
}
