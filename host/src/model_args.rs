//! Options shared by the subcommands that load a model.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use oxtune_registry::Registry;

use oxtune_data::TextAssets;
use oxtune_engine::generate::SamplingParams;
use oxtune_engine::model::checkpoint::Trainable;
use oxtune_engine::quant::{Bnb4Type, QuantizeOnLoad};
use oxtune_engine::{LoadOptions, LoadedModel};

/// Which model to load, and how.
#[derive(Clone, Debug, clap::Args)]
pub struct ModelArgs {
    /// The model: a Hugging Face folder (config.json, safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Use this architecture plugin instead of the one config.json names.
    #[arg(long, value_name = "NAME")]
    pub model_type: Option<String>,
    /// A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to apply.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Images: smallest area in pixels after resizing (default: the model's
    /// `preprocessor_config.json`).
    #[arg(long, value_name = "PIXELS")]
    pub min_pixels: Option<u64>,
    /// Images: largest area in pixels after resizing; larger images are
    /// scaled down to fit, never rejected.
    #[arg(long, value_name = "PIXELS")]
    pub max_pixels: Option<u64>,
    /// Videos: most frames kept (evenly sampled).
    #[arg(long, value_name = "N")]
    pub max_frames: Option<u64>,
    /// Videos: the frame rate a list of frames stands for.
    #[arg(long, value_name = "FPS")]
    pub fps: Option<f64>,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, value_name = "DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Where the model runs: `cpu`, `cuda` (`cuda:N` for the N-th GPU) or
    /// `metal`; the GPU ones need oxtune built with that cargo feature.
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub device: String,
    /// Quantise the linear layers as the model loads, for QLoRA: `bnb`
    /// (bitsandbytes' 4-bit NF4/FP4, kept 4-bit in memory; the codes are
    /// bitsandbytes' own).
    #[arg(long, value_name = "METHOD")]
    pub quant_method: Option<String>,
    /// Bits of `--quant-method` (4).
    #[arg(long, value_name = "BITS")]
    pub quant_bits: Option<u32>,
    /// The 4-bit code: `nf4` or `fp4`.
    #[arg(long, value_name = "TYPE", default_value = "nf4")]
    pub bnb_4bit_quant_type: String,
    /// Store the 4-bit block scales in 8 bits too (double quantisation).
    #[arg(long, value_name = "BOOL", default_value_t = true, num_args = 0..=1, default_missing_value = "true")]
    pub bnb_4bit_use_double_quant: bool,
    /// A GGUF file: keep its Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K weights quantised in memory
    /// (decoding by integer dot products; training through dequantised
    /// panels); `false` dequantises the model as it loads.
    #[arg(long, value_name = "BOOL", default_value_t = true, num_args = 0..=1, default_missing_value = "true")]
    pub keep_quantized: bool,
    /// The dtype the 4-bit layers compute in (`float32`, `bfloat16`,
    /// `float16`): the model's compute dtype (`--dtype`).
    #[arg(long, value_name = "DTYPE")]
    pub bnb_4bit_compute_dtype: Option<String>,
    /// What generation's KV cache stores keys and values in: `f32`, `f16`,
    /// `bf16`, or `auto` — f16 for a GGUF file (llama.cpp's default cache
    /// type: half the memory, within f16 rounding), the compute dtype
    /// (`--dtype`) for a Hugging Face folder (as transformers keeps it).
    #[arg(long, value_name = "DTYPE", default_value = "auto")]
    pub kv_cache_dtype: String,
}

/// A model with its tokenizer and template.
pub struct LoadedText {
    /// The model.
    pub model: LoadedModel,
    /// Its tokenizer, chat template and generation defaults.
    pub assets: TextAssets,
}

