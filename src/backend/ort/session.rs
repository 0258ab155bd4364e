//! One sequence on the ort backend: its IoBinding, its KV cache, and the forward call.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use ort::session::IoBinding;
use ort::value::Tensor;

use super::cache::KvCache;
use super::graph_io::LOGITS_TO_KEEP;
use super::Shared;
use crate::backend::{Logits, Session};

pub struct OrtSessionState {
    pub(super) shared: Arc<Shared>,
    pub(super) binding: IoBinding,
    pub(super) cache: KvCache,
    pub(super) capacity: usize,
    pub(super) logits: Vec<f32>,
}

impl Session for OrtSessionState {
    fn capacity(&self) -> usize {
        self.capacity
    }

    fn len(&self) -> usize {
        self.cache.len()
    }

    fn truncate(&mut self, len: usize) {
        if let Err(e) = self.cache.truncate(len) {
            // The cache is then reset to empty, which is always correct (the generator
            // re-feeds whatever it believes is cached only if len() says so).
            tracing::warn!(error = %e, "cannot truncate the ort KV cache; starting over");
            let _ = self.cache.truncate(0);
        }
    }

    fn vocab(&self) -> usize {
        self.shared.io.vocab
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn run(&mut self, tokens: &[u32], which: Logits) -> Result<&mut [f32]> {
        let past = self.cache.len();
        if past > 0 && tokens.len() > 1 && !self.shared.chunks_on_cache {
            let mut rows = Vec::new();
            for &t in tokens {
                self.run_graph(&[t], Logits::Last)?;
                if which == Logits::All {
                    rows.extend_from_slice(&self.logits);
                }
            }
            if which == Logits::All {
                self.logits = rows;
            }
            return Ok(&mut self.logits);
        }
        self.run_graph(tokens, which)?;
        Ok(&mut self.logits)
    }
}

impl OrtSessionState {
    /// One graph call: `tokens` at the next positions; leaves the requested logits in
    /// `self.logits`.
    fn run_graph(&mut self, tokens: &[u32], which: Logits) -> Result<()> {
        let io = &self.shared.io;
        let vocab = io.vocab;
        let past = self.cache.len();
        let n = tokens.len();
        let total = past + n;
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let bind = |b: &mut IoBinding, name: &str, data: Vec<i64>, len: usize| -> Result<()> {
            let t = Tensor::from_array(([1usize, len], data)).map_err(|e| anyhow!("{e}"))?;
            b.bind_input(name, &t).map_err(|e| anyhow!("{e}"))
        };
        bind(&mut self.binding, "input_ids", ids, n)?;
        bind(&mut self.binding, "attention_mask", vec![1; total], total)?;
        if io.has_position_ids {
            let pos = (past as i64..total as i64).collect();
            bind(&mut self.binding, "position_ids", pos, n)?;
        }
        // Rows of logits the graph computes: all of them, unless it can skip the ones not asked.
        let rows = match which {
            Logits::Last if io.keeps_logits => 1,
            _ => n,
        };
        if io.keeps_logits {
            let t =
                Tensor::from_array(([1usize], vec![rows as i64])).map_err(|e| anyhow!("{e}"))?;
            self.binding
                .bind_input(LOGITS_TO_KEEP, &t)
                .map_err(|e| anyhow!("{e}"))?;
        }
        self.cache.bind(&mut self.binding)?;
        self.binding
            .bind_output_to_device("logits", &self.shared.logits_memory)
            .map_err(|e| anyhow!("{e}"))?;
        let mut session = self
            .shared
            .session
            .lock()
            .map_err(|_| anyhow!("ort session lock poisoned"))?;
        let mut outputs = session
            .run_binding(&self.binding)
            .map_err(|e| anyhow!("ONNX Runtime run failed: {e}"))?;
        let logits = outputs
            .get("logits")
            .ok_or_else(|| anyhow!("the graph returned no logits"))?;
        let (shape, data) = logits
            .try_extract_tensor::<f32>()
            .map_err(|e| anyhow!("logits: {e}"))?;
        if data.len() != rows * vocab {
            bail!("logits have shape {shape:?}, expected [1, {rows}, {vocab}]");
        }
        // Only the requested rows are copied.
        let wanted = match which {
            Logits::Last => &data[(rows - 1) * vocab..],
            Logits::All => data,
        };
        self.logits.clear();
        self.logits.extend_from_slice(wanted);
        self.cache.advance(n, &mut outputs)?;
        Ok(())
    }
}
