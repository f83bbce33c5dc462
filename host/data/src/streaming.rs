//! Datasets larger than memory (`--streaming`): each dataset file is read
//! one record at a time, encoded on every core in chunks, and written in
//! order to a tokenised dataset on disk ([`crate::tokenised`]), which the
//! trainer then reads by index. Memory stays bounded by a chunk of records
//! whatever the file's length; the rows, their order, sampling (`FILE#N`)
//! and the held-out split are those of the in-memory path, so a streamed
//! run trains exactly what an in-memory run would.
//!
//! The entry is named by a hash of the file (path, size, modification
//! time), the tokenizer, template and end-of-sequence ids, what the
//! records become (SFT or pretraining rows, preference pairs, KTO
//! completions), column renames, the dataset adapters, `--max-length`, the truncation
//! rule and the model's vocabulary; the next run with the same key reuses
//! it without reading the file (ms-swift's `--load-from-cache-file`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use serde_json::json;

use crate::encoder::{cut, Cut, Encoded, Encoder};
use crate::error::EncodeError;
use crate::records::{DataError, RawRecord, RecordReader};
use crate::sources::{rename, sample_indices, split, DatasetSource, SourcedRecord};
use crate::tokenised::{CacheError, CacheKey, CachedItem, TokenisedItems, TokenisedRows, TokenisedWriter};

/// Records handed to the encoding threads at a time: bounds memory, and
/// is large enough to keep every core busy.
const CHUNK_RECORDS: usize = 4096;

/// How a streamed dataset is encoded and kept.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// Where tokenised datasets are kept (one folder per key).
    pub cache_dir: PathBuf,
    /// Reuse a tokenised dataset of the same key; `false` encodes again
    /// (and replaces it).
    pub reuse: bool,
    /// Encoding threads.
    pub threads: usize,
    /// Show a progress bar while encoding (on a terminal).
    pub progress: bool,
}

impl StreamOptions {
    /// The default cache folder: `datasets` in oxtune's user folder
    /// (`$OXTUNE_HOME`, default `~/.oxtune`, where plugins are found too).
    pub fn default_cache_dir() -> PathBuf {
        let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let home = env("OXTUNE_HOME").or_else(|| env("HOME").map(|h| h.join(".oxtune")));
        home.unwrap_or_else(|| std::env::temp_dir().join("oxtune")).join("datasets")
    }
}

/// What happened to one dataset file.
#[derive(Clone, Debug)]
pub struct FileReport {
    /// The dataset file.
    pub path: PathBuf,
    /// Its tokenised dataset.
    pub entry: PathBuf,
    /// Whether an existing tokenised dataset was reused (nothing encoded).
    pub reused: bool,
    /// Well-formed records in the file.
    pub records: usize,
    /// Rows encoded from them (items: a preference pair counts once).
    pub rows: usize,
    /// Tokens over all its rows.
    pub tokens: usize,
    /// Rows cut to `--max-length`.
    pub truncated: usize,
    /// Records dropped as too long.
    pub deleted: usize,
    /// Records skipped as bad (with `--skip-bad-records`).
    pub skipped: usize,
    /// The first skipped record's error.
    pub first_skipped: Option<String>,
    /// Seconds spent encoding (0 when reused).
    pub seconds: f64,
}

/// A streamed run's items, read from disk as the trainer asks for them.
pub struct Streamed<T> {
    /// Training items.
    pub train: TokenisedItems<T>,
    /// Evaluation items (from the validation files or the held-out share).
    pub eval: TokenisedItems<T>,
    /// One report per distinct dataset file.
    pub files: Vec<FileReport>,
}

/// How one raw record turned out.
enum Outcome<T> {
    /// Not a well-formed record (does not count as one).
    Malformed(DataError),
    /// A record the encoder refused.
    Failed(EncodeError),
    /// A record too long for `--max-length`, dropped.
    Deleted,
    /// The item, and whether it was cut.
    Item(T, bool),
}

