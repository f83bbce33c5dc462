//! Dynamic tiling, as transformers' `GotOcr2ImageProcessor` does it with
//! `crop_to_patches` (the processor InternVL, GOT-OCR2 and Aya Vision
//! use): the image is resized to the grid of square tiles whose aspect
//! ratio is closest to its own, cut into those tiles row by row, and — when
//! there is more than one — followed by a thumbnail of the whole image.
//! Every tile is rescaled and normalised into `[3, tile, tile]` values.

use std::path::Path;

use serde_json::Value;

use crate::image::{load_rgb, normalized_planes, resize_bicubic, RgbImage};
use crate::processor::triple;
use oxtune_plugin_api::{Error, Result};

/// The tiling processor's settings (`preprocessor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct TileConfig {
    /// Tile height and width in pixels (`size`).
    pub tile: (usize, usize),
    /// Fewest tiles of the grid (`min_patches`).
    pub min_tiles: usize,
    /// Most tiles of the grid (`max_patches`).
    pub max_tiles: usize,
    /// Whether to tile at all (`crop_to_patches`); off, the image is one
    /// tile resized to `tile`.
    pub crop_to_patches: bool,
    /// Per-channel mean, on the 0–1 scale.
    pub image_mean: [f64; 3],
    /// Per-channel standard deviation, on the 0–1 scale.
    pub image_std: [f64; 3],
    /// Multiplies the 0–255 values when `do_rescale`.
    pub rescale_factor: f64,
    /// Whether to rescale.
    pub do_rescale: bool,
    /// Whether to normalise.
    pub do_normalize: bool,
}

impl TileConfig {
    /// Reads the settings; `default_tile` is the vision tower's image
    /// size, used when the file gives none.
    pub fn from_json(v: &Value, default_tile: usize) -> Result<TileConfig> {
        let size = v.get("size").cloned().unwrap_or(Value::Null);
        let side = |key: &str| -> Result<usize> {
            match size.get(key) {
                None | Some(Value::Null) => Ok(default_tile),
                Some(n) => n.as_u64().filter(|&n| n > 0).map(|n| n as usize).ok_or_else(|| {
                    Error::new(format!("preprocessor config: `size.{key}` must be a positive integer, not {n}"))
                }),
            }
        };
        let count = |key: &str, default: usize| -> Result<usize> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(n) => n.as_u64().filter(|&n| n > 0).map(|n| n as usize).ok_or_else(|| {
                    Error::new(format!("preprocessor config: `{key}` must be a positive integer, not {n}"))
                }),
            }
        };
        let flag = |key: &str, default: bool| v.get(key).and_then(Value::as_bool).unwrap_or(default);
        let cfg = TileConfig {
            tile: (side("height")?, side("width")?),
            min_tiles: count("min_patches", 1)?,
            max_tiles: count("max_patches", 12)?,
            crop_to_patches: flag("crop_to_patches", false),
            image_mean: triple(v, "image_mean", [0.48145466, 0.4578275, 0.40821073])?,
            image_std: triple(v, "image_std", [0.26862954, 0.26130258, 0.27577711])?,
            rescale_factor: v.get("rescale_factor").and_then(Value::as_f64).unwrap_or(1.0 / 255.0),
            do_rescale: flag("do_rescale", true),
            do_normalize: flag("do_normalize", true),
        };
        if cfg.min_tiles > cfg.max_tiles {
            return Err(Error::new(format!(
                "preprocessor config: min_patches {} is larger than max_patches {}",
                cfg.min_tiles, cfg.max_tiles
            )));
        }
        Ok(cfg)
    }

    /// Values per tile (`3 · height · width`).
    pub fn features(&self) -> usize {
        3 * self.tile.0 * self.tile.1
    }

    /// The tiles of an image (row by row, then the thumbnail), as 8-bit
    /// images of the tile size.
    pub fn tiles(&self, img: &RgbImage) -> Vec<RgbImage> {
        let (th, tw) = self.tile;
        if !self.crop_to_patches {
            return vec![resize_bicubic(img, tw, th)];
        }
        let (columns, rows) = tile_grid(img.height, img.width, self.tile, self.min_tiles, self.max_tiles);
        let canvas = resize_bicubic(img, tw * columns, th * rows);
        let mut tiles = Vec::with_capacity(columns * rows + 1);
        for row in 0..rows {
            for column in 0..columns {
                let mut data = Vec::with_capacity(th * tw * 3);
                for y in row * th..(row + 1) * th {
                    let start = (y * canvas.width + column * tw) * 3;
                    data.extend_from_slice(&canvas.data[start..start + tw * 3]);
                }
                tiles.push(RgbImage { width: tw, height: th, data });
            }
        }
        if tiles.len() > 1 {
            tiles.push(resize_bicubic(img, tw, th));
        }
        tiles
    }

    /// The normalised tiles of an image file, `[tiles, 3, height, width]`
    /// row-major, and the tile count.
    pub fn image(&self, path: &Path) -> Result<(Vec<f32>, usize)> {
        let tiles = self.tiles(&load_rgb(path)?);
        let rescale = self.do_rescale.then_some(self.rescale_factor);
        let mean_std = self.do_normalize.then_some((self.image_mean, self.image_std));
        let mut values = Vec::with_capacity(tiles.len() * self.features());
        for tile in &tiles {
            values.extend(normalized_planes(tile, rescale, mean_std));
        }
        Ok((values, tiles.len()))
    }
}

