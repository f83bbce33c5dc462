//! `--config FILE`: a run's arguments in a TOML or YAML file, as ms-swift
//! users keep them. The file's keys are the flags' names (`learning_rate`
//! or `learning-rate`); they are spliced into the command line after the
//! subcommand, and a flag given on the command line overrides the file. A
//! boolean is a switch (`true` gives `--flag`, `false` nothing) unless the
//! flag takes a value (`--gradient-checkpointing false`).

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

/// The flags one config entry stands for; `takes_value` says whether the
/// flag is written with a value (else a boolean is a switch).
fn flags(path: &Path, key: &str, value: &Value, takes_value: bool) -> anyhow::Result<Vec<OsString>> {
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
        Value::Bool(b) if takes_value => vec![flag.into(), b.to_string().into()],
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
/// `command` is the command-line definition whose subcommands read a config.
pub fn expand(args: Vec<OsString>, command: &clap::Command, subcommands: &[&str]) -> anyhow::Result<Vec<OsString>> {
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
    let at = args
        .iter()
        .position(|a| a.to_str().is_some_and(|s| subcommands.contains(&s)))
        .with_context(|| format!("--config {} needs a subcommand ({})", path.display(), subcommands.join(", ")))?;
    let subcommand = command.find_subcommand(args[at].to_str().unwrap_or_default());
    let takes_value = |long: &str| {
        subcommand
            .and_then(|s| s.get_arguments().find(|a| a.get_long() == Some(long)))
            .is_some_and(|a| a.get_action().takes_values())
    };
    let mut spliced = Vec::new();
    for (key, value) in read(&path)? {
        let long = key.replace('_', "-");
        if !given.contains(&long) {
            spliced.extend(flags(&path, &key, &value, takes_value(&long))?);
        }
    }
    let at = at + 1;
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
            "learning_rate = 0.001\nmax-steps = 5\nuse_rslora = true\ngradient_checkpointing = false\n\
             dataset = [\"a.jsonl\", \"b.jsonl#3\"]\n",
        )
        .unwrap();
        let argv: Vec<OsString> = ["oxtune", "sft", "--config", toml.to_str().unwrap(), "--max-steps", "9"]
            .iter()
            .map(OsString::from)
            .collect();
        let out = expand(argv, &command(), &["sft", "pt"]).unwrap();
        assert_eq!(
            strings(&out),
            [
                "oxtune",
                "sft",
                "--dataset",
                "a.jsonl",
                "--dataset",
                "b.jsonl#3",
                "--gradient-checkpointing",
                "false",
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
            strings(&expand(argv, &command(), &["sft", "pt"]).unwrap()),
            ["oxtune", "--plugin", "p.so", "pt", "--tuner", "dora", "--lora-rank", "4"]
        );
        std::fs::write(&yaml, "tuner: [dora\n").unwrap();
        let argv: Vec<OsString> =
            ["oxtune", "sft", "--config", yaml.to_str().unwrap()].iter().map(OsString::from).collect();
        assert!(format!("{:#}", expand(argv, &command(), &["sft"]).unwrap_err()).contains("run.yaml is not valid YAML"));
    }

    /// The real command line's definition.
    fn command() -> clap::Command {
        <crate::Cli as clap::CommandFactory>::command()
    }
}
