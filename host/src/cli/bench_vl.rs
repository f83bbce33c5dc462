//! `oxtune bench vl`: where a vision-language training step spends its
//! time — the vision encoder or the language model.
//!
//! One row (a synthetic square image, a question and an answer) is run
//! through forward and backward with LoRA on the language model (the
//! vision tower frozen, as `--freeze-vit` leaves it, or adapted too with
//! `--train-vit`); the same tokens without the pixels (the placeholder
//! tokens embedded as text) give the language model's share in the same
//! run, and the difference is the vision encoder's.

use std::time::Instant;

use anyhow::Context;
use serde_json::json;

use super::model_args::ModelArgs;
use super::GlobalArgs;
use crate::media::{encode_chat_with_media, MediaKind, MediaRef, RowMedia};
use crate::text::EncodedRow;
use crate::train::objective::{Objective, SftObjective};

/// Arguments of `oxtune bench vl`.
#[derive(Debug, clap::Args)]
pub struct VlBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Side of the synthetic square image in pixels (it is not resized
    /// when it is a multiple of the model's patch × merge size).
    #[arg(long, default_value_t = 448)]
    pub image_size: u32,
    /// Put LoRA on the vision tower too (`--freeze-vit false`).
    #[arg(long)]
    pub train_vit: bool,
    /// Timed steps (after one untimed warm-up step) of each kind.
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
}

/// Seconds of forward + backward of `row`, best of `steps` after a warm-up.
fn step_seconds(model: &crate::model::LoadedModel, row: &EncodedRow, steps: usize) -> anyhow::Result<f64> {
    let mut best = f64::MAX;
    for i in 0..=steps {
        let start = Instant::now();
        let loss = SftObjective.loss(model, &[row], None, 0)?;
        loss.loss.backward()?;
        if i > 0 {
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    Ok(best)
}

/// Runs `oxtune bench vl`.
pub fn run(global: &GlobalArgs, args: &VlBenchArgs) -> anyhow::Result<()> {
    let registry = global.registry()?;
    let mut text = args.model.load(&registry)?;
    let spec = text.model.media_spec().cloned().context("bench vl needs a vision-language model")?;
    let mut frozen: Vec<String> = spec.parts.get("aligner").cloned().unwrap_or_default();
    if !args.train_vit {
        frozen.extend(spec.parts.get("vit").cloned().unwrap_or_default());
    }
    text.model.freeze_prefixes(frozen);
    let config = json!({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "qkv"]});
    text.model.add_adapter(&registry, "lora", config, 0)?;

    let side = args.image_size;
    let image = std::env::temp_dir().join(format!("oxtune-bench-vl-{}-{side}.png", std::process::id()));
    image::RgbImage::from_fn(side, side, |x, y| image::Rgb([(x * 255 / side) as u8, (y * 255 / side) as u8, 128]))
        .save(&image)
        .with_context(|| format!("writing {}", image.display()))?;
    let pixels = u64::from(side) * u64::from(side);
    let mut options = args.model.media_options();
    options["min_pixels"] = options.get("min_pixels").cloned().unwrap_or(pixels.into());
    options["max_pixels"] = options.get("max_pixels").cloned().unwrap_or(pixels.into());
    let messages = vec![
        json!({"role": "user", "content": "<image>Describe the picture in one sentence."}),
        json!({"role": "assistant", "content": "A colour gradient from dark to light."}),
    ];
    let media = [MediaRef { kind: MediaKind::Image, sources: vec![image.clone()] }];
    let with_image = encode_chat_with_media(&text.model, &text.assets, &messages, &media, None, &options)?;
    let _ = std::fs::remove_file(&image);
    let positions = with_image.media.as_ref().map(|m| m.positions.clone()).unwrap_or_default();
    let grid = with_image.media.as_ref().and_then(|m| m.items.first()).map(|i| i.grid.clone()).unwrap_or_default();
    let text_only =
        EncodedRow { media: Some(RowMedia { items: Vec::new(), positions, sources: None }), ..with_image.clone() };

    let full = step_seconds(&text.model, &with_image, args.steps)?;
    let language = step_seconds(&text.model, &text_only, args.steps)?;
    let vision = (full - language).max(0.0);
    println!(
        "{}",
        json!({
            "model": args.model.model,
            "image_size": side,
            "image_grid_thw": grid,
            "tokens": with_image.input_ids.len(),
            "vision_trained": args.train_vit,
            "timed_steps": args.steps,
            "step_seconds": full,
            "language_model_seconds": language,
            "vision_encoder_seconds": vision,
            "vision_share": vision / full,
            "language_model_share": language / full,
            "peak_memory_mb": crate::memory::peak_resident_bytes().map(|b| b as f64 / 1e6),
        })
    );
    Ok(())
}
