//! The command line of a run launched from the web UI: one of the CLI's
//! own training subcommands (`sft`, `pt`, `rlhf`) with flags from the form,
//! never a shell. Flag names are checked (`[a-z0-9_]`, turned into
//! `--kebab-case`); every path a flag names — on the form or in the
//! `--config` file it points to — must lie inside the workspace.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::workspace::Workspace;

/// The subcommands the UI launches as training runs.
pub const TRAINING: [&str; 3] = ["sft", "pt", "rlhf"];

/// Flags whose values are paths, checked against the workspace.
const PATH_FLAGS: [&str; 9] = [
    "model",
    "dataset",
    "val_dataset",
    "output_dir",
    "config",
    "adapter",
    "resume_from_checkpoint",
    "plugin",
    "adapters",
];

/// A run asked for by the form: `{"subcommand", "flags": {name: value}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRequest {
    /// `sft`, `pt` or `rlhf`.
    pub subcommand: String,
    /// Flag names (`learning_rate`) and values as typed; an empty value is
    /// a flag without a value.
    pub flags: BTreeMap<String, String>,
}

impl RunRequest {
    /// Reads a request body.
    pub fn from_json(body: &Value) -> Result<RunRequest, String> {
        let subcommand = body.get("subcommand").and_then(Value::as_str).ok_or("`subcommand` is required")?;
        if !TRAINING.contains(&subcommand) {
            return Err(format!("`{subcommand}` is not a training subcommand (sft, pt or rlhf)"));
        }
        let mut flags = BTreeMap::new();
        if let Some(given) = body.get("flags") {
            let given = given.as_object().ok_or("`flags` must be an object of flag names and values")?;
            for (name, value) in given {
                let value = match value {
                    Value::String(s) => s.trim().to_owned(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    Value::Null => continue,
                    other => return Err(format!("flag `{name}`: {other} is not a string, number or boolean")),
                };
                flags.insert(name.clone(), value);
            }
        }
        Ok(RunRequest { subcommand: subcommand.to_owned(), flags })
    }
}

/// The argument list (after the program name) of `request`, with paths
/// checked against `workspace`; `output_dir` defaults to `default_output`.
pub fn arguments(request: &RunRequest, workspace: &Workspace, default_output: &str) -> Result<Vec<String>, String> {
    let mut argv = vec![request.subcommand.clone()];
    let mut flags = request.flags.clone();
    flags.entry("output_dir".into()).or_insert_with(|| default_output.to_owned());
    for (name, value) in &flags {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
            return Err(format!("`{name}` is not a flag name (lower-case letters, digits and _)"));
        }
        let values: Vec<&str> = if name == "dataset" || name == "val_dataset" || name == "adapters" {
            value.split(',').map(str::trim).filter(|v| !v.is_empty()).collect()
        } else {
            vec![value.as_str()]
        };
        if PATH_FLAGS.contains(&name.as_str()) {
            for v in &values {
                check_path(name, v, workspace)?;
            }
        }
        if name == "config" {
            check_config(&workspace.resolve(value)?, workspace)?;
        }
        let flag = format!("--{}", name.replace('_', "-"));
        match values.as_slice() {
            [""] | [] => argv.push(flag),
            list => {
                for v in list {
                    argv.push(flag.clone());
                    argv.push((*v).to_owned());
                }
            }
        }
    }
    Ok(argv)
}

/// Checks a path-valued flag (a dataset's `#N` sample suffix and an
/// adapter's `NAME=` prefix left out).
fn check_path(flag: &str, value: &str, workspace: &Workspace) -> Result<(), String> {
    let mut path = value;
    if flag.contains("dataset") {
        path = path.rsplit_once('#').filter(|(_, n)| n.parse::<u64>().is_ok()).map_or(path, |(p, _)| p);
    }
    if flag == "adapters" {
        path = path.split_once('=').map_or(path, |(_, p)| p);
    }
    workspace.resolve(path).map(|_| ()).map_err(|e| format!("--{}: {e}", flag.replace('_', "-")))
}

