//! Reward scripts in WebAssembly: correct scores, and a sandbox that holds
//! against loops, memory hogs, forbidden imports and invalid modules.

use std::path::PathBuf;

use oxtune_plugin_api::RewardSample;
use oxtune_registry::{Registry, RegistryError, SandboxConfig, WasmReward};
use oxtune_tests::{build_rust_wasm_reward, fixtures, workspace_root};

// Link the built-in rewards in, to compare the wasm script with them.
use oxtune_plugin_rewards as _;

fn fixture(name: &str) -> PathBuf {
    fixtures().join("wasm").join(name)
}

fn samples(completions: &[&str]) -> Vec<RewardSample> {
    completions
        .iter()
        .map(|c| RewardSample { prompt: "Q?".into(), completion: (*c).into(), ..Default::default() })
        .collect()
}

fn short(message: &str) {
    assert!(message.lines().count() <= 2 && message.len() < 400, "not a short message: {message}");
}

#[test]
fn the_wat_example_scores_sentence_ends() {
    let path = workspace_root().join("examples/wasm-rewards/sentence_end.wat");
    let mut registry = Registry::empty();
    registry.load_path(&path, &SandboxConfig::default()).unwrap();
    let scores =
        registry.score("sentence_end", &samples(&["It is four.", "Four!  \n", "four", "", "Is it?", "a.b"])).unwrap();
    assert_eq!(scores, vec![1.0, 1.0, 0.0, 0.0, 1.0, 0.0]);
}

#[test]
fn the_rust_wasm_example_matches_the_builtin_repetition_reward() {
    let wasm = build_rust_wasm_reward();
    let mut registry = Registry::with_builtins().unwrap();
    registry.load_path(&wasm, &SandboxConfig::default()).unwrap();
    let batch = samples(&[
        "the cat sat on the mat the cat sat on the mat",
        "All distinct words appear here once",
        "go go go go go go",
        "The The the THE the",
        "two words",
        "",
        "naïve café naïve café naïve café",
    ]);
    let wasm_scores = registry.score("repetition_wasm", &batch).unwrap();
    let native_scores = registry.score("repetition", &batch).unwrap();
    assert_eq!(wasm_scores, native_scores);
    assert!(wasm_scores.iter().any(|&s| s < -0.5), "{wasm_scores:?}");
}

#[test]
fn an_infinite_loop_is_stopped_by_the_deadline() {
    let config = SandboxConfig { fuel_per_sample: 5_000_000, ..Default::default() };
    let reward = WasmReward::load(&fixture("infinite_loop.wat"), &config).unwrap();
    let results = reward.score_each(&samples(&["a", "b"]));
    for (i, r) in results.iter().enumerate() {
        let message = r.as_ref().unwrap_err().to_string();
        short(&message);
        assert!(message.contains("infinite_loop") && message.contains(&format!("sample {i}")), "{message}");
        assert!(message.contains("deadline"), "{message}");
    }
}

#[test]
fn growing_memory_past_the_cap_fails_cleanly() {
    let config = SandboxConfig { memory_limit: 4 << 20, ..Default::default() };
    let reward = WasmReward::load(&fixture("memory_hog.wat"), &config).unwrap();
    let message = reward.score(&samples(&["x"])).unwrap_err().to_string();
    short(&message);
    assert!(message.contains("memory_hog") && message.contains("cap of 4 MiB"), "{message}");
}

#[test]
fn an_ungranted_import_is_refused_at_load_naming_it() {
    let err = WasmReward::load(&fixture("imports_files.wat"), &SandboxConfig::default()).unwrap_err();
    let message = err.to_string();
    short(&message);
    assert!(message.contains("wasi_snapshot_preview1::path_open"), "{message}");
    assert!(message.contains("no file system"), "{message}");

    let message = WasmReward::load(&fixture("reads_clock.wat"), &SandboxConfig::default()).unwrap_err().to_string();
    assert!(message.contains("clock_time_get") && message.contains("--wasm-grant clock"), "{message}");

    let mut granted = SandboxConfig::default();
    granted.grant("clock").unwrap();
    let reward = WasmReward::load(&fixture("reads_clock.wat"), &granted).unwrap();
    assert_eq!(reward.score(&samples(&["now"])).unwrap(), vec![1.0]);
    assert!(granted.grant("files").unwrap_err().contains("cannot be granted"));
}

#[test]
fn invalid_modules_and_wrong_interfaces_are_refused_at_load() {
    let err = WasmReward::load(&fixture("not_wasm.wasm"), &SandboxConfig::default()).unwrap_err();
    assert!(matches!(err, RegistryError::InvalidWasm { .. }), "{err:?}");
    short(&err.to_string());
    assert!(err.to_string().contains("not_wasm.wasm"));

    let message = WasmReward::load(&fixture("wrong_signature.wat"), &SandboxConfig::default()).unwrap_err().to_string();
    short(&message);
    assert!(message.contains("oxtune_reward") && message.contains("-> (f64)"), "{message}");
}
