//! The Qwen-VL image and video processor: decode, smart-resize, rescale
//! and normalise, then cut into temporal × spatial patches in the order
//! the vision tower reads them, as transformers' `Qwen2VLImageProcessor`
//! (and its video processor) lays them out.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::image::{load_rgb, normalized_planes, resize_bicubic, smart_resize, smart_resize_frames, RgbImage};
use oxtune_plugin_api::{Error, Result};

/// The processor settings of `preprocessor_config.json`, with a run's
/// overrides (`min_pixels`, `max_pixels`, `max_frames`, `fps`) applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessorConfig {
    /// Side of one square patch in pixels.
    pub patch_size: usize,
    /// Frames per temporal patch.
    pub temporal_patch_size: usize,
    /// Patches merged into one language-model token per side.
    pub merge_size: usize,
    /// Smallest image area after resizing.
    pub min_pixels: usize,
    /// Largest image area after resizing.
    pub max_pixels: usize,
    /// Smallest frame area of a video after resizing.
    pub video_min_pixels: usize,
    /// Largest frame area of a video after resizing.
    pub video_max_pixels: usize,
    /// Per-channel mean, on the 0–1 scale.
    pub image_mean: [f64; 3],
    /// Per-channel standard deviation, on the 0–1 scale.
    pub image_std: [f64; 3],
    /// Videos' per-channel mean: the video processor's own (Qwen3-VL's is
    /// 0.5), else the image mean.
    pub video_mean: [f64; 3],
    /// Videos' per-channel standard deviation, likewise.
    pub video_std: [f64; 3],
    /// Multiplies the 0–255 pixel values.
    pub rescale_factor: f64,
    /// Whether to resize at all.
    pub do_resize: bool,
    /// Whether to rescale.
    pub do_rescale: bool,
    /// Whether to normalise.
    pub do_normalize: bool,
    /// Most frames kept from a video (evenly sampled).
    pub max_frames: usize,
    /// Frames per second a frame list stands for (time positions).
    pub fps: f64,
    /// Videos: the pixel budget covers all frames together (Qwen3-VL)
    /// rather than each frame (Qwen2-VL, Qwen2.5-VL).
    pub budget_covers_all_frames: bool,
}

fn number(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

pub(crate) fn triple(v: &Value, key: &str, default: [f64; 3]) -> Result<[f64; 3]> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Array(a)) if a.len() == 3 && a.iter().all(Value::is_number) => {
            Ok([a[0].as_f64().unwrap(), a[1].as_f64().unwrap(), a[2].as_f64().unwrap()])
        }
        Some(Value::Number(n)) => Ok([n.as_f64().unwrap(); 3]),
        Some(other) => Err(Error::new(format!("preprocessor config: `{key}` must be 3 numbers, not {other}"))),
    }
}

impl ProcessorConfig {
    /// Reads the processor settings; `patch_size` and `merge_size` default
    /// to the model's vision config values given here.
    pub fn from_json(v: &Value, patch_size: usize, merge_size: usize, temporal_patch_size: usize) -> Result<Self> {
        let usize_of = |key: &str, default: usize| -> usize { number(v, key).map_or(default, |n| n as usize) };
        let size = v.get("size").cloned().unwrap_or(Value::Null);
        let patch_size = usize_of("patch_size", patch_size);
        let merge_size = usize_of("merge_size", merge_size);
        let factor = patch_size * merge_size;
        let min_pixels = number(v, "min_pixels")
            .or_else(|| number(&size, "shortest_edge"))
            .map_or(4 * factor * factor, |n| n as usize);
        let max_pixels = number(v, "max_pixels")
            .or_else(|| number(&size, "longest_edge"))
            .map_or(16384 * factor * factor, |n| n as usize);
        let bool_of = |key: &str| v.get(key).and_then(Value::as_bool).unwrap_or(true);
        // A `video_preprocessor_config.json` (passed under `video`) sets the video budget.
        let video = v.get("video").cloned().unwrap_or(Value::Null);
        let video_size = video.get("size").cloned().unwrap_or(Value::Null);
        let image_mean = triple(v, "image_mean", [0.48145466, 0.4578275, 0.40821073])?;
        let image_std = triple(v, "image_std", [0.26862954, 0.26130258, 0.27577711])?;
        let cfg = ProcessorConfig {
            patch_size,
            temporal_patch_size: usize_of("temporal_patch_size", temporal_patch_size),
            merge_size,
            min_pixels,
            max_pixels,
            video_min_pixels: number(v, "video_min_pixels")
                .or_else(|| number(&video_size, "shortest_edge"))
                .map_or(min_pixels, |n| n as usize),
            video_max_pixels: number(v, "video_max_pixels")
                .or_else(|| number(&video_size, "longest_edge"))
                .map_or(max_pixels, |n| n as usize),
            image_mean,
            image_std,
            video_mean: triple(&video, "image_mean", image_mean)?,
            video_std: triple(&video, "image_std", image_std)?,
            rescale_factor: number(v, "rescale_factor").unwrap_or(1.0 / 255.0),
            do_resize: bool_of("do_resize"),
            do_rescale: bool_of("do_rescale"),
            do_normalize: bool_of("do_normalize"),
            max_frames: usize_of("max_frames", 768),
            fps: number(v, "fps").unwrap_or(2.0),
            budget_covers_all_frames: false,
        };
        if cfg.patch_size == 0 || cfg.merge_size == 0 || cfg.temporal_patch_size == 0 {
            return Err(Error::new("preprocessor config: patch, merge and temporal patch sizes must be positive"));
        }
        if cfg.min_pixels > cfg.max_pixels {
            return Err(Error::new(format!(
                "preprocessor config: min_pixels {} is larger than max_pixels {}",
                cfg.min_pixels, cfg.max_pixels
            )));
        }
        Ok(cfg)
    }

    fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Channel-planar normalised values `[3, h, w]` of an RGB image, with
    /// the per-channel `mean` and `std` (0–1 scale).
    fn normalize(&self, img: &RgbImage, mean_std: ([f64; 3], [f64; 3])) -> Vec<f32> {
        normalized_planes(img, self.do_rescale.then_some(self.rescale_factor), self.do_normalize.then_some(mean_std))
    }

    /// Pixel rows `[t·h·w, 3·tp·p·p]` and grid `[t, h, w]` of equally sized
    /// frames (each `[3, height, width]`), the last frame repeated up to a
    /// whole temporal patch. Rows run over merge blocks so that each block
    /// of `merge²` rows becomes one language-model token.
    pub fn patchify(&self, frames: &[Vec<f32>], height: usize, width: usize) -> (Vec<f32>, [usize; 3]) {
        let (ps, tps, m) = (self.patch_size, self.temporal_patch_size, self.merge_size);
        let mut frames: Vec<&Vec<f32>> = frames.iter().collect();
        while !frames.len().is_multiple_of(tps) {
            frames.push(frames[frames.len() - 1]);
        }
        let (gt, gh, gw) = (frames.len() / tps, height / ps, width / ps);
        let features = 3 * tps * ps * ps;
        let mut out = Vec::with_capacity(gt * gh * gw * features);
        let plane = height * width;
        for t in 0..gt {
            for bh in 0..gh / m {
                for bw in 0..gw / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            let (y0, x0) = ((bh * m + mh) * ps, (bw * m + mw) * ps);
                            for c in 0..3 {
                                for tp in 0..tps {
                                    let frame = frames[t * tps + tp];
                                    for py in 0..ps {
                                        let row = c * plane + (y0 + py) * width + x0;
                                        out.extend_from_slice(&frame[row..row + ps]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        (out, [gt, gh, gw])
    }

    fn resized(&self, img: &RgbImage, min_pixels: usize, max_pixels: usize) -> Result<RgbImage> {
        let (h, w) = if self.do_resize {
            smart_resize(img.height, img.width, self.factor(), min_pixels, max_pixels)?
        } else {
            (img.height, img.width)
        };
        if h % self.factor() != 0 || w % self.factor() != 0 {
            return Err(Error::new(format!(
                "the image is {}x{} and do_resize is off: its sides must be multiples of {}",
                img.width,
                img.height,
                self.factor()
            )));
        }
        Ok(resize_bicubic(img, w, h))
    }

    /// Pixel rows and grid of one image file.
    pub fn image(&self, path: &Path) -> Result<(Vec<f32>, [usize; 3])> {
        let img = load_rgb(path)?;
        let img = self.resized(&img, self.min_pixels, self.max_pixels)?;
        let frame = self.normalize(&img, (self.image_mean, self.image_std));
        Ok(self.patchify(&[frame], img.height, img.width))
    }

    /// Pixel rows and grid of a video given as frame files (or one folder
    /// of frames, read in name order), at most `max_frames` of them kept
    /// evenly spaced (their indices are returned too); every frame takes
    /// the first frame's resized size.
    pub fn video(&self, sources: &[String]) -> Result<(Vec<f32>, [usize; 3], Vec<usize>)> {
        let files = frame_files(sources)?;
        let keep = sample_frames(files.len(), self.max_frames, self.temporal_patch_size);
        let mut frames = Vec::with_capacity(keep.len());
        let mut size = None;
        for &i in &keep {
            let img = load_rgb(&files[i])?;
            let (w, h) = match size {
                Some(s) => s,
                None if self.budget_covers_all_frames && self.do_resize => {
                    let (h, w) = smart_resize_frames(
                        keep.len(),
                        img.height,
                        img.width,
                        self.temporal_patch_size,
                        self.factor(),
                        self.video_min_pixels,
                        self.video_max_pixels,
                    )?;
                    (w, h)
                }
                None => {
                    let r = self.resized(&img, self.video_min_pixels, self.video_max_pixels)?;
                    (r.width, r.height)
                }
            };
            size = Some((w, h));
            frames.push(self.normalize(&resize_bicubic(&img, w, h), (self.video_mean, self.video_std)));
        }
        let (w, h) = size.expect("sample_frames keeps at least one frame");
        let (pixels, grid) = self.patchify(&frames, h, w);
        Ok((pixels, grid, keep))
    }
}

/// The frame files of a video: the list itself, or a folder's image files
/// in name order.
pub fn frame_files(sources: &[String]) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = Vec::new();
    for s in sources {
        let p = PathBuf::from(s);
        if p.is_dir() {
            let listing =
                std::fs::read_dir(&p).map_err(|e| Error::new(format!("cannot read frame folder {s}: {e}")))?;
            let mut frames: Vec<PathBuf> = listing
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.extension()
                        .and_then(|x| x.to_str())
                        .is_some_and(|x| matches!(x.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg" | "webp"))
                })
                .collect();
            frames.sort();
            if frames.is_empty() {
                return Err(Error::new(format!("the frame folder {s} holds no PNG, JPEG or WebP file")));
            }
            files.extend(frames);
        } else {
            files.push(p);
        }
    }
    if files.is_empty() {
        return Err(Error::new("a video needs at least one frame"));
    }
    Ok(files)
}

/// Which of `total` frames to keep: all when they fit in `max_frames`,
/// else `max_frames` (rounded down to whole temporal patches) evenly
/// spaced ones, as `qwen_vl_utils` samples (`linspace(0, total-1, n).round()`).
pub fn sample_frames(total: usize, max_frames: usize, temporal_patch_size: usize) -> Vec<usize> {
    if total <= max_frames.max(1) {
        return (0..total).collect();
    }
    let n = (max_frames / temporal_patch_size * temporal_patch_size).max(temporal_patch_size).min(total);
    (0..n).map(|i| (i as f64 * (total - 1) as f64 / (n - 1).max(1) as f64).round_ties_even() as usize).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_sampled_evenly_and_keep_the_ends() {
        assert_eq!(sample_frames(5, 768, 2), vec![0, 1, 2, 3, 4]);
        assert_eq!(sample_frames(10, 4, 2), vec![0, 3, 6, 9]);
        assert_eq!(sample_frames(10, 5, 2), vec![0, 3, 6, 9]);
    }

    #[test]
    fn patch_rows_follow_merge_blocks() {
        let cfg = ProcessorConfig::from_json(&serde_json::json!({"do_normalize": false, "do_rescale": false}), 1, 2, 1)
            .unwrap();
        // A 2x4 single-channel-looking frame: value = y*10 + x on every channel.
        let frame: Vec<f32> =
            (0..3).flat_map(|_| (0..2).flat_map(|y| (0..4).map(move |x| (y * 10 + x) as f32))).collect();
        let (rows, grid) = cfg.patchify(&[frame], 2, 4);
        assert_eq!(grid, [1, 2, 4]);
        // Rows of the first merge block are (0,0) (0,1) (1,0) (1,1), then the next block.
        let firsts: Vec<f32> = rows.chunks(3).map(|r| r[0]).collect();
        assert_eq!(firsts, vec![0.0, 1.0, 10.0, 11.0, 2.0, 3.0, 12.0, 13.0]);
    }
}
