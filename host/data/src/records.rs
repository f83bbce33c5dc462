//! Reading datasets: JSONL, JSON-array, CSV/TSV and Parquet files of
//! records, one record at a time ([`RecordReader`]), with every error
//! naming the file and the line (or row) at fault.

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
    /// The file is corrupt from a point on (a Parquet page, a JSON array,
    /// a CSV row the reader cannot get past): nothing after it is read.
    #[error("{path}:{line}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The line or row where reading failed (0: the file's header or footer).
        line: usize,
        /// What is wrong.
        message: String,
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

/// Reads a dataset file whole (its format from its extension, see
/// [`RecordReader`]), stopping at the first bad record.
pub fn read_records(path: &Path) -> Result<Vec<Record>, DataError> {
    let (records, mut bad) = read_records_lenient(path)?;
    match bad.is_empty() {
        true => Ok(records),
        false => Err(bad.swap_remove(0)),
    }
}

/// Like [`read_records`], but a malformed record is returned as an error
/// beside the good records instead of stopping the read (an unreadable
/// or corrupt file still fails as a whole).
pub fn read_records_lenient(path: &Path) -> Result<(Vec<Record>, Vec<DataError>), DataError> {
    let (mut records, mut errors) = (Vec::new(), Vec::new());
    for raw in RecordReader::open(path)? {
        match raw?.parse() {
            Ok(record) => records.push(record),
            Err(e) => errors.push(e),
        }
    }
    Ok((records, errors))
}

/// A record as read from its file, not yet parsed: JSONL lines are parsed
/// by [`RawRecord::parse`], which the encoder runs on its worker threads.
pub struct RawRecord {
    /// The file.
    path: std::sync::Arc<Path>,
    /// 1-based line (JSONL, CSV data rows counted from the header's line)
    /// or record number (JSON array, Parquet row).
    pub line: usize,
    body: RawBody,
}

enum RawBody {
    /// A JSONL line, unparsed.
    Line(Vec<u8>),
    /// A parsed value (a JSON array's element, a CSV or Parquet row).
    Value(serde_json::Value),
    /// A record the reader found malformed (a ragged CSV row).
    Bad(String),
}

impl RawRecord {
    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record, or the error naming its file and line.
    pub fn parse(self) -> Result<Record, DataError> {
        let bad = |message: String| DataError::Record { path: self.path.to_path_buf(), line: self.line, message };
        let value = match self.body {
            RawBody::Line(bytes) => {
                let text = std::str::from_utf8(&bytes)
                    .map_err(|e| bad(format!("the line is not valid UTF-8 (byte {} of the line)", e.valid_up_to())))?;
                serde_json::from_str(text).map_err(|e| bad(e.to_string()))?
            }
            RawBody::Value(value) => value,
            RawBody::Bad(message) => return Err(bad(message)),
        };
        match value {
            serde_json::Value::Object(map) => Ok(Record { line: self.line, value: map }),
            other => Err(bad(format!("a record must be a JSON object, found {}", kind(&other)))),
        }
    }
}

/// Reads a dataset file's records in order, holding one record (a JSONL
/// line, a CSV row) or one Parquet row group at a time. The format comes
/// from the extension: `.parquet`, `.csv`, `.tsv`, else JSON — a file
/// whose first character is `[` is a JSON array (read whole), any other a
/// JSONL file (one object per line, blank lines skipped).
///
/// Yields an error, after which it stops, only when the file cannot be read
/// on (I/O, a corrupt Parquet page); a malformed record is an `Ok` whose
/// [`RawRecord::parse`] fails, so a caller can skip it.
pub struct RecordReader {
    path: std::sync::Arc<Path>,
    inner: Reader,
    /// Records read so far.
    count: usize,
    done: bool,
}

