//! What a training step minimises. The loop (`train_with`) owns data order,
//! accumulation, clipping, the optimizer and checkpoints; an [`Objective`]
//! turns a micro-batch of its items into a differentiable loss: the
//! causal-LM loss for SFT and pretraining ([`SftObjective`]), a preference
//! loss for DPO and its relatives, the policy loss for GRPO.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::TrainError;
use oxtune_data::text::EncodedRow;
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::loss::{mean_token_nll, IGNORE_INDEX};
use oxtune_engine::media::{batch_inputs, with_pixels, RowMedia};
use oxtune_engine::model::LoadedModel;

/// The loss of one micro-batch and what comes with it.
pub struct ObjectiveLoss {
    /// The scalar loss to differentiate.
    pub loss: Tensor,
    /// Tokens the batch ran through the model (for tokens/s).
    pub tokens: usize,
    /// The batch's weight in an evaluation mean (trained tokens, or rows).
    pub weight: f64,
    /// Values to log beside the loss (`rewards/chosen`, `logps/rejected`, ...).
    pub logged: BTreeMap<String, f64>,
}

/// A training objective over items of type `Item`.
pub trait Objective {
    /// One training example (an encoded row, a preference pair, a prompt).
    type Item;

    /// Whether `item` has anything to train on (others are left out).
    fn trainable(&self, item: &Self::Item) -> bool;

    /// The loss of `batch`. `dropout_seed` is set while training (dropout
    /// active) and `None` when evaluating; `step` is the optimizer step
    /// (0 when evaluating).
    fn loss(
        &self,
        model: &LoadedModel,
        batch: &[&Self::Item],
        dropout_seed: Option<u64>,
        step: usize,
    ) -> Result<ObjectiveLoss, TrainError>;
}

/// Right-pads rows into `input_ids`, `labels` and an attention mask.
pub fn collate(rows: &[&EncodedRow], device: &candle_core::Device) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let width = rows.iter().map(|r| r.input_ids.len()).max().unwrap_or(0);
    let (mut ids, mut labels, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        let pad = width - r.input_ids.len();
        ids.extend(r.input_ids.iter().copied().chain(std::iter::repeat_n(0, pad)));
        labels.extend(r.labels.iter().copied().chain(std::iter::repeat_n(IGNORE_INDEX, pad)));
        mask.extend(std::iter::repeat_n(1u32, r.input_ids.len()).chain(std::iter::repeat_n(0, pad)));
    }
    let shape = (rows.len(), width);
    Ok((
        Tensor::from_vec(ids, shape, device)?,
        Tensor::from_vec(labels, shape, device)?,
        Tensor::from_vec(mask, shape, device)?,
    ))
}

/// Next-token cross-entropy on the labelled tokens (SFT, pretraining).
pub struct SftObjective;

impl Objective for SftObjective {
    type Item = EncodedRow;

    fn trainable(&self, item: &EncodedRow) -> bool {
        item.labels.iter().skip(1).any(|&l| l != IGNORE_INDEX)
    }

    fn loss(
        &self,
        model: &LoadedModel,
        batch: &[&EncodedRow],
        dropout_seed: Option<u64>,
        step: usize,
    ) -> Result<ObjectiveLoss, TrainError> {
        let compute = |cause| TrainError::Compute { step, source: cause };
        let (ids, labels, mask) = collate(batch, model.device()).map_err(compute)?;
        let with_pixel_rows: Vec<Option<std::borrow::Cow<'_, RowMedia>>> = batch
            .iter()
            .map(|r| r.media.as_ref().map(|m| with_pixels(model, m)).transpose())
            .collect::<Result<_, _>>()
            .map_err(|e| TrainError::Data { step, message: oxtune_engine::error_chain(&e) })?;
        let rows: Vec<(usize, Option<&RowMedia>)> =
            batch.iter().zip(&with_pixel_rows).map(|(r, m)| (r.input_ids.len(), m.as_deref())).collect();
        let width = ids.dim(1).map_err(compute)?;
        let (position_ids, media) =
            batch_inputs(&rows, width, false, model.position_axes(), model.device()).map_err(compute)?;
        let info = BatchInfo { attention_mask: Some(mask), dropout_seed, position_ids, media, ..Default::default() };
        let (logps, label_mask) = model.label_logps(&ids, &info, &labels).map_err(Box::new)?;
        let loss = mean_token_nll(&logps, &label_mask).map_err(compute)?;
        let trained: usize =
            batch.iter().map(|r| r.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()).sum();
        Ok(ObjectiveLoss {
            loss,
            tokens: batch.iter().map(|r| r.input_ids.len()).sum(),
            weight: trained as f64,
            logged: BTreeMap::new(),
        })
    }
}
