//! The benchmark formats, read from local JSONL / JSON files in the
//! columns the datasets ship with, and turned into prompts as
//! lm-evaluation-harness writes them (its `gsm8k`, `mmlu`, `arc_easy` /
//! `arc_challenge` and `hellaswag` task configs).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use oxtune_data::{read_records, Record};
use serde_json::Value;

use crate::EvalError;

/// A benchmark format.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum TaskKind {
    /// Grade-school math: `question`, `answer` ending in `#### N`; generation.
    Gsm8k,
    /// `question`, `choices` (four strings), `answer` (0–3 or A–D), optional `subject`.
    Mmlu,
    /// `question`, `choices.text` / `choices.label`, `answerKey`.
    Arc,
    /// `ctx` (or `ctx_a` + `ctx_b`), `endings`, `label`, optional `activity_label`.
    Hellaswag,
}

impl TaskKind {
    /// Every task, by name.
    pub const ALL: [TaskKind; 4] = [TaskKind::Gsm8k, TaskKind::Mmlu, TaskKind::Arc, TaskKind::Hellaswag];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Gsm8k => "gsm8k",
            TaskKind::Mmlu => "mmlu",
            TaskKind::Arc => "arc",
            TaskKind::Hellaswag => "hellaswag",
        }
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TaskKind {
    type Err = String;

    fn from_str(s: &str) -> Result<TaskKind, String> {
        TaskKind::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            let names: Vec<&str> = TaskKind::ALL.iter().map(|t| t.name()).collect();
            format!("unknown task `{s}` (one of: {})", names.join(", "))
        })
    }
}

/// One benchmark question.
#[derive(Clone, Debug, PartialEq)]
pub enum Doc {
    /// Scored by the log-likelihood of each choice after the query.
    Choice {
        /// The prompt the choices continue.
        query: String,
        /// Each choice as the continuation of the query (with its leading space).
        choices: Vec<String>,
        /// The right choice.
        gold: usize,
        /// The group it is reported under (MMLU's subject), if any.
        group: Option<String>,
    },
    /// Scored by the answer extracted from a greedy generation.
    Generation {
        /// The prompt.
        query: String,
        /// The full reference answer (GSM8K: reasoning then `#### N`), the
        /// few-shot target and the reference the metric compares with.
        answer: String,
    },
}

impl Doc {
    /// The text that answers the doc in a few-shot example.
    pub fn fewshot_target(&self) -> &str {
        match self {
            Doc::Choice { choices, gold, .. } => &choices[*gold],
            Doc::Generation { answer, .. } => answer,
        }
    }

    /// The prompt.
    pub fn query(&self) -> &str {
        match self {
            Doc::Choice { query, .. } | Doc::Generation { query, .. } => query,
        }
    }
}

/// A doc with the file line it came from.
#[derive(Clone, Debug)]
pub struct LoadedDoc {
    /// 1-based line (JSONL) or index (JSON array).
    pub line: usize,
    /// The question.
    pub doc: Doc,
}

fn field<'a>(record: &'a Record, path: &Path, name: &str) -> Result<&'a Value, EvalError> {
    let mut value = None;
    for (i, part) in name.split('.').enumerate() {
        value = match i {
            0 => record.value.get(part),
            _ => value.and_then(|v: &Value| v.get(part)),
        };
    }
    value.filter(|v| !v.is_null()).ok_or_else(|| bad(record, path, format!("the field `{name}` is missing")))
}

fn bad(record: &Record, path: &Path, message: String) -> EvalError {
    EvalError::Record { path: path.to_owned(), line: record.line, message }
}

fn text(record: &Record, path: &Path, name: &str) -> Result<String, EvalError> {
    match field(record, path, name)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(bad(record, path, format!("the field `{name}` must be a string, not {other}"))),
    }
}

fn texts(record: &Record, path: &Path, name: &str) -> Result<Vec<String>, EvalError> {
    let not_list = || bad(record, path, format!("the field `{name}` must be a list of strings"));
    let list = field(record, path, name)?.as_array().ok_or_else(not_list)?;
    list.iter().map(|v| v.as_str().map(str::to_owned).ok_or_else(not_list)).collect()
}

/// An answer index given as a number, a numeric string or a letter (`A` = 0).
fn index(record: &Record, path: &Path, name: &str, count: usize) -> Result<usize, EvalError> {
    let value = field(record, path, name)?;
    let parsed = match value {
        Value::Number(n) => n.as_u64().map(|n| n as usize),
        Value::String(s) => s.trim().parse::<usize>().ok().or_else(|| {
            let c = s.trim().chars().next()?;
            (s.trim().len() == 1 && c.is_ascii_uppercase()).then(|| (c as u8 - b'A') as usize)
        }),
        _ => None,
    };
    match parsed {
        Some(i) if i < count => Ok(i),
        _ => Err(bad(record, path, format!("the field `{name}` ({value}) names none of the {count} choices"))),
    }
}

/// lm-eval's HellaSwag text clean-up: WikiHow's ` [title]` becomes a
/// sentence break, other bracketed tags go, double spaces close up.
fn hellaswag_clean(text: &str) -> String {
    let text = text.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(text.len());
    let mut depth = 0;
    for c in text.chars() {
        match c {
            '[' => depth += 1,
            ']' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out.replace("  ", " ")
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars.flat_map(char::to_lowercase)).collect(),
        None => String::new(),
    }
}

