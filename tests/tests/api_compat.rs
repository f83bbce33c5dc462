//! ABI compatibility across plugin API versions, with plugins and hosts
//! built against modified copies of `plugin-api/` (see
//! `tests/fixtures/api-variants`):
//!
//! - a plugin built against an older minor loads and runs in a host of a
//!   newer one (this API plus an op and a root-module function): the
//!   evolution rule; trait methods added after the 1.0 prefix (tuners'
//!   `trains_base`, models' `media_spec`) default for plugins without them;
//! - a plugin of another major version is refused by the version check;
//! - a plugin whose types differ but claims the host's version is refused
//!   by abi_stable's layout check — in one line naming the file and both
//!   versions, not abi_stable's report.

use oxtune_registry::{Registry, RegistryError, SandboxConfig};
use oxtune_tests::{build_against_api_variant, build_cdylib, Patch};

/// This API plus an op and a root-module function, as the next minor
/// version would add them.
const API_NEXT_MINOR: &[Patch] = &[
    Patch {
        file: "abi.rs",
        find: "\n}\n\n/// An [`Op`] as it crosses the boundary.",
        replace: "\n    /// Added in the next minor.\n    Erf { x: TensorId },\n}\n\n/// An [`Op`] as it crosses the boundary.",
    },
    Patch {
        file: "abi.rs",
        find: "-> RResult<ROption<RString>, RString>,\n}\n\nimpl RootModule",
        replace: "-> RResult<ROption<RString>, RString>,\n    /// Added in the next minor.\n    #[sabi(missing_field(option))]\n    pub describe_reward: extern \"C\" fn(name: RStr<'_>) -> RResult<RString, RString>,\n}\n\nimpl RootModule",
    },
    Patch {
        file: "plugin.rs",
        find: "        load_tuner: load_tuner::<P>,\n",
        replace: "        load_tuner: load_tuner::<P>,\n        describe_reward: describe_reward,\n",
    },
    Patch {
        file: "plugin.rs",
        find: "/// A plugin linked into the host binary",
        replace: "extern \"C\" fn describe_reward(_: RStr<'_>) -> RResult<RString, RString> {\n    RResult::RErr(RString::new())\n}\n\n/// A plugin linked into the host binary",
    },
];

#[test]
fn a_plugin_built_against_an_older_minor_runs_in_a_newer_host() {
    let plugin = build_cdylib("oxtune-example-plugin", &["cdylib"]);
    let next = next_minor();
    let probe = build_against_api_variant(&format!("probe-{next}"), &next, API_NEXT_MINOR, "probe");
    let out = std::process::Command::new(&probe).arg(&plugin).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the {next} host refused the older plugin:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("api {}", oxtune_plugin_api::API_VERSION)), "{stdout}");
    assert!(stdout.contains("component model example-block"), "{stdout}");
    assert!(stdout.contains("component dataset-adapter qa-pairs"), "{stdout}");
    // The call crosses the boundary and the plugin's own error comes back.
    assert!(stdout.contains("score keyword Err(") && stdout.contains("no string column `keyword`"), "{stdout}");
    // The newer function is simply absent from an older plugin.
    assert!(stdout.contains("new-function absent"), "{stdout}");
}

fn load(path: &std::path::Path) -> Result<Registry, RegistryError> {
    let mut registry = Registry::empty();
    registry.load_path(path, &SandboxConfig::default())?;
    Ok(registry)
}

fn short(message: &str) {
    assert!(message.lines().count() <= 2 && message.len() < 400, "not a short message: {message}");
}

#[test]
fn a_plugin_built_against_a_newer_minor_is_refused_with_advice() {
    // A plugin built against a newer minor may use ops this host lacks:
    // refused at load, with advice.
    let next = next_minor();
    let plugin = build_against_api_variant(&format!("plugin-{next}"), &next, API_NEXT_MINOR, "plugin");
    let host = oxtune_plugin_api::API_VERSION;
    let message = load(&plugin).unwrap_err().to_string();
    short(&message);
    assert!(message.contains(&next) && message.contains(host) && message.contains("upgrade oxtune"), "{message}");
}

