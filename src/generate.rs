//! The generation loop: prefill, decode one token at a time, stop rules, streaming,
//! cancellation, usage and timings.
//!
//! A `Generator` owns one backend session and remembers which tokens its KV cache holds, so
//! a follow-up prompt that starts with the same tokens (the next turn of a chat) only runs
//! the new part. It never touches a backend's internals: only `Session`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::backend::{Logits, Session};
use crate::draft::{DraftModel, Drafter};
use crate::guide::Guide;
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{StopMatcher, StopStep, StreamDecoder, Tokenizer};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// User stop strings: generation ends when one appears; it is not emitted.
    pub stop: Vec<String>,
    /// Token ids that end generation (generation_config.json's eos ids); not emitted.
    pub eos_token_ids: Vec<u32>,
    /// Speculative decoding with prompt-lookup drafts (`lookup`): up to this many drafted
    /// tokens verified per forward pass; 0 = off. With a draft model (`with_draft_model`),
    /// lookup's drafts come first (`Drafter`). The output is the same either way; off for
    /// constrained output (its masks are computed a token at a time).
    pub prompt_lookup: usize,
}

/// Cancels a running generation from another thread; checked before every token.
#[derive(Debug, Clone, Default)]
pub struct CancelHandle(Arc<AtomicBool>);

impl CancelHandle {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An eos token or a stop string.
    Stop,
    /// `max_new_tokens` reached, or the context is full.
    Length,
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Tokens sampled, the final eos included.
    pub completion_tokens: usize,
    /// Prompt tokens whose keys and values were reused from the previous call.
    pub cached_prompt_tokens: usize,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// From the call to the first sampled token (prefill + one sampling step).
    pub ttft: Duration,
    pub prefill: Duration,
    /// From the first token to the last.
    pub decode: Duration,
    /// Prompt tokens actually run (not reused) per second of prefill.
    pub prefill_tokens_per_s: f64,
    /// Tokens after the first per second of decode.
    pub decode_tokens_per_s: f64,
}

/// How speculative decoding went: tokens drafted, and how many of them the model confirmed
/// (each confirmed one is a token that needed no forward pass of its own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Speculation {
    pub drafted: usize,
    pub accepted: usize,
    /// Forward passes of the decode phase (drafts verified or not).
    pub steps: usize,
    /// Of `drafted` and `accepted`, those prompt lookup drafted (all of them without a draft
    /// model; with one, lookup drafts first and the model where the context has no match).
    pub lookup_drafted: usize,
    pub lookup_accepted: usize,
    /// Time spent drafting (the draft model's passes, prompt lookup's search) and in the
    /// model's own passes, which verify the drafts (`generate`; the service's steps run several
    /// requests at once and leave these zero).
    pub drafting: Duration,
    pub verifying: Duration,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    /// How a constrained generation went (None when unconstrained).
    pub constraint: Option<ConstraintReport>,
    /// Speculative decoding's counts (all zero when it was off).
    pub speculation: Speculation,
}

#[derive(Debug, Clone, Default)]
pub struct ConstraintReport {
    /// The text is a complete match of the grammar (false when cut by the token limit).
    pub complete: bool,
    /// How long each token mask took to compute.
    pub mask_times: Vec<Duration>,
}

/// One generation between its tokens: sampler, stop rules, streamed text, usage and timings.
/// `Generator::generate` drives one over one session; the service's engine loop drives
/// several, a decode step at a time. It never touches a session: the driver runs the
/// forward passes and hands it the logits.
pub struct Decoding<'t> {
    sampler: Sampler,
    max_new_tokens: usize,
    eos_token_ids: Vec<u32>,
    capacity: usize,
    history: Vec<u32>,
    generated: Vec<u32>,
    text: String,
    decoder: StreamDecoder<'t>,
    stops: StopMatcher,
    stop_string_seen: bool,
    /// The constraint on the output, if any.
    guide: Option<Guide>,
    finish_reason: Option<FinishReason>,
    usage: Usage,
    speculation: Speculation,
    timings: Timings,
    start: Instant,
    first_token_at: Option<Instant>,
}