impl ModelArgs {
    /// What `--quant-method`, `--quant-bits` and the `--bnb-4bit-*` flags ask.
    fn quantize_on_load(&self) -> anyhow::Result<Option<QuantizeOnLoad>> {
        match (self.quant_method.as_deref(), self.quant_bits) {
            (None, None) => Ok(None),
            (Some("bnb"), Some(4) | None) => {
                let kind = Bnb4Type::parse(&self.bnb_4bit_quant_type)
                    .with_context(|| format!("--bnb-4bit-quant-type {}: use nf4 or fp4", self.bnb_4bit_quant_type))?;
                Ok(Some(QuantizeOnLoad { kind, double_quant: self.bnb_4bit_use_double_quant }))
            }
            (Some("bnb"), Some(bits)) => {
                anyhow::bail!("--quant-bits {bits}: bitsandbytes quantisation here is 4-bit (NF4 or FP4)")
            }
            (Some(other), _) => anyhow::bail!(
                "--quant-method {other}: `bnb` is supported (a GGUF file loads with its own quantisation)"
            ),
            (None, Some(_)) => anyhow::bail!("--quant-bits needs --quant-method bnb"),
        }
    }

    /// What `--kv-cache-dtype` asks (`None`: the compute dtype).
    fn kv_cache_dtype(&self) -> anyhow::Result<Option<DType>> {
        Ok(match self.kv_cache_dtype.as_str() {
            "auto" if oxtune_engine::model::is_gguf(&self.model) => Some(DType::F16),
            "auto" => None,
            "f32" | "float32" => Some(DType::F32),
            "f16" | "float16" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            other => anyhow::bail!("--kv-cache-dtype {other}: use auto, f32, f16 or bf16"),
        })
    }

    /// Loads the model (with `--adapter` applied) and its text assets.
    pub fn load(&self, registry: &Registry) -> anyhow::Result<LoadedText> {
        self.load_with(registry, true)
    }

    /// Loads the model and its text assets, applying `--adapter` only if asked.
    pub fn load_with(&self, registry: &Registry, apply_adapter: bool) -> anyhow::Result<LoadedText> {
        let (flag, name) = match &self.bnb_4bit_compute_dtype {
            Some(compute) => ("--bnb-4bit-compute-dtype", compute.as_str()),
            None => ("--dtype", self.dtype.as_str()),
        };
        let dtype = match name {
            "f32" | "float32" => DType::F32,
            "bf16" | "bfloat16" => DType::BF16,
            "f16" | "float16" => DType::F16,
            other => anyhow::bail!("{flag} {other}: use f32, bf16 or f16"),
        };
        let quantize = self.quantize_on_load()?;
        let device = self.device()?;
        // A dtype the device cannot compute in fails here, not mid-run.
        let probe = Tensor::ones((2, 2), dtype, &device).and_then(|t| t.matmul(&t)?.sum_all()?.to_dtype(DType::F32));
        if let Err(e) = probe.and_then(|t| t.to_scalar::<f32>()) {
            let cause = e.to_string();
            anyhow::bail!(
                "--dtype {}: the {} device cannot compute in it ({})",
                self.dtype,
                self.device,
                first_line(&cause)
            );
        }
        let options = LoadOptions {
            dtype,
            device,
            trainable: Trainable::None,
            model_type: self.model_type.clone(),
            quantize,
            keep_gguf_quantized: self.keep_quantized,
            kv_cache_dtype: self.kv_cache_dtype()?,
        };
        let load_assets = || {
            TextAssets::load(&self.model).with_context(|| format!("loading the tokenizer of {}", self.model.display()))
        };
        // The tokenizer first: building it (a GGUF file's vocabulary as
        // JSON) allocates about 25 MB that is freed before the weights
        // arrive, instead of on top of them at the peak. A missing model
        // is left to the model loader, which names what is missing.
        let present = self.model.is_file() || self.model.join("config.json").is_file();
        let early_assets = if present { Some(load_assets()?) } else { None };
        let mut model = LoadedModel::load(registry, &self.model, &options)?;
        let assets = match early_assets {
            Some(assets) => assets,
            None => load_assets()?,
        };
        if let Some(adapter) = self.adapter.as_ref().filter(|_| apply_adapter) {
            model
                .attach_adapter(registry, adapter, Trainable::None)
                .with_context(|| format!("applying the adapter {}", adapter.display()))?;
        }
        Ok(LoadedText { model, assets })
    }
}

