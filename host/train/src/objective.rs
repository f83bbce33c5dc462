//! What a training step minimises. The loop (`train_with`) owns data order,
//! accumulation, clipping, the optimizer and checkpoints; an [`Objective`]
//! turns a micro-batch of its items into a differentiable loss: the
//! causal-LM loss for SFT and pretraining ([`SftObjective`]), a preference
//! loss for DPO and its relatives, the policy loss for GRPO.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::TrainError;
use oxtune_data::text::EncodedRow;
use oxtune_data::PackedRow;
use oxtune_engine::backend::AuxOutputs;
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::loss::{mean_token_nll, IGNORE_INDEX};
use oxtune_engine::media::{batch_inputs, with_pixels, NamedInputs, RowMedia};
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
    /// The model's auxiliary outputs of the policy's forward pass (a
    /// router's `aux_loss`, which the trainer adds with
    /// [`TrainConfig::router_aux_loss_coef`](crate::TrainConfig::router_aux_loss_coef)).
    pub aux: AuxOutputs,
}

/// A training objective over items of type `Item`.
pub trait Objective {
    /// One training example (an encoded row, a preference pair, a prompt).
    type Item;

    /// Whether `item` has anything to train on (others are left out).
    fn trainable(&self, item: &Self::Item) -> bool;

    /// The item's share in a step's loss when gradients are accumulated
    /// over micro-batches: each micro-batch's loss is scaled by its items'
    /// total weight over the step's (transformers' `num_items_in_batch`).
    /// Token-level losses weigh by trained tokens, so a step means the
    /// same whatever its micro-batches hold; the default weighs by item.
    fn weight(&self, item: &Self::Item) -> f64 {
        let _ = item;
        1.0
    }

    /// Tokens the item puts through the model's forward pass with
    /// gradients, padded to its own longest row (a pair: its chosen and
    /// rejected rows). A micro-batch of `n` items runs at most `n` times the
    /// largest of these, which the trainer sizes a step's activation memory
    /// by before training starts; 0 when not known.
    fn forward_tokens(&self, item: &Self::Item) -> usize {
        let _ = item;
        0
    }

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

/// Labelled tokens of a row that the loss is taken on (the first token
/// has nothing before it to be predicted from).
fn trained_tokens(row: &EncodedRow) -> usize {
    row.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()
}

impl Objective for SftObjective {
    type Item = EncodedRow;

    fn trainable(&self, item: &EncodedRow) -> bool {
        trained_tokens(item) > 0
    }

    fn weight(&self, item: &EncodedRow) -> f64 {
        trained_tokens(item) as f64
    }

