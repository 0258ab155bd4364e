//! Prompt-lookup drafting for speculative decoding: propose the tokens that followed the most
//! recent earlier occurrence of the context's last few tokens. Code edits, quotes and
//! summaries copy long runs of their input, so such drafts are often right, and they cost no
//! draft model. The target model verifies every drafted token (`generate::Generator`).

/// The longest n-gram looked up, as in the prompt-lookup decoding of Hugging Face's
/// `generate` (`max_matching_ngram_size`) and llama.cpp's lookup example.
const MAX_NGRAM: usize = 3;
/// The shortest: a single token recurs too often to predict what follows it, and a wrong
/// draft costs a wider forward pass.
const MIN_NGRAM: usize = 2;

/// Up to `max` tokens to propose after `context`: what followed the latest earlier occurrence
/// of its last n tokens, for the largest n from 3 down to 2 that occurs. Empty when none does.
pub fn draft(context: &[u32], max: usize) -> &[u32] {
    if max == 0 {
        return &[];
    }
    for n in (MIN_NGRAM..=MAX_NGRAM).rev() {
        if context.len() <= n {
            continue;
        }
        let tail = &context[context.len() - n..];
        // Starts before the tail's own, latest first; what follows is never empty.
        if let Some(start) = (0..context.len() - n)
            .rev()
            .find(|&i| &context[i..i + n] == tail)
        {
            let from = start + n;
            return &context[from..(from + max).min(context.len())];
        }
    }
    &[]
}

#[cfg(test)]
mod tests {
    use super::draft;

    #[test]
    fn continues_the_latest_match_of_the_longest_ngram() {
        // "1 2 3" occurs twice before the tail; the later one is followed by 9.
        let context = [1, 2, 3, 4, 5, 1, 2, 3, 9, 8, 1, 2, 3];
        assert_eq!(draft(&context, 2), &[9, 8]);
        assert_eq!(draft(&context, 10), &[9, 8, 1, 2, 3]);
    }

    #[test]
    fn falls_back_to_a_bigram_and_never_to_one_token() {
        // The trigram 7 2 3 never occurred, the bigram 2 3 did.
        assert_eq!(draft(&[2, 3, 6, 7, 2, 3], 4), &[6, 7, 2, 3]);
        // Only the last token (5) recurs: no draft.
        assert_eq!(draft(&[5, 1, 9, 5], 4), &[] as &[u32]);
    }

    #[test]
    fn short_contexts_and_zero_draft_are_empty() {
        assert!(draft(&[], 4).is_empty());
        assert!(draft(&[1, 2], 4).is_empty());
        assert!(draft(&[1, 2, 1, 2], 0).is_empty());
        // A repeating run drafts its own continuation (the match overlaps the tail).
        assert_eq!(draft(&[7, 7, 7, 7], 3), &[7]);
    }
}
