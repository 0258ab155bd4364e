//! End-to-end benchmark: time to first token, prefill and decode speed, peak memory.
//!
//! The prompt is real text (so token ids look like a user's), cut to the requested number
//! of tokens; decoding is greedy with no eos, so exactly `gen_tokens` tokens are produced.
//! Each figure is the median of `runs` runs, each on a fresh session: answer runs (prompt +
//! generated tokens: TTFT, prefill and decode speed), then prefill-only runs of a longer
//! prompt. Peak RSS is read after the answer runs. With a JSON schema, `constrained` times
//! what the constraint costs decode.

mod constrained;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::backend::{Logits, Session, StepInput};
use crate::engine::{Engine, EngineOptions};
use crate::generate::{CancelHandle, GenerateOptions, Generation};
use crate::guide::Constraint;
use crate::sampling::argmax;
use crate::sampling::SamplingParams;
pub use constrained::ConstrainedDecode;

const FILLER: &str = "The quick brown fox jumps over the lazy dog while the edge box \
    streams tokens back to the operator. 边缘设备上的小模型也能快速回答问题。 ";

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub engine: EngineOptions,
    /// Prompt of the answer runs (TTFT, prefill, decode).
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Prompt of the prefill-only runs (0 = skip).
    pub long_prompt_tokens: usize,
    /// Runs of each kind; figures are medians.
    pub runs: usize,
    /// Batch sizes for batched decoding (empty = skip): that many sequences, each after the
    /// answer runs' prompt, decode `gen_tokens` steps together.
    pub batches: Vec<usize>,
    /// Also time decode with and without this constraint (None = skip).
    pub constraint: Option<Constraint>,
}

/// Batched decoding at one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct BatchedDecode {
    pub batch: usize,
    /// Tokens of all sequences per second (median of the runs).
    pub tokens_per_s: f64,
    /// Against one sequence decoding alone in the same way.
    pub speedup: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub backend: String,
    /// What computed (for ort: ONNX Runtime's version and the execution providers used).
    pub device: String,
    pub variant: String,
    pub kernels: Option<String>,
    /// Kernels the chosen tier takes from the portable code (there should be none).
    pub kernel_fallbacks: Option<Vec<String>>,
    pub threads: usize,
    pub runs: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub load_s: f64,
    pub ttft_ms: f64,
    /// From the start of the benchmark (process start, give or take argument parsing) to
    /// the first generated token: load plus prefill.
    pub first_token_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub long_prompt_tokens: usize,
    pub prefill_long_tokens_per_s: Option<f64>,
    /// Peak resident set size (VmHWM) after the answer runs, when the OS reports it.
    pub peak_rss_mib: Option<f64>,
    /// Weight bytes read per decoded token, and the rate decode streams them at.
    pub weight_mb_per_token: Option<f64>,
    pub decode_weight_gb_per_s: Option<f64>,
    /// This machine's memory read bandwidth with the same number of threads, measured after
    /// the runs (the decode bound for weights that do not fit in cache), and the fraction of
    /// it decode reaches.
    pub memory_read_gb_per_s: f64,
    pub decode_bandwidth_fraction: Option<f64>,
    pub batched_decode: Vec<BatchedDecode>,
    pub constrained_decode: Option<ConstrainedDecode>,
}