impl<'t> Decoding<'t> {
    /// Checks the prompt against a context of `capacity` positions (the prompt and at least
    /// one new token must fit) and the options; the clock for TTFT starts here.
    pub fn new(
        tokenizer: &'t Tokenizer,
        prompt: &[u32],
        options: &GenerateOptions,
        capacity: usize,
    ) -> Result<Self> {
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        if prompt.len() >= capacity {
            bail!(
                "prompt too long: {} tokens, the context holds {capacity} (prompt plus at least one new token must fit)",
                prompt.len()
            );
        }
        Ok(Self {
            sampler: Sampler::new(options.sampling.clone())?,
            max_new_tokens: options.max_new_tokens,
            eos_token_ids: options.eos_token_ids.clone(),
            capacity,
            history: prompt.to_vec(),
            generated: Vec::new(),
            text: String::new(),
            decoder: tokenizer.stream_decoder(),
            stops: StopMatcher::new(&options.stop),
            stop_string_seen: false,
            guide: None,
            finish_reason: None,
            usage: Usage {
                prompt_tokens: prompt.len(),
                ..Usage::default()
            },
            speculation: Speculation::default(),
            timings: Timings::default(),
            start: Instant::now(),
            first_token_at: None,
        })
    }

    /// Constrains the output with `guide`.
    pub fn with_guide(mut self, guide: Option<Guide>) -> Self {
        self.guide = guide;
        self
    }

    /// Lends the guide out (to compute its next mask on another thread while the forward pass
    /// runs); `return_guide` gives it back before the next `next`.
    pub fn lend_guide(&mut self) -> Option<Guide> {
        self.guide.take()
    }

    pub fn return_guide(&mut self, guide: Guide) {
        self.guide = Some(guide);
    }

    /// Records the prefill: `reused` prompt positions came from a cache, the rest ran.
    pub fn prefilled(&mut self, reused: usize) {
        self.usage.cached_prompt_tokens = reused;
        self.timings.prefill = self.start.elapsed();
        self.timings.prefill_tokens_per_s =
            rate(self.usage.prompt_tokens - reused, self.timings.prefill);
    }

    /// Samples the next token from `logits` (modified in place) of a session now holding
    /// `filled` positions, streams the text it completes, and returns the token to run next,
    /// or None when the generation is over (eos, a stop string, the token limit, a full
    /// context).
    pub fn next(
        &mut self,
        logits: &mut [f32],
        filled: usize,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Option<u32>> {
        if self.finish_reason.is_some() {
            return Ok(None);
        }
        if let Some(guide) = &mut self.guide {
            guide.constrain(logits)?;
        }
        let next = self.sampler.sample(logits, &self.history);
        if self.first_token_at.is_none() {
            let now = Instant::now();
            self.timings.ttft = now - self.start;
            self.first_token_at = Some(now);
        }
        self.usage.completion_tokens += 1;
        self.history.push(next);
        if self.eos_token_ids.contains(&next) {
            return Ok(self.end(FinishReason::Stop));
        }
        if let Some(guide) = &mut self.guide {
            guide.commit(next)?;
        }
        self.generated.push(next);
        let piece = self.decoder.push(next)?;
        match self.stops.push(&piece) {
            StopStep::Emit(t) => emit(&t, &mut self.text, on_text),
            StopStep::Stop(t) => {
                emit(&t, &mut self.text, on_text);
                self.stop_string_seen = true;
                return Ok(self.end(FinishReason::Stop));
            }
        }
        if self.generated.len() >= self.max_new_tokens || filled >= self.capacity {
            return Ok(self.end(FinishReason::Length));
        }
        Ok(Some(next))
    }

    /// Counts one verification pass of `drafted` drafted tokens of which `accepted` held.
    pub fn record_speculation(&mut self, drafted: usize, accepted: usize) {
        self.speculation.steps += 1;
        self.speculation.drafted += drafted;
        self.speculation.accepted += accepted;
    }

    /// Of a step's drafts, how many prompt lookup made and how many of those held.
    pub fn record_lookup(&mut self, drafted: usize, accepted: usize) {
        self.speculation.lookup_drafted += drafted;
        self.speculation.lookup_accepted += accepted;
    }

    /// New tokens still allowed (`max_new_tokens` less those generated).
    pub fn remaining(&self) -> usize {
        self.max_new_tokens.saturating_sub(self.generated.len())
    }

    /// Ends the generation as cancelled (unless it already ended).
    pub fn cancel(&mut self) {
        self.end(FinishReason::Cancelled);
    }

    fn end(&mut self, reason: FinishReason) -> Option<u32> {
        self.finish_reason.get_or_insert(reason);
        None
    }

    /// Releases the text held back and returns the result.
    pub fn finish(mut self, on_text: &mut dyn FnMut(&str)) -> Result<Generation> {
        let mut finish_reason = *self.finish_reason.get_or_insert(FinishReason::Cancelled);
        if !self.stop_string_seen && self.first_token_at.is_some() {
            // Release what was held back: an unfinished character at the very end, and text
            // that could have begun a stop string (it still may, now that all is known).
            let tail = self.decoder.finish()?;
            match self.stops.push(&tail) {
                StopStep::Emit(t) => {
                    emit(&t, &mut self.text, on_text);
                    emit(&self.stops.finish(), &mut self.text, on_text);
                }
                StopStep::Stop(t) => {
                    emit(&t, &mut self.text, on_text);
                    finish_reason = FinishReason::Stop;
                }
            }
        }
        if let Some(first) = self.first_token_at {
            self.timings.decode = first.elapsed();
            self.timings.decode_tokens_per_s = rate(
                self.usage.completion_tokens.saturating_sub(1),
                self.timings.decode,
            );
        }
        let constraint = self.guide.as_mut().map(|g| ConstraintReport {
            complete: g.is_complete(),
            mask_times: g.mask_times().to_vec(),
        });
        Ok(Generation {
            text: self.text,
            tokens: self.generated,
            finish_reason,
            usage: self.usage,
            timings: self.timings,
            constraint,
            speculation: self.speculation,
        })
    }
}

pub struct Generator {
    session: Box<dyn Session>,
    /// The tokens whose keys and values the session's cache holds, in order.
    cached: Vec<u32>,
    /// Drafts from a smaller model (after prompt lookup's, where that is on too: `Drafter`).
    draft: Option<DraftModel>,
}

impl Generator {
    pub fn new(session: Box<dyn Session>) -> Self {
        Self {
            session,
            cached: Vec::new(),
            draft: None,
        }
    }

