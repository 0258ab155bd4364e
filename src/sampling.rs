//! Logits processors and samplers on plain `&[f32]`, seeded and reproducible.
//!
//! Semantics follow Hugging Face `generate`: the repetition penalty is a logits processor
//! (applied even when decoding greedily), then — only when sampling — temperature, top-k,
//! top-p and min-p warpers, in that order, then one multinomial draw. The random stream is
//! ChaCha8, whose output is fixed by its specification, so a seed reproduces across builds.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use crate::bundle::GenerationConfig;

/// `GenerationConfig._get_default_generation_params()["top_k"]` in transformers.
const HF_DEFAULT_TOP_K: usize = 50;

/// The accepted values of a sampling setting that is a number. The one place these ranges
/// are written: `SamplingParams::validate` (CLI flags, the bundle's defaults) and the
/// service's request parser both check against them.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    /// The setting's name, as the wire protocol and the error messages spell it.
    pub name: &'static str,
    /// What is accepted, as an error message says it ("… must be {expected}, got …").
    pub expected: &'static str,
    accepts: fn(f32) -> bool,
}

impl Range {
    pub fn accepts(&self, value: f32) -> bool {
        (self.accepts)(value)
    }
}

/// One range per setting: the name tells them apart.
impl PartialEq for Range {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

pub const TEMPERATURE: Range = Range {
    name: "temperature",
    expected: "a number >= 0 (0 = greedy)",
    accepts: |t| t.is_finite() && t >= 0.0,
};
pub const TOP_P: Range = Range {
    name: "top_p",
    expected: "a number in (0, 1]",
    accepts: |p| p > 0.0 && p <= 1.0,
};
pub const MIN_P: Range = Range {
    name: "min_p",
    expected: "a number in [0, 1]",
    accepts: |p| (0.0..=1.0).contains(&p),
};
pub const REPETITION_PENALTY: Range = Range {
    name: "repetition_penalty",
    expected: "a number > 0",
    accepts: |r| r.is_finite() && r > 0.0,
};

/// A rejected sampling setting; the message names the setting and the accepted range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{} must be {}, got {value}", range.name, range.expected)]
pub struct SamplingError {
    pub range: Range,
    pub value: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); HF's `do_sample=False`.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1 disables top-p.
    pub top_p: f32,
    /// 0 disables min-p.
    pub min_p: f32,
    /// 1 disables the penalty.
    pub repetition_penalty: f32,
    /// None: a seed is drawn from the clock (and reported by the caller if it wants).
    pub seed: Option<u64>,
}

/// Settings a caller gives over the defaults (a command-line flag, a request field); None keeps
/// the default. The one place where overrides meet defaults, for the CLI and the service alike.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingOverrides {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
}

impl SamplingOverrides {
    /// Writes the given settings over `params` (the seed always: None means "draw one").
    pub fn apply(&self, params: &mut SamplingParams) {
        if let Some(t) = self.temperature {
            params.temperature = t;
        }
        if let Some(p) = self.top_p {
            params.top_p = p;
        }
        if let Some(k) = self.top_k {
            params.top_k = k;
        }
        if let Some(p) = self.min_p {
            params.min_p = p;
        }
        if let Some(r) = self.repetition_penalty {
            params.repetition_penalty = r;
        }
        params.seed = self.seed;
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }

    /// The model's defaults: sampling settings apply only when `do_sample` is true (as in
    /// HF), the repetition penalty always.
    pub fn from_generation_config(g: &GenerationConfig) -> Self {
        let mut p = Self::greedy();
        if let Some(penalty) = g.repetition_penalty {
            p.repetition_penalty = penalty as f32;
        }
        if g.do_sample == Some(true) {
            // Unset keys take transformers' global defaults (top_k 50, the rest neutral).
            p.temperature = g.temperature.unwrap_or(1.0) as f32;
            p.top_k = g.top_k.unwrap_or(HF_DEFAULT_TOP_K);
            p.top_p = g.top_p.unwrap_or(1.0) as f32;
            p.min_p = g.min_p.unwrap_or(0.0) as f32;
        }
        p
    }

