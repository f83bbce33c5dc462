//! Which records a run reads: dataset arguments in ms-swift's form
//! (`data.jsonl`, `data.jsonl#500` to sample 500 records), column renames
//! (`--columns old=new`), and a seeded train/validation split.

use std::path::PathBuf;

use crate::records::{read_records_lenient, DataError, Record};
use oxtune_engine::rng::SplitMix64;

/// One `--dataset` argument: a file and an optional sample size.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetSource {
    /// The JSONL or JSON-array file.
    pub path: PathBuf,
    /// `#N`: draw N records (all of them as often as N allows, the rest at
    /// random), as ms-swift does.
    pub sample: Option<usize>,
}

impl std::str::FromStr for DatasetSource {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.rsplit_once('#') {
            Some((path, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                let sample = n.parse().map_err(|e| format!("`{text}`: the sample size {n}: {e}"))?;
                Ok(DatasetSource { path: path.into(), sample: Some(sample) })
            }
            _ => Ok(DatasetSource { path: text.into(), sample: None }),
        }
    }
}

/// A record and the file it came from.
#[derive(Clone, Debug)]
pub struct SourcedRecord {
    /// The file.
    pub path: PathBuf,
    /// The record, columns renamed.
    pub record: Record,
}

impl SourcedRecord {
    /// `file:line`, for messages.
    pub fn at(&self) -> String {
        format!("{}:{}", self.path.display(), self.record.line)
    }
}

/// Parses `--columns` entries `old=new`.
pub fn parse_renames(entries: &[String]) -> Result<Vec<(String, String)>, String> {
    entries
        .iter()
        .map(|e| match e.split_once('=') {
            Some((old, new)) if !old.is_empty() && !new.is_empty() => Ok((old.to_owned(), new.to_owned())),
            _ => Err(format!("--columns `{e}`: write old=new")),
        })
        .collect()
}

/// Reads every source: good records (renamed, sampled) and the malformed
/// lines found on the way (for the caller to stop at or count).
pub fn read_sources(
    sources: &[DatasetSource],
    renames: &[(String, String)],
    seed: u64,
) -> Result<(Vec<SourcedRecord>, Vec<DataError>), DataError> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        let (mut records, errors) = read_records_lenient(&source.path)?;
        bad.extend(errors);
        for record in &mut records {
            rename(record, renames);
        }
        if let Some(n) = source.sample {
            let chosen = sample_indices(records.len(), n, seed.wrapping_add(i as u64));
            records = chosen.into_iter().map(|i| records[i].clone()).collect();
        }
        out.extend(records.into_iter().map(|record| SourcedRecord { path: source.path.clone(), record }));
    }
    Ok((out, bad))
}

/// Applies `--columns` renames (`old`, `new`) to a record.
pub fn rename(record: &mut Record, renames: &[(String, String)]) {
    for (old, new) in renames {
        if let Some(value) = record.value.remove(old) {
            record.value.insert(new.clone(), value);
        }
    }
}

/// `FILE#N` over a file of `len` records: the indices of `n` records —
/// every record as many whole times as fit, then a seeded random subset
/// without repetition, in file order (ms-swift's rule).
pub fn sample_indices(len: usize, n: usize, seed: u64) -> Vec<usize> {
    if len == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(n);
    while out.len() + len <= n {
        out.extend(0..len);
    }
    let mut rng = SplitMix64::new(seed);
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let rest = n - out.len();
    let mut chosen: Vec<usize> = order.into_iter().take(rest).collect();
    chosen.sort_unstable();
    out.extend(chosen);
    out
}

/// Splits `items` into (train, validation) with `ratio` of them (at least
/// one, if any) held out at seeded random positions.
pub fn split<T>(items: Vec<T>, ratio: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    if ratio <= 0.0 || items.len() < 2 {
        return (items, Vec::new());
    }
    let held = ((items.len() as f64 * ratio).round() as usize).clamp(1, items.len() - 1);
    let mut rng = SplitMix64::new(seed ^ 0x5EED_5EED);
    let mut order: Vec<usize> = (0..items.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let held_out: std::collections::HashSet<usize> = order.into_iter().take(held).collect();
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, item) in items.into_iter().enumerate() {
        if held_out.contains(&i) {
            eval.push(item);
        } else {
            train.push(item);
        }
    }
    (train, eval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_with_and_without_a_sample() {
        assert_eq!("a.jsonl#500".parse(), Ok(DatasetSource { path: "a.jsonl".into(), sample: Some(500) }));
        assert_eq!("dir#1/a.jsonl".parse(), Ok(DatasetSource { path: "dir#1/a.jsonl".into(), sample: None }));
    }

    #[test]
    fn sampling_repeats_whole_copies_then_draws_distinct_records() {
        let ten = sample_indices(4, 10, 7);
        assert_eq!(ten.len(), 10);
        assert_eq!(&ten[..8], &[0, 1, 2, 3, 0, 1, 2, 3]);
        assert_ne!(ten[8], ten[9]);
        let two = sample_indices(4, 2, 7);
        assert_eq!(two.len(), 2);
        assert_ne!(two[0], two[1]);
    }

    #[test]
    fn a_split_holds_out_the_ratio_and_keeps_every_item() {
        let (train, eval) = split((0..100).collect::<Vec<_>>(), 0.1, 3);
        assert_eq!((train.len(), eval.len()), (90, 10));
        let mut all: Vec<i32> = train.iter().chain(&eval).copied().collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }
}
