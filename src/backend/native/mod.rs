//! The native CPU backend: weights memory-mapped from the variant's `model.onnx.data`, one
//! readable forward pass (model.rs) over a table of kernels (kernels/).
//!
//! A `NativeBackend` holds the model behind an `Arc` and a thread pool; its sessions share
//! both and own only their KV cache and activation buffers.

pub mod kernels;
pub mod model;
pub mod rope;
pub mod weights;

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};

use super::{Backend, LoadOptions, Logits, Session};
use crate::bundle::{Bundle, ModelConfig};
use model::{Head, KvCache, Model, Workspace};
use weights::WeightFile;

/// Prompt tokens run through the layers together. Larger chunks make GEMM more efficient
/// but need activation buffers proportional to them (256 rows of a 0.5B model ≈ 12 MB).
const PREFILL_CHUNK: usize = 256;

pub struct NativeBackend {
    model: Arc<Model>,
    prefill_chunk: usize,
    pool: Arc<rayon::ThreadPool>,
    config: ModelConfig,
}

impl NativeBackend {
    pub fn load(bundle: &Bundle, variant: &str, options: &LoadOptions) -> Result<Self> {
        let v = bundle.variant(variant)?;
        match v.precision.as_str() {
            "fp32" | "fp16" => {}
            other => bail!(
                "variant {variant} has precision {other}: the native backend runs fp32 and fp16 so far (int8/int4 kernels are not built yet)"
            ),
        }
        let threads = if options.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            options.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("native-{i}"))
            .build()
            .map_err(|e| anyhow!("cannot start {threads} worker threads: {e}"))?;
        let kernels = kernels::select();
        let weights = WeightFile::open(bundle, v)?;
        let model = Model::load(&weights, &bundle.config, kernels)?;
        tracing::info!(
            variant,
            threads,
            kernels = kernels.name,
            tied_lm_head = model.is_tied(),
            "native backend loaded"
        );
        let prefill_chunk = match options.prefill_chunk {
            0 => PREFILL_CHUNK,
            n => n,
        };
        Ok(Self {
            model: Arc::new(model),
            prefill_chunk,
            pool: Arc::new(pool),
            config: bundle.config.clone(),
        })
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
}

impl Backend for NativeBackend {
    fn name(&self) -> &'static str {
        "native"
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn new_session(&self, capacity: usize) -> Result<Box<dyn Session>> {
        let max = self.model.dims.max_positions;
        if capacity == 0 || capacity > max {
            bail!("session capacity must be 1..={max} positions (max_position_embeddings), got {capacity}");
        }
        let dims = &self.model.dims;
        let rows = self.prefill_chunk.min(capacity);
        Ok(Box::new(NativeSession {
            model: Arc::clone(&self.model),
            pool: Arc::clone(&self.pool),
            cache: KvCache::new(dims, capacity),
            workspace: Workspace::new(dims, rows, capacity),
            logits: vec![0.0; dims.vocab],
        }))
    }
}

pub struct NativeSession {
    model: Arc<Model>,
    pool: Arc<rayon::ThreadPool>,
    cache: KvCache,
    workspace: Workspace,
    /// Last-row logits, or every row's for `Logits::All` (grown on demand).
    logits: Vec<f32>,
}

impl Session for NativeSession {
    fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    fn len(&self) -> usize {
        self.cache.len()
    }

    fn truncate(&mut self, len: usize) {
        self.cache.truncate(len);
    }

    fn forward(&mut self, tokens: &[u32], which: Logits) -> Result<&[f32]> {
        let vocab = self.model.dims.vocab;
        if tokens.is_empty() {
            bail!("forward called with no tokens");
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the model's vocabulary ({vocab})");
        }
        let room = self.cache.capacity() - self.cache.len();
        if tokens.len() > room {
            bail!(
                "context full: {} tokens cached, {} more do not fit in {}",
                self.cache.len(),
                tokens.len(),
                self.cache.capacity()
            );
        }
        let rows_out = match which {
            Logits::Last => 1,
            Logits::All => tokens.len(),
        };
        if self.logits.len() < rows_out * vocab {
            self.logits.resize(rows_out * vocab, 0.0);
        }
        let Self {
            model,
            pool,
            cache,
            workspace,
            logits,
        } = self;
        let chunk = workspace.rows;
        let chunks = tokens.len().div_ceil(chunk);
        pool.install(|| {
            for (i, part) in tokens.chunks(chunk).enumerate() {
                let is_last = i + 1 == chunks;
                let (head, out) = match which {
                    Logits::All => (Head::All, &mut logits[i * chunk * vocab..]),
                    Logits::Last if is_last => (Head::Last, &mut logits[..]),
                    Logits::Last => (Head::Skip, &mut logits[..0]),
                };
                model.forward(part, cache, workspace, head, out);
            }
        });
        Ok(&self.logits[..rows_out * vocab])
    }
}
