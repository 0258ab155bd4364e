//! Speculative decoding's draft model: a smaller model with the target's vocabulary (the 0.5B
//! for the 1.5B) proposes the next tokens greedily, and the target verifies them in one pass
//! (`generate::Generator`). Greedy drafts are deterministic, so verifying them by sampling each
//! row as plain decoding would (a draft kept while it equals the sample) gives exactly the
//! target's output, greedy or sampled.

use anyhow::{bail, Result};

use crate::backend::{Logits, Session};
use crate::engine::Engine;
use crate::generate::common_prefix;
use crate::sampling::argmax;

/// Drafts per pass by default. With the pending token, three drafts make a pass of four rows,
/// the most a native decode-batch product takes in one pass over the weights (`BATCH_ROWS`):
/// a fifth row made the 1.5B's verification half again as dear on a 2-core Zen 2 (int8: 99 ->
/// 145 ms), and the 0.5B drafting for the 1.5B int4 ran at 0.87x plain decoding with 4 drafts
/// against 1.03x with 3 (README, "Speculative decoding").
pub const DEFAULT_DRAFT_TOKENS: usize = 3;

pub struct DraftModel {
    session: Box<dyn Session>,
    /// The tokens its cache holds, in order.
    cached: Vec<u32>,
    /// Drafts per pass, at most.
    pub max_tokens: usize,
}

impl DraftModel {
    /// `draft`'s session of `capacity` positions, for a `target` that must share its
    /// vocabulary: the same token for every id (checked on both tokenizers).
    pub fn new(
        draft: &Engine,
        target: &Engine,
        capacity: usize,
        max_tokens: usize,
    ) -> Result<Self> {
        let (d, t) = (&draft.tokenizer, &target.tokenizer);
        if !d.same_vocabulary(t) {
            bail!(
                "the draft model's vocabulary is not the model's ({} and {} tokens, or other tokens for the same ids): drafts must be the model's own tokens",
                d.vocab_size(),
                t.vocab_size()
            );
        }
        Ok(Self {
            session: draft.backend.new_session(capacity)?,
            cached: Vec::new(),
            max_tokens,
        })
    }

    /// Positions of `context` its cache lacks (a new request's whole prompt, at first).
    pub fn behind(&self, context: &[u32]) -> usize {
        context.len() - self.shared_with(context)
    }

    /// Positions its cache holds of `context`.
    fn shared_with(&self, context: &[u32]) -> usize {
        common_prefix(&self.cached, context).min(self.session.len())
    }

    /// Cuts its cache back to what it shares with `context`, at most `limit` positions; the
    /// positions kept.
    fn keep_shared(&mut self, context: &[u32], limit: usize) -> usize {
        let keep = self.shared_with(context).min(limit);
        self.session.truncate(keep);
        self.cached.truncate(keep);
        keep
    }

    /// Runs up to `n` of the positions of `context` its cache lacks, leaving the last for
    /// `propose`: a service catches a long prompt up a slice per step, as it prefills prompts,
    /// instead of holding up the other requests' step for all of it.
    pub fn catch_up(&mut self, context: &[u32], n: usize) -> Result<()> {
        let keep = self.keep_shared(context, context.len());
        let end = (keep + n).min(context.len().saturating_sub(1));
        if end > keep {
            self.session.forward(&context[keep..end], Logits::Last)?;
            self.cached.extend_from_slice(&context[keep..end]);
        }
        Ok(())
    }

    /// Up to `max` tokens the draft model predicts greedily after `context`. It runs only the
    /// part of `context` its cache does not hold (after a partial acceptance, the common
    /// prefix stays), so a round costs one pass per drafted token.
    pub fn propose(&mut self, context: &[u32], max: usize) -> Result<Vec<u32>> {
        let room = self.session.capacity().saturating_sub(context.len());
        let max = max.min(room);
        if max == 0 || context.is_empty() {
            return Ok(Vec::new());
        }
        // At least the last context token runs, for its logits.
        let keep = self.keep_shared(context, context.len() - 1);
        let new = &context[keep..];
        let mut next = argmax(self.session.forward(new, Logits::Last)?);
        self.cached.extend_from_slice(new);
        let mut drafts = vec![next];
        while drafts.len() < max {
            next = argmax(self.session.forward(&[next], Logits::Last)?);
            self.cached.push(drafts[drafts.len() - 1]);
            drafts.push(next);
        }
        Ok(drafts)
    }
}