/// One record as a doc of `kind`.
pub fn parse_doc(kind: TaskKind, record: &Record, path: &Path) -> Result<Doc, EvalError> {
    Ok(match kind {
        TaskKind::Gsm8k => Doc::Generation {
            query: format!("Question: {}\nAnswer:", text(record, path, "question")?),
            answer: format!(" {}", text(record, path, "answer")?),
        },
        TaskKind::Mmlu => {
            let choices = texts(record, path, "choices")?;
            let letters = ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J"];
            if choices.is_empty() || choices.len() > letters.len() {
                return Err(bad(
                    record,
                    path,
                    format!("`choices` has {} entries (1 to 10 can be lettered)", choices.len()),
                ));
            }
            let mut query = text(record, path, "question")?.trim().to_owned();
            for (letter, choice) in letters.iter().zip(&choices) {
                query.push_str(&format!("\n{letter}. {choice}"));
            }
            query.push_str("\nAnswer:");
            let group = record.value.get("subject").and_then(Value::as_str).map(|s| s.replace('_', " "));
            Doc::Choice {
                query,
                gold: index(record, path, "answer", choices.len())?,
                choices: letters[..choices.len()].iter().map(|l| format!(" {l}")).collect(),
                group,
            }
        }
        TaskKind::Arc => {
            let choices = texts(record, path, "choices.text")?;
            let labels = texts(record, path, "choices.label")?;
            if labels.len() != choices.len() {
                return Err(bad(record, path, "`choices.label` and `choices.text` differ in length".into()));
            }
            let key = text(record, path, "answerKey")?;
            let gold = labels
                .iter()
                .position(|l| *l == key)
                .ok_or_else(|| bad(record, path, format!("`answerKey` {key:?} is none of the labels {labels:?}")))?;
            Doc::Choice {
                query: format!("Question: {}\nAnswer:", text(record, path, "question")?),
                choices: choices.iter().map(|c| format!(" {c}")).collect(),
                gold,
                group: None,
            }
        }
        TaskKind::Hellaswag => {
            let ctx = match record.value.get("ctx").and_then(Value::as_str) {
                Some(ctx) => ctx.to_owned(),
                None => format!("{} {}", text(record, path, "ctx_a")?, capitalize(&text(record, path, "ctx_b")?)),
            };
            let query = match record.value.get("activity_label").and_then(Value::as_str) {
                Some(label) => hellaswag_clean(&format!("{label}: {ctx}")),
                None => hellaswag_clean(&ctx),
            };
            let endings = texts(record, path, "endings")?;
            Doc::Choice {
                query,
                gold: index(record, path, "label", endings.len())?,
                choices: endings.iter().map(|e| format!(" {}", hellaswag_clean(e))).collect(),
                group: None,
            }
        }
    })
}

/// Every doc of `path` as `kind`; the first bad record is an error naming
/// its line and field.
pub fn load_docs(kind: TaskKind, path: &Path) -> Result<Vec<LoadedDoc>, EvalError> {
    let records = read_records(path).map_err(|e| EvalError::Dataset { path: path.to_owned(), source: Box::new(e) })?;
    records.iter().map(|r| Ok(LoadedDoc { line: r.line, doc: parse_doc(kind, r, path)? })).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(value: Value) -> Record {
        Record { line: 7, value: value.as_object().unwrap().clone() }
    }

    #[test]
    fn prompts_are_lm_eval_harness_prompts() {
        let p = Path::new("x.jsonl");
        let mmlu = serde_json::json!({"question": " What is 2+2? ", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "elementary_mathematics"});
        let Doc::Choice { query, choices, gold, group } = parse_doc(TaskKind::Mmlu, &record(mmlu), p).unwrap() else {
            panic!()
        };
        assert_eq!(query, "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:");
        assert_eq!((choices[1].as_str(), gold, group.as_deref()), (" B", 1, Some("elementary mathematics")));
        let hs = serde_json::json!({"activity_label": "Baking cookies", "ctx_a": "A woman pours flour.", "ctx_b": "she",
            "endings": ["mixes it [title] well.", "eats  it."], "label": "1"});
        let Doc::Choice { query, choices, gold, .. } = parse_doc(TaskKind::Hellaswag, &record(hs), p).unwrap() else {
            panic!()
        };
        assert_eq!(query, "Baking cookies: A woman pours flour. She");
        assert_eq!(choices, vec![" mixes it.  well.".replace("  ", " "), " eats it.".to_owned()]);
        assert_eq!(gold, 1);
    }

    #[test]
    fn bad_records_name_their_line_and_field() {
        let p = Path::new("arc.jsonl");
        let arc = serde_json::json!({"question": "Q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"});
        let err = parse_doc(TaskKind::Arc, &record(arc), p).unwrap_err().to_string();
        assert!(err.contains("arc.jsonl:7") && err.contains("answerKey"), "{err}");
        let err = parse_doc(TaskKind::Gsm8k, &record(serde_json::json!({"question": "Q"})), p).unwrap_err().to_string();
        assert!(err.contains("arc.jsonl:7") && err.contains("`answer` is missing"), "{err}");
    }
}
