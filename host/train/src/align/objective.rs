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
use oxtune_engine::backend::{AuxOutputs, BatchInfo};
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
/// completions, and the forward pass's auxiliary outputs (a mixture of
/// experts' router loss, which the trainer adds for the policy as TRL
/// does with `output_router_logits`): from a right-padded batch, or, given `groups` (row
/// indices), from one row per group with its rows laid end to end,
/// positions restarting and attention kept within each (TRL's
/// `padding_free`, and packing).
fn logps(
    model: &LoadedModel,
    reference: Option<&Reference<'_>>,
    rows: &[&EncodedRow],
    groups: Option<&[Vec<usize>]>,
    dropout_seed: Option<u64>,
    step: usize,
) -> Result<(Tensor, Tensor, AuxOutputs), TrainError> {
    let compute = |cause| TrainError::Compute { step, source: cause };
    let (ids, labels, info, owners) = match groups {
        Some(groups) => {
            let packs = groups
                .iter()
                .map(|g| PackedRow::from_rows(&g.iter().map(|&i| rows[i]).collect::<Vec<_>>()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| compute(candle_core::Error::Msg(m)))?;
            let refs: Vec<&PackedRow> = packs.iter().collect();
            let (ids, labels, info) = collate_packed(&refs, dropout_seed, model.device()).map_err(compute)?;
            // Which row each predicted label belongs to: position t of pack g
            // predicts its token t + 1.
            let width = ids.dim(1).map_err(compute)?;
            let mut owners = vec![None; packs.len() * width.saturating_sub(1)];
            for (g, (pack, group)) in packs.iter().zip(groups).enumerate() {
                for (t, &segment) in pack.segment_ids.iter().enumerate().skip(1) {
                    owners[g * (width - 1) + t - 1] = Some(group[segment as usize]);
                }
            }
            (ids, labels, info, Some(owners))
        }
        None => {
            let (ids, labels, mask) = collate(rows, model.device()).map_err(compute)?;
            (ids, labels, BatchInfo { attention_mask: Some(mask), dropout_seed, ..Default::default() }, None)
        }
    };
    let out = match reference {
        None => model.label_logps(&ids, &info, &labels),
        Some(Reference::AdapterOff) => model.label_logps_without_adapter(&ids, &info, &labels),
        Some(Reference::Model(frozen)) => frozen.reference_label_logps(&ids, &info, &labels),
    }
    .map_err(Box::new)?;
    let (picked, label_mask, aux) = (out.logps, out.mask, out.aux);
    let (sum, count) = match &owners {
        Some(owners) => segment_logps(&picked, &label_mask, owners, rows.len()),
        None => completion_logps(&picked, &label_mask),
    }
    .map_err(compute)?;
    match reference {
        None => Ok((sum, count, aux)),
        Some(_) => Ok((sum.detach(), count, AuxOutputs::default())),
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

impl PairObjective<'_> {
    /// The method's loss over `pairs`, their rows laid out one per row or,
    /// with `groups` (indices of pairs), one row per group holding its
    /// pairs' chosen and rejected rows.
    fn pairs_loss(
        &self,
        model: &LoadedModel,
        pairs: &[&PreferencePair],
        groups: Option<&[Vec<usize>]>,
        dropout_seed: Option<u64>,
        step: usize,
    ) -> Result<ObjectiveLoss, TrainError> {
        let compute = |cause| TrainError::Compute { step, source: cause };
        let n = pairs.len();
        let rows: Vec<&EncodedRow> = pairs.iter().map(|p| &p.chosen).chain(pairs.iter().map(|p| &p.rejected)).collect();
        // Pair i's rows are i (chosen) and n + i (rejected): a group keeps them together.
        let row_groups: Option<Vec<Vec<usize>>> =
            groups.map(|groups| groups.iter().map(|g| g.iter().flat_map(|&i| [i, n + i]).collect()).collect());
        let row_groups = row_groups.as_deref();
        let (sum, count, aux) = logps(model, None, &rows, row_groups, dropout_seed, step)?;
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
            let (sum, ..) = logps(model, Some(&self.reference), &rows, row_groups, None, step)?;
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
        Ok(ObjectiveLoss { loss, tokens: rows.iter().map(|r| r.input_ids.len()).sum(), weight: n as f64, logged, aux })
    }
}

impl Objective for PairObjective<'_> {
    type Item = PreferencePair;

    fn trainable(&self, _item: &PreferencePair) -> bool {
        true
    }

    fn forward_tokens(&self, item: &PreferencePair) -> usize {
        2 * item.chosen.input_ids.len().max(item.rejected.input_ids.len())
    }

    fn loss(
        &self,
        model: &LoadedModel,
        batch: &[&PreferencePair],
        dropout_seed: Option<u64>,
        step: usize,
    ) -> Result<ObjectiveLoss, TrainError> {
        let one_row = [(0..batch.len()).collect::<Vec<usize>>()];
        let groups = self.padding_free.then_some(&one_row[..]);
        self.pairs_loss(model, batch, groups, dropout_seed, step)
    }
}

/// Preference pairs packed before training (`--packing`): each item is a
/// bin of whole pairs that fills a row of `--max-length` tokens.
pub struct PackedPairObjective<'a>(pub PairObjective<'a>);

