//! The native CPU backend: weights memory-mapped from the variant's `model.onnx.data`, one
//! readable forward pass (model.rs) over a table of kernels (kernels/).
//!
//! A `NativeBackend` holds the model behind an `Arc` and a persistent thread pool
//! (kernels/pool.rs); its sessions share both and own only their KV cache and activation
//! buffers. Weight formats: fp32 and fp16 (used in place from the map), int8 and int4
//! (repacked at load, weights.rs), with the kernel set picked for this CPU at load
//! (kernels/mod.rs `select`; `QWEN2_EDGE_KERNELS=generic` forces the portable one).

pub mod kernels;
pub mod kv;
pub mod model;
pub mod rope;
pub mod weights;

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};

use kernels::pool::{self, Pool};
use kernels::Scratch;

use super::{Backend, KvCacheType, LoadOptions, Logits, Session};
use crate::bundle::{Bundle, ModelConfig};
use kv::KvCache;
use model::{Head, Model, Workspace};
use weights::WeightFile;

/// Prompt tokens run through the layers together. Larger chunks make GEMM more efficient
/// but need activation buffers proportional to them (256 rows of a 0.5B model ≈ 12 MB).
const PREFILL_CHUNK: usize = 256;

pub struct NativeBackend {
    model: Arc<Model>,
    prefill_chunk: usize,
    pool: Arc<Pool>,
    config: ModelConfig,
    kernels: &'static str,
    kv_cache: KvCacheType,
}

impl NativeBackend {
    pub fn load(bundle: &Bundle, variant: &str, options: &LoadOptions) -> Result<Self> {
        let v = bundle.variant(variant)?;
        match v.precision.as_str() {
            "fp32" | "fp16" | "int8" | "int4" => {}
            other => bail!(
                "variant {variant} has precision {other}, which the native backend does not run"
            ),
        }
        let threads = if options.threads == 0 {
            pool::physical_cores()
        } else {
            options.threads
        };
        let pool = Arc::new(
            Pool::new(threads)
                .map_err(|e| anyhow!("cannot start {threads} worker threads: {e}"))?,
        );
        let kernels = kernels::select(&options.kernels)?;
        let weights = WeightFile::open(bundle, v, Arc::clone(&pool))?;
        let model = Model::load(&weights, &bundle.config, kernels)?;
        tracing::info!(
            variant,
            threads,
            kernels = kernels.name,
            tied_lm_head = model.is_tied(),
            kv_cache = options.kv_cache.as_str(),
            "native backend loaded"
        );
        let prefill_chunk = match options.prefill_chunk {
            0 => PREFILL_CHUNK,
            n => n,
        };
        Ok(Self {
            model: Arc::new(model),
            prefill_chunk,
            pool,
            config: bundle.config.clone(),
            kernels: kernels.name,
            kv_cache: options.kv_cache,
        })
    }
}

impl Backend for NativeBackend {
    fn name(&self) -> &'static str {
        "native"
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kernels(&self) -> Option<String> {
        Some(self.kernels.to_string())
    }

    fn threads(&self) -> Option<usize> {
        Some(self.pool.threads())
    }

    fn weight_bytes_per_token(&self) -> Option<u64> {
        Some(self.model.bytes_per_token())
    }

    fn create_session(&self, capacity: usize) -> Result<Box<dyn Session>> {
        let dims = &self.model.dims;
        let rows = self.prefill_chunk.min(capacity);
        let max_k = dims
            .hidden
            .max(dims.intermediate)
            .max(dims.heads * dims.head_dim);
        let scratch = Scratch::new(
            max_k,
            rows,
            self.pool.threads(),
            self.model.has_f16_weights(),
        );
        Ok(Box::new(NativeSession {
            model: Arc::clone(&self.model),
            pool: Arc::clone(&self.pool),
            cache: KvCache::new(dims, capacity, self.kv_cache),
            workspace: Workspace::new(dims, rows, capacity, scratch),
            logits: vec![0.0; dims.vocab],
        }))
    }
}

pub struct NativeSession {
    model: Arc<Model>,
    pool: Arc<Pool>,
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

    fn vocab(&self) -> usize {
        self.model.dims.vocab
    }

    fn run(&mut self, tokens: &[u32], which: Logits) -> Result<&mut [f32]> {
        let vocab = self.model.dims.vocab;
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
        for (i, part) in tokens.chunks(chunk).enumerate() {
            let is_last = i + 1 == chunks;
            let (head, out) = match which {
                Logits::All => (Head::All, &mut logits[i * chunk * vocab..]),
                Logits::Last if is_last => (Head::Last, &mut logits[..]),
                Logits::Last => (Head::Skip, &mut logits[..0]),
            };
            model.forward(pool, part, cache, workspace, head, out);
        }
        Ok(&mut self.logits[..rows_out * vocab])
    }
}
