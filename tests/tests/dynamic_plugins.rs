//! Dynamic plugins end to end: cdylibs built by the test, loaded from a path
//! through the registry, compared with their linked-in builds, and the
//! ways loading or calling one can go wrong.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use oxtune_engine::backend::{BatchInfo, ForwardContext, GraphSession, TargetModules, TunerBinding, WeightStore};
use oxtune_plugin_api::{ComponentKind, RewardSample};
use oxtune_registry::{Origin, Registry, RegistryError, SandboxConfig};
use oxtune_tests::build_cdylib;
use serde_json::json;

// Link the example plugin in as a built-in, to compare with its cdylib build.
use oxtune_example_plugin as _;

fn load(path: &Path) -> Result<Registry, RegistryError> {
    let mut registry = Registry::empty();
    registry.load_path(path, &SandboxConfig::default())?;
    Ok(registry)
}

fn sample(completion: &str, columns: serde_json::Value) -> RewardSample {
    RewardSample {
        prompt: "Say something.".into(),
        completion: completion.into(),
        columns: columns.as_object().cloned().unwrap_or_default(),
    }
}

fn one_line(message: &str) {
    assert!(message.lines().count() <= 2 && message.len() < 400, "not a short message: {message}");
}

#[test]
fn example_plugin_loads_from_a_path_and_its_components_work() {
    let path = build_cdylib("oxtune-example-plugin", &["cdylib"]);
    let registry = load(&path).unwrap();
    let names: Vec<(ComponentKind, &str)> = registry.components().iter().map(|c| (c.kind(), c.name())).collect();
    assert_eq!(
        names,
        vec![
            (ComponentKind::Model, "example-block"),
            (ComponentKind::Tuner, "ia3"),
            (ComponentKind::Tuner, "ln-tuning"),
            (ComponentKind::Reward, "keyword"),
            (ComponentKind::DatasetAdapter, "qa-pairs"),
        ]
    );
    let keyword = registry.get(ComponentKind::Reward, "keyword").unwrap();
    assert_eq!(keyword.origin(), &Origin::Dynamic(path.clone()));
    assert_eq!(keyword.api_version(), oxtune_plugin_api::API_VERSION);

    let scores = registry
        .score(
            "keyword",
            &[
                sample("The capital is Paris.", json!({"keyword": "paris"})),
                sample("I do not know.", json!({"keyword": "Paris"})),
                sample("BERLIN, of course", json!({"keyword": "berlin", "other": 3})),
            ],
        )
        .unwrap();
    assert_eq!(scores, vec![1.0, 0.0, 1.0]);

    let row = registry.adapt("qa-pairs", &json!({"q": "2+2?", "a": "4"})).unwrap();
    assert_eq!(row, json!({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}));

    // A plugin's own error names the plugin, the component and the record.
    let err = registry.adapt("qa-pairs", &json!({"question": "?"})).unwrap_err().to_string();
    assert!(err.contains("oxtune-example-plugin") && err.contains("qa-pairs") && err.contains("`q`"), "{err}");
    let err = registry.score("keyword", &[sample("x", json!({}))]).unwrap_err().to_string();
    assert!(err.contains("sample 0") && err.contains("keyword"), "{err}");
}

fn completions() -> Vec<RewardSample> {
    [
        "<think>2 and 2</think>\n<answer>4</answer>",
        "<answer>4</answer>",
        "the cat sat on the mat the cat sat on the mat",
        "All distinct words appear here once",
        "",
        "<think>x</think><answer>y</answer> extra",
    ]
    .iter()
    .map(|c| sample(c, json!({})))
    .collect()
}

