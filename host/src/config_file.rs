//! `--config FILE`: a run's arguments in a TOML or YAML file, as ms-swift
//! users keep them. The file's keys are the flags' names (`learning_rate`
//! or `learning-rate`); they are spliced into the command line after the
//! subcommand, and a flag given on the command line overrides the file.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::Path;

use anyhow::{bail, Context};
use serde_json::Value;

/// Reads a config file into a JSON object (TOML by `.toml`, YAML by
/// `.yaml`/`.yml`).
fn read(path: &Path) -> anyhow::Result<serde_json::Map<String, Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    let value: Value = match ext.as_str() {
        "toml" => toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?,
        "yaml" | "yml" => {
            serde_yaml::from_str(&text).with_context(|| format!("{} is not valid YAML", path.display()))?
        }
        _ => bail!("{}: a config file must end in .toml, .yaml or .yml", path.display()),
    };
    match value {
        Value::Object(map) => Ok(map),
        _ => bail!("{}: the config must be a table of flag = value", path.display()),
    }
}

/// The flags one config entry stands for.
fn flags(path: &Path, key: &str, value: &Value) -> anyhow::Result<Vec<OsString>> {
    let flag = format!("--{}", key.replace('_', "-"));
    let scalar = |v: &Value| -> anyhow::Result<String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            other => bail!("{}: `{key}` holds {other}, which is not a flag value", path.display()),
        }
    };
    Ok(match value {
        Value::Bool(true) => vec![flag.into()],
        Value::Bool(false) | Value::Null => Vec::new(),
        Value::Array(items) => {
            let mut out = Vec::new();
            for item in items {
                out.push(OsString::from(&flag));
                out.push(scalar(item)?.into());
            }
            out
        }
        other => vec![flag.into(), scalar(other)?.into()],
    })
}

/// Expands `--config FILE` (or `--config=FILE`) in `args`: the file's flags
/// go right after the subcommand, minus those the command line sets itself.
pub fn expand(args: Vec<OsString>, subcommands: &[&str]) -> anyhow::Result<Vec<OsString>> {
    let position = args.iter().position(|a| a == "--config" || a.to_str().is_some_and(|s| s.starts_with("--config=")));
    let Some(position) = position else { return Ok(args) };
    let mut args = args;
    let path: OsString = match args[position].to_str().and_then(|s| s.strip_prefix("--config=")) {
        Some(p) => {
            let p = OsString::from(p);
            args.remove(position);
            p
        }
        None => {
            if position + 1 >= args.len() {
                bail!("--config needs a file");
            }
            args.remove(position);
            args.remove(position)
        }
    };
    let path = Path::new(&path).to_owned();
    let given: HashSet<String> = args
        .iter()
        .filter_map(|a| a.to_str())
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_owned())
        .collect();
    let mut spliced = Vec::new();
    for (key, value) in read(&path)? {
        if !given.contains(&key.replace('_', "-")) {
            spliced.extend(flags(&path, &key, &value)?);
        }
    }
    let at = args
        .iter()
        .position(|a| a.to_str().is_some_and(|s| subcommands.contains(&s)))
        .map(|i| i + 1)
        .with_context(|| format!("--config {} needs a subcommand ({})", path.display(), subcommands.join(", ")))?;
    args.splice(at..at, spliced);
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[OsString]) -> Vec<&str> {
        args.iter().map(|a| a.to_str().unwrap()).collect()
    }

    #[test]
    fn file_flags_go_after_the_subcommand_and_the_command_line_wins() {
        let dir = std::env::temp_dir().join(format!("oxtune-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let toml = dir.join("run.toml");
        std::fs::write(
            &toml,
            "learning_rate = 0.001\nmax-steps = 5\nuse_rslora = true\ndataset = [\"a.jsonl\", \"b.jsonl#3\"]\n",
        )
        .unwrap();
        let argv: Vec<OsString> = ["oxtune", "sft", "--config", toml.to_str().unwrap(), "--max-steps", "9"]
            .iter()
            .map(OsString::from)
            .collect();
        let out = expand(argv, &["sft", "pt"]).unwrap();
        assert_eq!(
            strings(&out),
            [
                "oxtune",
                "sft",
                "--dataset",
                "a.jsonl",
                "--dataset",
                "b.jsonl#3",
                "--learning-rate",
                "0.001",
                "--use-rslora",
                "--max-steps",
                "9"
            ]
        );
        let yaml = dir.join("run.yaml");
        std::fs::write(&yaml, "tuner: dora\nlora_rank: 4\n").unwrap();
        let argv: Vec<OsString> = ["oxtune", "--plugin", "p.so", "pt", &format!("--config={}", yaml.display())]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(
            strings(&expand(argv, &["sft", "pt"]).unwrap()),
            ["oxtune", "--plugin", "p.so", "pt", "--tuner", "dora", "--lora-rank", "4"]
        );
        std::fs::write(&yaml, "tuner: [dora\n").unwrap();
        let argv: Vec<OsString> =
            ["oxtune", "sft", "--config", yaml.to_str().unwrap()].iter().map(OsString::from).collect();
        assert!(format!("{:#}", expand(argv, &["sft"]).unwrap_err()).contains("run.yaml is not valid YAML"));
    }
}
