//! Tokenised datasets on disk: a dataset file's encoded rows, written once
//! by the streaming encoder into a cache folder named by a hash of
//! everything the encoding depends on, then read back by index through a
//! memory map. A run trains on more rows than fit in memory, and the next
//! run with the same file, tokenizer, template and cutting rules skips
//! encoding.
//!
//! An item is one or more token rows and a flag ([`CachedItem`]: an SFT
//! row; a preference pair's chosen and rejected rows; a KTO completion and
//! whether it is desirable). A cache entry is a folder `<root>/<key>/`
//! holding
//! - `rows.bin`: per item, its row count and flag (u32 each), each row's
//!   token count (u32), then each row's ids (u32) and labels (i32), all
//!   little-endian;
//! - `index.bin`: 16 bytes per item: its byte offset in `rows.bin` (u64),
//!   its token count over all rows (u32) and the record it came from (u32,
//!   0-based among the file's well-formed records, so `FILE#N` samples
//!   records as the in-memory path does);
//! - `meta.json`: the key's parts, the format version and what happened to
//!   the records (counts of records, rows, tokens, cut, dropped, skipped).
//!
//! An entry is written into `<key>.partial-<pid>` and renamed into place
//! when whole, so a folder named by its key is never half-written; a run
//! killed while encoding leaves only a partial folder, which is ignored
//! (and replaced by the next run's).

use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::items::Items;
use crate::preference::{LabelledCompletion, PreferencePair};
use crate::text::EncodedRow;

/// An encoded item a tokenised dataset holds: its token rows and a flag.
pub trait CachedItem: Sized {
    /// What the items are, part of the cache key (`rows`, `pairs`, ...).
    const KIND: &'static str;

    /// The item's rows, in order.
    fn rows(&self) -> Vec<&EncodedRow>;

    /// Its flag (KTO's desirable); `false` for items without one.
    fn flag(&self) -> bool {
        false
    }

    /// The item from its rows and flag, as [`rows`](CachedItem::rows) and
    /// [`flag`](CachedItem::flag) gave them.
    fn from_parts(rows: Vec<EncodedRow>, flag: bool) -> Self;
}

impl CachedItem for EncodedRow {
    const KIND: &'static str = "rows";

    fn rows(&self) -> Vec<&EncodedRow> {
        vec![self]
    }

    fn from_parts(mut rows: Vec<EncodedRow>, _: bool) -> Self {
        rows.swap_remove(0)
    }
}

impl CachedItem for PreferencePair {
    const KIND: &'static str = "pairs";

    fn rows(&self) -> Vec<&EncodedRow> {
        vec![&self.chosen, &self.rejected]
    }

    fn from_parts(rows: Vec<EncodedRow>, _: bool) -> Self {
        let [chosen, rejected]: [EncodedRow; 2] = rows.try_into().expect("a pair is stored as two rows");
        PreferencePair { chosen, rejected }
    }
}

impl CachedItem for LabelledCompletion {
    const KIND: &'static str = "labelled";

    fn rows(&self) -> Vec<&EncodedRow> {
        vec![&self.row]
    }

    fn flag(&self) -> bool {
        self.desirable
    }

    fn from_parts(mut rows: Vec<EncodedRow>, desirable: bool) -> Self {
        LabelledCompletion { row: rows.swap_remove(0), desirable }
    }
}

/// The on-disk format's version, part of every key.
pub const FORMAT_VERSION: u32 = 1;

const ROWS_FILE: &str = "rows.bin";
const INDEX_FILE: &str = "index.bin";
const META_FILE: &str = "meta.json";
const INDEX_ENTRY: usize = 16;

/// What names a cache entry: a JSON object of everything its rows depend
/// on, and its hash.
#[derive(Clone, Debug)]
pub struct CacheKey {
    parts: Value,
    hex: String,
}

impl CacheKey {
    /// The key of `parts` (the format version is added).
    pub fn new(mut parts: Value) -> CacheKey {
        use sha2::Digest;
        parts["format"] = json!(FORMAT_VERSION);
        let digest = sha2::Sha256::digest(parts.to_string().as_bytes());
        let hex = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        CacheKey { parts, hex }
    }

    /// The entry's folder name.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// What the key was made of.
    pub fn parts(&self) -> &Value {
        &self.parts
    }
}

/// An I/O error on a cache file, naming it.
#[derive(Debug, thiserror::Error)]
#[error("the tokenised dataset {path}: {message}")]
pub struct CacheError {
    /// The file or folder.
    pub path: PathBuf,
    /// What went wrong.
    pub message: String,
}

fn cache_error(path: &Path) -> impl Fn(std::io::Error) -> CacheError + '_ {
    move |e| CacheError { path: path.to_owned(), message: e.to_string() }
}