impl ModelArgs {
    /// The device `--device` names, or a one-line error naming the flag.
    pub fn device(&self) -> anyhow::Result<Device> {
        let spec = self.device.as_str();
        let (kind, ordinal) = match spec.split_once(':') {
            Some((kind, n)) => {
                let n =
                    n.parse::<usize>().map_err(|_| anyhow::anyhow!("--device {spec}: `{n}` is not a device number"))?;
                (kind, n)
            }
            None => (spec, 0),
        };
        let (device, feature) = match kind {
            "cpu" if ordinal == 0 => return Ok(Device::Cpu),
            "cuda" => (Device::new_cuda(ordinal), "cuda"),
            "metal" => (Device::new_metal(ordinal), "metal"),
            _ => anyhow::bail!("--device {spec}: use cpu, cuda, cuda:N or metal"),
        };
        device.map_err(|e| match e {
            candle_core::Error::NotCompiledWithCudaSupport | candle_core::Error::NotCompiledWithMetalSupport => {
                anyhow::anyhow!("--device {spec}: this oxtune was built without {feature} support (build it with `--features {feature}`)")
            }
            other => anyhow::anyhow!("--device {spec}: {}", first_line(&other.to_string())),
        })
    }

    /// The media preprocessing overrides given on the command line, as the
    /// keys of `preprocessor_config.json` they replace.
    pub fn media_options(&self) -> serde_json::Value {
        let mut options = serde_json::Map::new();
        let mut put = |key: &str, value: Option<serde_json::Value>| {
            if let Some(v) = value {
                options.insert(key.to_owned(), v);
            }
        };
        put("min_pixels", self.min_pixels.map(Into::into));
        put("max_pixels", self.max_pixels.map(Into::into));
        put("max_frames", self.max_frames.map(Into::into));
        put("fps", self.fps.map(Into::into));
        serde_json::Value::Object(options)
    }
}

/// Sampling options; unset ones come from the model's `generation_config.json`.
#[derive(Debug, clap::Args)]
pub struct SamplingArgs {
    /// Most new tokens per answer.
    #[arg(long, value_name = "N")]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,
    /// Sample among the K most likely tokens (0: all).
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold.
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than MIN_P times the most likely one.
    #[arg(long, value_name = "MIN_P")]
    pub min_p: Option<f32>,
    /// Penalise tokens already in the prompt or answer (1: off).
    #[arg(long, value_name = "R")]
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Stop when the answer contains this string (repeatable).
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The sampling parameters: flags, else `generation_config.json`, else greedy.
    pub fn params(&self, assets: &TextAssets) -> SamplingParams {
        let g = &assets.generation_config;
        let sampled = g.get("do_sample").and_then(|v| v.as_bool()).unwrap_or(false);
        let number = |key: &str| g.get(key).and_then(|v| v.as_f64());
        let default_temperature = if sampled { number("temperature").unwrap_or(1.0) as f32 } else { 0.0 };
        SamplingParams {
            max_new_tokens: self.max_new_tokens.or_else(|| number("max_new_tokens").map(|v| v as usize)).unwrap_or(512),
            temperature: self.temperature.unwrap_or(default_temperature),
            top_k: self.top_k.or_else(|| number("top_k").filter(|_| sampled).map(|v| v as usize)).unwrap_or(0),
            top_p: self.top_p.or_else(|| number("top_p").filter(|_| sampled).map(|v| v as f32)).unwrap_or(1.0),
            min_p: self.min_p.or_else(|| number("min_p").filter(|_| sampled).map(|v| v as f32)).unwrap_or(0.0),
            repetition_penalty: self
                .repetition_penalty
                .or_else(|| number("repetition_penalty").map(|v| v as f32))
                .unwrap_or(1.0),
            seed: self.seed,
            eos_token_ids: assets.eos_token_ids.clone(),
            stop: self.stop.clone(),
        }
    }
}

/// The first line of an error message (device errors can run to pages).
fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or(message)
}
