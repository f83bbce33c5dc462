//! oxtune's built-in reward functions, written as any third-party plugin
//! would be: against `oxtune-plugin-api` only.
//!
//! - `format`: 1.0 when the completion is `<think>…</think>` followed by
//!   `<answer>…</answer>` and nothing else (ms-swift's `format` reward);
//! - `repetition`: a penalty in `[-1, 0]` growing with the share of
//!   repeated word 3-grams (ms-swift's `repetition` reward, after
//!   "Demystifying Long Chain-of-Thought Reasoning in LLMs");
//! - `accuracy`: 1.0 when the completion's final answer equals the row's
//!   `solution` (or `answer`) column: a `\boxed{…}` expression, else the
//!   `<answer>` block, else the last number, else a choice letter, else
//!   the last word;
//!   numbers compare by value, text ignoring case, spaces and `$`;
//! - `length`: with a `target_length` column (words), `−|n − target| /
//!   target`; otherwise DAPO's soft overlong penalty over words: 0 up to
//!   `max_length − cache` (`max_length` and `overlong_cache` columns,
//!   defaults 256 and 64), falling linearly to −1 at `max_length`.

use std::collections::HashSet;

use oxtune_plugin_api::{declare_plugin, Descriptor, Plugin, Result, RewardFunction, RewardSample};
use regex::Regex;

/// The think-then-answer format check.
pub struct FormatReward {
    pattern: Regex,
}

impl Default for FormatReward {
    fn default() -> Self {
        FormatReward {
            pattern: Regex::new(r"(?s)\A<think>.*?</think>\s*<answer>.*?</answer>\z").expect("a valid pattern"),
        }
    }
}

impl RewardFunction for FormatReward {
    fn descriptor(&self) -> Descriptor {
        Descriptor::reward("format", env!("CARGO_PKG_VERSION"))
            .description("1.0 if the completion is <think>...</think> then <answer>...</answer>, else 0.0")
    }

    fn score(&self, samples: &[RewardSample]) -> Result<Vec<f64>> {
        Ok(samples.iter().map(|s| if self.pattern.is_match(&s.completion) { 1.0 } else { 0.0 }).collect())
    }
}

/// The n-gram repetition penalty.
pub struct RepetitionPenalty {
    /// The n of the n-grams (3).
    pub ngram_size: usize,
    /// The penalty when every n-gram repeats (-1.0).
    pub max_penalty: f64,
}

impl Default for RepetitionPenalty {
    fn default() -> Self {
        RepetitionPenalty { ngram_size: 3, max_penalty: -1.0 }
    }
}

impl RepetitionPenalty {
    /// `max_penalty · (1 - distinct / total)` over lower-cased word n-grams;
    /// 0 for texts shorter than one n-gram.
    pub fn penalty(&self, text: &str) -> f64 {
        let lower = text.to_lowercase();
        let words: Vec<&str> = lower.split_whitespace().collect();
        if words.len() < self.ngram_size || self.ngram_size == 0 {
            return 0.0;
        }
        let ngrams: Vec<&[&str]> = words.windows(self.ngram_size).collect();
        let distinct: HashSet<&[&str]> = ngrams.iter().copied().collect();
        (1.0 - distinct.len() as f64 / ngrams.len() as f64) * self.max_penalty
    }
}

impl RewardFunction for RepetitionPenalty {
    fn descriptor(&self) -> Descriptor {
        Descriptor::reward("repetition", env!("CARGO_PKG_VERSION"))
            .description("-(share of repeated word 3-grams), in [-1, 0]")
    }

    fn score(&self, samples: &[RewardSample]) -> Result<Vec<f64>> {
        Ok(samples.iter().map(|s| self.penalty(&s.completion)).collect())
    }
}

/// The final-answer check against the row's solution.
pub struct AccuracyReward {
    boxed: Regex,
    answer_tag: Regex,
    number: Regex,
    choice: Regex,
}