/// Writes one cache entry row by row; [`finish`](TokenisedWriter::finish)
/// moves it into place.
pub struct TokenisedWriter {
    partial: PathBuf,
    target: PathBuf,
    key: CacheKey,
    rows: std::io::BufWriter<std::fs::File>,
    index: std::io::BufWriter<std::fs::File>,
    offset: u64,
    count: usize,
    tokens: u64,
}

impl TokenisedWriter {
    /// Starts the entry of `key` under `root` (created if needed).
    pub fn create(root: &Path, key: CacheKey) -> Result<TokenisedWriter, CacheError> {
        let target = root.join(key.hex());
        let partial = root.join(format!("{}.partial-{}", key.hex(), std::process::id()));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(cache_error(&partial))?;
        let open = |name: &str| {
            let path = partial.join(name);
            std::fs::File::create(&path).map(std::io::BufWriter::new).map_err(cache_error(&path))
        };
        let (rows, index) = (open(ROWS_FILE)?, open(INDEX_FILE)?);
        Ok(TokenisedWriter { partial, target, key, rows, index, offset: 0, count: 0, tokens: 0 })
    }

    /// Appends an item of text rows that came from record `record`
    /// (0-based among the file's well-formed records). Rows with media are
    /// refused.
    pub fn push<T: CachedItem>(&mut self, item: &T, record: usize) -> Result<(), CacheError> {
        let rows = item.rows();
        if rows.iter().any(|r| r.media.is_some()) {
            return Err(CacheError {
                path: self.partial.clone(),
                message: "rows with images or videos are not cached".into(),
            });
        }
        let tokens: usize = rows.iter().map(|r| r.input_ids.len()).sum();
        let (Ok(len), Ok(record)) = (u32::try_from(tokens), u32::try_from(record)) else {
            return Err(CacheError { path: self.partial.clone(), message: "more than 2^32 tokens or records".into() });
        };
        let mut bytes = Vec::with_capacity(8 + 4 * rows.len() + tokens * 8);
        bytes.extend((rows.len() as u32).to_le_bytes());
        bytes.extend((item.flag() as u32).to_le_bytes());
        bytes.extend(rows.iter().flat_map(|r| (r.input_ids.len() as u32).to_le_bytes()));
        for row in &rows {
            bytes.extend(row.input_ids.iter().flat_map(|id| id.to_le_bytes()));
            // Labels are -100 or a vocabulary id, both within i32.
            bytes.extend(row.labels.iter().flat_map(|&l| (l as i32).to_le_bytes()));
        }
        let rows_path = self.partial.join(ROWS_FILE);
        self.rows.write_all(&bytes).map_err(cache_error(&rows_path))?;
        let mut entry = [0u8; INDEX_ENTRY];
        entry[..8].copy_from_slice(&self.offset.to_le_bytes());
        entry[8..12].copy_from_slice(&len.to_le_bytes());
        entry[12..].copy_from_slice(&record.to_le_bytes());
        let index_path = self.partial.join(INDEX_FILE);
        self.index.write_all(&entry).map_err(cache_error(&index_path))?;
        self.offset += bytes.len() as u64;
        self.count += 1;
        self.tokens += len as u64;
        Ok(())
    }

    /// Rows written so far.
    pub fn rows(&self) -> usize {
        self.count
    }

    /// Writes `meta.json` (the key's parts, the counts, and `summary`),
    /// syncs, moves the entry into place and opens it. When another run
    /// finished the same entry first, its entry is kept and this one dropped.
    pub fn finish(mut self, summary: Value) -> Result<TokenisedRows, CacheError> {
        let rows_path = self.partial.join(ROWS_FILE);
        let index_path = self.partial.join(INDEX_FILE);
        self.rows.flush().and_then(|_| self.rows.get_ref().sync_all()).map_err(cache_error(&rows_path))?;
        self.index.flush().and_then(|_| self.index.get_ref().sync_all()).map_err(cache_error(&index_path))?;
        let meta = json!({"key": self.key.parts(), "rows": self.count, "tokens": self.tokens, "summary": summary});
        let meta_path = self.partial.join(META_FILE);
        let text = serde_json::to_string_pretty(&meta).expect("JSON values serialise");
        std::fs::write(&meta_path, text).map_err(cache_error(&meta_path))?;
        if self.target.is_dir() {
            let _ = std::fs::remove_dir_all(&self.partial);
        } else {
            std::fs::rename(&self.partial, &self.target).map_err(cache_error(&self.target))?;
        }
        TokenisedRows::open(&self.target)?
            .ok_or_else(|| CacheError { path: self.target.clone(), message: "vanished after writing".into() })
    }
}

