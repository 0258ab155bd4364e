//! The native CPU backend: weights memory-mapped from the variant's `model.onnx.data`, one
//! readable forward pass (model.rs) over a table of kernels (kernels/).
//!
//! A `NativeBackend` holds, behind an `Arc` its sessions share, the model, a persistent thread
//! pool (kernels/pool.rs), one set of activation buffers and the prefix cache (prefix.rs); a
//! session owns only its KV cache and logits. `step_batch` steps several sessions through one
//! forward pass (a decode token each, and a prompt slice where that keeps its results exact).
//! Weight formats: fp32 and fp16 (used in place from the map), int8 and int4 (repacked at
//! load, weights.rs), with the kernel set picked for this CPU at load
//! (kernels/mod.rs `select`; `QWEN2_EDGE_KERNELS=generic` forces the portable one).

pub mod dual_chunk;
pub mod kernels;
pub mod kv;
pub mod model;
pub mod moe;
pub mod prefix;
pub mod rope;
pub mod weights;

use std::any::Any;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{anyhow, bail, Result};
use sha2::{Digest, Sha256};

use kernels::pool::{self, Pool};
use kernels::Scratch;

use super::{Backend, KvCacheType, LoadOptions, Logits, Session, StepInput};
use crate::bundle::{Bundle, ModelConfig};
use kv::{BlockShape, KvCache};
use model::{Head, Model, Segment, Workspace};
use prefix::{PrefixCache, PrefixStats, BLOCK};
use weights::WeightFile;

/// Prompt tokens run through the layers together. Larger chunks make GEMM more efficient
/// but need activation buffers proportional to them (256 rows of a 0.5B model ≈ 12 MB).
const PREFILL_CHUNK: usize = 256;

/// What every session of a backend shares: the weights, the thread pool, the activation
/// buffers (one forward runs at a time: the pool is not reentrant) and the prefix cache.
struct Shared {
    model: Model,
    pool: Arc<Pool>,
    work: Mutex<Work>,
    prefix: Mutex<PrefixCache>,
    /// The LM head's rows of the last draft vocabulary asked for (`new_draft_session`), shared
    /// by the draft sessions that ask for the same.
    draft_head: Mutex<Option<Arc<DraftHead>>>,
}

/// A draft session's LM head: the rows of the tokens it may propose.
struct DraftHead {
    ids: Vec<u32>,
    rows: weights::Matrix,
}

/// Activation buffers, and the logits of a batched decode step.
struct Work {
    workspace: Workspace,
    batch_logits: Vec<f32>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct NativeBackend {
    shared: Arc<Shared>,
    config: ModelConfig,
    kernels: &'static str,
    kv_cache: KvCacheType,
    saved: Option<SavedCache>,
}

impl NativeBackend {
    /// A session of `capacity` positions (checked by the caller), with a draft session's part
    /// of the LM head or none.
    fn native_session(&self, capacity: usize, draft_head: Option<Arc<DraftHead>>) -> NativeSession {
        let dims = &self.shared.model.dims;
        lock(&self.shared.work)
            .workspace
            .reserve_positions(dims, capacity);
        NativeSession {
            shared: Arc::clone(&self.shared),
            cache: KvCache::new(dims, capacity, self.kv_cache),
            logits: vec![0.0; dims.vocab],
            draft_head,
            keep_to_vocabulary: true,
            head_logits: Vec::new(),
        }
    }