impl Default for AccuracyReward {
    fn default() -> Self {
        AccuracyReward {
            boxed: Regex::new(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}").expect("a valid pattern"),
            answer_tag: Regex::new(r"(?s)<answer>(.*?)</answer>").expect("a valid pattern"),
            number: Regex::new(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?").expect("a valid pattern"),
            choice: Regex::new(r"\b([A-E])\b").expect("a valid pattern"),
        }
    }
}

/// A number written as `1,234.5`, `-3` or `3/4`.
fn number_value(text: &str) -> Option<f64> {
    let clean = text.trim().replace(',', "");
    match clean.split_once('/') {
        Some((a, b)) => Some(a.trim().parse::<f64>().ok()? / b.trim().parse::<f64>().ok()?),
        None => clean.parse().ok(),
    }
}

/// Text compared loosely: lower case, no spaces, no `$`, no trailing period.
fn loose(text: &str) -> String {
    text.chars().filter(|c| !c.is_whitespace() && *c != '$').collect::<String>().trim_end_matches('.').to_lowercase()
}

impl AccuracyReward {
    /// A marked answer: the last `\\boxed{…}`, else the last `<answer>` block.
    fn marked<'a>(&self, text: &'a str) -> Option<&'a str> {
        if let Some(c) = self.boxed.captures_iter(text).last() {
            return c.get(1).map(|m| m.as_str());
        }
        self.answer_tag.captures_iter(text).last().and_then(|c| c.get(1)).map(|m| m.as_str().trim())
    }

    /// The completion's final answer: marked, else the last number, else a
    /// choice letter, else the last word.
    fn extract<'a>(&self, completion: &'a str) -> Option<&'a str> {
        if let Some(marked) = self.marked(completion) {
            return Some(marked);
        }
        if let Some(m) = self.number.find_iter(completion).last() {
            return Some(m.as_str());
        }
        if let Some(letter) = self.choice.captures_iter(completion).last().and_then(|c| c.get(1)) {
            return Some(letter.as_str());
        }
        completion.split_whitespace().last().map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
    }

    /// Whether `answer` matches `solution` (itself possibly boxed or tagged).
    fn matches(&self, answer: &str, solution: &str) -> bool {
        let solution = self.marked(solution).unwrap_or(solution).trim();
        match (number_value(answer), number_value(solution)) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-6 * b.abs().max(1.0),
            _ => loose(answer) == loose(solution),
        }
    }
}

impl RewardFunction for AccuracyReward {
    fn descriptor(&self) -> Descriptor {
        Descriptor::reward("accuracy", env!("CARGO_PKG_VERSION")).description(
            "1.0 if the final answer (\\boxed{}, <answer>, last number or letter) equals the row's `solution`",
        )
    }

    fn score(&self, samples: &[RewardSample]) -> Result<Vec<f64>> {
        samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let solution = ["solution", "answer"]
                    .iter()
                    .find_map(|k| match s.columns.get(*k) {
                        Some(oxtune_plugin_api::serde_json::Value::String(t)) => Some(t.clone()),
                        Some(oxtune_plugin_api::serde_json::Value::Number(n)) => Some(n.to_string()),
                        _ => None,
                    })
                    .ok_or_else(|| {
                        oxtune_plugin_api::Error::new(format!(
                            "sample {i}: the row has no `solution` (or `answer`) column to compare with"
                        ))
                    })?;
                Ok(match self.extract(&s.completion) {
                    Some(answer) if self.matches(answer, &solution) => 1.0,
                    _ => 0.0,
                })
            })
            .collect()
    }
}

/// The length reward: a target length, or the soft overlong penalty.
#[derive(Default)]
pub struct LengthReward;

impl RewardFunction for LengthReward {
    fn descriptor(&self) -> Descriptor {
        Descriptor::reward("length", env!("CARGO_PKG_VERSION"))
            .description("closeness to a `target_length` column (words), else DAPO's soft overlong penalty")
    }

