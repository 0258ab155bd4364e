//! Speculative decoding's draft model: a smaller model with the target's vocabulary (the 0.5B
//! for the 1.5B) proposes the next tokens greedily, and the target verifies them in one pass
//! (`generate::Generator`). Greedy drafts are deterministic, so verifying them by sampling each
//! row as plain decoding would (a draft kept while it equals the sample) gives exactly the
//! target's output, greedy or sampled.
//!
//! With prompt lookup as well (`Drafter`), the context's own continuation is drafted first,
//! as far as the draft model predicts it too (one pass checks it), then the model's tokens;
//! while lookup's drafts keep holding they skip the check.

use anyhow::{bail, Result};

use crate::backend::{Logits, Session};
use crate::engine::Engine;
use crate::generate::common_prefix;
use crate::lookup::DraftLength;
use crate::sampling::argmax;

/// Drafts per pass by default. With the pending token, three drafts make a pass of four rows,
/// the most a native decode-batch product takes in one pass over the weights (`BATCH_ROWS`):
/// a fifth row made the 1.5B's verification half again as dear on a 2-core Zen 2 (int8: 99 ->
/// 145 ms), and the 0.5B drafting for the 1.5B int4 ran at 0.87x plain decoding with 4 drafts
/// against 1.03x with 3 (README, "Speculative decoding").
pub const DEFAULT_DRAFT_TOKENS: usize = 3;

/// Token ids a draft model proposes from by default (`draft_vocabulary`).
pub const DEFAULT_DRAFT_VOCABULARY: usize = 65536;

pub struct DraftModel {
    session: Box<dyn Session>,
    /// The tokens its cache holds, in order.
    cached: Vec<u32>,
    /// Drafts per pass, at most.
    pub max_tokens: usize,
    /// With a draft vocabulary (`draft_vocabulary`): whether each id is in it.
    vocabulary: Option<Vec<bool>>,
}

/// A draft session keeps to its vocabulary while at most one token in this many of the
/// context lies outside it: English prose and code have 0-5% of their tokens above Qwen2's
/// first 65,536 ids (the speculative benchmark's prompts and answers), Chinese half, Russian a
/// quarter; their drafts then come from every token's logits.
const OUTSIDE_VOCABULARY_AT_MOST_ONE_IN: usize = 8;

impl DraftModel {
    /// `draft`'s session of `capacity` positions, for a `target` that must share its
    /// vocabulary: the same token for every id (checked on both tokenizers). With a
    /// `vocabulary` above 0 it drafts from the ids below it and the tokenizer's added tokens
    /// while the context keeps to them (`draft_vocabulary`, `OUTSIDE_VOCABULARY_AT_MOST_ONE_IN`).
    pub fn new(
        draft: &Engine,
        target: &Engine,
        capacity: usize,
        max_tokens: usize,
        vocabulary: usize,
    ) -> Result<Self> {
        let (d, t) = (&draft.tokenizer, &target.tokenizer);
        if !d.same_vocabulary(t) {
            bail!(
                "the draft model's vocabulary is not the model's ({} and {} tokens, or other tokens for the same ids): drafts must be the model's own tokens",
                d.vocab_size(),
                t.vocab_size()
            );
        }
        let (session, vocabulary) = match draft_vocabulary(draft, vocabulary) {
            Some(ids) => {
                let mut member = vec![false; draft.backend.config().vocab_size];
                for &id in &ids {
                    member[id as usize] = true;
                }
                let session = draft.backend.new_draft_session(capacity, &ids)?;
                (session, Some(member))
            }
            None => (draft.backend.new_session(capacity)?, None),
        };
        Ok(Self {
            session,
            cached: Vec::new(),
            max_tokens,
            vocabulary,
        })
    }

