//! Packing and padding-free rows, with ms-swift's and TRL's semantics:
//! samples are laid end to end in one row, never split; positions restart
//! at each sample; each sample is its own attention segment (the host's
//! attention never crosses one); and each sample's first label is masked,
//! so no sample is trained to predict from the one before it. Samples with
//! images or videos keep their media items and their M-RoPE positions,
//! restarted per sample on every axis.
//!
//! [`pack_best_fit_decreasing`] bins samples into rows of at most
//! `--max-length` tokens (`--packing`); [`PackedRow::from_rows`] lays out
//! one bin, or one micro-batch flattened (`--padding-free`).

use std::borrow::Cow;
use std::collections::BTreeMap;

use oxtune_engine::loss::IGNORE_INDEX;
use oxtune_engine::media::RowMedia;

use crate::items::Items;
use crate::text::EncodedRow;

/// Several samples in one row.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedRow {
    /// The samples' ids, end to end.
    pub input_ids: Vec<u32>,
    /// Their labels, each sample's first one masked.
    pub labels: Vec<i64>,
    /// Each token's position within its sample.
    pub position_ids: Vec<u32>,
    /// Each token's sample (0, 1, 2, ... along the row).
    pub segment_ids: Vec<u32>,
    /// With images or videos: the samples' media items in token order and
    /// every token's position on each axis (M-RoPE), restarting per sample
    /// (text samples count up on every axis).
    pub media: Option<RowMedia>,
}

impl PackedRow {
    /// `rows` laid end to end.
    pub fn from_rows(rows: &[&EncodedRow]) -> Result<PackedRow, String> {
        let mut packed = PackedRow {
            input_ids: Vec::new(),
            labels: Vec::new(),
            position_ids: Vec::new(),
            segment_ids: Vec::new(),
            media: None,
        };
        let axes = rows.iter().find_map(|r| r.media.as_ref()).map(|m| m.positions.len());
        let mut media =
            axes.map(|axes| RowMedia { items: Vec::new(), positions: vec![Vec::new(); axes], sources: None });
        // Released pixels are read again from every sample's files, in order.
        let released = rows.iter().filter_map(|r| r.media.as_ref()).map(|m| m.sources.is_some()).collect::<Vec<_>>();
        if released.contains(&true) && released.contains(&false) {
            return Err("samples with held and released pixels cannot share a packed row".into());
        }
        for (segment, row) in rows.iter().enumerate() {
            let start = packed.labels.len();
            let len = row.input_ids.len();
            packed.input_ids.extend(&row.input_ids);
            packed.labels.extend(&row.labels);
            if let Some(first) = packed.labels.get_mut(start) {
                *first = IGNORE_INDEX;
            }
            packed.position_ids.extend(0..len as u32);
            packed.segment_ids.extend(std::iter::repeat_n(segment as u32, len));
            let Some(merged) = media.as_mut() else { continue };
            match &row.media {
                Some(m) if m.positions.len() != merged.positions.len() => {
                    return Err("samples with different position axes cannot share a packed row".into());
                }
                Some(m) => {
                    for (axis, positions) in merged.positions.iter_mut().zip(&m.positions) {
                        axis.extend(positions);
                    }
                    merged.items.extend(m.items.iter().cloned());
                    if let Some((refs, options)) = &m.sources {
                        let (all, merged_options) = merged.sources.get_or_insert_with(|| (Vec::new(), options.clone()));
                        if merged_options != options {
                            return Err(
                                "samples prepared with different media options cannot share a packed row".into()
                            );
                        }
                        all.extend(refs.iter().cloned());
                    }
                }
                None => merged.positions.iter_mut().for_each(|axis| axis.extend(0..len as u32)),
            }
        }
        packed.media = media;
        Ok(packed)
    }

    /// How many samples it holds.
    pub fn samples(&self) -> usize {
        self.segment_ids.last().map_or(0, |&s| s as usize + 1)
    }

