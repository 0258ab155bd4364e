//! One sequence on the ort backend: its IoBinding, its KV cache, and the forward call.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use ort::memory::Allocator;
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
    pub(super) step: StepTensors,
}

/// The tensors of a one-token call (every decode step), allocated with the session and
/// rewritten in place, so a decode step allocates no tensor.
pub(super) struct StepTensors {
    input_ids: Tensor<i64>,
    position_ids: Tensor<i64>,
    logits_to_keep: Tensor<i64>,
    /// `[1, 1, vocab]`, bound as the output whenever one row of logits is computed.
    logits: Tensor<f32>,
    /// `[1, capacity]`, ones for the positions in use and zeros after them, for graphs that take
    /// a padded mask (a mask's shape is the total length otherwise: a new tensor per call).
    mask: Option<PaddedMask>,
}

struct PaddedMask {
    tensor: Tensor<i64>,
    /// Leading ones now in the tensor.
    ones: usize,
}

impl PaddedMask {
    /// Ones for the first `total` positions, zeros after (only the changed range is written).
    fn cover(&mut self, total: usize) -> Result<&Tensor<i64>> {
        let (_, data) = self.tensor.extract_tensor_mut();
        if total > data.len() {
            bail!("{total} positions do not fit the {}-wide mask", data.len());
        }
        if total > self.ones {
            data[self.ones..total].fill(1);
        } else {
            data[total..self.ones].fill(0);
        }
        self.ones = total;
        Ok(&self.tensor)
    }
}

impl StepTensors {
    pub(super) fn new(vocab: usize, padded_mask: Option<usize>) -> Result<Self> {
        let cpu = Allocator::default();
        let tensor = |shape: &[usize]| Tensor::<i64>::new(&cpu, shape.to_vec());
        let mask = match padded_mask {
            Some(capacity) => {
                let mut tensor = tensor(&[1, capacity]).map_err(|e| anyhow!("{e}"))?;
                tensor.extract_tensor_mut().1.fill(0);
                Some(PaddedMask { tensor, ones: 0 })
            }
            None => None,
        };
        Ok(Self {
            input_ids: tensor(&[1, 1]).map_err(|e| anyhow!("{e}"))?,
            position_ids: tensor(&[1, 1]).map_err(|e| anyhow!("{e}"))?,
            logits_to_keep: tensor(&[1]).map_err(|e| anyhow!("{e}"))?,
            logits: Tensor::<f32>::new(&cpu, [1usize, 1, vocab]).map_err(|e| anyhow!("{e}"))?,
            mask,
        })
    }
}

/// Writes `value` into a one-element tensor and binds it (the binding shares the tensor).
fn bind_scalar(binding: &mut IoBinding, name: &str, t: &mut Tensor<i64>, value: i64) -> Result<()> {
    let (_, data) = t.extract_tensor_mut();
    data[0] = value;
    binding.bind_input(name, t).map_err(|e| anyhow!("{e}"))
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
                if which.every_row() {
                    rows.extend_from_slice(&self.logits);
                }
            }
            if which.every_row() {
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
        let bind = |b: &mut IoBinding, name: &str, data: Vec<i64>, len: usize| -> Result<()> {
            let t = Tensor::from_array(([1usize, len], data)).map_err(|e| anyhow!("{e}"))?;
            b.bind_input(name, &t).map_err(|e| anyhow!("{e}"))
        };
        let step = &mut self.step;
        if n == 1 {
            let token = i64::from(tokens[0]);
            bind_scalar(&mut self.binding, "input_ids", &mut step.input_ids, token)?;
            if io.has_position_ids {
                let b = &mut self.binding;
                bind_scalar(b, "position_ids", &mut step.position_ids, past as i64)?;
            }
        } else {
            let ids = tokens.iter().map(|&t| i64::from(t)).collect();
            bind(&mut self.binding, "input_ids", ids, n)?;
            if io.has_position_ids {
                let pos = (past as i64..total as i64).collect();
                bind(&mut self.binding, "position_ids", pos, n)?;
            }
        }
        match &mut step.mask {
            Some(mask) => self
                .binding
                .bind_input("attention_mask", mask.cover(total)?)
                .map_err(|e| anyhow!("{e}"))?,
            None => bind(&mut self.binding, "attention_mask", vec![1; total], total)?,
        }
        // Rows of logits the graph computes: all of them, unless it can skip the ones not asked.
        let rows = match which {
            Logits::Last if io.keeps_logits => 1,
            _ => n,
        };
        if io.keeps_logits {
            let b = &mut self.binding;
            bind_scalar(b, LOGITS_TO_KEEP, &mut step.logits_to_keep, rows as i64)?;
        }
        self.cache.bind(&mut self.binding)?;
        if rows == 1 {
            self.binding.bind_output("logits", &mut step.logits)
        } else {
            let memory = &self.shared.logits_memory;
            self.binding.bind_output_to_device("logits", memory)
        }
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
            Logits::All | Logits::Each => data,
        };
        self.logits.clear();
        self.logits.extend_from_slice(wanted);
        self.cache.advance(n, &mut outputs)?;
        Ok(())
    }
}
