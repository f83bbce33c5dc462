//! Support for the workspace integration tests: building plugin cdylibs,
//! the `oxtune` binary and the wasm examples from inside a test, so that
//! `cargo test --workspace` alone runs everything.
//!
//! Each build goes through the `cargo` that runs the tests (same profile,
//! same target folder, so dependencies are reused), and each artifact is
//! copied to a unique name with an atomic rename, so a library another test
//! has already loaded is never overwritten in place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The workspace's root folder.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lives in the workspace").to_owned()
}

/// The folder a test's fixture files live in.
pub fn fixtures() -> PathBuf {
    workspace_root().join("tests/fixtures")
}

fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);

/// Runs `cargo build` with `args` and returns the artifact whose file name
/// satisfies `pick`, copied to `target/oxtune-test-artifacts/<key>.<ext>`.
fn build(key: &str, args: &[&str], manifest_dir: &Path, pick: impl Fn(&Path) -> bool) -> PathBuf {
    let mut cache = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = cache.get_or_insert_with(HashMap::new).get(key) {
        return path.clone();
    }
    // A benchmark (built without debug assertions) measures release plugins.
    let profile: &[&str] = if cfg!(debug_assertions) { &[] } else { &["--release"] };
    let output = Command::new(cargo())
        .arg("build")
        .args(profile)
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .current_dir(manifest_dir)
        .output()
        .expect("cargo runs");
    assert!(output.status.success(), "cargo build {args:?} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let artifact = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact")
        .flat_map(|msg| msg["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .filter(|f| pick(f))
        .last()
        .unwrap_or_else(|| panic!("cargo build {args:?} produced no matching artifact"));
    let dir = target_dir().join("oxtune-test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifact folder");
    let ext = artifact.extension().and_then(|e| e.to_str()).unwrap_or("bin");
    let dest = dir.join(format!("{key}.{ext}"));
    let tmp = dir.join(format!("{key}.{}.tmp", std::process::id()));
    std::fs::copy(&artifact, &tmp).expect("copy artifact");
    std::fs::rename(&tmp, &dest).expect("rename artifact");
    cache.get_or_insert_with(HashMap::new).insert(key.to_owned(), dest.clone());
    dest
}

fn is_cdylib(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("so" | "dylib" | "dll"))
}

/// Builds workspace package `package` as a cdylib with `features` and
/// returns the library's path.
pub fn build_cdylib(package: &str, features: &[&str]) -> PathBuf {
    let key = format!("{package}{}", features.iter().map(|f| format!("+{f}")).collect::<String>());
    let mut args = vec!["-p", package, "--lib"];
    let joined = features.join(",");
    if !features.is_empty() {
        args.extend(["--features", joined.as_str()]);
    }
    build(&key, &args, &workspace_root(), is_cdylib)
}

/// Builds the `oxtune` binary and returns its path.
pub fn oxtune_bin() -> PathBuf {
    build("oxtune-bin", &["-p", "oxtune", "--bin", "oxtune"], &workspace_root(), |p| {
        p.file_stem().is_some_and(|s| s == "oxtune") && p.extension().is_none_or(|e| e == "exe")
    })
}

/// Builds the Rust reward example for `wasm32-unknown-unknown`, in the
/// profile of the caller (the target
/// must be installed: `rustup target add wasm32-unknown-unknown`).
pub fn build_rust_wasm_reward() -> PathBuf {
    let dir = workspace_root().join("examples/wasm-reward-rust");
    build("repetition_wasm", &["--target", "wasm32-unknown-unknown"], &dir, |p| {
        p.extension().is_some_and(|e| e == "wasm")
    })
}
