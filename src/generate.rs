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
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{StopMatcher, StopStep, Tokenizer};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// User stop strings: generation ends when one appears; it is not emitted.
    pub stop: Vec<String>,
    /// Token ids that end generation (generation_config.json's eos ids); not emitted.
    pub eos_token_ids: Vec<u32>,
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

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
}

pub struct Generator {
    session: Box<dyn Session>,
    /// The tokens whose keys and values the session's cache holds, in order.
    cached: Vec<u32>,
}

impl Generator {
    pub fn new(session: Box<dyn Session>) -> Self {
        Self {
            session,
            cached: Vec::new(),
        }
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
        let start = Instant::now();
        let capacity = self.session.capacity();
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        if prompt.len() >= capacity {
            bail!(
                "prompt too long: {} tokens, the context holds {capacity} (prompt plus at least one new token must fit)",
                prompt.len()
            );
        }
        let mut sampler = Sampler::new(options.sampling.clone())?;
        let mut usage = Usage {
            prompt_tokens: prompt.len(),
            ..Usage::default()
        };
        let mut timings = Timings::default();
        let mut generated = Vec::new();
        let mut text = String::new();
        let mut decoder = tokenizer.stream_decoder();
        let mut stops = StopMatcher::new(&options.stop);
        let mut history = prompt.to_vec();

        if cancel.is_cancelled() {
            return Ok(Generation {
                text,
                tokens: generated,
                finish_reason: FinishReason::Cancelled,
                usage,
                timings,
            });
        }

        // Reuse the cached prefix; at least the last prompt token runs, for its logits.
        let reuse = common_prefix(&self.cached, prompt).min(prompt.len() - 1);
        self.session.truncate(reuse);
        self.cached.truncate(reuse);
        usage.cached_prompt_tokens = reuse;
        let new_part = &prompt[reuse..];
        // The session's own buffer: the sampler modifies it in place (no copy per token).
        let mut logits = self.session.forward(new_part, Logits::Last)?;
        self.cached.extend_from_slice(new_part);
        timings.prefill = start.elapsed();
        timings.prefill_tokens_per_s = rate(new_part.len(), timings.prefill);

        let mut first_token_at = None;
        let mut stop_string_seen = false;
        let mut finish_reason = loop {
            if cancel.is_cancelled() {
                break FinishReason::Cancelled;
            }
            let next = sampler.sample(logits, &history);
            if first_token_at.is_none() {
                let now = Instant::now();
                timings.ttft = now - start;
                first_token_at = Some(now);
            }
            usage.completion_tokens += 1;
            history.push(next);
            if options.eos_token_ids.contains(&next) {
                break FinishReason::Stop;
            }
            generated.push(next);
            let piece = decoder.push(next)?;
            match stops.push(&piece) {
                StopStep::Emit(t) => emit(&t, &mut text, on_text),
                StopStep::Stop(t) => {
                    emit(&t, &mut text, on_text);
                    stop_string_seen = true;
                    break FinishReason::Stop;
                }
            }
            if generated.len() >= options.max_new_tokens || self.session.len() >= capacity {
                break FinishReason::Length;
            }
            logits = self.session.forward(&[next], Logits::Last)?;
            self.cached.push(next);
        };
        if !stop_string_seen {
            // Release what was held back: an unfinished character at the very end, and text
            // that could have begun a stop string (it still may, now that all is known).
            let tail = decoder.finish()?;
            match stops.push(&tail) {
                StopStep::Emit(t) => {
                    emit(&t, &mut text, on_text);
                    emit(&stops.finish(), &mut text, on_text);
                }
                StopStep::Stop(t) => {
                    emit(&t, &mut text, on_text);
                    finish_reason = FinishReason::Stop;
                }
            }
        }
        if let Some(first) = first_token_at {
            timings.decode = first.elapsed();
            timings.decode_tokens_per_s =
                rate(usage.completion_tokens.saturating_sub(1), timings.decode);
        }
        Ok(Generation {
            text,
            tokens: generated,
            finish_reason,
            usage,
            timings,
        })
    }
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

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
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
