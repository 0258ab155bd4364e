//! What a JSON-schema constraint costs decode: the same prompt and the same tokens decoded
//! with and without the constraint. The tokens are the constrained greedy answer, fed back in
//! both modes (the unconstrained runs take them instead of their own argmax), so both time
//! the same forward passes; the constrained runs also compute each mask (on a helper thread
//! during the forward pass, as the service does), apply it and advance the grammar.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::backend::Logits;
use crate::engine::Engine;
use crate::generate::{CancelHandle, GenerateOptions};
use crate::guide::{Constraint, Guide};
use crate::sampling::{argmax, SamplingParams};
use crate::service::metrics;

use super::median;

const PROMPT: &str = "Describe one device of a smart home as JSON.";
/// Most tokens the constrained answer may take.
const MAX_ANSWER_TOKENS: usize = 256;

#[derive(Debug, Clone, Serialize)]
pub struct ConstrainedDecode {
    /// Decoded tokens per run (the constrained greedy answer).
    pub tokens: usize,
    pub unconstrained_tokens_per_s: f64,
    pub constrained_tokens_per_s: f64,
    /// 1 - constrained / unconstrained, in percent: the median over runs of each run's pair
    /// (timed back to back, so slow drift of the machine cancels).
    pub cost_percent: f64,
    pub mask_us_median: f64,
    pub mask_us_p99: f64,
}

pub fn constrained_decode(
    engine: &Engine,
    constraint: &Constraint,
    runs: usize,
) -> Result<ConstrainedDecode> {
    let guides = engine.guides()?;
    let prompt = engine.chat_prompt(&Engine::single_turn(None, PROMPT))?;
    let options = GenerateOptions {
        max_new_tokens: MAX_ANSWER_TOKENS,
        sampling: SamplingParams::greedy(),
        ..engine.default_options()
    };
    let mut generator = engine.generator(Some(prompt.len() + MAX_ANSWER_TOKENS + 1))?;
    let answer = generator.generate_guided(
        &engine.tokenizer,
        &prompt,
        &options,
        Some(guides.compile(constraint)?),
        &CancelHandle::new(),
        &mut |_| {},
    )?;
    if !answer.constraint.is_some_and(|c| c.complete) {
        bail!("the constrained answer did not complete in {MAX_ANSWER_TOKENS} tokens");
    }
    let tokens = answer.tokens;
    let rate = |time: Duration| tokens.len() as f64 / time.as_secs_f64();
    let (mut plain, mut guided, mut costs, mut masks) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let alone = rate(decode(engine, &prompt, &tokens, None)?);
        let mut guide = guides.compile(constraint)?;
        let masked = rate(decode(engine, &prompt, &tokens, Some(&mut guide))?);
        plain.push(alone);
        guided.push(masked);
        costs.push(100.0 * (1.0 - masked / alone));
        masks.extend(guide.mask_times().iter().map(|t| t.as_secs_f64() * 1e6));
    }
    let Some(mask_us) = metrics::percentiles(&masks, &[50.0, 99.0]) else {
        bail!("the constrained answer has no tokens to time");
    };
    Ok(ConstrainedDecode {
        tokens: tokens.len(),
        unconstrained_tokens_per_s: median(&mut plain),
        constrained_tokens_per_s: median(&mut guided),
        cost_percent: median(&mut costs),
        mask_us_median: mask_us[0],
        mask_us_p99: mask_us[1],
    })
}

/// Prefills `prompt` on a fresh session, then decodes `tokens` (each picked from the logits
/// the step before, as sampling would), masked by `guide` when given. Returns decode time.
fn decode(
    engine: &Engine,
    prompt: &[u32],
    tokens: &[u32],
    mut guide: Option<&mut Guide>,
) -> Result<Duration> {
    let mut session = engine
        .backend
        .new_session(prompt.len() + tokens.len() + 1)?;
    let mut logits = session.forward(prompt, Logits::Last)?.to_vec();
    let start = Instant::now();
    for &token in tokens {
        if let Some(g) = guide.as_deref_mut() {
            g.constrain(&mut logits)?;
        }
        let picked = argmax(&logits);
        std::hint::black_box(picked);
        let Some(g) = guide.as_deref_mut() else {
            logits = session.forward(&[token], Logits::Last)?.to_vec();
            continue;
        };
        if !logits[token as usize].is_finite() {
            bail!("the constraint refused token {token} of its own answer");
        }
        g.commit(token)?;
        logits =
            g.prepare_during(|| session.forward(&[token], Logits::Last).map(|l| l.to_vec()))??;
    }
    Ok(start.elapsed())
}