    fn score(&self, samples: &[RewardSample]) -> Result<Vec<f64>> {
        let number = |s: &RewardSample, key: &str| s.columns.get(key).and_then(|v| v.as_f64());
        Ok(samples
            .iter()
            .map(|s| {
                let words = s.completion.split_whitespace().count() as f64;
                if let Some(target) = number(s, "target_length").filter(|t| *t > 0.0) {
                    return -(words - target).abs() / target;
                }
                let max = number(s, "max_length").unwrap_or(256.0);
                let cache = number(s, "overlong_cache").unwrap_or(64.0).max(1.0);
                let free = max - cache;
                if words <= free {
                    0.0
                } else if words <= max {
                    (free - words) / cache
                } else {
                    -1.0
                }
            })
            .collect())
    }
}

fn plugin() -> Plugin {
    Plugin::new("oxtune-plugin-rewards", env!("CARGO_PKG_VERSION"))
        .reward(FormatReward::default())
        .reward(RepetitionPenalty::default())
        .reward(AccuracyReward::default())
        .reward(LengthReward)
}

declare_plugin!(plugin);

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(completion: &str) -> RewardSample {
        RewardSample { completion: completion.into(), ..Default::default() }
    }

    #[test]
    fn format_accepts_only_think_then_answer() {
        let r = FormatReward::default();
        let scores = r
            .score(&[
                sample("<think>a\nb</think>\n<answer>42</answer>"),
                sample("<think>a</think><answer>42</answer> trailing"),
                sample("<answer>42</answer>"),
                sample("x<think>a</think><answer>42</answer>"),
            ])
            .unwrap();
        assert_eq!(scores, vec![1.0, 0.0, 0.0, 0.0]);
    }

    fn with(completion: &str, columns: oxtune_plugin_api::serde_json::Value) -> RewardSample {
        RewardSample {
            completion: completion.into(),
            columns: columns.as_object().unwrap().clone(),
            ..Default::default()
        }
    }

    #[test]
    fn accuracy_compares_the_final_answer_with_the_solution() {
        use oxtune_plugin_api::serde_json::json;
        let r = AccuracyReward::default();
        let scores = r
            .score(&[
                with("so the total is \\boxed{\\frac{1}{2}} done", json!({"solution": "\\frac{1}{2}"})),
                with("<think>2+2</think><answer>4</answer>", json!({"solution": "4"})),
                with("first 3, then 1,250.0", json!({"solution": "1250"})),
                with("I pick (B).", json!({"solution": "B"})),
                with("The answer is 5", json!({"solution": "The answer is \\boxed{6}"})),
                with("three quarters: 3/4", json!({"answer": 0.75})),
                with("Two plus five is seven.", json!({"solution": "seven"})),
                with("Two plus five is eight.", json!({"solution": "seven"})),
            ])
            .unwrap();
        assert_eq!(scores, vec![1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]);
        let err = r.score(&[sample("4")]).unwrap_err().to_string();
        assert!(err.contains("no `solution`"), "{err}");
    }

    #[test]
    fn length_rewards_a_target_or_penalises_overlong_completions() {
        use oxtune_plugin_api::serde_json::json;
        let words = |n: usize| vec!["w"; n].join(" ");
        let scores = LengthReward
            .score(&[
                with(&words(8), json!({"target_length": 10})),
                with(&words(10), json!({"max_length": 20, "overlong_cache": 10})),
                with(&words(15), json!({"max_length": 20, "overlong_cache": 10})),
                with(&words(25), json!({"max_length": 20, "overlong_cache": 10})),
            ])
            .unwrap();
        assert_eq!(scores, vec![-0.2, 0.0, -0.5, -1.0]);
    }

    #[test]
    fn repetition_counts_repeated_trigrams() {
        let r = RepetitionPenalty::default();
        // "a b c a b c": trigrams abc, bca, cab, abc -> 3 distinct of 4.
        assert!((r.penalty("a b c a b c") - (-(1.0 - 3.0 / 4.0))).abs() < 1e-12);
        assert_eq!(r.penalty("all words differ here"), 0.0);
        assert_eq!(r.penalty("too short"), 0.0);
        // Case-insensitive: "A B C a b c" is the same as above.
        assert_eq!(r.penalty("A B C a b c"), r.penalty("a b c a b c"));
    }
}