    pub fn validate(&self) -> Result<(), SamplingError> {
        for (range, value) in [
            (TEMPERATURE, self.temperature),
            (TOP_P, self.top_p),
            (MIN_P, self.min_p),
            (REPETITION_PENALTY, self.repetition_penalty),
        ] {
            if !range.accepts(value) {
                return Err(SamplingError { range, value });
            }
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// HF `RepetitionPenaltyLogitsProcessor`: each distinct token seen so far (prompt included)
/// has its logit divided by `penalty` when positive, multiplied when negative; once per token.
pub fn apply_repetition_penalty(
    logits: &mut [f32],
    seen: &[u32],
    penalty: f32,
    scratch: &mut Vec<u32>,
) {
    if penalty == 1.0 {
        return;
    }
    scratch.clear();
    scratch.extend_from_slice(seen);
    scratch.sort_unstable();
    scratch.dedup();
    for &id in scratch.iter() {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// Index of the largest logit; the first one on ties (as `torch.argmax`), NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    // The largest value first, in 16 independent lanes the compiler turns into SIMD maxima (a
    // running index made the loop scalar: ~0.2 ms per token over Qwen2's 151,936 logits, spent
    // on the engine thread while the kernel threads wait), then its first position.
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &l) in lanes.iter_mut().zip(chunk) {
            *m = if l > *m { l } else { *m };
        }
    }
    let tail = chunks.remainder().iter();
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    if max == f32::NEG_INFINITY {
        return 0;
    }
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

/// A token id and its (processed) logit.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    id: u32,
    logit: f32,
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    candidates: Vec<Candidate>,
    probs: Vec<f64>,
    dedup: Vec<u32>,
    /// top-k's selection buffer, kept between tokens (it can hold the whole vocabulary).
    kth: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(clock_seed);
        Ok(Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            candidates: Vec::new(),
            probs: Vec::new(),
            dedup: Vec::new(),
            kth: Vec::new(),
        })
    }

    /// Picks the next token. `logits` is modified in place (penalty, temperature);
    /// `seen` is every token of the sequence so far, prompt included.
    pub fn sample(&mut self, logits: &mut [f32], seen: &[u32]) -> u32 {
        let p = &self.params;
        apply_repetition_penalty(logits, seen, p.repetition_penalty, &mut self.dedup);
        if p.is_greedy() {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| **l > f32::NEG_INFINITY)
                .map(|(i, &l)| Candidate {
                    id: i as u32,
                    logit: if p.temperature == 1.0 { l } else { l * inv_t },
                }),
        );
        if self.candidates.is_empty() {
            return argmax(logits);
        }
        if p.top_k > 0 {
            top_k(&mut self.candidates, &mut self.kth, p.top_k);
        }
        if p.top_p < 1.0 {
            top_p(&mut self.candidates, &mut self.probs, p.top_p);
        }
        if p.min_p > 0.0 {
            min_p(&mut self.candidates, &mut self.probs, p.min_p);
        }
        softmax(&self.candidates, &mut self.probs);
        let u = unit_f64(&mut self.rng);
        let mut cumulative = 0.0;
        for (c, &prob) in self.candidates.iter().zip(&self.probs) {
            cumulative += prob;
            if u < cumulative {
                return c.id;
            }
        }
        // Rounding left the total a hair under 1 and u above it: the last candidate.
        self.candidates.last().map_or(0, |c| c.id)
    }
}

/// Keeps every candidate whose logit is at least the k-th largest (HF keeps ties).
fn top_k(candidates: &mut Vec<Candidate>, values: &mut Vec<f32>, k: usize) {
    if k >= candidates.len() {
        return;
    }
    values.clear();
    values.extend(candidates.iter().map(|c| c.logit));
    let (_, kth, _) = values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let threshold = *kth;
    candidates.retain(|c| c.logit >= threshold);
}

/// Sorts by descending logit (ties by id, so the order is deterministic) and keeps the
/// smallest head whose probability mass reaches `p`. HF removes a token when the ascending
/// cumulative mass up to and including it is <= 1 - p, i.e. keeps a token exactly when the
/// mass of the tokens strictly more likely than it is < p; the most likely is always kept.
fn top_p(candidates: &mut Vec<Candidate>, probs: &mut Vec<f64>, p: f32) {
    candidates.sort_by(|a, b| b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id)));
    softmax(candidates, probs);
    let mut before = 0.0f64;
    let mut keep = 0;
    for &prob in probs.iter() {
        if keep > 0 && before >= p as f64 {
            break;
        }
        before += prob;
        keep += 1;
    }
    candidates.truncate(keep.max(1));
}

