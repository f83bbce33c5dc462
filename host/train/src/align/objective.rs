//! The preference objectives for the shared training loop: each micro-batch
//! runs the policy once over its chosen and rejected rows together (and,
//! for methods with one, the reference: the base model with the adapter
//! switched off, or a frozen copy for full fine-tuning), then applies the
//! method's loss.

use candle_core::{Tensor, D};

use super::logps::{completion_logps, segment_logps};
use super::losses::{kto_loss, pair_loss, KtoLoss, PairInputs, PairLoss};
use crate::objective::{collate, collate_packed};
use crate::{Objective, ObjectiveLoss, TrainError};
use oxtune_data::packing::PackedRow;
use oxtune_data::preference::{join, split_prompt, LabelledCompletion, PreferencePair};
use oxtune_data::text::EncodedRow;
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::loss::IGNORE_INDEX;
use oxtune_engine::model::LoadedModel;

/// Where reference log-probabilities come from.
pub enum Reference<'a> {
    /// The trained model with its adapter switched off (LoRA and friends).
    AdapterOff,
    /// A separate frozen model (full fine-tuning).
    Model(&'a LoadedModel),
}

/// Summed log-probabilities `[n]` and token counts `[n]` of `rows`'
/// completions: from a right-padded batch, or (`padding_free`) from the
/// rows laid end to end in one row, positions restarting and attention
/// kept within each (TRL's `padding_free`).
fn logps(
    model: &LoadedModel,
    reference: Option<&Reference<'_>>,
    rows: &[&EncodedRow],
    dropout_seed: Option<u64>,
    padding_free: bool,
    step: usize,
) -> Result<(Tensor, Tensor), TrainError> {
    let compute = |cause| TrainError::Compute { step, source: cause };
    let (ids, labels, info, segments) = if padding_free {
        let packed = PackedRow::from_rows(rows).map_err(|m| compute(candle_core::Error::Msg(m)))?;
        let (ids, labels, info) = collate_packed(&[&packed], dropout_seed, model.device()).map_err(compute)?;
        (ids, labels, info, Some(packed.segment_ids))
    } else {
        let (ids, labels, mask) = collate(rows, model.device()).map_err(compute)?;
        (ids, labels, BatchInfo { attention_mask: Some(mask), dropout_seed, ..Default::default() }, None)
    };
    let (picked, label_mask) = match reference {
        None => model.label_logps(&ids, &info, &labels),
        Some(Reference::AdapterOff) => model.label_logps_without_adapter(&ids, &info, &labels),
        Some(Reference::Model(frozen)) => frozen.label_logps(&ids, &info, &labels),
    }
    .map_err(Box::new)?;
    let (sum, count) = match &segments {
        Some(segments) => segment_logps(&picked, &label_mask, segments, rows.len()),
        None => completion_logps(&picked, &label_mask),
    }
    .map_err(compute)?;
    match reference {
        None => Ok((sum, count)),
        Some(_) => Ok((sum.detach(), count)),
    }
}

/// A pairwise preference method (DPO and variants, CPO, SimPO, ORPO).
pub struct PairObjective<'a> {
    /// The method and its knobs.
    pub method: PairLoss,
    /// The reference, for methods that compare with one.
    pub reference: Reference<'a>,
    /// Each micro-batch's chosen and rejected rows laid end to end in one
    /// row (`--padding-free`), no padding computed.
    pub padding_free: bool,
}

