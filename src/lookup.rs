//! Prompt-lookup drafting for speculative decoding: propose the tokens that followed the most
//! recent earlier occurrence of the context's last few tokens. Code edits, quotes and
//! summaries copy long runs of their input, so such drafts are often right, and they cost no
//! draft model. The target model verifies every drafted token (`generate::Generator`).

/// The most tokens drafted after one token (`generate --prompt-lookup`, `[[model]]
/// prompt_lookup`): a pass over more rows costs more when the drafts fail.
pub const MAX_DRAFT: usize = 32;

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

/// How many tokens to draft next, from how the last drafts did. A pass over rejected drafts
/// costs more than a one-token pass, so after a miss only what held plus one is drafted, the
/// length doubling while all drafts hold; and when none held, drafting pauses for a few tokens
/// (1, 2, 4, … up to 16 while misses follow each other): replies that copy nothing then pay
/// for few wasted rows. Which tokens are drafted never changes the output, only the speed.
#[derive(Debug, Clone)]
pub struct DraftLength {
    max: usize,
    limit: usize,
    /// Tokens still to decode without drafts, and the next pause's length.
    paused: usize,
    pause: usize,
}

/// The longest pause after drafts that all failed, in tokens.
const MAX_PAUSE: usize = 16;

impl DraftLength {
    /// Up to `max` drafts a step (0: never).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            limit: max,
            paused: 0,
            pause: 1,
        }
    }

    /// Drafts a step at most (0: never).
    pub fn max(&self) -> usize {
        self.max
    }

    /// Drafts wanted for the next step (0 while paused).
    pub fn wanted(&self) -> usize {
        if self.paused > 0 {
            0
        } else {
            self.limit
        }
    }

    /// A step ran `drafted` drafts (0: none were made) of which the first `accepted` held.
    pub fn update(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            self.paused = self.paused.saturating_sub(1);
        } else if accepted == drafted {
            self.limit = (self.limit * 2).min(self.max);
            self.pause = 1;
        } else if accepted > 0 {
            self.limit = accepted + 1;
            self.pause = 1;
        } else {
            self.limit = 1;
            self.paused = self.pause;
            self.pause = (self.pause * 2).min(MAX_PAUSE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{draft, DraftLength};

    #[test]
    fn the_draft_length_follows_how_drafts_did() {
        let mut d = DraftLength::new(8);
        assert_eq!(d.wanted(), 8);
        d.update(8, 3);
        assert_eq!(d.wanted(), 4, "after a miss: what held plus one");
        d.update(4, 4);
        assert_eq!(d.wanted(), 8, "doubles while all hold");
        d.update(8, 8);
        assert_eq!(d.wanted(), 8, "at most the maximum");
        // None held: pauses of 1, then 2 tokens, a draft of one between them.
        d.update(8, 0);
        assert_eq!(d.wanted(), 0);
        d.update(0, 0);
        assert_eq!(d.wanted(), 1);
        d.update(1, 0);
        assert_eq!(d.wanted(), 0);
        d.update(0, 0);
        assert_eq!(d.wanted(), 0);
        d.update(0, 0);
        assert_eq!(d.wanted(), 1);
        // A hit ends the backing off.
        d.update(1, 1);
        assert_eq!(d.wanted(), 2);
        d.update(2, 0);
        d.update(0, 0);
        assert_eq!(d.wanted(), 1, "the pause starts from one again");
        assert_eq!(DraftLength::new(0).wanted(), 0);
    }

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
