//! End-to-end benchmark: time to first token, prefill and decode speed, peak memory.
//!
//! The prompt is real text (so token ids look like a user's), cut to the requested number
//! of tokens; decoding is greedy with no eos, so exactly `gen_tokens` tokens are produced.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::engine::{Engine, EngineOptions};
use crate::generate::{CancelHandle, GenerateOptions};
use crate::sampling::SamplingParams;

const FILLER: &str = "The quick brown fox jumps over the lazy dog while the edge box \
    streams tokens back to the operator. 边缘设备上的小模型也能快速回答问题。 ";

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub engine: EngineOptions,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub backend: String,
    pub variant: String,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub load_s: f64,
    pub ttft_ms: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// Peak resident set size (VmHWM), when the OS reports it.
    pub peak_rss_mib: Option<f64>,
}

pub fn run(options: &BenchOptions) -> Result<BenchReport> {
    if options.prompt_tokens == 0 || options.gen_tokens == 0 {
        bail!("--prompt-tokens and --gen-tokens must be at least 1");
    }
    let started = Instant::now();
    let engine = Engine::load(&options.engine)?;
    let load = started.elapsed();
    let needed = options.prompt_tokens + options.gen_tokens;
    if needed > engine.max_context() {
        bail!(
            "--prompt-tokens + --gen-tokens = {needed} exceeds the model's context of {}",
            engine.max_context()
        );
    }
    let prompt = filler_tokens(&engine, options.prompt_tokens)?;
    let mut generator = engine.generator(Some(needed))?;
    let generate = GenerateOptions {
        max_new_tokens: options.gen_tokens,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        eos_token_ids: Vec::new(),
    };
    let result = generator.generate(
        &engine.tokenizer,
        &prompt,
        &generate,
        &CancelHandle::new(),
        &mut |_| {},
    )?;
    let threads = if options.engine.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        options.engine.threads
    };
    Ok(BenchReport {
        backend: engine.backend.name().to_string(),
        variant: options.engine.variant.clone(),
        threads,
        prompt_tokens: prompt.len(),
        gen_tokens: result.usage.completion_tokens,
        load_s: load.as_secs_f64(),
        ttft_ms: ms(result.timings.ttft),
        prefill_tokens_per_s: result.timings.prefill_tokens_per_s,
        decode_tokens_per_s: result.timings.decode_tokens_per_s,
        peak_rss_mib: peak_rss_kib().map(|kib| kib as f64 / 1024.0),
    })
}

impl BenchReport {
    pub fn to_text(&self) -> String {
        let rss = self
            .peak_rss_mib
            .map_or("n/a".to_string(), |m| format!("{m:.0} MiB"));
        format!(
            "backend {} variant {} threads {}\n\
             load                 {:.2} s\n\
             prompt / generated   {} / {} tokens\n\
             time to first token  {:.1} ms\n\
             prefill              {:.1} tokens/s\n\
             decode               {:.2} tokens/s\n\
             peak RSS             {rss}",
            self.backend,
            self.variant,
            self.threads,
            self.load_s,
            self.prompt_tokens,
            self.gen_tokens,
            self.ttft_ms,
            self.prefill_tokens_per_s,
            self.decode_tokens_per_s,
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
