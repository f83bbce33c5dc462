//! `--merge-lora`: the adapter folded into the base weights and saved as a
//! Hugging Face folder (safetensors sharded by size, config, tokenizer,
//! chat template, generation config), as PEFT's `merge_and_unload` then
//! `save_pretrained` give.

use std::path::Path;

use oxtune_engine::model::LoadedModel;

use crate::{size_on_disk, ExportError, Written};

/// Merges `model`'s attached adapter (any tuner that merges: LoRA, DoRA,
/// IA³, ...) into its weights and writes the whole model to `dir`.
pub fn write_merged(model: &mut LoadedModel, dir: &Path, max_shard_bytes: usize) -> Result<Written, ExportError> {
    model.merge_adapter().map_err(|e| ExportError::source(model.dir(), e))?;
    model.save_pretrained_with(dir, max_shard_bytes, |_| Ok(())).map_err(|e| ExportError::source(dir, e))?;
    let bytes = size_on_disk(dir).map_err(|source| ExportError::Io { path: dir.to_owned(), source })?;
    Ok(Written { path: dir.to_owned(), bytes })
}