    /// Labelled tokens (those the loss is taken on).
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Bins items of `lengths` into bins of at most `capacity`, best fit
/// decreasing: longest first, each into the fullest bin it still fits
/// (a new bin when none does). Returns each bin's item indices, longest
/// first; an item longer than `capacity` is an error naming it.
pub fn pack_best_fit_decreasing(lengths: &[usize], capacity: usize) -> Result<Vec<Vec<usize>>, usize> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    // Free space → the bins with that much room left.
    let mut by_room: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in order {
        let length = lengths[i];
        if length > capacity {
            return Err(i);
        }
        let fit = by_room.range(length..).next().map(|(&room, _)| room);
        let bin = match fit {
            Some(room) => {
                let list = by_room.get_mut(&room).expect("found above");
                let bin = list.pop().expect("lists are never left empty");
                if list.is_empty() {
                    by_room.remove(&room);
                }
                by_room.entry(room - length).or_default().push(bin);
                bin
            }
            None => {
                bins.push(Vec::new());
                by_room.entry(capacity - length).or_default().push(bins.len() - 1);
                bins.len() - 1
            }
        };
        bins[bin].push(i);
    }
    Ok(bins)
}

/// `rows` packed into rows of at most `max_length` tokens.
pub fn pack_rows(rows: &[EncodedRow], max_length: usize) -> Result<Vec<PackedRow>, String> {
    let lengths: Vec<usize> = rows.iter().map(|r| r.input_ids.len()).collect();
    let packed = PackedItems::new(rows, &lengths, max_length)?;
    (0..packed.len()).map(|i| packed.get(i).map(Cow::into_owned)).collect()
}

/// Rows binned up front by their lengths and laid end to end as they are
/// read: packing a dataset on disk holds only its bins in memory.
pub struct PackedItems<'a, S: ?Sized> {
    rows: &'a S,
    bins: Vec<Vec<usize>>,
}

impl<'a, S: Items<EncodedRow> + ?Sized> PackedItems<'a, S> {
    /// Bins `rows` (whose token counts are `lengths`) into rows of at most
    /// `max_length` tokens, best fit decreasing.
    pub fn new(rows: &'a S, lengths: &[usize], max_length: usize) -> Result<Self, String> {
        let bins = pack_best_fit_decreasing(lengths, max_length)
            .map_err(|i| format!("a row of {} tokens is longer than --max-length {max_length}", lengths[i]))?;
        Ok(PackedItems { rows, bins })
    }

    /// Samples packed (the rows binned).
    pub fn samples(&self) -> usize {
        self.bins.iter().map(Vec::len).sum()
    }
}

impl<S: Items<EncodedRow> + ?Sized> Items<PackedRow> for PackedItems<'_, S> {
    fn len(&self) -> usize {
        self.bins.len()
    }

    fn get(&self, index: usize) -> Result<Cow<'_, PackedRow>, String> {
        let rows = self.bins[index].iter().map(|&i| self.rows.get(i)).collect::<Result<Vec<_>, _>>()?;
        PackedRow::from_rows(&rows.iter().map(|r| r.as_ref()).collect::<Vec<_>>()).map(Cow::Owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ids: &[u32], labels: &[i64]) -> EncodedRow {
        EncodedRow { input_ids: ids.to_vec(), labels: labels.to_vec(), media: None }
    }

    #[test]
    fn best_fit_decreasing_fills_bins_and_never_splits() {
        let lengths = [7, 5, 4, 3, 2, 2, 1];
        let bins = pack_best_fit_decreasing(&lengths, 8).unwrap();
        // 7+1, 5+3, 4+2+2: three full bins.
        let sums: Vec<usize> = bins.iter().map(|b| b.iter().map(|&i| lengths[i]).sum()).collect();
        assert_eq!(sums, vec![8, 8, 8]);
        let mut all: Vec<usize> = bins.concat();
        all.sort();
        assert_eq!(all, (0..lengths.len()).collect::<Vec<_>>(), "every item exactly once");
        assert_eq!(pack_best_fit_decreasing(&[3, 9], 8), Err(1), "too long an item is named");
    }

    #[test]
    fn packed_rows_restart_positions_and_mask_each_first_label() {
        let (a, b) = (row(&[5, 6, 7], &[-100, 6, 7]), row(&[8, 9], &[8, 9]));
        let packed = PackedRow::from_rows(&[&a, &b]).unwrap();
        assert_eq!(packed.input_ids, vec![5, 6, 7, 8, 9]);
        assert_eq!(packed.labels, vec![-100, 6, 7, -100, 9]);
        assert_eq!(packed.position_ids, vec![0, 1, 2, 0, 1]);
        assert_eq!(packed.segment_ids, vec![0, 0, 0, 1, 1]);
        assert_eq!((packed.samples(), packed.trained_tokens()), (2, 3));
    }
}