    pub fn load(bundle: &Bundle, variant: &str, options: &LoadOptions) -> Result<Self> {
        let v = bundle.variant(variant)?;
        match v.precision.as_str() {
            "fp32" | "fp16" | "int8" | "int4" | "int4k" => {}
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
        let weights = WeightFile::open(bundle, v, Arc::clone(&pool), !options.no_mmap)?;
        let model = Model::load(&weights, &bundle.config, kernels, options.lm_head)?;
        tracing::info!(
            variant,
            threads,
            kernels = kernels.name,
            tied_lm_head = model.is_tied(),
            lm_head = options.lm_head.as_str(),
            kv_cache = options.kv_cache.as_str(),
            prefix_cache_mib = options.prefix_cache_bytes >> 20,
            "native backend loaded"
        );
        let rows = match options.prefill_chunk {
            0 => PREFILL_CHUNK,
            n => n,
        };
        let dims = &model.dims;
        let max_k = dims
            .hidden
            .max(dims.ffn_width)
            .max(dims.heads * dims.head_dim);
        let scratch = Scratch::new(max_k, rows, pool.threads(), model.has_f16_weights());
        let workspace = Workspace::new(dims, rows, 1, scratch);
        let mut prefix = PrefixCache::new(options.prefix_cache_bytes);
        let saved = options
            .prefix_cache_file
            .clone()
            .filter(|_| prefix.is_enabled())
            .map(|path| {
                let identity = cache_identity(bundle, v, options.kv_cache, kernels.name);
                let shape = BlockShape::of(dims, options.kv_cache, BLOCK);
                let started = std::time::Instant::now();
                match prefix.restore(&path, &identity, shape) {
                    Ok(Some(blocks)) => tracing::info!(
                        blocks,
                        positions = blocks * BLOCK,
                        file = %path.display(),
                        "prefix cache restored in {:.2} s",
                        started.elapsed().as_secs_f64()
                    ),
                    Ok(None) => tracing::info!(file = %path.display(), "no saved prefix cache"),
                    // Never fatal: the cache starts empty and the file is replaced at the next
                    // save.
                    Err(e) => tracing::warn!("{e:#}; the prefix cache starts empty"),
                }
                // Said now rather than when the service stops and the save fails.
                if let Some(dir) = path.parent() {
                    if let Err(e) = std::fs::create_dir_all(dir) {
                        tracing::warn!(
                            "cannot create {}: {e}; the prefix cache will not be saved",
                            dir.display()
                        );
                    }
                }
                SavedCache { path, identity }
            });
        Ok(Self {
            shared: Arc::new(Shared {
                work: Mutex::new(Work {
                    workspace,
                    batch_logits: Vec::new(),
                }),
                prefix: Mutex::new(prefix),
                draft_head: Mutex::new(None),
                model,
                pool,
            }),
            config: bundle.config.clone(),
            kernels: kernels.name,
            kv_cache: options.kv_cache,
            saved,
        })
    }
}

/// Where the prefix cache is saved and what it was computed with.
struct SavedCache {
    path: PathBuf,
    identity: [u8; 32],
}

/// What the keys and values of a prompt depend on besides its tokens: the weights and model
/// config (named by their hashes in bundle.json), the KV cache's element type and the kernels
/// (another tier rounds differently). A saved cache is used only by an identical one.
fn cache_identity(
    bundle: &Bundle,
    variant: &crate::bundle::Variant,
    kv_cache: KvCacheType,
    kernels: &str,
) -> [u8; 32] {
    let file_hash = |name: &str| {
        bundle
            .manifest
            .files
            .get(name)
            .map_or("", |f| f.sha256.as_str())
    };
    let mut h = Sha256::new();
    let block = BLOCK.to_string();
    for part in [
        "qwen2-edge prefix cache 1",
        &block,
        file_hash(&variant.data),
        file_hash("config.json"),
        &variant.name,
        kv_cache.as_str(),
        kernels,
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.finalize().into()
}

impl Backend for NativeBackend {
    fn name(&self) -> &'static str {
        "native"
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn dual_chunk_attention(&self) -> bool {
        true
    }

    fn kernels(&self) -> Option<String> {
        Some(self.kernels.to_string())
    }

    fn threads(&self) -> Option<usize> {
        Some(self.shared.pool.threads())
    }

    fn weight_bytes_per_token(&self) -> Option<u64> {
        Some(self.shared.model.bytes_per_token())
    }

    fn create_session(&self, capacity: usize) -> Result<Box<dyn Session>> {
        Ok(Box::new(self.native_session(capacity, None)))
    }

    /// A session whose LM head has only the rows of `vocabulary`, an int8 head's requantized to
    /// int4 (the other tokens' logits are -inf): the 0.5B's int8 head is 40% of its int4
    /// variant's bytes a token, so a draft pass over the tokens a target most often picks costs
    /// a quarter less. The rows are copied once and shared by the sessions that ask for the
    /// same tokens; the model's own head stays as it was for its other sessions.
    fn new_draft_session(&self, capacity: usize, vocabulary: &[u32]) -> Result<Box<dyn Session>> {
        self.check_capacity(capacity)?;
        let head = {
            let mut cached = lock(&self.shared.draft_head);
            match &*cached {
                Some(head) if head.ids == vocabulary => Arc::clone(head),
                _ => {
                    let started = std::time::Instant::now();
                    let head = Arc::new(DraftHead {
                        ids: vocabulary.to_vec(),
                        rows: self.shared.model.draft_head_rows(vocabulary)?,
                    });
                    tracing::info!(
                        tokens = vocabulary.len(),
                        mib = head.rows.bytes() >> 20,
                        "draft vocabulary's LM head rows made in {:.2} s",
                        started.elapsed().as_secs_f64()
                    );
                    *cached = Some(Arc::clone(&head));
                    head
                }
            }
        };
        Ok(Box::new(self.native_session(capacity, Some(head))))
    }

    fn step_batch(
        &self,
        sessions: &mut [&mut dyn Session],
        inputs: &[StepInput<'_>],
        each: &mut dyn FnMut(usize, &mut [f32]),
    ) -> Result<()> {
        super::check_batch(sessions, inputs)?;
        let mut natives = Vec::with_capacity(sessions.len());
        for s in sessions.iter_mut() {
            match s.as_any_mut().downcast_mut::<NativeSession>() {
                Some(n) if Arc::ptr_eq(&n.shared, &self.shared) => natives.push(n),
                // Not ours to batch: one after another.
                _ => return super::step_one_by_one(sessions, inputs, each),
            }
        }
        let shared = &*self.shared;
        let group = lock(&shared.work).workspace.rows;
        // An input of several tokens shares the others' forward only where its results stay
        // what they would be alone: drafts to verify (`Logits::Each` rows take the batched
        // path anyway), a prompt slice where `Model::rows_independent`; and when it fits.
        // Else it runs first, alone.
        let join = shared.model.rows_independent();
        let mut together = Vec::with_capacity(natives.len());
        for (i, (s, input)) in natives.into_iter().zip(inputs).enumerate() {
            let n = input.tokens.len();
            if n == 1 || (n <= group && (join || input.logits.every_row())) {
                together.push((i, s));
            } else {
                each(i, s.forward(input.tokens, input.logits)?);
            }
        }
        let vocab = shared.model.dims.vocab;
        let mut guard = lock(&shared.work);
        let work = &mut *guard;
        let mut rest = &mut together[..];
        while !rest.is_empty() {
            // As many inputs as the activation buffers hold rows for (at least one: each fits).
            let mut rows = 0;
            let count = rest
                .iter()
                .take_while(|(i, _)| {
                    rows += inputs[*i].tokens.len();
                    rows <= group
                })
                .count();
            let (part, later) = std::mem::take(&mut rest).split_at_mut(count);
            rest = later;
            let head_rows: usize = part.iter().map(|(i, _)| inputs[*i].rows()).sum();
            if work.batch_logits.len() < head_rows * vocab {
                work.batch_logits.resize(head_rows * vocab, 0.0);
            }
            let mut segments: Vec<Segment> = part
                .iter_mut()
                .map(|(i, s)| Segment {
                    tokens: inputs[*i].tokens,
                    cache: &mut s.cache,
                    every_row: inputs[*i].logits.every_row(),
                })
                .collect();
            let mut logits = &mut work.batch_logits[..head_rows * vocab];
            shared.model.forward(
                &shared.pool,
                &mut segments,
                &mut work.workspace,
                Head::Last,
                None,
                logits,
            );
            for (i, _) in part.iter() {
                let (mine, others) =
                    std::mem::take(&mut logits).split_at_mut(inputs[*i].rows() * vocab);
                each(*i, mine);
                logits = others;
            }
        }
        Ok(())
    }

    fn prefix_cache(&self) -> Option<PrefixStats> {
        let cache = lock(&self.shared.prefix);
        cache.is_enabled().then(|| cache.stats())
    }

    fn save_prefix_cache(&self) -> Result<Option<usize>> {
        let Some(saved) = &self.saved else {
            return Ok(None);
        };
        let cache = lock(&self.shared.prefix);
        cache.save(&saved.path, &saved.identity).map(Some)
    }
}

pub struct NativeSession {
    shared: Arc<Shared>,
    cache: KvCache,
    /// Last-row logits, or every row's for `Logits::All` (grown on demand).
    logits: Vec<f32>,
    /// A draft session's part of the LM head (`Backend::new_draft_session`), whether it is
    /// used (`Session::keep_to_vocabulary`), and the logits of its rows before they are spread
    /// over the vocabulary.
    draft_head: Option<Arc<DraftHead>>,
    keep_to_vocabulary: bool,
    head_logits: Vec<f32>,
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
        self.shared.model.dims.vocab
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn keep_to_vocabulary(&mut self, on: bool) {
        self.keep_to_vocabulary = on;
    }

    fn run(&mut self, tokens: &[u32], which: Logits) -> Result<&mut [f32]> {
        let vocab = self.shared.model.dims.vocab;
        let rows_out = match which {
            Logits::Last => 1,
            Logits::All | Logits::Each => tokens.len(),
        };
        if self.logits.len() < rows_out * vocab {
            self.logits.resize(rows_out * vocab, 0.0);
        }
        let Self {
            shared,
            cache,
            logits,
            draft_head,
            keep_to_vocabulary,
            head_logits,
        } = self;
        let draft_head = draft_head.as_ref().filter(|_| *keep_to_vocabulary);
        // A draft head's logits go to a buffer as wide as its rows first.
        let (width, out_logits) = match draft_head {
            Some(head) => {
                let width = head.ids.len();
                if head_logits.len() < rows_out * width {
                    head_logits.resize(rows_out * width, 0.0);
                }
                (width, &mut head_logits[..])
            }
            None => (vocab, &mut logits[..]),
        };
        let lm_head = draft_head.map(|head| &head.rows);
        let mut work = lock(&shared.work);
        let workspace = &mut work.workspace;
        let chunk = workspace.rows;
        let chunks = tokens.len().div_ceil(chunk);
        for (i, part) in tokens.chunks(chunk).enumerate() {
            let is_last = i + 1 == chunks;
            let (head, out) = match which {
                Logits::All => (Head::All, &mut out_logits[i * chunk * width..]),
                Logits::Each => (Head::Each, &mut out_logits[i * chunk * width..]),
                Logits::Last if is_last => (Head::Last, &mut out_logits[..]),
                Logits::Last => (Head::Skip, &mut out_logits[..0]),
            };
            let mut segment = [Segment {
                tokens: part,
                cache: &mut *cache,
                every_row: false,
            }];
            shared
                .model
                .forward(&shared.pool, &mut segment, workspace, head, lm_head, out);
        }
        drop(work);
        if let Some(head) = draft_head {
            spread_rows(&head.ids, &head_logits[..rows_out * width], logits, vocab);
        }
        Ok(&mut self.logits[..rows_out * vocab])
    }

    fn restore_prefix(&mut self, tokens: &[u32], held: usize) -> usize {
        let held = held.min(self.cache.len());
        let whole = tokens.len() / BLOCK * BLOCK;
        let mut prefix = lock(&self.shared.prefix);
        if !prefix.is_enabled() || whole == 0 {
            return held;
        }
        let blocks = if whole > held {
            prefix.lookup(&tokens[..whole])
        } else {
            Vec::new()
        };
        drop(prefix);
        let mut restored = held;
        if blocks.len() * BLOCK > held {
            // From the block `held` ends in: the positions before it stay as they are.
            let from = held / BLOCK;
            self.cache.truncate(from * BLOCK);
            for (i, block) in blocks.iter().enumerate().skip(from) {
                if !self.cache.copy_in(i * BLOCK, block) {
                    break;
                }
            }
            restored = self.cache.len();
        }
        lock(&self.shared.prefix).record(restored);
        restored
    }

    fn save_prefix(&mut self, tokens: &[u32]) {
        let filled = tokens.len().min(self.cache.len());
        let cache = &self.cache;
        lock(&self.shared.prefix).insert(&tokens[..filled], |pos0, n| cache.copy_out(pos0, n));
    }
}

/// Each row of `rows` (logits of the tokens `ids`, in order) into the next row of `logits`,
/// (rows `vocab` wide) at the tokens' places; the other tokens' logits are -inf (never a
/// draft).
fn spread_rows(ids: &[u32], rows: &[f32], logits: &mut [f32], vocab: usize) {
    for (row, out) in rows.chunks_exact(ids.len()).zip(logits.chunks_mut(vocab)) {
        out.fill(f32::NEG_INFINITY);
        for (&id, &x) in ids.iter().zip(row) {
            out[id as usize] = x;
        }
    }
}