/// The tile grid `(columns, rows)` for an image of `height × width`: among
/// the grids of `min_tiles..=max_tiles` tiles (fewest tiles first), the
/// one whose aspect ratio is closest to the image's; on a tie, the one with
/// more tiles while the image covers more than half of its canvas
/// (transformers' `get_optimal_tiled_canvas`).
pub fn tile_grid(
    height: usize,
    width: usize,
    tile: (usize, usize),
    min_tiles: usize,
    max_tiles: usize,
) -> (usize, usize) {
    let mut grids: Vec<(usize, usize)> = (1..=max_tiles)
        .flat_map(|w| (1..=max_tiles).map(move |h| (w, h)))
        .filter(|&(w, h)| (min_tiles..=max_tiles).contains(&(w * h)))
        .collect();
    grids.sort_by_key(|&(w, h)| w * h);
    let aspect = width as f64 / height as f64;
    let area = (width * height) as f64;
    let (mut best, mut best_diff) = ((1, 1), f64::INFINITY);
    for grid in grids {
        let diff = (aspect - grid.0 as f64 / grid.1 as f64).abs();
        if diff < best_diff {
            (best, best_diff) = (grid, diff);
        } else if diff == best_diff && area > 0.5 * (tile.0 * tile.1 * grid.0 * grid.1) as f64 {
            best = grid;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_follow_the_aspect_ratio_and_prefer_more_tiles_on_ties() {
        // 100x70 at 56-pixel tiles: (1, 1) and (2, 2) tie; the image covers
        // more than half of the 2x2 canvas, so (2, 2).
        assert_eq!(tile_grid(70, 100, (56, 56), 1, 4), (2, 2));
        // The same image at 448-pixel tiles covers far less: stays (1, 1).
        assert_eq!(tile_grid(70, 100, (448, 448), 1, 4), (1, 1));
        // Wide and tall images.
        assert_eq!(tile_grid(100, 400, (448, 448), 1, 12), (4, 1));
        assert_eq!(tile_grid(900, 300, (448, 448), 1, 12), (1, 3));
        // min_tiles excludes the single tile.
        assert_eq!(tile_grid(448, 448, (448, 448), 2, 4), (2, 2));
    }

    #[test]
    fn tiles_are_cut_row_by_row_and_end_with_a_thumbnail() {
        let cfg = TileConfig::from_json(
            &serde_json::json!({"size": {"height": 2, "width": 2}, "crop_to_patches": true, "max_patches": 4}),
            448,
        )
        .unwrap();
        // A 4x2 image whose pixel value is its column: two tiles side by side.
        let img = RgbImage { width: 4, height: 2, data: (0..2).flat_map(|_| (0..4u8).flat_map(|x| [x; 3])).collect() };
        let tiles = cfg.tiles(&img);
        assert_eq!(tiles.len(), 3);
        assert_eq!(tiles[0].data.chunks(3).map(|p| p[0]).collect::<Vec<_>>(), vec![0, 1, 0, 1]);
        assert_eq!(tiles[1].data.chunks(3).map(|p| p[0]).collect::<Vec<_>>(), vec![2, 3, 2, 3]);
        assert_eq!((tiles[2].width, tiles[2].height), (2, 2));
        let bad = TileConfig::from_json(&serde_json::json!({"min_patches": 5, "max_patches": 4}), 448);
        assert!(bad.unwrap_err().to_string().contains("min_patches 5 is larger than max_patches 4"));
    }
}
