//! `oxtune export`: merge an adapter into its base (`--merge-lora`), write
//! GGUF files llama.cpp loads (`--to-gguf`, a model in any `--quant-type`
//! or a LoRA adapter alone), or a folder Ollama imports (`--to-ollama`).
//! Each export is written beside its target and renamed into place; the
//! command prints its size and how to use it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use oxtune_export::gguf_adapter::write_adapter_gguf;
use oxtune_export::gguf_model::{write_model_gguf, write_model_gguf_streaming};
use oxtune_export::merged::write_merged;
use oxtune_export::ollama::modelfile;
use oxtune_export::{QuantType, Written};

use super::model_args::ModelArgs;
use super::GlobalArgs;

/// Arguments of `oxtune export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Fold `--adapter` into the base weights (any tuner that merges: LoRA,
    /// DoRA, IA³). Alone: a Hugging Face folder. With --to-gguf or
    /// --to-ollama: the merged model instead of a separate adapter file.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub merge_lora: bool,
    /// Write GGUF: the model (merged with --adapter when --merge-lora), or
    /// the LoRA adapter alone when --adapter is given without --merge-lora.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub to_gguf: bool,
    /// Write a folder Ollama imports: the GGUF model (and adapter) with a Modelfile.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub to_ollama: bool,
    /// How a GGUF model stores its weights: f32, f16, bf16, q8_0, q4_0,
    /// q4_k_m, q5_k_m or q6_k (llama.cpp's mixes).
    #[arg(long, value_name = "TYPE", default_value = "f16")]
    pub quant_type: QuantType,
    /// The largest safetensors shard of a merged folder (`5GB`, `500MB`).
    #[arg(long, value_name = "SIZE", default_value = "5GB")]
    pub max_shard_size: String,
    /// Where to write (default: beside the adapter, or the model, with a suffix).
    #[arg(long, value_name = "PATH")]
    pub output: Option<PathBuf>,
}

/// `5GB`, `500MB`, `10KB` or a plain byte count, in decimal units as
/// Hugging Face's `max_shard_size` reads them.
fn parse_size(text: &str) -> anyhow::Result<usize> {
    let upper = text.trim().to_ascii_uppercase();
    let (digits, unit) = match upper.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => upper.split_at(i),
        None => (upper.as_str(), "B"),
    };
    let scale = match unit.trim() {
        "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("--max-shard-size {text}: unknown unit `{other}` (use B, KB, MB, GB, KiB, MiB or GiB)"),
    };
    let number: f64 = digits.parse().with_context(|| format!("--max-shard-size {text}: not a size"))?;
    Ok((number * scale) as usize)
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b as f64 / 1024.0),
    }
}

/// `path` with `suffix` added to its file name (`run/checkpoint-10` →
/// `run/checkpoint-10-merged`; a `.gguf` stem loses its extension first).
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let stem = match path.extension().filter(|e| e.eq_ignore_ascii_case("gguf")) {
        Some(_) => path.file_stem(),
        None => path.file_name(),
    };
    let mut name = stem.unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn report(what: &str, written: &Written, usage: &str) {
    println!("wrote {what}: {} ({})", written.path.display(), human(written.bytes));
    println!("use it: {usage}");
}