impl Objective for PairObjective<'_> {
    type Item = PreferencePair;

    fn trainable(&self, _item: &PreferencePair) -> bool {
        true
    }

    fn loss(
        &self,
        model: &LoadedModel,
        batch: &[&PreferencePair],
        dropout_seed: Option<u64>,
        step: usize,
    ) -> Result<ObjectiveLoss, TrainError> {
        let compute = |cause| TrainError::Compute { step, source: cause };
        let n = batch.len();
        let rows: Vec<&EncodedRow> = batch.iter().map(|p| &p.chosen).chain(batch.iter().map(|p| &p.rejected)).collect();
        let (sum, count) = logps(model, None, &rows, dropout_seed, self.padding_free, step)?;
        // NLL of the chosen tokens, over all of them (TRL's `nll_loss`).
        let chosen_nll = (sum.narrow(0, 0, n).and_then(|s| s.sum_all()).map_err(compute)?.neg().map_err(compute)?
            / count.narrow(0, 0, n).and_then(|c| c.sum_all()?.to_scalar::<f32>()).map_err(compute)? as f64)
            .map_err(compute)?;
        let per_pair = |values: &Tensor| -> candle_core::Result<Tensor> {
            if self.method.averages_logps() {
                values / &count
            } else {
                Ok(values.clone())
            }
        };
        let policy = per_pair(&sum).map_err(compute)?;
        let reference = if self.method.needs_reference() {
            let (sum, _) = logps(model, Some(&self.reference), &rows, None, self.padding_free, step)?;
            Some(per_pair(&sum).map_err(compute)?)
        } else {
            None
        };
        let split =
            |t: &Tensor| -> candle_core::Result<(Tensor, Tensor)> { Ok((t.narrow(0, 0, n)?, t.narrow(0, n, n)?)) };
        let (chosen, rejected) = split(&policy).map_err(compute)?;
        let reference = reference.as_ref().map(split).transpose().map_err(compute)?;
        let inputs = PairInputs {
            chosen: &chosen,
            rejected: &rejected,
            reference: reference.as_ref().map(|(c, r)| (c, r)),
            chosen_nll: &chosen_nll,
        };
        let (loss, logged) = pair_loss(&self.method, &inputs).map_err(compute)?;
        Ok(ObjectiveLoss { loss, tokens: rows.iter().map(|r| r.input_ids.len()).sum(), weight: n as f64, logged })
    }
}

/// KTO over labelled completions.
pub struct KtoObjective<'a> {
    /// β and the class weights.
    pub method: KtoLoss,
    /// The reference model.
    pub reference: Reference<'a>,
}

impl Objective for KtoObjective<'_> {
    type Item = LabelledCompletion;

    fn trainable(&self, item: &LabelledCompletion) -> bool {
        item.row.labels.iter().any(|&l| l != IGNORE_INDEX)
    }

    fn loss(
        &self,
        model: &LoadedModel,
        batch: &[&LabelledCompletion],
        dropout_seed: Option<u64>,
        step: usize,
    ) -> Result<ObjectiveLoss, TrainError> {
        let compute = |cause| TrainError::Compute { step, source: cause };
        let n = batch.len();
        if n < 2 {
            return Err(TrainError::Setup(
                "KTO needs batches of at least 2 rows (its KL estimate pairs each prompt with another row's completion): \
                 raise --per-device-train-batch-size"
                    .into(),
            ));
        }
        // Mismatched pairs for the KL estimate: prompt i with completion i+1.
        let mismatched: Vec<EncodedRow> = (0..n)
            .map(|i| {
                let (prompt, _) = split_prompt(&batch[i].row);
                let (_, completion) = split_prompt(&batch[(i + 1) % n].row);
                join(prompt, completion)
            })
            .collect();
        let rows: Vec<&EncodedRow> = batch.iter().map(|c| &c.row).chain(mismatched.iter()).collect();
        let (policy, _) = logps(model, None, &rows, dropout_seed, false, step)?;
        let (reference, _) = logps(model, Some(&self.reference), &rows, None, false, step)?;
        let split =
            |t: &Tensor| -> candle_core::Result<(Tensor, Tensor)> { Ok((t.narrow(0, 0, n)?, t.narrow(0, n, n)?)) };
        let (policy, kl_policy) = split(&policy).map_err(compute)?;
        let (reference, kl_reference) = split(&reference).map_err(compute)?;
        let desirable: Vec<bool> = batch.iter().map(|c| c.desirable).collect();
        let (loss, mut logged) =
            kto_loss(&self.method, &policy, &reference, &desirable, &kl_policy, &kl_reference).map_err(compute)?;
        let mean = policy.detach().mean(D::Minus1).and_then(|m| m.to_scalar::<f32>()).map_err(compute)?;
        logged.insert("logps/completions".to_owned(), mean as f64);
        Ok(ObjectiveLoss { loss, tokens: rows.iter().map(|r| r.input_ids.len()).sum(), weight: n as f64, logged })
    }
}
