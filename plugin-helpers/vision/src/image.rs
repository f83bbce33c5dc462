//! Decoding images and resizing them exactly as the Qwen-VL processors of
//! transformers do, so that pixel values match the Python reference.
//!
//! transformers' fast image processors resize `uint8` images with
//! PyTorch's antialiased bicubic interpolation, whose CPU kernel for
//! `uint8` works in fixed point (Pillow's algorithm with 16-bit weights
//! and a per-axis precision): a horizontal pass, a clamp to `0..=255`, then
//! a vertical pass. [`resize_bicubic`] reproduces that kernel bit for bit;
//! a float bicubic (or the `image` crate's filters) differs by one level
//! on many pixels, which after normalisation is ~0.015 — far above the
//! 1e-5 the reference tests hold.

use std::path::Path;

use oxtune_plugin_api::{Error, Result};

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height * width * 3` bytes.
    pub data: Vec<u8>,
}

/// Decodes a PNG, JPEG or WebP file into RGB (alpha dropped, grey
/// expanded, as PIL's `convert("RGB")`). Errors name the file.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::new(format!("cannot read image {}: {e}", path.display())))?;
    decode_rgb(&bytes).map_err(|e| Error::new(format!("{} is not a readable image: {e}", path.display())))
}

/// Decodes image bytes (PNG, JPEG, WebP) into RGB.
pub fn decode_rgb(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let format = ::image::guess_format(bytes).map_err(|e| e.to_string())?;
    let decoded = ::image::load_from_memory_with_format(bytes, format).map_err(|e| e.to_string())?;
    let rgb = decoded.to_rgb8();
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    if width == 0 || height == 0 {
        return Err("the image is empty".into());
    }
    Ok(RgbImage { width, height, data: rgb.into_raw() })
}

/// Qwen-VL's `smart_resize`: the size nearest to `(height, width)` whose
/// sides are multiples of `factor` and whose area lies within
/// `[min_pixels, max_pixels]`, keeping the aspect ratio. Python's
/// `round` (half to even) is kept, as the reference rounds that way.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    let (h, w) = (height as f64, width as f64);
    if h.max(w) / h.min(w) > 200.0 {
        return Err(Error::new(format!("the image is {width}x{height}: its aspect ratio must be smaller than 200")));
    }
    let f = factor as f64;
    let mut h_bar = ((h / f).round_ties_even() * f).max(f);
    let mut w_bar = ((w / f).round_ties_even() * f).max(f);
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// Qwen3-VL's video `smart_resize`: like [`smart_resize`], but the pixel
/// budget covers all `frames` (rounded to whole temporal patches of
/// `temporal` frames), so a longer video gets smaller frames.
pub fn smart_resize_frames(
    frames: usize,
    height: usize,
    width: usize,
    temporal: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    let (h, w, n) = (height as f64, width as f64, frames.max(temporal) as f64);
    if h.max(w) / h.min(w) > 200.0 {
        return Err(Error::new(format!(
            "the frames are {width}x{height}: their aspect ratio must be smaller than 200"
        )));
    }
    let (f, tf) = (factor as f64, temporal as f64);
    let mut h_bar = ((h / f).round_ties_even() * f).max(f);
    let mut w_bar = ((w / f).round_ties_even() * f).max(f);
    let t_bar = (n / tf).round_ties_even() * tf;
    if t_bar * h_bar * w_bar > max_pixels as f64 {
        let beta = (n * h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if t_bar * h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (n * h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// Bicubic (a = -0.5), as PyTorch's antialiased kernels use.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The taps of one output pixel: first input index and 16-bit weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// Antialiased bicubic weights for resampling `input` pixels to `output`,
/// in fixed point with the largest precision that keeps every weight in
/// an `i16` (PyTorch's `_compute_indices_int16_weights_aa`).
fn fixed_point_taps(input: usize, output: usize) -> (Vec<Taps>, u32) {
    let scale = input as f64 / output as f64;
    let (support, inv_scale) = if scale >= 1.0 { (2.0 * scale, 1.0 / scale) } else { (2.0, 1.0) };
    let mut float_taps = Vec::with_capacity(output);
    let mut max_weight = 0f64;
    for i in 0..output {
        let center = scale * (i as f64 + 0.5);
        let start = ((center - support + 0.5) as i64).max(0) as usize;
        let end = ((center + support + 0.5) as i64).min(input as i64) as usize;
        let mut weights: Vec<f64> = (start..end).map(|j| bicubic((j as f64 - center + 0.5) * inv_scale)).collect();
        let total: f64 = weights.iter().sum();
        if total != 0.0 {
            weights.iter_mut().for_each(|w| *w /= total);
        }
        max_weight = weights.iter().fold(max_weight, |m, &w| m.max(w));
        float_taps.push((start, weights));
    }
    let mut precision = 0u32;
    while precision < 22 {
        let next = (0.5 + max_weight * (1u64 << (precision + 1)) as f64) as i64;
        if next >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let unit = (1u64 << precision) as f64;
    let taps = float_taps
        .into_iter()
        .map(|(start, weights)| Taps {
            start,
            weights: weights
                .iter()
                .map(|&w| if w < 0.0 { (w * unit - 0.5) as i32 } else { (w * unit + 0.5) as i32 })
                .collect(),
        })
        .collect();
    (taps, precision)
}

/// One resampling pass along an axis: `lines` lines of `len` pixels,
/// pixel `i` of line `l` at `l * line_stride + i * pixel_stride` (3
/// channels each).
fn resample_axis(src: &[u8], geometry: AxisGeometry, taps: &[Taps], precision: u32) -> Vec<u8> {
    let AxisGeometry { lines, line_stride, pixel_stride, out_line_stride, out_pixel_stride, out_len } = geometry;
    let mut out = vec![0u8; out_len];
    let round = 1i64 << (precision.max(1) - 1);
    for l in 0..lines {
        for (o, tap) in taps.iter().enumerate() {
            for c in 0..3 {
                let mut acc = round;
                for (k, &w) in tap.weights.iter().enumerate() {
                    acc += w as i64 * src[l * line_stride + (tap.start + k) * pixel_stride + c] as i64;
                }
                out[l * out_line_stride + o * out_pixel_stride + c] = (acc >> precision).clamp(0, 255) as u8;
            }
        }
    }
    out
}

#[derive(Copy, Clone)]
struct AxisGeometry {
    lines: usize,
    line_stride: usize,
    pixel_stride: usize,
    out_line_stride: usize,
    out_pixel_stride: usize,
    out_len: usize,
}

/// Resizes to `width × height` with antialiased bicubic interpolation,
/// bit-identical to `torchvision`'s resize of a `uint8` tensor (and so to
/// transformers' fast Qwen-VL processors): horizontal pass first, each
/// pass skipped when its size does not change.
pub fn resize_bicubic(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let mut data = img.data.clone();
    let mut w = img.width;
    if width != img.width {
        let (taps, precision) = fixed_point_taps(img.width, width);
        let geometry = AxisGeometry {
            lines: img.height,
            line_stride: img.width * 3,
            pixel_stride: 3,
            out_line_stride: width * 3,
            out_pixel_stride: 3,
            out_len: img.height * width * 3,
        };
        data = resample_axis(&data, geometry, &taps, precision);
        w = width;
    }
    if height != img.height {
        let (taps, precision) = fixed_point_taps(img.height, height);
        let geometry = AxisGeometry {
            lines: w,
            line_stride: 3,
            pixel_stride: w * 3,
            out_line_stride: 3,
            out_pixel_stride: w * 3,
            out_len: height * w * 3,
        };
        data = resample_axis(&data, geometry, &taps, precision);
    }
    RgbImage { width, height, data }
}

/// Channel-planar values `[3, h, w]` of an RGB image: multiplied by
/// `rescale` (when given), then `(x - mean) / std` per channel (when
/// given, on the rescaled scale). As transformers does, the rescale is
/// folded into the mean and std: `(x - mean/r) / (std/r)`.
pub fn normalized_planes(img: &RgbImage, rescale: Option<f64>, mean_std: Option<([f64; 3], [f64; 3])>) -> Vec<f32> {
    let plane = img.width * img.height;
    let mut out = vec![0f32; 3 * plane];
    let scale = rescale.unwrap_or(1.0);
    for c in 0..3 {
        let (mean, std) = mean_std.map_or((0.0, 1.0), |(m, s)| (m[c], s[c]));
        let (mean, std) = ((mean / scale) as f32, (std / scale) as f32);
        for p in 0..plane {
            out[c * plane + p] = (img.data[p * 3 + c] as f32 - mean) / std;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_rounds_like_python_and_keeps_the_budget() {
        // 70 / 28 = 2.5 rounds to 2 (half to even), 100 / 28 = 3.57 to 4.
        assert_eq!(smart_resize(70, 100, 28, 3136, 12544).unwrap(), (56, 112));
        assert_eq!(smart_resize(70, 100, 32, 4096, 16384).unwrap(), (64, 96));
        // Too large: scaled down into the budget, never rejected.
        let (h, w) = smart_resize(4000, 3000, 28, 3136, 12544).unwrap();
        assert!(h * w <= 12544 && h % 28 == 0 && w % 28 == 0 && h > w, "{h}x{w}");
        // Too small: scaled up to the minimum.
        let (h, w) = smart_resize(10, 10, 28, 3136, 12544).unwrap();
        assert!(h * w >= 3136, "{h}x{w}");
        assert!(smart_resize(1, 300, 28, 3136, 12544).unwrap_err().to_string().contains("aspect ratio"));
    }

    #[test]
    fn resizing_a_flat_image_keeps_it_flat_and_identity_is_exact() {
        let flat = RgbImage { width: 5, height: 4, data: [10u8, 200, 30].repeat(20) };
        let up = resize_bicubic(&flat, 13, 7);
        assert!(up.data.chunks(3).all(|p| p == [10, 200, 30]), "{:?}", &up.data[..9]);
        let down = resize_bicubic(&up, 3, 2);
        assert!(down.data.chunks(3).all(|p| p == [10, 200, 30]));
        let ramp = RgbImage { width: 4, height: 1, data: (0..12).map(|v| v as u8 * 20).collect() };
        assert_eq!(resize_bicubic(&ramp, 4, 1), ramp);
    }

    #[test]
    fn png_jpeg_and_webp_decode_to_rgb() {
        let source = ::image::RgbImage::from_fn(8, 6, |x, y| ::image::Rgb([x as u8 * 30, y as u8 * 40, 200]));
        for format in [::image::ImageFormat::Png, ::image::ImageFormat::Jpeg, ::image::ImageFormat::WebP] {
            let mut bytes = std::io::Cursor::new(Vec::new());
            source.write_to(&mut bytes, format).unwrap();
            let decoded = decode_rgb(bytes.get_ref()).unwrap();
            assert_eq!((decoded.width, decoded.height), (8, 6), "{format:?}");
            // PNG and lossless WebP are exact; JPEG is close.
            let worst = decoded.data.iter().zip(source.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
            assert!(worst <= if format == ::image::ImageFormat::Jpeg { 40 } else { 0 }, "{format:?}: {worst}");
        }
        // Grey and RGBA images come out as RGB.
        let grey = ::image::GrayImage::from_pixel(3, 2, ::image::Luma([77]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        grey.write_to(&mut bytes, ::image::ImageFormat::Png).unwrap();
        assert_eq!(decode_rgb(bytes.get_ref()).unwrap().data, vec![77; 18]);
    }

    #[test]
    fn corrupt_bytes_are_an_error_not_a_panic() {
        assert!(decode_rgb(b"\x89PNG\r\n\x1a\nnot really").is_err());
        assert!(decode_rgb(b"hello").is_err());
    }
}