/// Runs `oxtune export`.
pub fn run(global: &GlobalArgs, args: &ExportArgs) -> anyhow::Result<()> {
    if !(args.merge_lora || args.to_gguf || args.to_ollama) {
        bail!("say what to export: --merge-lora, --to-gguf or --to-ollama");
    }
    if args.merge_lora && args.model.adapter.is_none() {
        bail!("--merge-lora needs --adapter (the adapter folder to merge)");
    }
    let registry = global.registry()?;
    let source = args.model.adapter.clone().unwrap_or_else(|| args.model.model.clone());
    let quant = args.quant_type;
    if args.to_ollama {
        return to_ollama(args, &registry, &source);
    }
    if args.to_gguf {
        if let (Some(adapter), false) = (&args.model.adapter, args.merge_lora) {
            let base = args.model.load_with(&registry, false)?.model;
            let path = args.output.clone().unwrap_or_else(|| beside(adapter, "-lora.gguf"));
            let written = write_adapter_gguf(&base, adapter, &path)?;
            let usage =
                format!("llama-cli -m BASE.gguf --lora {}  (BASE.gguf: --to-gguf without --adapter)", path.display());
            report("GGUF LoRA adapter", &written, &usage);
            return Ok(());
        }
        let path = args.output.clone().unwrap_or_else(|| beside(&source, &format!("-{quant}.gguf")));
        let written = match &args.model.adapter {
            Some(_) => write_model_gguf(&mut args.model.load(&registry)?.model, quant, &path)?,
            None => {
                let model_type = args.model.model_type.as_deref();
                write_model_gguf_streaming(&registry, &args.model.model, model_type, quant, &path)?
            }
        };
        report(&format!("GGUF model ({quant})"), &written, &format!("llama-cli -m {}", path.display()));
        return Ok(());
    }
    let max_shard = parse_size(&args.max_shard_size)?;
    let mut model = args.model.load(&registry)?.model;
    let dir = args.output.clone().unwrap_or_else(|| beside(&source, "-merged"));
    let written = write_merged(&mut model, &dir, max_shard)?;
    report("merged model", &written, &format!("oxtune infer --model {}", dir.display()));
    Ok(())
}

/// The Ollama folder: GGUF model (merged, or base plus adapter) and Modelfile.
fn to_ollama(args: &ExportArgs, registry: &oxtune_registry::Registry, source: &Path) -> anyhow::Result<()> {
    let dir = args.output.clone().unwrap_or_else(|| beside(source, "-ollama"));
    if dir.exists() {
        bail!("{} exists: remove it or choose another --output", dir.display());
    }
    let staging = beside(&dir, ".partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let result = (|| -> anyhow::Result<Option<&'static str>> {
        let quant = args.quant_type;
        let model_file = format!("model-{quant}.gguf");
        let separate_adapter = args.model.adapter.as_ref().filter(|_| !args.merge_lora);
        if let Some(adapter) = separate_adapter {
            let base = args.model.load_with(registry, false)?.model;
            write_adapter_gguf(&base, adapter, &staging.join("adapter.gguf"))?;
        }
        let model_path = staging.join(&model_file);
        if args.merge_lora {
            write_model_gguf(&mut args.model.load(registry)?.model, quant, &model_path)?;
        } else {
            let model_type = args.model.model_type.as_deref();
            write_model_gguf_streaming(registry, &args.model.model, model_type, quant, &model_path)?;
        }
        let file = modelfile(&args.model.model, &model_file, separate_adapter.map(|_| "adapter.gguf"))?;
        std::fs::write(staging.join("Modelfile"), &file.text)?;
        Ok(file.format)
    })();
    let format = match result {
        Ok(format) => format,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    std::fs::rename(&staging, &dir).with_context(|| format!("moving {} into place", dir.display()))?;
    if format.is_none() {
        eprintln!(
            "note: the chat template is none Ollama's Modelfile can state (ChatML, Llama 3); Ollama will use the one in the GGUF file"
        );
    }
    let written = Written { path: dir.clone(), bytes: oxtune_export::size_on_disk(&dir)? };
    let name = dir.file_name().unwrap_or_default().to_string_lossy().to_lowercase();
    report(
        "Ollama model",
        &written,
        &format!("ollama create {name} -f {}/Modelfile && ollama run {name}", dir.display()),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_sizes_read_as_hugging_face_reads_them() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("500mb").unwrap(), 500_000_000);
        assert_eq!(parse_size("2KiB").unwrap(), 2048);
        assert_eq!(parse_size("1234").unwrap(), 1234);
        assert!(parse_size("5 parsecs").unwrap_err().to_string().contains("unknown unit"));
    }

    #[test]
    fn outputs_go_beside_their_source() {
        assert_eq!(beside(Path::new("out/checkpoint-5"), "-merged"), PathBuf::from("out/checkpoint-5-merged"));
        assert_eq!(beside(Path::new("m/SmolLM2.Q4_1.gguf"), "-f16.gguf"), PathBuf::from("m/SmolLM2.Q4_1-f16.gguf"));
    }
}