pub fn run(options: &BenchOptions) -> Result<BenchReport> {
    if options.prompt_tokens == 0 || options.gen_tokens == 0 || options.runs == 0 {
        bail!("--prompt-tokens, --gen-tokens and --runs must be at least 1");
    }
    let started = Instant::now();
    let engine = Engine::load(&options.engine)?;
    let load = started.elapsed();
    let needed = options.prompt_tokens + options.gen_tokens;
    let longest = needed.max(options.long_prompt_tokens + 1);
    if longest > engine.max_context() {
        bail!(
            "the benchmark needs {longest} positions; the model's context is {}",
            engine.max_context()
        );
    }
    let (mut ttft, mut prefill, mut decode) = (Vec::new(), Vec::new(), Vec::new());
    let mut generated = 0;
    let mut prompt_len = 0;
    for _ in 0..options.runs {
        let g = answer(&engine, options.prompt_tokens, options.gen_tokens)?;
        ttft.push(ms(g.timings.ttft));
        prefill.push(g.timings.prefill_tokens_per_s);
        decode.push(g.timings.decode_tokens_per_s);
        generated = g.usage.completion_tokens;
        prompt_len = g.usage.prompt_tokens;
    }
    let peak_rss_mib = peak_rss_kib().map(|kib| kib as f64 / 1024.0);
    let decode = median(&mut decode);
    let bytes = engine.backend.weight_bytes_per_token();
    let mut long = Vec::new();
    if options.long_prompt_tokens > 0 {
        for _ in 0..options.runs {
            let g = answer(&engine, options.long_prompt_tokens, 1)?;
            long.push(g.timings.prefill_tokens_per_s);
        }
    }
    let mut batched_decode = Vec::new();
    if !options.batches.is_empty() {
        let rate = |batch| -> Result<f64> {
            let mut v = (0..options.runs)
                .map(|_| batched(&engine, options.prompt_tokens, options.gen_tokens, batch))
                .collect::<Result<Vec<_>>>()?;
            Ok(median(&mut v))
        };
        let alone = rate(1)?;
        for &batch in &options.batches {
            let tokens_per_s = if batch == 1 { alone } else { rate(batch)? };
            batched_decode.push(BatchedDecode {
                batch,
                tokens_per_s,
                speedup: tokens_per_s / alone,
            });
        }
    }
    let constrained_decode = options
        .constraint
        .as_ref()
        .map(|c| constrained::constrained_decode(&engine, c, options.runs))
        .transpose()?;
    let threads = engine.backend.threads().unwrap_or(options.engine.threads);
    // The probe reads as many bytes as decode streams per token (within 64 MiB..1 GiB), so
    // caches help it exactly as much as they help decode (this box class has a 480 MiB L3).
    let probe_bytes = bytes
        .map_or(256 << 20, |b| usize::try_from(b).unwrap_or(usize::MAX))
        .clamp(64 << 20, 1 << 30);
    let memory_read_gb_per_s = memory_read_bandwidth(threads.max(1), probe_bytes);
    let decode_weight_gb_per_s = bytes.map(|b| b as f64 * decode / 1e9);
    Ok(BenchReport {
        backend: engine.backend.name().to_string(),
        device: engine.backend.device(),
        variant: options.engine.variant.clone(),
        kernels: engine.backend.kernels(),
        kernel_fallbacks: engine
            .backend
            .kernels()
            .and_then(|k| crate::backend::native::kernels::by_name(&k))
            .map(|k| k.fallbacks().iter().map(|f| f.to_string()).collect()),
        threads,
        runs: options.runs,
        prompt_tokens: prompt_len,
        gen_tokens: generated,
        load_s: load.as_secs_f64(),
        first_token_s: load.as_secs_f64() + median(&mut ttft) / 1000.0,
        ttft_ms: median(&mut ttft),
        prefill_tokens_per_s: median(&mut prefill),
        decode_tokens_per_s: decode,
        long_prompt_tokens: options.long_prompt_tokens,
        prefill_long_tokens_per_s: (!long.is_empty()).then(|| median(&mut long)),
        peak_rss_mib,
        weight_mb_per_token: bytes.map(|b| b as f64 / 1e6),
        decode_weight_gb_per_s,
        memory_read_gb_per_s,
        decode_bandwidth_fraction: decode_weight_gb_per_s.map(|g| g / memory_read_gb_per_s),
        batched_decode,
        constrained_decode,
    })
}

/// Aggregate decode tokens/s of `batch` sequences after the same prompt, stepped together
/// through `Backend::step_batch` (greedy, no eos): the service's engine loop without it.
fn batched(engine: &Engine, prompt_tokens: usize, steps: usize, batch: usize) -> Result<f64> {
    if batch == 0 {
        bail!("--batch sizes must be at least 1");
    }
    let prompt = filler_tokens(engine, prompt_tokens)?;
    let mut sessions = Vec::with_capacity(batch);
    let mut tokens = Vec::with_capacity(batch);
    for _ in 0..batch {
        let mut s = engine.backend.new_session(prompt.len() + steps + 1)?;
        tokens.push(argmax(s.forward(&prompt, Logits::Last)?));
        sessions.push(s);
    }
    let start = Instant::now();
    for _ in 0..steps {
        let mut refs: Vec<&mut dyn Session> = Vec::with_capacity(batch);
        for s in sessions.iter_mut() {
            refs.push(s.as_mut());
        }
        let inputs: Vec<StepInput> = tokens
            .iter()
            .map(|t| StepInput::last(std::slice::from_ref(t)))
            .collect();
        let mut next = vec![0; batch];
        engine
            .backend
            .step_batch(&mut refs, &inputs, &mut |i, logits| {
                next[i] = argmax(logits)
            })?;
        tokens = next;
    }
    Ok((batch * steps) as f64 / start.elapsed().as_secs_f64())
}