/// Checks the path keys of a `--config` file (TOML or YAML) as the flags'.
fn check_config(path: &Path, workspace: &Workspace) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", workspace.relative(path)))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    let value: Value = match ext.as_str() {
        "toml" => toml::from_str(&text).map_err(|e| format!("--config {}: {e}", workspace.relative(path)))?,
        "yaml" | "yml" => {
            serde_yaml::from_str(&text).map_err(|e| format!("--config {}: {e}", workspace.relative(path)))?
        }
        _ => return Err(format!("--config {}: a .toml or .yaml file", workspace.relative(path))),
    };
    let object =
        value.as_object().ok_or_else(|| format!("--config {}: not a table of flags", workspace.relative(path)))?;
    for (key, value) in object {
        let name = key.replace('-', "_");
        if name == "config" {
            return Err(format!("--config {}: a config file cannot name another", workspace.relative(path)));
        }
        if !PATH_FLAGS.contains(&name.as_str()) {
            continue;
        }
        let values: Vec<&Value> = match value {
            Value::Array(items) => items.iter().collect(),
            single => vec![single],
        };
        for v in values {
            let v =
                v.as_str().ok_or_else(|| format!("--config {}: `{key}` must be a path", workspace.relative(path)))?;
            check_path(&name, v, workspace).map_err(|e| format!("--config {}: {e}", workspace.relative(path)))?;
        }
    }
    Ok(())
}

/// `argv` as one line a user can paste into a shell (`oxtune ...`, single
/// quotes where needed).
pub fn command_line(argv: &[String]) -> String {
    let quote = |a: &String| {
        let plain = !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,#@%+".contains(&b));
        if plain {
            a.clone()
        } else {
            format!("'{}'", a.replace('\'', r"'\''"))
        }
    };
    std::iter::once("oxtune".to_owned()).chain(argv.iter().map(quote)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn workspace(name: &str) -> Workspace {
        let dir = std::env::temp_dir().join(format!("oxtune-webui-cmd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Workspace::new(&dir).unwrap()
    }

    #[test]
    fn form_flags_become_the_cli_s_arguments() {
        let ws = workspace("flags");
        let body = json!({"subcommand": "sft", "flags": {"model": "models/m", "dataset": "a.jsonl, b.jsonl#10",
                          "learning_rate": "1e-4", "max_steps": 6, "use_rslora": ""}});
        let argv = arguments(&RunRequest::from_json(&body).unwrap(), &ws, "runs/run-1").unwrap();
        assert_eq!(
            argv,
            [
                "sft",
                "--dataset",
                "a.jsonl",
                "--dataset",
                "b.jsonl#10",
                "--learning-rate",
                "1e-4",
                "--max-steps",
                "6",
                "--model",
                "models/m",
                "--output-dir",
                "runs/run-1",
                "--use-rslora"
            ]
        );
        assert_eq!(command_line(&["sft".into(), "--system".into(), "it's".into()]), r"oxtune sft --system 'it'\''s'");
    }

    #[test]
    fn paths_outside_the_workspace_and_bad_requests_are_refused() {
        let ws = workspace("refuse");
        let run = |flags: Value| {
            let body = json!({"subcommand": "sft", "flags": flags});
            arguments(&RunRequest::from_json(&body)?, &ws, "runs/x")
        };
        assert!(run(json!({"model": "/etc"})).unwrap_err().contains("--model: `/etc` is outside the workspace"));
        assert!(run(json!({"output_dir": "../elsewhere"})).unwrap_err().contains("--output-dir"));
        assert!(run(json!({"dataset": "ok.jsonl,../../x.jsonl"})).unwrap_err().contains("--dataset"));
        assert!(run(json!({"Model; rm": "x"})).unwrap_err().contains("not a flag name"));
        let shell = json!({"subcommand": "sh", "flags": {}});
        assert!(RunRequest::from_json(&shell).unwrap_err().contains("not a training subcommand"));
        // A config file inside may not name paths outside.
        std::fs::write(ws.root().join("bad.toml"), "model = \"/usr\"\n").unwrap();
        assert!(run(json!({"config": "bad.toml"})).unwrap_err().contains("outside"));
        std::fs::write(ws.root().join("good.yaml"), "model: models/m\nlearning_rate: 0.1\n").unwrap();
        assert!(run(json!({"config": "good.yaml"})).is_ok());
    }
}
