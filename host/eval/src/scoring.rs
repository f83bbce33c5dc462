//! Scoring rules as lm-evaluation-harness defines them: `acc` and
//! `acc_norm` for multiple choice, and GSM8K's answer extraction
//! (`strict-match`, `flexible-extract`) with its `exact_match`
//! normalisation; plus EvalScope's `\boxed{}` extraction.

use std::sync::LazyLock;

use regex::Regex;

/// The patterns, compiled once (they run for every GSM8K sample).
static STRICT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"#### (\-?[0-9\.\,]+)").expect("a valid pattern"));
static FLEXIBLE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(-?[$0-9.,]{2,})|(-?[0-9]+)").expect("a valid pattern"));
static IGNORED: LazyLock<[Regex; 4]> =
    LazyLock::new(|| [",", r"\$", r"(?s).*#### ", r"\.$"].map(|p| Regex::new(p).expect("a valid pattern")));

/// What lm-eval's extraction filters give when nothing matches.
pub const INVALID: &str = "[invalid]";

/// The index of the largest value (the first of equals, as `numpy.argmax`).
fn argmax(values: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// `acc` and `acc_norm` of one multiple-choice doc: whether the choice
/// with the highest log-likelihood is `gold`, and the same with each
/// log-likelihood divided by its choice's length in characters.
pub fn choice_scores(loglikelihoods: &[f64], choices: &[String], gold: usize) -> (bool, bool) {
    let acc = argmax(loglikelihoods.iter().copied()) == gold;
    let normed = loglikelihoods.iter().zip(choices).map(|(ll, c)| ll / c.chars().count().max(1) as f64);
    (acc, argmax(normed) == gold)
}

/// GSM8K's `strict-match`: the number after `#### `.
pub fn strict_match(text: &str) -> String {
    STRICT.captures(text).map_or(INVALID.to_owned(), |c| c[1].trim().to_owned())
}

/// GSM8K's `flexible-extract`: the last number in the text.
pub fn flexible_extract(text: &str) -> String {
    FLEXIBLE
        .captures_iter(text)
        .last()
        .and_then(|c| c.get(1).or_else(|| c.get(2)))
        .map_or(INVALID.to_owned(), |m| m.as_str().trim().to_owned())
}

/// The content of the last `\boxed{...}` (braces balanced), as EvalScope
/// reads math answers.
pub fn boxed(text: &str) -> String {
    let Some(start) = text.rfind("\\boxed{") else { return INVALID.to_owned() };
    let mut depth = 0;
    for (i, c) in text[start + 7..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return text[start + 7..start + 7 + i].trim().to_owned(),
            '}' => depth -= 1,
            _ => {}
        }
    }
    INVALID.to_owned()
}

/// GSM8K's `exact_match`: both sides lowercased, with commas, dollar
/// signs, everything up to `#### ` and a final period removed.
pub fn exact_match(prediction: &str, reference: &str) -> bool {
    let normalise = |s: &str| {
        let mut s = s.to_owned();
        for re in IGNORED.iter() {
            s = re.replace_all(&s, "").into_owned();
        }
        s.to_lowercase()
    };
    normalise(prediction) == normalise(reference)
}

/// Cuts a generation at the first of `until` (lm-eval's stop sequences).
pub fn cut_at_stop(text: &str, until: &[String]) -> String {
    let end = until.iter().filter_map(|s| text.find(s.as_str())).min().unwrap_or(text.len());
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_extraction_and_matching_follow_lm_eval() {
        let reference = " Natalia sold 48/2 = 24 clips in May.\n#### 72";
        // A model that states the answer the GSM8K way.
        let good = " She sold 48 + 24 = 72 clips.\n#### 72";
        assert_eq!(strict_match(good), "72");
        assert!(exact_match(&strict_match(good), reference));
        // No `####`: strict fails, flexible takes the last number.
        let loose = " She sold 48 + 24 = 72 clips in total, that is $1,072.";
        assert_eq!(strict_match(loose), INVALID);
        assert_eq!(flexible_extract(loose), "$1,072.");
        assert!(exact_match("$1,072.", "#### 1072"), "commas, dollars and a final period are ignored");
        assert!(!exact_match(INVALID, reference));
        assert_eq!(flexible_extract("it is 7"), "7", "a single digit matches the second group");
        assert_eq!(boxed(r"so \boxed{\frac{1}{2}} and \boxed{72}"), "72");
        assert_eq!(boxed(r"\boxed{\frac{1}{2}}"), r"\frac{1}{2}");
        assert_eq!(cut_at_stop(" 72\n\nQuestion: next", &["Question:".into(), "</s>".into()]), " 72\n\n");
    }

    #[test]
    fn acc_norm_divides_by_characters_and_ties_go_to_the_first() {
        let choices = vec![" a".to_owned(), " much longer answer".to_owned()];
        // Raw: the short choice wins; per character: the long one.
        let (acc, acc_norm) = choice_scores(&[-2.0, -6.0], &choices, 1);
        assert!(!acc && acc_norm);
        let (acc, _) = choice_scores(&[-1.0, -1.0], &choices, 0);
        assert!(acc, "equal log-likelihoods: the first is chosen");
    }
}
