//! The Qwen2.5-VL and Qwen3-VL plugins against transformers, loaded the
//! way users load them: built as cdylibs and opened at run time. For each
//! tiny reference checkpoint (`tests/fixtures/vlm`, transformers 5.24):
//! the processor's pixel rows and grid for `test_image.png`, the M-RoPE
//! position ids of the expanded prompt, and the logits.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use oxtune::backend::BatchInfo;
use oxtune::media::{batch_inputs, expand, MediaKind, MediaRef};
use oxtune::model::{LoadOptions, LoadedModel};
use oxtune::text::EncodedRow;
use oxtune_registry::{Registry, SandboxConfig};
use oxtune_tests::{build_cdylib, fixtures};

/// (fixture folder, plugin package)
const MODELS: [(&str, &str); 2] =
    [("tiny-qwen2.5-vl", "oxtune-plugin-qwen2-5-vl"), ("tiny-qwen3-vl", "oxtune-plugin-qwen3-vl")];

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("vlm").join(name)
}

fn load(name: &str, package: &str) -> LoadedModel {
    let mut registry = Registry::with_builtins().unwrap();
    registry.load_path(&build_cdylib(package, &["cdylib"]), &SandboxConfig::default()).unwrap();
    LoadedModel::load(&registry, &model_dir(name), &LoadOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let b = b.to_dtype(a.dtype()).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn image(path: &Path) -> MediaRef {
    MediaRef { kind: MediaKind::Image, sources: vec![path.to_owned()] }
}

#[test]
fn preprocessing_positions_and_logits_match_transformers() {
    for (name, package) in MODELS {
        let model = load(name, package);
        let dir = model_dir(name);
        let reference = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
        let prepared = model.prepare_media(&[image(&dir.join("test_image.png"))], &serde_json::json!({})).unwrap();
        assert_eq!(prepared.len(), 1);
        let item = &prepared[0];
        let expected_grid: Vec<u64> =
            reference["image_grid_thw"].flatten_all().unwrap().to_vec1::<i64>().unwrap().iter().map(|&g| g as u64).collect();
        assert_eq!(item.grid, expected_grid, "{name}: grid");
        let pixels = Tensor::from_vec(item.pixels.clone(), (item.pixels.len() / item.features, item.features), &Device::Cpu)
            .unwrap();
        assert_eq!(pixels.dims(), reference["pixel_values"].dims(), "{name}: pixel rows");
        let diff = max_abs_diff(&pixels, &reference["pixel_values"]);
        assert!(diff < 1e-5, "{name}: pixel values differ by {diff}");

        // The prompt as the chat template renders it: one placeholder.
        let template_ids = vec![5u32, 6, 1002, 1000, 1003, 7, 8, 9];
        let row = EncodedRow { labels: vec![-100; template_ids.len()], input_ids: template_ids, media: None };
        let row = expand(row, prepared, model.position_axes()).unwrap();
        let expected_ids: Vec<u32> =
            reference["input_ids"].flatten_all().unwrap().to_vec1::<i64>().unwrap().iter().map(|&t| t as u32).collect();
        assert_eq!(row.input_ids, expected_ids, "{name}: expanded ids");
        let media = row.media.as_ref().unwrap();
        let expected_positions = reference["position_ids"].squeeze(1).unwrap().to_vec2::<i64>().unwrap();
        let positions: Vec<Vec<i64>> =
            media.positions.iter().map(|axis| axis.iter().map(|&p| p as i64).collect()).collect();
        assert_eq!(positions, expected_positions, "{name}: M-RoPE positions");

        let n = row.input_ids.len();
        let (position_ids, inputs) = batch_inputs(&[(n, Some(media))], n, false, 3, &Device::Cpu).unwrap();
        let ids = Tensor::from_vec(row.input_ids.clone(), (1, n), &Device::Cpu).unwrap();
        let batch = BatchInfo { position_ids, media: inputs, ..Default::default() };
        let logits = model.forward(&ids, &batch, None, None).unwrap();
        let diff = max_abs_diff(&logits.to_dtype(DType::F32).unwrap(), &reference["logits"]);
        eprintln!("{name}: logits max diff {diff}");
        assert!(diff < 1e-4, "{name}: logits differ by {diff}");
    }
}