#[test]
fn first_party_rewards_are_identical_linked_in_and_as_a_cdylib() {
    let builtin = Registry::with_builtins().unwrap();
    let dynamic = load(&build_cdylib("oxtune-plugin-rewards", &["cdylib"])).unwrap();
    for name in ["format", "repetition"] {
        assert!(matches!(builtin.get(ComponentKind::Reward, name).unwrap().origin(), Origin::Builtin(_)));
        let a = builtin.score(name, &completions()).unwrap();
        let b = dynamic.score(name, &completions()).unwrap();
        assert_eq!(
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
    // And they are not trivially constant.
    assert_eq!(builtin.score("format", &completions()).unwrap(), vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    assert!(builtin.score("repetition", &completions()).unwrap()[2] < -0.3);
}

const BLOCK_CONFIG: &str = r#"{"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "rms_norm_eps": 1e-6}"#;

/// Random weights for the example block (each test compares runs on the same weights).
fn block_weights() -> WeightStore {
    let mut store = WeightStore::new();
    let shapes: [(&str, &[usize]); 9] = [
        ("attn_norm.weight", &[16]),
        ("q_proj.weight", &[16, 16]),
        ("k_proj.weight", &[8, 16]),
        ("v_proj.weight", &[8, 16]),
        ("o_proj.weight", &[16, 16]),
        ("mlp_norm.weight", &[16]),
        ("gate_proj.weight", &[32, 16]),
        ("up_proj.weight", &[32, 16]),
        ("down_proj.weight", &[16, 32]),
    ];
    for layer in 0..2u64 {
        for (name, shape) in shapes {
            let t = Tensor::rand(-0.5f32, 0.5, shape, &Device::Cpu).unwrap();
            store.insert(format!("layers.{layer}.{name}"), t);
        }
    }
    store
}

fn run_block(registry: &Registry, weights: &WeightStore, x: &Tensor, tuner: Option<&TunerBinding>) -> Tensor {
    let model = registry.load_model("example-block", BLOCK_CONFIG).unwrap();
    let batch = BatchInfo::default();
    let mut session = GraphSession::new(ForwardContext { weights, batch: &batch, cache: None, tuner });
    session.run_model(&model, &[("hidden_states", x.clone())]).unwrap()
}

#[test]
fn a_model_plugin_gives_bit_identical_outputs_linked_in_and_loaded() {
    let builtin = Registry::with_builtins().unwrap();
    let dynamic = load(&build_cdylib("oxtune-example-plugin", &["cdylib"])).unwrap();
    let weights = block_weights();
    let x = Tensor::rand(-1f32, 1.0, (2, 7, 16), &Device::Cpu).unwrap();
    let a = run_block(&builtin, &weights, &x, None);
    let b = run_block(&dynamic, &weights, &x, None);
    assert_eq!(a.dims(), &[2, 7, 16]);
    let bits =
        |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b));
    // The blocks did something: the output is not the input.
    let moved = (a - &x).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(moved > 1e-3);
}

#[test]
fn a_tuner_plugin_adapts_the_linear_hook_and_receives_gradients() {
    let registry = load(&build_cdylib("oxtune-example-plugin", &["cdylib"])).unwrap();
    let tuner = TunerBinding {
        instance: registry.load_tuner("ia3", r#"{"target_modules": ["o_proj"], "feedforward_modules": []}"#).unwrap(),
        target_modules: TargetModules::Names(vec!["o_proj".into()]),
    };
    let params = tuner.instance.params("layers.0.o_proj".into(), 16, 16).into_result().unwrap();
    assert_eq!(params.len(), 1);
    assert_eq!(params[0].name.as_str(), "layers.0.o_proj.ia3_l");
    assert_eq!(params[0].shape.as_slice(), &[16, 1], "PEFT's shape for a scaled output");
    assert!(
        tuner.targets("layers.1.o_proj") && !tuner.targets("layers.1.q_proj") && !tuner.targets("layers.1.xo_proj")
    );

    let mut weights = block_weights();
    let x = Tensor::rand(-1f32, 1.0, (1, 5, 16), &Device::Cpu).unwrap();
    let base = run_block(&registry, &weights, &x, None);
    let mut vars = Vec::new();
    for layer in 0..2 {
        let var = Var::ones((16, 1), DType::F32, &Device::Cpu).unwrap();
        weights.insert_var(format!("layers.{layer}.o_proj.ia3_l"), var.clone());
        vars.push(var);
    }
    // Initialised to ones, the tuner leaves the model unchanged...
    let tuned = run_block(&registry, &weights, &x, Some(&tuner));
    let diff = (&tuned - &base).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-6, "{diff}");
    // ...and the backward pass reaches its parameters through the plugin's ops.
    let grads = tuned.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for var in &vars {
        let g = grads.get(var.as_tensor()).expect("the tuner parameter has a gradient");
        assert!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    }
    // Scaling o_proj by 2 changes the output.
    vars[0].set(&Tensor::full(2f32, (16, 1), &Device::Cpu).unwrap()).unwrap();
    let scaled = run_block(&registry, &weights, &x, Some(&tuner));
    let diff = (&scaled - &base).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff > 1e-3);
}