impl Drop for TokenisedWriter {
    /// An entry abandoned before [`finish`](TokenisedWriter::finish) (a bad
    /// record stopped encoding) leaves nothing behind.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.partial);
    }
}

/// One cache entry, open for reading (both files memory-mapped: nothing
/// per row is held in the process's own memory).
pub struct TokenisedRows {
    dir: PathBuf,
    rows: memmap2::Mmap,
    /// 16 bytes per row: byte offset, token count, record.
    index: memmap2::Mmap,
    meta: Value,
}

/// Maps `path` read-only.
fn map(path: &Path) -> Result<memmap2::Mmap, CacheError> {
    let file = std::fs::File::open(path).map_err(cache_error(path))?;
    // SAFETY: entries are written once into a partial folder and renamed
    // into place; oxtune never modifies a finished entry, and the map is
    // only read through bounds-checked slices.
    unsafe { memmap2::Mmap::map(&file) }.map_err(cache_error(path))
}

impl TokenisedRows {
    /// Opens the entry in `dir`; `None` when there is none (an entry is a
    /// folder with `meta.json`, which is written last).
    pub fn open(dir: &Path) -> Result<Option<TokenisedRows>, CacheError> {
        let meta_path = dir.join(META_FILE);
        if !meta_path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&meta_path).map_err(cache_error(&meta_path))?;
        let meta: Value =
            serde_json::from_str(&text).map_err(|e| CacheError { path: meta_path.clone(), message: e.to_string() })?;
        let (index, rows) = (map(&dir.join(INDEX_FILE))?, map(&dir.join(ROWS_FILE))?);
        let entry = TokenisedRows { dir: dir.to_owned(), rows, index, meta };
        let n = entry.index.len() / INDEX_ENTRY;
        let consistent = entry.meta["rows"].as_u64() == Some(n as u64)
            && entry.index.len() == n * INDEX_ENTRY
            && (n == 0 || entry.blob_end(n - 1) == Some(entry.rows.len()));
        if !consistent {
            let message = "its files disagree (delete the folder to encode again)".into();
            return Err(CacheError { path: dir.to_owned(), message });
        }
        Ok(Some(entry))
    }

    /// Where item `i`'s bytes end, from its header (`None` if the header
    /// lies outside the file).
    fn blob_end(&self, i: usize) -> Option<usize> {
        let (offset, tokens, _) = self.entry(i);
        let header = self.rows.get(offset as usize..offset as usize + 4)?;
        let rows = u32::from_le_bytes(header.try_into().expect("4 bytes")) as usize;
        Some(offset as usize + 8 + 4 * rows + 8 * tokens as usize)
    }

    /// Item `i`'s index entry: byte offset, token count, record.
    fn entry(&self, i: usize) -> (u64, u32, u32) {
        let e = &self.index[i * INDEX_ENTRY..(i + 1) * INDEX_ENTRY];
        let word = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        (u64::from_le_bytes(e[..8].try_into().expect("8 bytes")), word(&e[8..12]), word(&e[12..]))
    }

    /// The entry's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `meta.json`.
    pub fn meta(&self) -> &Value {
        &self.meta
    }

    /// How many rows it holds.
    pub fn len(&self) -> usize {
        self.index.len() / INDEX_ENTRY
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Item `i`'s token count (over all its rows).
    pub fn tokens(&self, i: usize) -> usize {
        self.entry(i).1 as usize
    }

    /// The record item `i` came from (0-based among the well-formed records).
    pub fn record(&self, i: usize) -> usize {
        self.entry(i).2 as usize
    }

    /// Item `i`, read from the map.
    pub fn item<T: CachedItem>(&self, i: usize) -> T {
        let start = self.entry(i).0 as usize;
        let word = |at: usize| u32::from_le_bytes(self.rows[at..at + 4].try_into().expect("4 bytes"));
        let (count, flag) = (word(start) as usize, word(start + 4) != 0);
        let mut at = start + 8 + 4 * count;
        let rows = (0..count)
            .map(|r| {
                let n = word(start + 8 + 4 * r) as usize;
                let (ids, labels) = self.rows[at..at + 8 * n].split_at(4 * n);
                at += 8 * n;
                let four = |b: &[u8]| <[u8; 4]>::try_from(b).expect("4 bytes");
                EncodedRow {
                    input_ids: ids.chunks_exact(4).map(|b| u32::from_le_bytes(four(b))).collect(),
                    labels: labels.chunks_exact(4).map(|b| i32::from_le_bytes(four(b)) as i64).collect(),
                    media: None,
                }
            })
            .collect();
        T::from_parts(rows, flag)
    }
}