impl Objective for PackedPairObjective<'_> {
    type Item = Vec<PreferencePair>;

    fn trainable(&self, item: &Vec<PreferencePair>) -> bool {
        !item.is_empty()
    }

    fn weight(&self, item: &Vec<PreferencePair>) -> f64 {
        item.len() as f64
    }

    fn forward_tokens(&self, item: &Vec<PreferencePair>) -> usize {
        item.iter().map(|p| p.chosen.input_ids.len() + p.rejected.input_ids.len()).sum()
    }

    fn loss(
        &self,
        model: &LoadedModel,
        batch: &[&Vec<PreferencePair>],
        dropout_seed: Option<u64>,
        step: usize,
    ) -> Result<ObjectiveLoss, TrainError> {
        let pairs: Vec<&PreferencePair> = batch.iter().flat_map(|bin| bin.iter()).collect();
        let mut groups = Vec::with_capacity(batch.len());
        let mut next = 0;
        for bin in batch {
            groups.push((next..next + bin.len()).collect());
            next += bin.len();
        }
        self.0.pairs_loss(model, &pairs, Some(&groups), dropout_seed, step)
    }
}

/// Bins whole pairs best-fit-decreasing into rows of `max_length` tokens
/// (a pair's chosen and rejected rows together); the too-long pair's index
/// when one does not fit alone.
pub fn pack_pairs(pairs: Vec<PreferencePair>, max_length: usize) -> Result<Vec<Vec<PreferencePair>>, usize> {
    let lengths: Vec<usize> = pairs.iter().map(|p| p.chosen.input_ids.len() + p.rejected.input_ids.len()).collect();
    let bins = oxtune_data::pack_best_fit_decreasing(&lengths, max_length)?;
    let mut slots: Vec<Option<PreferencePair>> = pairs.into_iter().map(Some).collect();
    Ok(bins.into_iter().map(|bin| bin.into_iter().filter_map(|i| slots[i].take()).collect()).collect())
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

    fn forward_tokens(&self, item: &LabelledCompletion) -> usize {
        item.row.input_ids.len()
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
        let (policy, _, aux) = logps(model, None, &rows, None, dropout_seed, step)?;
        let (reference, ..) = logps(model, Some(&self.reference), &rows, None, None, step)?;
        let split =
            |t: &Tensor| -> candle_core::Result<(Tensor, Tensor)> { Ok((t.narrow(0, 0, n)?, t.narrow(0, n, n)?)) };
        let (policy, kl_policy) = split(&policy).map_err(compute)?;
        let (reference, kl_reference) = split(&reference).map_err(compute)?;
        let desirable: Vec<bool> = batch.iter().map(|c| c.desirable).collect();
        let (loss, mut logged) =
            kto_loss(&self.method, &policy, &reference, &desirable, &kl_policy, &kl_reference).map_err(compute)?;
        let mean = policy.detach().mean(D::Minus1).and_then(|m| m.to_scalar::<f32>()).map_err(compute)?;
        logged.insert("logps/completions".to_owned(), mean as f64);
        Ok(ObjectiveLoss { loss, tokens: rows.iter().map(|r| r.input_ids.len()).sum(), weight: n as f64, logged, aux })
    }
}
