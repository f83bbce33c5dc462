//! `oxtune-plot`: pictures of training runs. A run's `metrics.jsonl`
//! becomes `training_curves.png` — loss (with eval loss), learning rate,
//! gradient norm, and for alignment the rewards, margins and KL — and
//! several runs can be overlaid in one picture (`oxtune plot`).
//!
//! Drawn with `plotters` into an in-memory bitmap and written atomically;
//! the text uses the DejaVu Sans font shipped in `assets/` (Bitstream Vera
//! licence, `assets/DejaVuSans-LICENSE`), so no system font is needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

/// The picture a run writes into its output folder.
pub const TRAINING_CURVES: &str = "training_curves.png";

/// Width and height of one panel, in pixels.
const PANEL: (u32, u32) = (560, 360);

/// A picture that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line of `metrics.jsonl` is not a JSON object with a `step`.
    #[error("{}:{line}: {message}", path.display())]
    Metrics {
        /// The file.
        path: PathBuf,
        /// Its 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A run has no steps to draw.
    #[error("{}: no steps logged yet", path.display())]
    Empty {
        /// The metrics file.
        path: PathBuf,
    },
    /// Drawing failed.
    #[error("drawing {path}: {message}")]
    Draw {
        /// The picture.
        path: PathBuf,
        /// The drawing library's message.
        message: String,
    },
}

/// One run's logged values: each metric's `(step, value)` points.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunMetrics {
    /// How the run is named in legends (its folder name).
    pub label: String,
    /// Each metric's points, in step order.
    pub series: BTreeMap<String, Vec<(f64, f64)>>,
}

/// Reads `metrics.jsonl`: every numeric field of every line, by its `step`.
pub fn read_metrics(path: &Path, label: &str) -> Result<RunMetrics, PlotError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Io { path: path.to_owned(), source })?;
    let mut run = RunMetrics { label: label.to_owned(), series: BTreeMap::new() };
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |message: String| PlotError::Metrics { path: path.to_owned(), line: i + 1, message };
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let object = value.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        let step = object.get("step").and_then(|s| s.as_f64()).ok_or_else(|| bad("no numeric `step`".into()))?;
        for (key, v) in object {
            if let (true, Some(v)) = (key != "step", v.as_f64().filter(|v| v.is_finite())) {
                run.series.entry(key.clone()).or_default().push((step, v));
            }
        }
    }
    if run.series.is_empty() {
        return Err(PlotError::Empty { path: path.to_owned() });
    }
    Ok(run)
}

/// One chart of the picture: a title and the metrics drawn in it.
#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    /// Its title.
    pub title: &'static str,
    /// The metrics it overlays.
    pub metrics: Vec<String>,
}

/// The charts worth drawing for `runs`: loss and eval loss, learning rate,
/// gradient norm, rewards and margins (preference methods, GRPO's mean
/// reward per function), KL — each only when some run logged it.
pub fn panels(runs: &[RunMetrics]) -> Vec<Panel> {
    let logged: std::collections::BTreeSet<&String> = runs.iter().flat_map(|r| r.series.keys()).collect();
    let pick = |keep: &dyn Fn(&str) -> bool| -> Vec<String> {
        logged.iter().filter(|k| keep(k)).map(|k| (*k).clone()).collect()
    };
    let candidates = [
        ("loss", pick(&|k| k == "loss" || k == "eval_loss")),
        ("learning rate", pick(&|k| k == "lr")),
        ("gradient norm", pick(&|k| k == "grad_norm")),
        (
            "rewards",
            pick(&|k| {
                k.starts_with("rewards/")
                    && !k.ends_with("/std")
                    && !k.ends_with("/failed")
                    && !k.ends_with("accuracies")
            }),
        ),
        ("reward accuracy", pick(&|k| k.ends_with("accuracies"))),
        ("KL", pick(&|k| k == "kl")),
    ];
    candidates.into_iter().filter(|(_, m)| !m.is_empty()).map(|(title, metrics)| Panel { title, metrics }).collect()
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let font: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        // The font is shipped with the crate and parses: a failure here is a
        // build defect, caught by the tests.
        if plotters::style::register_font("sans-serif", FontStyle::Normal, font).is_err() {
            panic!("the bundled DejaVu Sans font does not parse");
        }
    });
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { lo.abs().max(1.0) * 0.05 };
    (lo - pad, hi + pad)
}