/// Items picked from several cache entries, in a run's order (sampled,
/// split): what the trainer reads for a streamed dataset.
pub struct TokenisedItems<T> {
    entries: Arc<Vec<TokenisedRows>>,
    /// (entry, item) per item.
    picks: Vec<(u32, u32)>,
    kind: std::marker::PhantomData<fn() -> T>,
}

impl<T> TokenisedItems<T> {
    /// `picks` (entry, item) of `entries`.
    pub fn new(entries: Arc<Vec<TokenisedRows>>, picks: Vec<(u32, u32)>) -> TokenisedItems<T> {
        TokenisedItems { entries, picks, kind: std::marker::PhantomData }
    }

    /// Each item's token count (what packing bins by).
    pub fn lengths(&self) -> Vec<usize> {
        self.picks.iter().map(|&(e, r)| self.entries[e as usize].tokens(r as usize)).collect()
    }
}

impl<T: CachedItem + Clone> Items<T> for TokenisedItems<T> {
    fn len(&self) -> usize {
        self.picks.len()
    }

    fn get(&self, index: usize) -> Result<Cow<'_, T>, String> {
        let (entry, item) = self.picks[index];
        Ok(Cow::Owned(self.entries[entry as usize].item(item as usize)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_back_as_written_and_a_partial_entry_is_not_an_entry() {
        let root = std::env::temp_dir().join(format!("oxtune-tokenised-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let key = CacheKey::new(json!({"file": "a.jsonl"}));
        assert_ne!(key.hex(), CacheKey::new(json!({"file": "b.jsonl"})).hex());
        let rows = [
            EncodedRow { input_ids: vec![1, 2, 3], labels: vec![-100, 2, 3], media: None },
            EncodedRow { input_ids: vec![70000], labels: vec![70000], media: None },
        ];
        let mut writer = TokenisedWriter::create(&root, key.clone()).unwrap();
        writer.push(&rows[0], 0).unwrap();
        writer.push(&rows[1], 2).unwrap();
        assert!(TokenisedRows::open(&root.join(key.hex())).unwrap().is_none(), "not in place before finish");
        let entry = writer.finish(json!({"records": 3})).unwrap();
        assert_eq!((entry.len(), entry.tokens(0), entry.record(1)), (2, 3, 2));
        assert_eq!(entry.item::<EncodedRow>(0), rows[0]);
        assert_eq!(entry.item::<EncodedRow>(1), rows[1]);
        assert_eq!(entry.meta()["summary"]["records"], 3);
        let items = TokenisedItems::<EncodedRow>::new(Arc::new(vec![entry]), vec![(0, 1), (0, 0), (0, 1)]);
        assert_eq!(items.lengths(), vec![1, 3, 1]);
        assert_eq!(*items.get(1).unwrap(), rows[0]);
        // A finished entry whose files disagree is an error, not wrong rows.
        std::fs::write(root.join(key.hex()).join(INDEX_FILE), [0u8; 16]).unwrap();
        let err = TokenisedRows::open(&root.join(key.hex())).err().unwrap().to_string();
        assert!(err.contains("its files disagree"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn pairs_and_labelled_completions_read_back_whole() {
        let root = std::env::temp_dir().join(format!("oxtune-tokenised-items-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let row = |ids: &[u32]| EncodedRow {
            input_ids: ids.to_vec(),
            labels: ids.iter().map(|&i| if i < 3 { -100 } else { i as i64 }).collect(),
            media: None,
        };
        let pair = PreferencePair { chosen: row(&[1, 2, 5, 6]), rejected: row(&[1, 2, 7]) };
        let kto = [
            LabelledCompletion { row: row(&[1, 4]), desirable: true },
            LabelledCompletion { row: row(&[2, 9, 9]), desirable: false },
        ];
        let mut writer = TokenisedWriter::create(&root, CacheKey::new(json!({"kind": "pairs"}))).unwrap();
        writer.push(&pair, 0).unwrap();
        let pairs = writer.finish(json!({})).unwrap();
        let back: PreferencePair = pairs.item(0);
        assert_eq!((back.chosen, back.rejected, pairs.tokens(0)), (pair.chosen.clone(), pair.rejected.clone(), 7));
        let mut writer = TokenisedWriter::create(&root, CacheKey::new(json!({"kind": "labelled"}))).unwrap();
        for (i, item) in kto.iter().enumerate() {
            writer.push(item, i).unwrap();
        }
        let labelled = writer.finish(json!({})).unwrap();
        for (i, item) in kto.iter().enumerate() {
            let back: LabelledCompletion = labelled.item(i);
            assert_eq!((back.row, back.desirable), (item.row.clone(), item.desirable));
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
