//! oxtune's built-in reward functions, written as any third-party plugin
//! would be: against `oxtune-plugin-api` only.
//!
//! - `format`: 1.0 when the completion is `<think>…</think>` followed by
//!   `<answer>…</answer>` and nothing else (ms-swift's `format` reward);
//! - `repetition`: a penalty in `[-1, 0]` growing with the share of
//!   repeated word 3-grams (ms-swift's `repetition` reward, after
//!   "Demystifying Long Chain-of-Thought Reasoning in LLMs").

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

fn plugin() -> Plugin {
    Plugin::new("oxtune-plugin-rewards", env!("CARGO_PKG_VERSION"))
        .reward(FormatReward::default())
        .reward(RepetitionPenalty::default())
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
