//! `oxtune plot RUN_DIR...`: the training curves of one run, or several
//! overlaid (loss, eval loss, learning rate, gradient norm, rewards, KL),
//! from their `metrics.jsonl`, as a PNG.

use std::path::PathBuf;

use anyhow::bail;
use oxtune_plot::{read_metrics, render, TRAINING_CURVES};

/// Arguments of `oxtune plot`.
#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// Run folders (each with a `metrics.jsonl`), or `metrics.jsonl` files.
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// The picture (default: `training_curves.png` in the run folder for
    /// one run, `runs.png` here for several).
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Runs `oxtune plot`.
pub fn run(args: &PlotArgs) -> anyhow::Result<()> {
    let mut runs = Vec::with_capacity(args.runs.len());
    for path in &args.runs {
        let (file, folder) = match path.is_dir() {
            true => (path.join("metrics.jsonl"), path.clone()),
            false => (path.clone(), path.parent().map(PathBuf::from).unwrap_or_default()),
        };
        if !file.is_file() {
            bail!("{}: no metrics.jsonl (a run folder of sft, pt or rlhf has one)", path.display());
        }
        let label = folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
        runs.push(read_metrics(&file, &label)?);
    }
    let output = match (&args.output, args.runs.as_slice()) {
        (Some(path), _) => path.clone(),
        (None, [one]) if one.is_dir() => one.join(TRAINING_CURVES),
        _ => PathBuf::from("runs.png"),
    };
    render(&runs, &output)?;
    println!("wrote {}", output.display());
    Ok(())
}