    /// Whether drafts for `context` come from the draft vocabulary's logits only: where
    /// there is one and the context keeps to it (`OUTSIDE_VOCABULARY_AT_MOST_ONE_IN`).
    fn keeps_to_vocabulary(&self, context: &[u32]) -> bool {
        self.vocabulary.as_ref().is_some_and(|member| {
            let outside = context
                .iter()
                .filter(|&&t| !member.get(t as usize).copied().unwrap_or(false))
                .count();
            outside * OUTSIDE_VOCABULARY_AT_MOST_ONE_IN <= context.len()
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

    /// Tokens the draft model predicts greedily after `context`: first those of `lookup`
    /// (prompt lookup's proposal, may be empty) it predicts too, checked in the same pass that
    /// runs what its cache lacks of `context`, then its own, one pass each, up to `max` drafts
    /// in all (at least one where `lookup` is not empty). The part of `context` its cache holds
    /// stays (after a partial acceptance, the common prefix), so a draft of its own costs one
    /// pass.
    pub fn propose(&mut self, context: &[u32], lookup: &[u32], max: usize) -> Result<Drafts> {
        let room = self.session.capacity().saturating_sub(context.len());
        let lookup = &lookup[..lookup.len().min(room.saturating_sub(1))];
        let max = max.min(room);
        if (max == 0 && lookup.is_empty()) || context.is_empty() {
            return Ok(Drafts::default());
        }
        let narrow = self.keeps_to_vocabulary(context);
        self.session.keep_to_vocabulary(narrow);
        // At least the last context token runs, for its logits.
        let keep = self.keep_shared(context, context.len() - 1);
        let new = &context[keep..];
        let mut tokens = Vec::new();
        if lookup.is_empty() {
            tokens.push(argmax(self.session.forward(new, Logits::Last)?));
        } else {
            let input = [new, lookup].concat();
            let logits = self.session.forward(&input, Logits::All)?;
            let vocab = logits.len() / input.len();
            // The rows from the context's last token on predict `lookup`'s tokens in turn.
            for (i, row) in logits.chunks(vocab).skip(new.len() - 1).enumerate() {
                let t = argmax(row);
                tokens.push(t);
                if lookup.get(i) != Some(&t) {
                    break;
                }
            }
        }
        let from_lookup = tokens.len() - 1;
        self.cached.extend_from_slice(new);
        self.cached.extend_from_slice(&lookup[..from_lookup]);
        // Forget the lookup tokens it did not predict.
        self.session.truncate(self.cached.len());
        let mut next = tokens[tokens.len() - 1];
        while tokens.len() < max {
            self.cached.push(next);
            next = argmax(self.session.forward(&[next], Logits::Last)?);
            tokens.push(next);
        }
        Ok(Drafts {
            tokens,
            from_lookup,
        })
    }
}

/// The tokens a draft model proposes from with a vocabulary of `first` (0: every token): the
/// ids below `first` and the tokenizer's added tokens (the end of a turn). Byte-pair ids are
/// in merge order, so the first ids are the most common pieces: the 1.5B's answers to the
/// speculative benchmark's prompts take 98% of their tokens from Qwen2's first 65,536 (94%
/// from the first 32,768), while the 0.5B's head a draft pass reads shrinks from 137 MB to 33
/// (`Backend::new_draft_session`: those rows, in int4). None where that is every token.
pub fn draft_vocabulary(draft: &Engine, first: usize) -> Option<Vec<u32>> {
    let vocab = draft.backend.config().vocab_size;
    if first == 0 || first >= vocab {
        return None;
    }
    let mut ids: Vec<u32> = (0..first as u32).collect();
    ids.extend(
        draft
            .tokenizer
            .added_token_ids()
            .into_iter()
            .filter(|&id| (first..vocab).contains(&(id as usize))),
    );
    ids.sort_unstable();
    ids.dedup();
    Some(ids)
}

/// A draft model's proposal (`DraftModel::propose`).
#[derive(Debug, Default)]
pub struct Drafts {
    pub tokens: Vec<u32>,
    /// How many of the first `tokens` were prompt lookup's.
    pub from_lookup: usize,
}

/// Where a decoding's drafts come from, step by step, and how many (`Generator::generate`,
/// the service's batcher): prompt lookup's continuation of the context where it has one, as
/// far as the draft model (if any) predicts it too, then the draft model's own tokens. Each
/// source keeps its own `DraftLength`. Lookup's drafts that all held (copying the prompt) are
/// trusted: the next skip the draft model's check, until one fails. Which tokens are drafted
/// never changes the output, only the speed.
#[derive(Debug, Clone)]
pub struct Drafter {
    lookup: DraftLength,
    model: DraftLength,
    trust_lookup: bool,
    /// The last proposal: tokens lookup offered, and of the drafts, how many were lookup's.
    offered: usize,
    from_lookup: usize,
    drafted: usize,
}

impl Drafter {
    /// Up to `lookup` prompt-lookup drafts and `model` draft-model drafts a step (0: that
    /// source never drafts).
    pub fn new(lookup: usize, model: usize) -> Self {
        Self {
            lookup: DraftLength::new(lookup),
            model: DraftLength::new(model),
            trust_lookup: false,
            offered: 0,
            from_lookup: 0,
            drafted: 0,
        }
    }

    /// Up to `limit` drafts after `context` (its last token the one about to run), from
    /// `model` where the config has one, at most `model_limit` where the model runs (a service
    /// step's share of rows; 0: none at all); `settle` then says how many held.
    pub fn propose(
        &mut self,
        context: &[u32],
        model: Option<&mut DraftModel>,
        limit: usize,
        model_limit: usize,
    ) -> Result<Vec<u32>> {
        (self.offered, self.from_lookup, self.drafted) = (0, 0, 0);
        // A busy service step leaves a draft model no rows: no drafts then (rows past a
        // decode batch's cost every request in the step; README).
        if limit == 0 || (model.is_some() && model_limit == 0) {
            return Ok(Vec::new());
        }
        let lookup = crate::lookup::draft(context, self.lookup.wanted().min(limit));
        let (offered, drafts) = match model {
            // Trusted lookup drafts go unchecked.
            Some(model) if !self.trust_lookup || lookup.is_empty() => {
                let limit = limit.min(model_limit);
                // Room for the model's token after lookup's.
                let lookup = &lookup[..lookup.len().min(limit - 1)];
                let own = self.model.wanted().min(limit);
                (lookup.len(), model.propose(context, lookup, own)?)
            }
            _ => {
                let drafts = Drafts {
                    tokens: lookup.to_vec(),
                    from_lookup: lookup.len(),
                };
                (lookup.len(), drafts)
            }
        };
        (self.offered, self.from_lookup) = (offered, drafts.from_lookup);
        self.drafted = drafts.tokens.len();
        Ok(drafts.tokens)
    }

    /// Of the last proposal's drafts the first `accepted` held (0 drafts, or no proposal since
    /// the last `settle`: a plain step). Returns how many of those accepted were lookup's.
    pub fn settle(&mut self, accepted: usize) -> usize {
        let from_lookup = self.from_lookup;
        self.lookup.update(self.offered, accepted.min(from_lookup));
        if self.offered > 0 {
            self.trust_lookup = from_lookup == self.offered && accepted >= from_lookup;
        }
        // The model's own drafts count once the target reached them.
        if accepted >= from_lookup {
            self.model
                .update(self.drafted - from_lookup, accepted - from_lookup);
        }
        // Settled: a step that drafts nothing next (a draft model catching up) counts as none.
        (self.offered, self.from_lookup, self.drafted) = (0, 0, 0);
        accepted.min(from_lookup)
    }

    /// Whether any source drafts (not for a constrained request).
    pub fn drafts(&self) -> bool {
        self.lookup.max() > 0 || self.model.max() > 0
    }

    /// How many of the last proposal's drafts were prompt lookup's.
    pub fn from_lookup(&self) -> usize {
        self.from_lookup
    }
}

#[cfg(test)]
mod tests {
    use super::Drafter;

    #[test]
    fn without_a_model_the_drafter_is_prompt_lookup() {
        let context = [1, 2, 3, 4, 5, 6, 1, 2, 3];
        let mut d = Drafter::new(8, 0);
        assert_eq!(d.propose(&context, None, 3, 3).unwrap(), [4, 5, 6]);
        assert_eq!(d.from_lookup(), 3);
        assert_eq!(d.settle(3), 3, "all three held");
        assert_eq!(d.propose(&context, None, 8, 0).unwrap(), [4, 5, 6, 1, 2, 3]);
        // None held: lookup pauses for a token, then drafts one.
        assert_eq!(d.settle(0), 0);
        assert!(d.propose(&context, None, 8, 0).unwrap().is_empty());
        d.settle(0);
        assert_eq!(d.propose(&context, None, 8, 0).unwrap(), [4]);
        // No room, or drafting off: nothing.
        assert!(d.propose(&context, None, 0, 8).unwrap().is_empty());
        assert!(Drafter::new(0, 3)
            .propose(&context, None, 8, 8)
            .unwrap()
            .is_empty());
    }
}
