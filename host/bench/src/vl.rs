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

use oxtune_data::media::encode_chat_with_media;
use oxtune_data::{EncodedRow, TextAssets};
use oxtune_engine::media::{MediaKind, MediaRef, RowMedia};
use oxtune_engine::LoadedModel;
use oxtune_registry::Registry;
use oxtune_train::{Objective, SftObjective};
use serde_json::{json, Value};

use crate::{peak_memory_mb, BenchError};

/// `oxtune bench vl`: the vision encoder's share of a training step.
#[derive(Clone, Debug)]
pub struct VlBench {
    /// Side of the synthetic square image in pixels (it is not resized
    /// when it is a multiple of the model's patch × merge size).
    pub image_size: u32,
    /// Put LoRA on the vision tower too.
    pub train_vit: bool,
    /// Timed steps (after one untimed warm-up step) of each kind.
    pub steps: usize,
    /// Media preprocessing overrides (`min_pixels`, ...).
    pub media_options: Value,
}

/// Seconds of forward + backward of `row`, best of `steps` after a warm-up.
fn step_seconds(model: &LoadedModel, row: &EncodedRow, steps: usize) -> Result<f64, BenchError> {
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

/// Measures a LoRA step on one row with a square image, and the same
/// tokens without the pixels, on a vision-language `model`.
pub fn vl(
    registry: &Registry,
    model: &mut LoadedModel,
    assets: &TextAssets,
    bench: &VlBench,
) -> Result<Value, BenchError> {
    let spec = model
        .media_spec()
        .cloned()
        .ok_or_else(|| BenchError::Invalid("bench vl needs a vision-language model".into()))?;
    let mut frozen: Vec<String> = spec.parts.get("aligner").cloned().unwrap_or_default();
    if !bench.train_vit {
        frozen.extend(spec.parts.get("vit").cloned().unwrap_or_default());
    }
    model.freeze_prefixes(frozen);
    let config = json!({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "qkv"]});
    model.add_adapter(registry, "lora", config, 0)?;

    let side = bench.image_size;
    let image = std::env::temp_dir().join(format!("oxtune-bench-vl-{}-{side}.png", std::process::id()));
    image::RgbImage::from_fn(side, side, |x, y| image::Rgb([(x * 255 / side) as u8, (y * 255 / side) as u8, 128]))
        .save(&image)
        .map_err(|e| BenchError::Invalid(format!("writing {}: {e}", image.display())))?;
    let pixels = u64::from(side) * u64::from(side);
    let mut options = bench.media_options.clone();
    options["min_pixels"] = options.get("min_pixels").cloned().unwrap_or(pixels.into());
    options["max_pixels"] = options.get("max_pixels").cloned().unwrap_or(pixels.into());
    let messages = vec![
        json!({"role": "user", "content": "<image>Describe the picture in one sentence."}),
        json!({"role": "assistant", "content": "A colour gradient from dark to light."}),
    ];
    let media = [MediaRef { kind: MediaKind::Image, sources: vec![image.clone()] }];
    let with_image = encode_chat_with_media(model, assets, &messages, &media, None, &options);
    let _ = std::fs::remove_file(&image);
    let with_image = with_image?;
    let positions = with_image.media.as_ref().map(|m| m.positions.clone()).unwrap_or_default();
    let grid = with_image.media.as_ref().and_then(|m| m.items.first()).map(|i| i.grid.clone()).unwrap_or_default();
    let text_only =
        EncodedRow { media: Some(RowMedia { items: Vec::new(), positions, sources: None }), ..with_image.clone() };

    let full = step_seconds(model, &with_image, bench.steps)?;
    let language = step_seconds(model, &text_only, bench.steps)?;
    let vision = (full - language).max(0.0);
    Ok(json!({
        "model": model.dir(),
        "image_size": side,
        "image_grid_thw": grid,
        "tokens": with_image.input_ids.len(),
        "vision_trained": bench.train_vit,
        "timed_steps": bench.steps,
        "step_seconds": full,
        "language_model_seconds": language,
        "vision_encoder_seconds": vision,
        "vision_share": vision / full,
        "language_model_share": language / full,
        "peak_memory_mb": peak_memory_mb(),
    }))
}
