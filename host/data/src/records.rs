//! Reading datasets: JSONL files and JSON-array files of records, with
//! every error naming the file and the line (or record) at fault.

use std::path::{Path, PathBuf};

/// One record of a dataset file and where it came from.
#[derive(Clone, Debug)]
pub struct Record {
    /// 1-based line in a JSONL file, or 1-based index in a JSON array.
    pub line: usize,
    /// The record.
    pub value: serde_json::Map<String, serde_json::Value>,
}

/// A malformed dataset file or record.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A record is malformed.
    #[error("{path}:{line}: {message}")]
    Record {
        /// The file.
        path: PathBuf,
        /// Its line (JSONL) or record number (JSON array).
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Reads a `.jsonl` file (one object per line; blank lines skipped) or a
/// `.json` file holding an array of objects, stopping at the first bad record.
pub fn read_records(path: &Path) -> Result<Vec<Record>, DataError> {
    let (records, mut bad) = read_records_lenient(path)?;
    match bad.is_empty() {
        true => Ok(records),
        false => Err(bad.swap_remove(0)),
    }
}

/// Like [`read_records`], but a malformed line is returned as an error
/// beside the good records instead of stopping the read (an unreadable
/// file or a malformed JSON array still fails as a whole).
pub fn read_records_lenient(path: &Path) -> Result<(Vec<Record>, Vec<DataError>), DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_owned(), source })?;
    let bad = |line: usize, message: String| DataError::Record { path: path.to_owned(), line, message };
    let object = |line: usize, value: serde_json::Value| match value {
        serde_json::Value::Object(map) => Ok(Record { line, value: map }),
        other => Err(bad(line, format!("a record must be a JSON object, found {}", kind(&other)))),
    };
    let starts_array = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    let results: Vec<Result<Record, DataError>> = if starts_array {
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            let line = 1 + bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count();
            bad(line, format!("not valid UTF-8 (byte {} of the file)", e.valid_up_to()))
        })?;
        let values: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|e| bad(e.line(), e.to_string()))?;
        values.into_iter().enumerate().map(|(i, v)| object(i + 1, v)).collect()
    } else {
        // Line by line, so one line that is not UTF-8 is one bad record.
        bytes
            .split(|&b| b == b'\n')
            .enumerate()
            .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l)))
            .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
            .map(|(line, l)| {
                let text = std::str::from_utf8(l).map_err(|e| {
                    bad(line, format!("the line is not valid UTF-8 (byte {} of the line)", e.valid_up_to()))
                })?;
                object(line, serde_json::from_str(text).map_err(|e| bad(line, e.to_string()))?)
            })
            .collect()
    };
    let (mut records, mut errors) = (Vec::new(), Vec::new());
    for r in results {
        match r {
            Ok(record) => records.push(record),
            Err(e) => errors.push(e),
        }
    }
    Ok((records, errors))
}

fn kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_line() {
        let dir = std::env::temp_dir().join(format!("oxtune-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.jsonl");
        std::fs::write(&path, "{\"text\": \"a\"}\n\n{\"text\": \n[1]\n").unwrap();
        let err = read_records(&path).unwrap_err().to_string();
        assert!(err.contains("d.jsonl:3:"), "{err}");
        std::fs::write(&path, "{\"text\": \"a\"}\n\n[1]\n").unwrap();
        let err = read_records(&path).unwrap_err().to_string();
        assert!(err.contains("d.jsonl:3: a record must be a JSON object, found an array"), "{err}");
        std::fs::write(&path, "{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n").unwrap();
        let lines: Vec<usize> = read_records(&path).unwrap().iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![1, 3]);
        let array = dir.join("d.json");
        std::fs::write(&array, "[{\"text\": \"a\"}, 2]").unwrap();
        assert!(read_records(&array).unwrap_err().to_string().contains("d.json:2:"));
    }

    #[test]
    fn a_line_of_invalid_utf8_is_one_bad_record() {
        let dir = std::env::temp_dir().join(format!("oxtune-data-utf8-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.jsonl");
        std::fs::write(&path, b"{\"text\": \"a\"}\r\n{\"text\": \"\xff\xfe\"}\n{\"text\": \"c\"}\n").unwrap();
        let (records, bad) = read_records_lenient(&path).unwrap();
        assert_eq!(records.iter().map(|r| r.line).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(records[0].value["text"], "a");
        assert_eq!(bad.len(), 1);
        let err = bad[0].to_string();
        assert!(err.contains("d.jsonl:2: the line is not valid UTF-8"), "{err}");
        let err = read_records(&path).unwrap_err().to_string();
        assert!(err.contains("d.jsonl:2:"), "{err}");
    }
}
