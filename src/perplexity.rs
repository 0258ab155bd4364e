//! Perplexity of a model on a text file: how well each variant (fp32, fp16, int8, int4)
//! predicts real text, the usual measure of what quantization costs.
//!
//! The file is tokenized as is (no chat template, no special tokens), cut to the first
//! `tokens` tokens, and split into windows of `context` tokens that are run through a fresh
//! KV cache each; every token of a window but the first is scored by the logits of the
//! position before it. Perplexity = exp(mean negative log-likelihood).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::backend::Logits;
use crate::engine::{Engine, EngineOptions};

/// Positions fed per forward call: the logits of all of them are returned at once, so this
/// bounds the logits buffer (64 × vocab floats, 39 MB for a 152k vocabulary).
const PIECE: usize = 64;

#[derive(Debug, Clone)]
pub struct PerplexityOptions {
    pub engine: EngineOptions,
    pub file: PathBuf,
    pub tokens: usize,
    /// Window length; 0 = one window over all `tokens`.
    pub context: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct PerplexityReport {
    pub variant: String,
    pub kernels: Option<String>,
    pub tokens: usize,
    pub scored: usize,
    pub context: usize,
    pub perplexity: f64,
    pub mean_nll: f64,
    pub seconds: f64,
}

pub fn run(options: &PerplexityOptions) -> Result<PerplexityReport> {
    let text = std::fs::read_to_string(&options.file)
        .with_context(|| format!("cannot read {}", options.file.display()))?;
    let engine = Engine::load(&options.engine)?;
    let mut ids = engine.tokenizer.encode(&text, false)?;
    if ids.len() < 2 {
        bail!("{} has fewer than 2 tokens", options.file.display());
    }
    ids.truncate(options.tokens.max(2));
    let context = match options.context {
        0 => ids.len(),
        n => n.min(ids.len()),
    };
    if context < 2 {
        bail!("--context must be at least 2");
    }
    let vocab = engine.backend.config().vocab_size;
    let mut session = engine.backend.new_session(context)?;
    let started = Instant::now();
    let (mut nll, mut scored) = (0.0f64, 0usize);
    for window in ids.chunks(context) {
        session.truncate(0);
        for (p, piece) in window.chunks(PIECE).enumerate() {
            let logits = session.forward(piece, Logits::All)?;
            for (i, row) in logits.chunks_exact(vocab).enumerate() {
                let pos = p * PIECE + i;
                if let Some(&next) = window.get(pos + 1) {
                    nll -= log_softmax_at(row, next as usize);
                    scored += 1;
                }
            }
        }
    }
    let mean_nll = nll / scored.max(1) as f64;
    Ok(PerplexityReport {
        variant: options.engine.variant.clone(),
        kernels: engine.backend.kernels(),
        tokens: ids.len(),
        scored,
        context,
        perplexity: mean_nll.exp(),
        mean_nll,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `log softmax(row)[index]`, in f64.
fn log_softmax_at(row: &[f32], index: usize) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row[index] as f64 - max - sum.ln()
}

impl PerplexityReport {
    pub fn to_text(&self) -> String {
        format!(
            "variant {} kernels {}\n\
             tokens               {} ({} scored, windows of {})\n\
             perplexity           {:.4}\n\
             mean NLL             {:.5} nats/token\n\
             time                 {:.1} s",
            self.variant,
            self.kernels.as_deref().unwrap_or("n/a"),
            self.tokens,
            self.scored,
            self.context,
            self.perplexity,
            self.mean_nll,
            self.seconds
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_softmax_of_uniform_row() {
        let row = [0.5f32; 4];
        let v = super::log_softmax_at(&row, 2);
        assert!((v - (0.25f64).ln()).abs() < 1e-12);
    }
}