    /// Decodes speculatively with `draft`'s proposals (unconstrained generations).
    pub fn with_draft_model(mut self, draft: DraftModel) -> Self {
        self.draft = Some(draft);
        self
    }

    /// Positions the context holds (prompt + generated tokens).
    pub fn context_len(&self) -> usize {
        self.session.capacity()
    }

    /// Generates a continuation of `prompt`, calling `on_text` with each piece of text as
    /// soon as it is whole (complete UTF-8, and certain not to be part of a stop string).
    pub fn generate(
        &mut self,
        tokenizer: &Tokenizer,
        prompt: &[u32],
        options: &GenerateOptions,
        cancel: &CancelHandle,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        self.generate_guided(tokenizer, prompt, options, None, cancel, on_text)
    }

    /// `generate`, the output constrained by `guide` (its masks computed between tokens).
    pub fn generate_guided(
        &mut self,
        tokenizer: &Tokenizer,
        prompt: &[u32],
        options: &GenerateOptions,
        guide: Option<Guide>,
        cancel: &CancelHandle,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let mut decoding =
            Decoding::new(tokenizer, prompt, options, self.session.capacity())?.with_guide(guide);
        if cancel.is_cancelled() {
            decoding.cancel();
            return decoding.finish(on_text);
        }
        let reuse = reuse_prefix(self.session.as_mut(), &mut self.cached, prompt);
        let new_part = &prompt[reuse..];
        // The session's own buffer: the sampler modifies it in place (no copy per token).
        let mut logits = self.session.forward(new_part, Logits::Last)?;
        self.cached.extend_from_slice(new_part);
        decoding.prefilled(reuse);
        if let Some(model) = self.draft.as_mut().filter(|_| decoding.guide.is_none()) {
            // The draft model reads the prompt now, as part of the prefill (as llama.cpp's
            // speculative decoding does), not in the first draft's pass.
            model.catch_up(prompt, prompt.len())?;
        }
        let model_drafts = self.draft.as_ref().map_or(0, |d| d.max_tokens);
        if (model_drafts > 0 || options.prompt_lookup > 0) && decoding.guide.is_none() {
            if let Some(first) = decoding.next(logits, self.cached.len(), on_text)? {
                let drafter = Drafter::new(options.prompt_lookup, model_drafts);
                self.speculate(first, drafter, &mut decoding, cancel, on_text)?;
            }
            return decoding.finish(on_text);
        }
        loop {
            if cancel.is_cancelled() {
                decoding.cancel();
                break;
            }
            match decoding.next(logits, self.cached.len(), on_text)? {
                Some(next) => {
                    logits = forward_guided(self.session.as_mut(), next, &mut decoding)?;
                    self.cached.push(next);
                }
                None => break,
            }
        }
        decoding.finish(on_text)
    }