#[test]
fn a_panicking_plugin_is_an_error_naming_it_and_the_host_goes_on() {
    let registry = load(&build_cdylib("oxtune-fixture-misbehaving", &[])).unwrap();
    let err = registry.score("explode", &completions()).unwrap_err().to_string();
    assert!(err.contains("oxtune-fixture-misbehaving") && err.contains("panicked") && err.contains("explode"), "{err}");
    // Again: the plugin is still usable and the process alive.
    let again = registry.score("explode", &completions()).unwrap_err().to_string();
    assert_eq!(err, again);
    let short = registry.score("short", &completions()).unwrap_err().to_string();
    assert!(short.contains("0 scores for 6 samples"), "{short}");
    let adapter = registry.adapt("no-messages", &json!({"a": 1})).unwrap_err().to_string();
    assert!(adapter.contains("messages") && adapter.contains("no-messages"), "{adapter}");
}

#[test]
fn bad_paths_and_non_plugins_are_clear_errors() {
    let missing = load(Path::new("/nonexistent/libnothing.so")).unwrap_err().to_string();
    one_line(&missing);
    assert!(missing.contains("does not exist"), "{missing}");

    let dir = std::env::temp_dir().join(format!("oxtune-bad-plugins-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("libfake.so");
    std::fs::write(&fake, "this is text, not a library").unwrap();
    let message = load(&fake).unwrap_err().to_string();
    one_line(&message);
    assert!(message.contains("not a loadable plugin library") && message.contains("libfake.so"), "{message}");

    // A real shared library that is not an oxtune plugin: Rust's own libstd.
    let libdir = std::process::Command::new("rustc").args(["--print", "target-libdir"]).output().unwrap();
    let lib_dir = Path::new(String::from_utf8_lossy(&libdir.stdout).trim()).to_owned();
    let libstd = std::fs::read_dir(&lib_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libstd-") && n.ends_with(".so"))
        })
        .expect("the toolchain ships libstd as a shared library");
    let message = load(&libstd).unwrap_err().to_string();
    one_line(&message);
    assert!(message.contains("is not an oxtune plugin"), "{message}");
}

#[test]
fn two_plugins_with_one_name_are_an_error_naming_both() {
    let path = build_cdylib("oxtune-plugin-rewards", &["cdylib"]);
    let mut registry = Registry::with_builtins().unwrap();
    let message = registry.load_path(&path, &SandboxConfig::default()).unwrap_err().to_string();
    one_line(&message);
    assert!(message.contains("built-in (oxtune-plugin-rewards)"), "{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("reward `format`"), "{message}");
}

#[test]
fn models_are_found_by_architecture_then_model_type() {
    let registry = load(&build_cdylib("oxtune-example-plugin", &["cdylib"])).unwrap();
    let by_arch = registry.model_for(&["Other".into(), "ExampleBlockModel".into()], None).unwrap();
    assert_eq!(by_arch.name(), "example-block");
    let by_type = registry.model_for(&["UnknownForCausalLM".into()], Some("example-block")).unwrap();
    assert_eq!(by_type.name(), "example-block");
    let message = registry.model_for(&["UnknownForCausalLM".into()], Some("unknown")).unwrap_err().to_string();
    one_line(&message);
    assert!(message.contains("UnknownForCausalLM") && message.contains("`unknown`"), "{message}");
}

#[test]
fn an_op_error_inside_a_plugin_forward_names_the_plugin_and_the_weight() {
    let registry = load(&build_cdylib("oxtune-example-plugin", &["cdylib"])).unwrap();
    let model = registry.load_model("example-block", BLOCK_CONFIG).unwrap();
    let weights = WeightStore::new();
    let batch = BatchInfo::default();
    let mut session = GraphSession::new(ForwardContext { weights: &weights, batch: &batch, cache: None, tuner: None });
    let x = Tensor::zeros((1, 3, 16), DType::F32, &Device::Cpu).unwrap();
    let message = session.run_model(&model, &[("hidden_states", x)]).unwrap_err().to_string();
    assert!(message.contains("oxtune-example-plugin") && message.contains("example-block"), "{message}");
    assert!(message.contains("no weight `layers.0.attn_norm.weight`"), "{message}");
    // A config the architecture cannot read is a clear error too.
    let Err(err) = registry.load_model("example-block", r#"{"hidden_size": 16}"#) else {
        panic!("a config without heads loaded")
    };
    let message = err.to_string();
    assert!(message.contains("num_attention_heads") && message.contains("config.json"), "{message}");
}