/// Read bandwidth of `threads` threads each streaming its share of a `bytes` buffer through
/// the best SIMD tier's f32 dot product (the widest loads the kernels use; `x·x` reads each
/// element once from memory), best of five passes. The reference for decode: every token
/// streams the weights once, so decode tokens/s × weight bytes can at most reach this.
fn memory_read_bandwidth(threads: usize, bytes: usize) -> f64 {
    let dot = crate::backend::native::kernels::available()[0].dot_f32;
    let buffer: Vec<f32> = (0..bytes / 4).map(|i| (i % 7) as f32).collect();
    let chunk = buffer.len().div_ceil(threads);
    let mut best = 0.0f64;
    for _ in 0..5 {
        let started = Instant::now();
        let total: f32 = std::thread::scope(|scope| {
            let workers: Vec<_> = buffer
                .chunks(chunk)
                .map(|part| scope.spawn(move || dot(part, part)))
                .collect();
            workers.into_iter().map(|w| w.join().unwrap_or(0.0)).sum()
        });
        std::hint::black_box(total);
        best = best.max(bytes as f64 / started.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// One greedy answer to a filler prompt of `prompt_tokens`, exactly `gen_tokens` long.
fn answer(engine: &Engine, prompt_tokens: usize, gen_tokens: usize) -> Result<Generation> {
    let prompt = filler_tokens(engine, prompt_tokens)?;
    let mut generator = engine.generator(Some(prompt_tokens + gen_tokens))?;
    let generate = GenerateOptions {
        max_new_tokens: gen_tokens,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        eos_token_ids: Vec::new(),
        prompt_lookup: 0,
    };
    generator.generate(
        &engine.tokenizer,
        &prompt,
        &generate,
        &CancelHandle::new(),
        &mut |_| {},
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl BenchReport {
    pub fn to_text(&self) -> String {
        let rss = self
            .peak_rss_mib
            .map_or("n/a".to_string(), |m| format!("{m:.0} MiB"));
        let stream = match (self.weight_mb_per_token, self.decode_weight_gb_per_s) {
            (Some(mb), Some(gbs)) => format!(
                " ({mb:.0} MB of weights per token: {gbs:.1} GB/s, {:.0}% of memory bandwidth)",
                100.0 * gbs / self.memory_read_gb_per_s
            ),
            _ => String::new(),
        };
        let fallbacks = match &self.kernel_fallbacks {
            Some(f) if f.is_empty() => " (no generic fallbacks)".to_string(),
            Some(f) => format!(" (generic fallbacks: {})", f.join(", ")),
            None => String::new(),
        };
        let long = self.prefill_long_tokens_per_s.map_or(String::new(), |t| {
            format!("\nprefill {:<12} {t:.1} tokens/s", self.long_prompt_tokens)
        });
        let batched: String = self
            .batched_decode
            .iter()
            .map(|b| {
                format!(
                    "\ndecode batch {:<7} {:.2} tokens/s ({:.2}x one sequence)",
                    b.batch, b.tokens_per_s, b.speedup
                )
            })
            .collect();
        let constrained = self.constrained_decode.as_ref().map_or(String::new(), |c| {
            format!(
                "\nconstrained decode   {:.2} tokens/s vs {:.2} unconstrained ({:.1}% cost, same {} tokens); mask median {:.0} us, p99 {:.0} us",
                c.constrained_tokens_per_s,
                c.unconstrained_tokens_per_s,
                c.cost_percent,
                c.tokens,
                c.mask_us_median,
                c.mask_us_p99
            )
        });
        format!(
            "backend {} variant {} kernels {}{fallbacks} threads {} (medians of {} runs)\n\
             device               {}\n\
             load                 {:.2} s\n\
             start to 1st token   {:.2} s\n\
             prompt / generated   {} / {} tokens\n\
             time to first token  {:.1} ms\n\
             prefill {:<12} {:.1} tokens/s{long}\n\
             decode               {:.2} tokens/s{stream}\n\
             peak RSS             {rss}\n\
             memory read          {:.1} GB/s ({} threads){batched}{constrained}",
            self.backend,
            self.variant,
            self.kernels.as_deref().unwrap_or("n/a"),
            self.threads,
            self.runs,
            self.device,
            self.load_s,
            self.first_token_s,
            self.prompt_tokens,
            self.gen_tokens,
            self.ttft_ms,
            self.prompt_tokens,
            self.prefill_tokens_per_s,
            self.decode_tokens_per_s,
            self.memory_read_gb_per_s,
            self.threads,
        )
    }
}

fn filler_tokens(engine: &Engine, count: usize) -> Result<Vec<u32>> {
    // FILLER is dozens of tokens long, so count / 8 + 1 copies are plenty.
    let text = FILLER.repeat(count / 8 + 1);
    let ids = engine.tokenizer.encode(&text, false)?;
    if ids.len() < count {
        bail!("could not build a {count}-token prompt");
    }
    Ok(ids[..count].to_vec())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// VmHWM from /proc/self/status, in KiB (Linux only; None elsewhere).
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_peak_rss_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(super::peak_rss_kib().is_some_and(|k| k > 0));
        }
    }
}