    /// Decodes on from `pending` (sampled, not yet run) with `drafter`'s drafts (prompt
    /// lookup's, the draft model's, or both): each forward pass runs the pending token and the
    /// tokens drafted after it, and its rows
    /// are sampled in order exactly as plain decoding would sample them one pass at a time. A
    /// draft is kept while it equals what was sampled; the first sample that differs (or the
    /// one after the last draft) is the next pending token, and the cache forgets the drafts
    /// after it. So the output is plain decoding's, token for token, greedy or sampled (a
    /// sample equal to a deterministic draft is the standard acceptance rule, and the random
    /// numbers are drawn in the same order), given rows equal to the one-token logits, which
    /// `Logits::Each` asks for.
    fn speculate(
        &mut self,
        mut pending: u32,
        mut drafter: Drafter,
        decoding: &mut Decoding,
        cancel: &CancelHandle,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<()> {
        loop {
            if cancel.is_cancelled() {
                decoding.cancel();
                return Ok(());
            }
            let held = self.cached.len();
            // Room for the pending token and the drafts; no draft past the token limit.
            let room = self
                .session
                .capacity()
                .saturating_sub(held + 1)
                .min(decoding.remaining().saturating_sub(1));
            self.cached.push(pending);
            // The pending token, then its drafts.
            let mut input = vec![pending];
            let started = Instant::now();
            input.extend(drafter.propose(&self.cached, self.draft.as_mut(), room, usize::MAX)?);
            let drafted = Instant::now();
            decoding.speculation.drafting += drafted - started;
            let draft = &input[1..];
            let which = if draft.is_empty() {
                Logits::Last
            } else {
                Logits::Each
            };
            let logits = self.session.forward(&input, which)?;
            decoding.speculation.verifying += drafted.elapsed();
            self.cached.extend_from_slice(draft);
            decoding.speculation.steps += 1;
            decoding.speculation.drafted += draft.len();
            let vocab = logits.len() / input.len();
            // Input tokens whose keys and values stay cached, and the next pending token.
            let (mut kept, mut next) = (input.len(), None);
            for (j, row) in logits.chunks_mut(vocab).enumerate() {
                match decoding.next(row, held + 1 + j, on_text)? {
                    Some(t) if draft.get(j) == Some(&t) => decoding.speculation.accepted += 1,
                    sampled => {
                        (kept, next) = (j + 1, sampled);
                        break;
                    }
                }
            }
            self.session.truncate(held + kept);
            self.cached.truncate(held + kept);
            let from_lookup = drafter.from_lookup();
            let lookup_accepted = drafter.settle(kept - 1);
            decoding.record_lookup(from_lookup, lookup_accepted);
            match next {
                Some(t) => pending = t,
                None => return Ok(()),
            }
        }
    }
}

/// Runs `token`; a constrained decoding's next mask is computed on a helper thread meanwhile
/// (it depends only on the tokens so far), so it is ready when the logits are.
fn forward_guided<'s>(
    session: &'s mut dyn Session,
    token: u32,
    decoding: &mut Decoding,
) -> Result<&'s mut [f32]> {
    match &mut decoding.guide {
        Some(guide) => guide.prepare_during(|| session.forward(&[token], Logits::Last))?,
        None => session.forward(&[token], Logits::Last),
    }
}

/// Prepares `session`, which holds the keys and values of `cached`, for `prompt`: keeps the
/// common prefix, fills more from the backend's prefix cache where it has it, and returns how
/// many prompt positions are reused (at least the last prompt token always runs, for its
/// logits). `cached` is cut to match.
pub fn reuse_prefix(session: &mut dyn Session, cached: &mut Vec<u32>, prompt: &[u32]) -> usize {
    let reusable = &prompt[..prompt.len().saturating_sub(1)];
    let held = common_prefix(cached, reusable).min(session.len());
    let reuse = session.restore_prefix(reusable, held).min(reusable.len());
    session.truncate(reuse);
    cached.clear();
    cached.extend_from_slice(&prompt[..reuse]);
    reuse
}

fn emit(piece: &str, text: &mut String, on_text: &mut dyn FnMut(&str)) {
    if !piece.is_empty() {
        text.push_str(piece);
        on_text(piece);
    }
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// How many tokens `a` and `b` share from the start.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
    }

    #[test]
    fn cancel_flag() {
        let c = CancelHandle::new();
        let d = c.clone();
        assert!(!d.is_cancelled());
        c.cancel();
        assert!(d.is_cancelled());
    }
}