/// The version after this host's minor, e.g. `1.3.0` for `1.2.0`.
fn next_minor() -> String {
    let mut parts = oxtune_plugin_api::API_VERSION.split('.');
    let major = parts.next().unwrap();
    let minor: u32 = parts.next().unwrap().parse().unwrap();
    format!("{major}.{}.0", minor + 1)
}

#[test]
fn a_plugin_of_another_major_version_is_refused_in_one_line() {
    let plugin = build_against_api_variant("plugin-2.0", "2.0.0", &[], "plugin");
    let err = load(&plugin).unwrap_err();
    assert!(matches!(err, RegistryError::IncompatibleApi { .. }), "{err:?}");
    let message = err.to_string();
    short(&message);
    assert!(message.contains(&plugin.display().to_string()), "{message}");
    assert!(message.contains("2.0.0") && message.contains(oxtune_plugin_api::API_VERSION), "{message}");
}

#[test]
fn a_plugin_with_a_changed_type_is_refused_in_one_line() {
    let changed =
        [Patch { file: "abi.rs", find: "pub struct TensorId(pub u64);", replace: "pub struct TensorId(pub u32);" }];
    let plugin = build_against_api_variant("plugin-changed-type", oxtune_plugin_api::API_VERSION, &changed, "plugin");
    let err = load(&plugin).unwrap_err();
    assert!(matches!(err, RegistryError::IncompatibleLayout { .. }), "{err:?}");
    let message = err.to_string();
    short(&message);
    assert!(message.contains(&plugin.display().to_string()), "{message}");
    assert!(message.contains(oxtune_plugin_api::API_VERSION) && message.contains("types do not match"), "{message}");

    // The unchanged template loads: the refusal is the changed type's doing.
    let control = build_against_api_variant("plugin-unchanged", oxtune_plugin_api::API_VERSION, &[], "plugin");
    assert_eq!(load(&control).unwrap().score("constant", &[Default::default()]).unwrap(), vec![0.5]);
}

/// The 1.0 tuner vtable: `merge` was its last method; `trains_base` and
/// `saved_config` came after the prefix. This variant comments them out.
const TUNER_VTABLE_1_0: &[Patch] = &[
    Patch {
        file: "abi.rs",
        find: "    /// Whether the base parameter `name` (a Hugging Face name, any\n",
        replace: "    /* not in this variant\n",
    },
    Patch {
        file: "abi.rs",
        find: "        RResult::ROk(ROption::RNone)\n    }\n}\n\n/// An owned tuner instance",
        replace: "        RResult::ROk(ROption::RNone)\n    }*/\n}\n\n/// An owned tuner instance",
    },
    Patch {
        file: "plugin.rs",
        find: "    fn trains_base(&self, name: RStr<'_>) -> RResult<bool, RString> {\n",
        replace: "    /* not in this variant\n    fn trains_base(&self, name: RStr<'_>) -> RResult<bool, RString> {\n",
    },
    Patch {
        file: "plugin.rs",
        find: "RString::from(c.to_string())).into())\n        })\n    }\n",
        replace: "RString::from(c.to_string())).into())\n        })\n    }*/\n",
    },
];