/// Draws `runs` (one or several, overlaid) into the PNG `path`, written
/// beside it first and renamed into place.
pub fn render(runs: &[RunMetrics], path: &Path) -> Result<(), PlotError> {
    register_font();
    let draw_error = |e: &dyn std::fmt::Display| PlotError::Draw { path: path.to_owned(), message: e.to_string() };
    let panels = panels(runs);
    let columns = if panels.len() > 1 { 2 } else { 1 };
    let rows = panels.len().div_ceil(columns).max(1);
    let (width, height) = (PANEL.0 * columns as u32, PANEL.1 * rows as u32 + 40);
    // The encoder picks PNG by the extension: the file being written is
    // `NAME.partial.png`, renamed into place when complete.
    let partial = path.with_extension("partial.png");
    {
        let root = BitMapBackend::new(&partial, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_error(&e))?;
        let labels: Vec<&str> = runs.iter().map(|r| r.label.as_str()).collect();
        let (title, body) = root.split_vertically(40);
        title.titled(&labels.join("  vs  "), ("sans-serif", 22)).map_err(|e| draw_error(&e))?;
        let areas = body.split_evenly((rows, columns));
        for (panel, area) in panels.iter().zip(areas) {
            let points = |run: &RunMetrics, m: &String| run.series.get(m).cloned().unwrap_or_default();
            let all: Vec<(f64, f64)> =
                runs.iter().flat_map(|r| panel.metrics.iter().flat_map(move |m| points(r, m))).collect();
            let (x0, x1) = range(all.iter().map(|p| p.0));
            let (y0, y1) = range(all.iter().map(|p| p.1));
            let mut chart = ChartBuilder::on(&area)
                .caption(panel.title, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(60)
                .build_cartesian_2d(x0.max(0.0)..x1, y0..y1)
                .map_err(|e| draw_error(&e))?;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_label_formatter(&|v| format!("{v:.3e}").replace("e0", ""))
                .draw()
                .map_err(|e| draw_error(&e))?;
            let mut colour = 0;
            for run in runs {
                for metric in &panel.metrics {
                    let series = points(run, metric);
                    if series.is_empty() {
                        continue;
                    }
                    let style = Palette99::pick(colour).stroke_width(2);
                    colour += 1;
                    let label = if runs.len() > 1 { format!("{}: {metric}", run.label) } else { metric.clone() };
                    let legend_style = style;
                    chart
                        .draw_series(LineSeries::new(series.iter().copied(), style))
                        .map_err(|e| draw_error(&e))?
                        .label(label)
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], legend_style));
                    if series.len() < 40 {
                        chart
                            .draw_series(series.iter().map(|&p| Circle::new(p, 3, style.filled())))
                            .map_err(|e| draw_error(&e))?;
                    }
                }
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK.mix(0.3))
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(|e| draw_error(&e))?;
        }
        root.present().map_err(|e| draw_error(&e))?;
    }
    std::fs::rename(&partial, path).map_err(|source| PlotError::Io { path: path.to_owned(), source })
}

/// Draws the run in `run_dir` (its `metrics.jsonl`) as
/// `run_dir/training_curves.png`, and returns the picture's path.
pub fn write_training_curves(run_dir: &Path) -> Result<PathBuf, PlotError> {
    let label = run_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    let run = read_metrics(&run_dir.join("metrics.jsonl"), &label)?;
    let path = run_dir.join(TRAINING_CURVES);
    render(&[run], &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("oxtune-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn metrics_become_series_and_the_panels_that_have_data() {
        let path = scratch("metrics.jsonl");
        std::fs::write(
            &path,
            "{\"step\":1,\"loss\":2.5,\"lr\":0.001,\"grad_norm\":1.5}\n\
             {\"step\":2,\"loss\":2.0,\"lr\":0.0005,\"grad_norm\":1.0,\"eval_loss\":2.2,\"rewards/margins\":0.1,\"kl\":0.01}\n",
        )
        .unwrap();
        let run = read_metrics(&path, "run").unwrap();
        assert_eq!(run.series["loss"], vec![(1.0, 2.5), (2.0, 2.0)]);
        assert_eq!(run.series["eval_loss"], vec![(2.0, 2.2)]);
        let titles: Vec<&str> = panels(&[run]).iter().map(|p| p.title).collect();
        assert_eq!(titles, vec!["loss", "learning rate", "gradient norm", "rewards", "KL"]);
    }

    #[test]
    fn a_bad_line_is_named() {
        let path = scratch("bad.jsonl");
        std::fs::write(&path, "{\"step\":1,\"loss\":2.5}\n{\"loss\":2.0}\n").unwrap();
        let err = read_metrics(&path, "run").unwrap_err().to_string();
        assert!(err.contains("bad.jsonl:2") && err.contains("step"), "{err}");
    }
}
