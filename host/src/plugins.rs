//! `oxtune plugins`: what is registered, and where it came from.

use std::io::Write;

use oxtune_registry::{Component, Origin};

use super::GlobalArgs;

/// Arguments of `oxtune plugins`.
#[derive(Debug, clap::Args)]
pub struct PluginsArgs {
    /// Print one JSON object per component instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn origin_kind(origin: &Origin) -> &'static str {
    match origin {
        Origin::Builtin(_) => "built-in",
        Origin::Dynamic(_) => "dynamic",
        Origin::Wasm(_) => "wasm",
    }
}

fn to_json(c: &Component) -> serde_json::Value {
    let mut v = serde_json::json!({
        "kind": c.kind().as_str(),
        "name": c.name(),
        "origin": origin_kind(c.origin()),
        "source": c.origin().to_string(),
        "version": c.version(),
        "api_version": c.api_version(),
        "description": c.description(),
    });
    if let Some(d) = c.descriptor().filter(|_| c.kind() == oxtune_plugin_api::ComponentKind::Model) {
        v["architectures"] = d.architectures.iter().map(|s| s.as_str()).collect::<Vec<_>>().into();
        v["model_types"] = d.model_types.iter().map(|s| s.as_str()).collect::<Vec<_>>().into();
        v["modality"] = d.modality.name().into();
    }
    v
}

/// Lists the registry.
pub fn run(global: &GlobalArgs, args: &PluginsArgs) -> anyhow::Result<()> {
    let registry = global.registry()?;
    let mut out = std::io::stdout().lock();
    if args.json {
        for c in registry.components() {
            writeln!(out, "{}", to_json(c))?;
        }
        return Ok(());
    }
    let rows: Vec<[String; 5]> = registry
        .components()
        .iter()
        .map(|c| {
            [
                c.kind().as_str().to_owned(),
                c.name().to_owned(),
                c.origin().to_string(),
                c.version().to_owned(),
                c.api_version().to_owned(),
            ]
        })
        .collect();
    let header = ["KIND", "NAME", "ORIGIN", "VERSION", "API"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        writeln!(out, "{}", cells.join("  ").trim_end())?;
    }
    Ok(())
}