impl Encoder<'_> {
    /// Encodes the run's training and evaluation files with `encode` into
    /// tokenised datasets under `stream.cache_dir` (or reuses them) and
    /// returns the items in the order the in-memory [`Encoder::prepare`]
    /// would give. `what` names the encoding in the cache key (`sft`,
    /// `pt`, `dpo`, ...). Text rows only: a row with images or videos is an
    /// error naming it.
    pub fn prepare_streamed<T: Encoded + CachedItem + Send>(
        &self,
        what: &str,
        encode: impl Fn(&Self, &SourcedRecord) -> Result<T, EncodeError> + Sync,
        stream: &StreamOptions,
    ) -> Result<Streamed<T>, EncodeError> {
        let options = self.options;
        let text = self.assets.fingerprint();
        let mut entries: Vec<TokenisedRows> = Vec::new();
        let mut files: Vec<FileReport> = Vec::new();
        let mut picks_of = |sources: &[DatasetSource]| -> Result<Vec<(u32, u32)>, EncodeError> {
            let mut picks = Vec::new();
            for (i, source) in sources.iter().enumerate() {
                let key = self.cache_key(&source.path, &format!("{what} {}", T::KIND), &text)?;
                let found = entries.iter().position(|e| e.dir().file_name() == Some(key.hex().as_ref()));
                let at = match found {
                    Some(at) => at,
                    None => {
                        let (entry, report) = self.open_or_encode(&source.path, key, &encode, stream)?;
                        entries.push(entry);
                        files.push(report);
                        entries.len() - 1
                    }
                };
                let entry = &entries[at];
                let report = files.iter().find(|f| f.entry == entry.dir()).expect("reported above");
                if !options.skip_bad_records {
                    if let Some(first) = &report.first_skipped {
                        bail!(
                            "{first} (the tokenised dataset {} skipped it; --skip-bad-records)",
                            entry.dir().display()
                        );
                    }
                }
                let rows_of_records = |records: &mut dyn Iterator<Item = usize>| {
                    let mut row_of = vec![u32::MAX; report.records];
                    for row in 0..entry.len() {
                        row_of[entry.record(row)] = row as u32;
                    }
                    records.filter(|&r| row_of[r] != u32::MAX).map(|r| (at as u32, row_of[r])).collect::<Vec<_>>()
                };
                match source.sample {
                    Some(n) => {
                        let chosen = sample_indices(report.records, n, options.seed.wrapping_add(i as u64));
                        picks.extend(rows_of_records(&mut chosen.into_iter()));
                    }
                    None => {
                        picks.reserve_exact(entry.len());
                        picks.extend((0..entry.len() as u32).map(|row| (at as u32, row)));
                    }
                }
            }
            Ok(picks)
        };
        let train = picks_of(&options.dataset)?;
        let (train, eval) = if options.val_dataset.is_empty() {
            split(train, options.split_ratio, options.seed)
        } else {
            (train, picks_of(&options.val_dataset)?)
        };
        if train.is_empty() {
            bail!("no training row is left (every record was skipped, dropped as too long, or held out)");
        }
        let entries = Arc::new(entries);
        Ok(Streamed {
            train: TokenisedItems::new(entries.clone(), train),
            eval: TokenisedItems::new(entries, eval),
            files,
        })
    }

    /// The key of `path`'s tokenised dataset under this encoder (`text`:
    /// the tokenizer and template's [`fingerprint`](crate::TextAssets::fingerprint)).
    fn cache_key(&self, path: &Path, what: &str, text: &str) -> Result<CacheKey, EncodeError> {
        let meta = std::fs::metadata(path).map_err(|source| DataError::Io { path: path.to_owned(), source })?;
        let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        let adapters: Vec<String> = self
            .registry
            .components()
            .iter()
            .filter(|c| c.kind() == oxtune_registry::ComponentKind::DatasetAdapter)
            .map(|c| format!("{} {}", c.name(), c.version()))
            .collect();
        let options = self.options;
        Ok(CacheKey::new(json!({
            "file": std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()),
            "size": meta.len(),
            "modified_ns": modified.map(|d| d.as_nanos().to_string()),
            "items": what,
            "text": text,
            "vocab_rows": self.model.vocab_size(),
            "renames": options.renames,
            "dataset_adapter": options.dataset_adapter,
            "adapters": adapters,
            "max_length": options.max_length,
            "truncation": options.truncation.as_str(),
        })))
    }

    fn open_or_encode<T: Encoded + CachedItem + Send>(
        &self,
        path: &Path,
        key: CacheKey,
        encode: &(impl Fn(&Self, &SourcedRecord) -> Result<T, EncodeError> + Sync),
        stream: &StreamOptions,
    ) -> Result<(TokenisedRows, FileReport), EncodeError> {
        let dir = stream.cache_dir.join(key.hex());
        if stream.reuse {
            if let Some(entry) = TokenisedRows::open(&dir).map_err(cache_failed)? {
                let report = report_of(path, &entry, true, 0.0);
                return Ok((entry, report));
            }
        } else if dir.is_dir() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| cache_failed(CacheError { path: dir.clone(), message: e.to_string() }))?;
        }
        let started = Instant::now();
        let entry = self.encode_file(path, key, encode, stream)?;
        let report = report_of(path, &entry, false, started.elapsed().as_secs_f64());
        Ok((entry, report))
    }

    /// Reads `path` a chunk at a time, encodes each chunk on `stream.threads`
    /// threads and writes its rows in file order.
    fn encode_file<T: Encoded + CachedItem + Send>(
        &self,
        path: &Path,
        key: CacheKey,
        encode: &(impl Fn(&Self, &SourcedRecord) -> Result<T, EncodeError> + Sync),
        stream: &StreamOptions,
    ) -> Result<TokenisedRows, EncodeError> {
        let options = self.options;
        let mut reader = RecordReader::open(path)?;
        let mut writer = TokenisedWriter::create(&stream.cache_dir, key).map_err(cache_failed)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(stream.threads.max(1))
            .build()
            .map_err(|e| EncodeError::Invalid(format!("encoding threads: {e}")))?;
        let bar = progress_bar(stream.progress, path);
        let (mut records, mut truncated, mut deleted) = (0usize, 0usize, 0usize);
        let (mut skipped, mut first_skipped) = (0usize, None::<String>);
        loop {
            let chunk: Vec<RawRecord> = (&mut reader).take(CHUNK_RECORDS).collect::<Result<_, _>>()?;
            if chunk.is_empty() {
                break;
            }
            let read = chunk.len();
            let outcomes: Vec<Outcome<T>> =
                pool.install(|| chunk.into_par_iter().map(|raw| self.encode_raw(raw, encode)).collect());
            for outcome in outcomes {
                let failure = match outcome {
                    Outcome::Malformed(e) => EncodeError::Read(e),
                    Outcome::Failed(e) => {
                        records += 1;
                        e
                    }
                    Outcome::Deleted => {
                        records += 1;
                        deleted += 1;
                        continue;
                    }
                    Outcome::Item(item, was_cut) => {
                        writer.push(&item, records).map_err(cache_failed)?;
                        records += 1;
                        truncated += was_cut as usize;
                        continue;
                    }
                };
                if !options.skip_bad_records {
                    return Err(failure);
                }
                skipped += 1;
                first_skipped.get_or_insert_with(|| oxtune_engine::error_chain(&failure));
            }
            if let Some(bar) = &bar {
                bar.inc(read as u64);
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let summary = json!({
            "file": path, "records": records, "truncated": truncated, "deleted": deleted,
            "skipped": skipped, "first_skipped": first_skipped,
        });
        writer.finish(summary).map_err(cache_failed)
    }

    /// One record through parsing, renaming, encoding and cutting.
    fn encode_raw<T: Encoded + CachedItem>(
        &self,
        raw: RawRecord,
        encode: &impl Fn(&Self, &SourcedRecord) -> Result<T, EncodeError>,
    ) -> Outcome<T> {
        let path = raw.path().to_owned();
        let mut record = match raw.parse() {
            Ok(record) => record,
            Err(e) => return Outcome::Malformed(e),
        };
        rename(&mut record, &self.options.renames);
        let sourced = SourcedRecord { path, record };
        let failed = |e: EncodeError| Outcome::Failed(EncodeError::Record { at: sourced.at(), source: Box::new(e) });
        let mut item = match encode(self, &sourced) {
            Ok(item) if item.rows().iter().any(|r| r.media.is_some()) => {
                return failed(EncodeError::Invalid("--streaming encodes text rows, and this row has media".into()))
            }
            Ok(item) => item,
            Err(e) => return failed(e),
        };
        match cut(&mut item, self.options.max_length, self.options.truncation) {
            Cut::Kept => Outcome::Item(item, false),
            Cut::Truncated => Outcome::Item(item, true),
            Cut::Deleted => Outcome::Deleted,
        }
    }
}

fn cache_failed(e: CacheError) -> EncodeError {
    EncodeError::Invalid(e.to_string())
}

fn report_of(path: &Path, entry: &TokenisedRows, reused: bool, seconds: f64) -> FileReport {
    let summary = &entry.meta()["summary"];
    let count = |key: &str| summary[key].as_u64().unwrap_or(0) as usize;
    FileReport {
        path: path.to_owned(),
        entry: entry.dir().to_owned(),
        reused,
        records: count("records"),
        rows: entry.len(),
        tokens: entry.meta()["tokens"].as_u64().unwrap_or(0) as usize,
        truncated: count("truncated"),
        deleted: count("deleted"),
        skipped: count("skipped"),
        first_skipped: summary["first_skipped"].as_str().map(str::to_owned),
        seconds,
    }
}

fn progress_bar(show: bool, path: &Path) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !show || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    let style =
        indicatif::ProgressStyle::with_template("{spinner} encoding {msg}: {human_pos} records [{elapsed}, {per_sec}]")
            .expect("the template is valid");
    bar.set_style(style);
    bar.set_message(path.display().to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    Some(bar)
}