#[test]
fn tuner_methods_added_after_the_prefix_default_for_older_plugins() {
    let query = |registry: &Registry| {
        let tuner = registry.load_tuner("everything", "{}").unwrap();
        let trains = tuner.trains_base("model.norm.weight".into()).into_result().unwrap();
        let saved = tuner.saved_config().into_result().unwrap().into_option().map(|s| s.to_string());
        (trains, saved)
    };
    // Built against this API, the plugin's own answers come through...
    let current = build_against_api_variant("plugin-tuner-current", oxtune_plugin_api::API_VERSION, &[], "plugin");
    assert_eq!(query(&load(&current).unwrap()), (true, Some(r#"{"peft_type":"EVERYTHING"}"#.to_owned())));
    // ...built against the 1.0 vtable (same plugin code), it loads, and the
    // host's defaults stand in for the methods it lacks.
    let older =
        build_against_api_variant("plugin-tuner-1.0", oxtune_plugin_api::API_VERSION, TUNER_VTABLE_1_0, "plugin");
    assert_eq!(query(&load(&older).unwrap()), (false, None));
}

/// The end of the model vtable's last 1.2 method (`linear_layers`), where
/// both older variants close their comment.
const MODEL_VTABLE_END: [Patch; 2] = [
    Patch {
        file: "abi.rs",
        find: "        RResult::ROk(ROption::RNone)\n    }\n}\n\n/// An owned model instance",
        replace: "        RResult::ROk(ROption::RNone)\n    }*/\n}\n\n/// An owned model instance",
    },
    Patch {
        file: "plugin.rs",
        find: "Some(layers) => ROption::RSome(serde_json::to_string(&layers)?.into()),\n            })\n        })\n    }\n",
        replace: "Some(layers) => ROption::RSome(serde_json::to_string(&layers)?.into()),\n            })\n        })\n    }*/\n",
    },
];

/// The 1.0 model vtable: `forward` was its only method; `media_spec` and
/// `prepare_media` came in 1.1, `gguf_layout` and `linear_layers` in 1.2,
/// after the prefix.
/// This variant comments them out.
const MODEL_VTABLE_1_0: [Patch; 4] = [
    Patch {
        file: "abi.rs",
        find: "    /// How the model reads media, as a JSON object",
        replace: "    /* not in this variant\n    /// How the model reads media, as a JSON object",
    },
    Patch {
        file: "plugin.rs",
        find: "    fn media_spec(&self) -> RResult<ROption<RString>, RString> {\n",
        replace: "    /* not in this variant\n    fn media_spec(&self) -> RResult<ROption<RString>, RString> {\n",
    },
    MODEL_VTABLE_END[0],
    MODEL_VTABLE_END[1],
];

/// The 1.1 model vtable: without 1.2's `gguf_layout` and `linear_layers`.
const MODEL_VTABLE_1_1: [Patch; 4] = [
    Patch {
        file: "abi.rs",
        find: "    /// How the model is stored in a llama.cpp GGUF file",
        replace: "    /* not in this variant\n    /// How the model is stored in a llama.cpp GGUF file",
    },
    Patch {
        file: "plugin.rs",
        find: "    fn gguf_layout(&self) -> RResult<ROption<RString>, RString> {\n",
        replace: "    /* not in this variant\n    fn gguf_layout(&self) -> RResult<ROption<RString>, RString> {\n",
    },
    MODEL_VTABLE_END[0],
    MODEL_VTABLE_END[1],
];

#[test]
fn model_methods_added_after_the_prefix_default_for_older_plugins() {
    let query = |registry: &Registry| {
        let model = registry.load_model("seeing", "{}").unwrap();
        let spec = model.media_spec().into_result().unwrap().into_option().map(|s| s.to_string());
        let prepared = model.prepare_media(Default::default(), "{}".into()).into_result().map(|v| v.len());
        let gguf = model.gguf_layout().into_result().unwrap().into_option().map(|s| s.to_string());
        (spec, prepared.map_err(|e| e.to_string()), gguf)
    };
    let current = build_against_api_variant("plugin-model-current", oxtune_plugin_api::API_VERSION, &[], "plugin");
    let (spec, prepared, gguf) = query(&load(&current).unwrap());
    assert_eq!(spec.as_deref(), Some(r#"{"position_axes":3}"#));
    // The plugin's own default (it preprocesses nothing) names the plugin.
    let message = prepared.unwrap_err();
    assert!(message.contains("plugin `") && message.contains("reads text only"), "{message}");
    assert_eq!(gguf, None, "the plugin states no GGUF form");
    // Built against the 1.0 model vtable, the same plugin loads as a
    // text-only model without a GGUF form: the host's defaults stand in
    // for the new methods.
    let older =
        build_against_api_variant("plugin-model-1.0", oxtune_plugin_api::API_VERSION, &MODEL_VTABLE_1_0, "plugin");
    let (spec, prepared, gguf) = query(&load(&older).unwrap());
    assert_eq!(spec, None);
    assert_eq!(prepared.unwrap_err(), "this model reads text only");
    assert_eq!(gguf, None);
    // Built against 1.1: its media methods answer, the 1.2 one defaults.
    let v1_1 =
        build_against_api_variant("plugin-model-1.1", oxtune_plugin_api::API_VERSION, &MODEL_VTABLE_1_1, "plugin");
    let (spec, _, gguf) = query(&load(&v1_1).unwrap());
    assert_eq!(spec.as_deref(), Some(r#"{"position_axes":3}"#));
    assert_eq!(gguf, None);
}
