//! Word error rate: how far a transcript is from a reference, in word edits.
//!
//! Words are compared case-insensitively with punctuation removed (apostrophes inside words kept), so
//! "Half past ten." matches "half past ten". Numbers are not normalised: "10" against "ten" is an error.

/// The words of `text`, lower-cased, punctuation stripped.
pub fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric() || *c == '\'')
                .flat_map(char::to_lowercase)
                .collect::<String>()
                .trim_matches('\'')
                .to_string()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// Word-level edit distance (substitutions + deletions + insertions) between two word lists.
pub fn edit_distance<T: PartialEq>(reference: &[T], hypothesis: &[T]) -> usize {
    // One row of the Levenshtein table at a time: O(|hyp|) memory.
    let mut row: Vec<usize> = (0..=hypothesis.len()).collect();
    for (i, r) in reference.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, h) in hypothesis.iter().enumerate() {
            let above = row[j + 1];
            let cost = usize::from(r != h);
            row[j + 1] = (diagonal + cost).min(above + 1).min(row[j] + 1);
            diagonal = above;
        }
    }
    row[hypothesis.len()]
}

/// Errors and reference words of one comparison; sum several before dividing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Score {
    pub errors: usize,
    pub reference_words: usize,
}

impl Score {
    pub fn of(reference: &str, hypothesis: &str) -> Score {
        let (r, h) = (words(reference), words(hypothesis));
        Score {
            errors: edit_distance(&r, &h),
            reference_words: r.len(),
        }
    }

    pub fn add(&mut self, other: Score) {
        self.errors += other.errors;
        self.reference_words += other.reference_words;
    }

    /// errors / reference words (0 for an empty reference with an empty hypothesis).
    pub fn wer(&self) -> f64 {
        if self.reference_words == 0 {
            return if self.errors == 0 { 0.0 } else { 1.0 };
        }
        self.errors as f64 / self.reference_words as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_ignore_case_and_punctuation() {
        assert_eq!(
            words("Could we move it, Bob? It's 10."),
            ["could", "we", "move", "it", "bob", "it's", "10"]
        );
        assert!(words(" ... ").is_empty());
    }

    #[test]
    fn edit_distance_counts_substitutions_insertions_and_deletions() {
        let d = |a: &str, b: &str| edit_distance(&words(a), &words(b));
        assert_eq!(d("a b c", "a b c"), 0);
        assert_eq!(d("a b c", "a x c"), 1);
        assert_eq!(d("a b c", "a c"), 1);
        assert_eq!(d("a b c", "a b c d e"), 2);
        assert_eq!(d("", "a b"), 2);
        assert_eq!(d("a b", ""), 2);
        assert_eq!(d("the cat sat on the mat", "cat sat in the mat today"), 3);
    }

    #[test]
    fn scores_add_up_before_dividing() {
        let mut total = Score::of("one two three four", "one two three four");
        total.add(Score::of("five six", "five seven"));
        assert_eq!(
            total,
            Score {
                errors: 1,
                reference_words: 6
            }
        );
        assert!((total.wer() - 1.0 / 6.0).abs() < 1e-12);
        assert_eq!(Score::default().wer(), 0.0);
        assert_eq!(Score::of("", "noise").wer(), 1.0);
    }
}