/// Drops candidates whose probability is below `min_p` times the top probability.
fn min_p(candidates: &mut Vec<Candidate>, probs: &mut Vec<f64>, min_p: f32) {
    softmax(candidates, probs);
    let top = probs.iter().cloned().fold(0.0f64, f64::max);
    let threshold = min_p as f64 * top;
    let mut i = 0;
    candidates.retain(|_| {
        let keep = probs[i] >= threshold;
        i += 1;
        keep
    });
}

fn softmax(candidates: &[Candidate], probs: &mut Vec<f64>) {
    let max = candidates
        .iter()
        .map(|c| c.logit)
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    probs.clear();
    probs.extend(candidates.iter().map(|c| (c.logit as f64 - max).exp()));
    let sum: f64 = probs.iter().sum();
    for p in probs.iter_mut() {
        *p /= sum;
    }
}

/// A uniform draw in [0, 1) from the top 53 bits.
fn unit_f64(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn clock_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..SamplingParams::greedy()
        }
    }

    #[test]
    fn argmax_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NAN]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn argmax_matches_a_plain_scan() {
        // Lengths around the 16-lane blocks, ties and NaNs anywhere.
        let mut state = 12345u32;
        for len in [1, 15, 16, 17, 33, 151_936] {
            let logits: Vec<f32> = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    match state >> 28 {
                        0 => f32::NAN,
                        v => (v % 5) as f32 - (state >> 16 & 3) as f32,
                    }
                })
                .collect();
            let mut best = (0, f32::NEG_INFINITY);
            for (i, &l) in logits.iter().enumerate() {
                if l > best.1 {
                    best = (i, l);
                }
            }
            assert_eq!(argmax(&logits), best.0 as u32, "length {len}");
        }
    }

    #[test]
    fn penalty_matches_hf_formula() {
        let mut logits = vec![2.0, -1.0, 0.5, 3.0];
        let mut scratch = Vec::new();
        apply_repetition_penalty(&mut logits, &[0, 1, 1, 0], 2.0, &mut scratch);
        assert_eq!(logits, vec![1.0, -2.0, 0.5, 3.0]);
    }

    #[test]
    fn top_p_keeps_smallest_head_reaching_p() {
        // probabilities 0.5, 0.3, 0.2 (logits are their logs)
        let make = || -> Vec<Candidate> {
            [0.2f32, 0.5, 0.3]
                .iter()
                .enumerate()
                .map(|(i, p)| Candidate {
                    id: i as u32,
                    logit: p.ln(),
                })
                .collect()
        };
        let mut probs = Vec::new();
        let mut c = make();
        top_p(&mut c, &mut probs, 0.5);
        assert_eq!(c.iter().map(|c| c.id).collect::<Vec<_>>(), vec![1]);
        let mut c = make();
        top_p(&mut c, &mut probs, 0.6);
        assert_eq!(c.iter().map(|c| c.id).collect::<Vec<_>>(), vec![1, 2]);
        let mut c = make();
        top_p(&mut c, &mut probs, 1.0);
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn validation() {
        assert!(params(-0.1).validate().is_err());
        assert!(params(f32::NAN).validate().is_err());
        let mut p = params(1.0);
        p.top_p = 0.0;
        assert_eq!(
            p.validate(),
            Err(SamplingError {
                range: TOP_P,
                value: 0.0
            })
        );
        p.top_p = 1.5;
        assert!(p.validate().is_err());
        p.top_p = 1.0;
        p.min_p = 1.5;
        assert!(p.validate().is_err());
        p.min_p = 0.0;
        p.repetition_penalty = 0.0;
        assert!(p.validate().is_err());
    }

    #[test]
    fn defaults_follow_do_sample() {
        let g = GenerationConfig {
            do_sample: Some(true),
            temperature: Some(0.7),
            top_p: Some(0.8),
            top_k: Some(20),
            repetition_penalty: Some(1.05),
            ..Default::default()
        };
        let p = SamplingParams::from_generation_config(&g);
        assert_eq!((p.temperature, p.top_k, p.top_p), (0.7, 20, 0.8));
        let unset = GenerationConfig {
            do_sample: Some(true),
            ..Default::default()
        };
        assert_eq!(SamplingParams::from_generation_config(&unset).top_k, 50);
        let g = GenerationConfig {
            do_sample: None,
            ..g
        };
        let p = SamplingParams::from_generation_config(&g);
        assert!(p.is_greedy());
        assert_eq!(p.repetition_penalty, 1.05);
    }
}