enum Reader {
    Lines {
        file: std::io::BufReader<std::fs::File>,
        line: usize,
    },
    Array(std::vec::IntoIter<serde_json::Value>),
    /// `crlf`: the file ends its lines with `\r\n`, for which the csv
    /// crate reports each record's line one too low (it counts the `\n`
    /// after taking the record's position).
    Csv {
        rows: csv::Reader<std::fs::File>,
        headers: Vec<String>,
        crlf: bool,
    },
    Parquet(parquet::record::reader::RowIter<'static>),
}

impl RecordReader {
    /// Opens `path` (a missing file, an unreadable header or Parquet footer,
    /// or a malformed JSON array is an error naming it).
    pub fn open(path: &Path) -> Result<RecordReader, DataError> {
        use std::io::BufRead;
        let io = |source| DataError::Io { path: path.to_owned(), source };
        let corrupt = |line: usize, message: String| DataError::Corrupt { path: path.to_owned(), line, message };
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        let file = std::fs::File::open(path).map_err(io)?;
        let inner = match extension.as_str() {
            "parquet" => {
                let reader = parquet::file::serialized_reader::SerializedFileReader::new(file)
                    .map_err(|e| corrupt(0, format!("not a readable Parquet file: {e}")))?;
                Reader::Parquet(reader.into_iter())
            }
            "csv" | "tsv" => {
                let crlf = {
                    use std::io::Read;
                    let mut start = Vec::new();
                    (&file).take(1 << 16).read_to_end(&mut start).map_err(io)?;
                    std::io::Seek::rewind(&mut &file).map_err(io)?;
                    start.iter().position(|&b| b == b'\n').is_some_and(|i| i > 0 && start[i - 1] == b'\r')
                };
                let mut rows = csv::ReaderBuilder::new()
                    .delimiter(if extension == "tsv" { b'\t' } else { b',' })
                    .flexible(true)
                    .from_reader(file);
                let headers = rows.headers().map_err(|e| corrupt(1, format!("the header row: {e}")))?;
                let headers = headers.iter().map(str::to_owned).collect();
                Reader::Csv { rows, headers, crlf }
            }
            _ => {
                let mut file = std::io::BufReader::new(file);
                let starts_array = loop {
                    let buffer = file.fill_buf().map_err(io)?;
                    match buffer.iter().position(|b| !b.is_ascii_whitespace()) {
                        Some(i) => break buffer[i] == b'[',
                        None if buffer.is_empty() => break false,
                        None => {
                            let n = buffer.len();
                            file.consume(n);
                        }
                    }
                };
                if starts_array {
                    let values: Vec<serde_json::Value> =
                        serde_json::from_reader(file).map_err(|e| corrupt(e.line(), e.to_string()))?;
                    Reader::Array(values.into_iter())
                } else {
                    Reader::Lines { file, line: 0 }
                }
            }
        };
        Ok(RecordReader { path: path.into(), inner, count: 0, done: false })
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn next_record(&mut self) -> Option<Result<RawRecord, DataError>> {
        use std::io::BufRead;
        let path = &self.path;
        let record = |line: usize, body: RawBody| Some(Ok(RawRecord { path: path.clone(), line, body }));
        match &mut self.inner {
            Reader::Lines { file, line } => loop {
                let mut bytes = Vec::new();
                match file.read_until(b'\n', &mut bytes) {
                    Ok(0) => return None,
                    Ok(_) => *line += 1,
                    Err(source) => return Some(Err(DataError::Io { path: path.to_path_buf(), source })),
                }
                if bytes.last() == Some(&b'\n') {
                    bytes.pop();
                }
                if bytes.last() == Some(&b'\r') {
                    bytes.pop();
                }
                if !bytes.iter().all(u8::is_ascii_whitespace) {
                    return record(*line, RawBody::Line(bytes));
                }
            },
            Reader::Array(values) => values.next().and_then(|v| record(self.count + 1, RawBody::Value(v))),
            Reader::Csv { rows, headers, crlf } => {
                let line_of =
                    |p: Option<&csv::Position>| p.map_or(self.count + 2, |p| p.line() as usize + *crlf as usize);
                let mut row = csv::StringRecord::new();
                match rows.read_record(&mut row) {
                    Ok(false) => None,
                    Ok(true) => {
                        let line = line_of(row.position());
                        if row.len() != headers.len() {
                            let message = format!("{} fields where the header has {}", row.len(), headers.len());
                            return record(line, RawBody::Bad(message));
                        }
                        let object = headers.iter().cloned().zip(row.iter().map(csv_cell)).collect();
                        record(line, RawBody::Value(serde_json::Value::Object(object)))
                    }
                    Err(e) => {
                        let line = line_of(e.position());
                        match e.kind() {
                            csv::ErrorKind::Utf8 { .. } => record(line, RawBody::Bad(format!("not valid UTF-8: {e}"))),
                            _ => {
                                Some(Err(DataError::Corrupt { path: path.to_path_buf(), line, message: e.to_string() }))
                            }
                        }
                    }
                }
            }
            Reader::Parquet(rows) => match rows.next()? {
                Ok(row) => record(self.count + 1, RawBody::Value(row.to_json_value())),
                Err(e) => {
                    let message = format!("row {}: {e}", self.count + 1);
                    Some(Err(DataError::Corrupt { path: path.to_path_buf(), line: self.count + 1, message }))
                }
            },
        }
    }
}

impl Iterator for RecordReader {
    type Item = Result<RawRecord, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = self.next_record();
        match &next {
            Some(Ok(_)) => self.count += 1,
            Some(Err(_)) | None => self.done = true,
        }
        next
    }
}

/// A CSV cell as a JSON value: an empty cell is null (a missing value,
/// as pandas and Hugging Face `datasets` read it), anything else a string.
fn csv_cell(cell: &str) -> serde_json::Value {
    match cell {
        "" => serde_json::Value::Null,
        text => serde_json::Value::String(text.to_owned()),
    }
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