    fn forward_tokens(&self, item: &EncodedRow) -> usize {
        item.input_ids.len()
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
        let out = model.label_logps(&ids, &info, &labels).map_err(Box::new)?;
        let loss = mean_token_nll(&out.logps, &out.mask).map_err(compute)?;
        let trained: usize = batch.iter().map(|r| trained_tokens(r)).sum();
        Ok(ObjectiveLoss {
            loss,
            tokens: batch.iter().map(|r| r.input_ids.len()).sum(),
            weight: trained as f64,
            logged: BTreeMap::new(),
            aux: out.aux,
        })
    }
}

/// Right-pads packed rows into `input_ids`, `labels` and the batch's
/// positions (restarting per sample), segments and attention mask.
pub fn collate_packed(
    packs: &[&PackedRow],
    dropout_seed: Option<u64>,
    device: &candle_core::Device,
) -> candle_core::Result<(Tensor, Tensor, BatchInfo)> {
    let width = packs.iter().map(|p| p.input_ids.len()).max().unwrap_or(0);
    let (mut ids, mut labels, mut positions, mut segments, mut mask) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for p in packs {
        let pad = width - p.input_ids.len();
        ids.extend(p.input_ids.iter().copied().chain(std::iter::repeat_n(0, pad)));
        labels.extend(p.labels.iter().copied().chain(std::iter::repeat_n(IGNORE_INDEX, pad)));
        positions.extend(p.position_ids.iter().copied().chain(std::iter::repeat_n(0, pad)));
        // Padding is a segment of its own, attended by nothing real.
        let pad_segment = p.samples() as u32;
        segments.extend(p.segment_ids.iter().copied().chain(std::iter::repeat_n(pad_segment, pad)));
        mask.extend(std::iter::repeat_n(1u32, p.input_ids.len()).chain(std::iter::repeat_n(0, pad)));
    }
    let shape = (packs.len(), width);
    let info = BatchInfo {
        position_ids: Some(Tensor::from_vec(positions, shape, device)?),
        attention_mask: Some(Tensor::from_vec(mask, shape, device)?),
        segment_ids: Some(Tensor::from_vec(segments, shape, device)?),
        dropout_seed,
        ..Default::default()
    };
    Ok((Tensor::from_vec(ids, shape, device)?, Tensor::from_vec(labels, shape, device)?, info))
}

/// The positions on every axis and the media inputs of packed rows when
/// any holds images or videos (`None` when none does): pixels read again
/// where they were released, text-only rows counting up on every axis
/// from each sample's start.
fn packed_media(
    model: &LoadedModel,
    packs: &[&PackedRow],
    width: usize,
    step: usize,
) -> Result<Option<(Option<Tensor>, NamedInputs)>, TrainError> {
    if packs.iter().all(|p| p.media.is_none()) {
        return Ok(None);
    }
    let axes = model.position_axes();
    let with_pixel_rows: Vec<std::borrow::Cow<'_, RowMedia>> = packs
        .iter()
        .map(|p| match &p.media {
            Some(m) => with_pixels(model, m),
            None => Ok(std::borrow::Cow::Owned(RowMedia {
                items: Vec::new(),
                positions: vec![p.position_ids.clone(); axes],
                sources: None,
            })),
        })
        .collect::<Result<_, _>>()
        .map_err(|e| TrainError::Data { step, message: oxtune_engine::error_chain(&e) })?;
    let rows: Vec<(usize, Option<&RowMedia>)> =
        packs.iter().zip(&with_pixel_rows).map(|(p, m)| (p.input_ids.len(), Some(m.as_ref()))).collect();
    let inputs = batch_inputs(&rows, width, false, axes, model.device())
        .map_err(|cause| TrainError::Compute { step, source: cause })?;
    Ok(Some(inputs))
}

/// The mean next-token loss over the labelled tokens of packed rows.
fn packed_loss(
    model: &LoadedModel,
    packs: &[&PackedRow],
    dropout_seed: Option<u64>,
    step: usize,
) -> Result<ObjectiveLoss, TrainError> {
    let compute = |cause| TrainError::Compute { step, source: cause };
    let (ids, labels, mut info) = collate_packed(packs, dropout_seed, model.device()).map_err(compute)?;
    if let Some((positions, media)) = packed_media(model, packs, ids.dim(1).map_err(compute)?, step)? {
        info.position_ids = positions;
        info.media = media;
    }
    let out = model.label_logps(&ids, &info, &labels).map_err(Box::new)?;
    let loss = mean_token_nll(&out.logps, &out.mask).map_err(compute)?;
    Ok(ObjectiveLoss {
        loss,
        tokens: packs.iter().map(|p| p.input_ids.len()).sum(),
        weight: packs.iter().map(|p| p.trained_tokens()).sum::<usize>() as f64,
        logged: BTreeMap::new(),
        aux: out.aux,
    })
}

/// SFT and pretraining on rows packed before training (`--packing`).
pub struct PackedSftObjective;

impl Objective for PackedSftObjective {
    type Item = PackedRow;

    fn trainable(&self, item: &PackedRow) -> bool {
        item.trained_tokens() > 0
    }

    fn weight(&self, item: &PackedRow) -> f64 {
        item.trained_tokens() as f64
    }

    fn forward_tokens(&self, item: &PackedRow) -> usize {
        item.input_ids.len()
    }

    fn loss(
        &self,
        model: &LoadedModel,
        batch: &[&PackedRow],
        dropout_seed: Option<u64>,
        step: usize,
    ) -> Result<ObjectiveLoss, TrainError> {
        packed_loss(model, batch, dropout_seed, step)
    }
}

/// SFT and pretraining with each micro-batch flattened into one row, no
/// padding (`--padding-free`).
pub struct PaddingFreeSftObjective;

impl Objective for PaddingFreeSftObjective {
    type Item = EncodedRow;

    fn trainable(&self, item: &EncodedRow) -> bool {
        SftObjective.trainable(item)
    }

    fn weight(&self, item: &EncodedRow) -> f64 {
        SftObjective.weight(item)
    }

    fn forward_tokens(&self, item: &EncodedRow) -> usize {
        SftObjective.forward_tokens(item)
    }

    fn loss(
        &self,
        model: &LoadedModel,
        batch: &[&EncodedRow],
        dropout_seed: Option<u64>,
        step: usize,
    ) -> Result<ObjectiveLoss, TrainError> {
        let packed = PackedRow::from_rows(batch).map_err(|message| TrainError::Data { step, message })?;
        packed_loss(model, &[&packed], dropout_seed, step)
    }
}
