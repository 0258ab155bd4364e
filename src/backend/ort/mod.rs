//! The ONNX Runtime backend: a decoder-with-past graph (a bundle variant of either profile, or
//! a Qwen2 graph exported by Hugging Face Optimum with the same I/O names) run by ONNX Runtime
//! on the configured execution providers.
//!
//! One ONNX Runtime session per backend holds the weights; each `Session` of ours owns an
//! `IoBinding` and its KV cache (cache.rs). `ort` types stay inside this module.

mod cache;
mod graph_io;
mod library;
mod optimized;
mod providers;
mod session;
mod setup;

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use ort::memory::MemoryInfo;
use ort::session::Session as OrtSession;

use super::{Backend, LoadOptions, Session};
use crate::bundle::{Bundle, ModelConfig};
use cache::{CacheLayout, KvCache};
use graph_io::GraphIo;
pub use library::{HOW_TO_GET, MIN_MINOR};
use session::{OrtSessionState, StepTensors};
use setup::{cpu_memory, kv_memory, open_session, GQA_FLOAT_MINOR};

/// How the graph's KV cache is wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// `present = Concat(past, new)`: every call returns the grown cache, which becomes the
    /// next call's `past` (moved, not copied). Profile `portable` and Optimum graphs.
    Chained,
    /// GroupQueryAttention graphs (profile `ort`): past and present are bound to one
    /// preallocated buffer per layer and the graph writes only the new positions, in place.
    Shared,
}

/// A graph to load, with what the loader knows about it.
pub struct GraphSource<'a> {
    pub graph: &'a Path,
    pub config: &'a ModelConfig,
    pub mode: CacheMode,
    /// Identifies the graph's bytes for the optimized-model cache (bundle checksums).
    pub identity: String,
    /// For messages: "variant int4-ort" or the file name.
    pub label: String,
    /// The graph accepts an `attention_mask` zero-padded on the right (bundle.json says so).
    pub padded_mask: bool,
}

pub struct OrtBackend {
    shared: Arc<Shared>,
    config: ModelConfig,
    device: String,
}

/// What all sessions of one backend share.
pub(crate) struct Shared {
    session: Mutex<OrtSession>,
    io: GraphIo,
    mode: CacheMode,
    /// Where the KV cache lives (CPU memory, or the GPU's for CUDA / ROCm providers).
    kv_memory: MemoryInfo<'static>,
    /// Logits always come back to host memory (only they cross from a GPU).
    logits_memory: MemoryInfo<'static>,
    /// Whether several tokens may be run in one call when the cache is not empty.
    chunks_on_cache: bool,
    /// Whether sessions may bind one capacity-wide, zero-padded `attention_mask`.
    padded_mask: bool,
}

impl OrtBackend {
    /// Loads a bundle variant (profile `portable` or `ort`).
    pub fn load(bundle: &Bundle, variant: &str, options: &LoadOptions) -> Result<Self> {
        let v = bundle.variant(variant)?;
        let mode = match v.profile.as_str() {
            "ort" | "gpu" => CacheMode::Shared,
            "portable" => CacheMode::Chained,
            other => bail!("variant {variant} has profile {other:?}, which the ort backend does not know (portable, ort or gpu)"),
        };
        if v.profile == "portable" && matches!(v.precision.as_str(), "int4" | "int4k") {
            // Measured on the demo model: ONNX Runtime's constant folding unpacks every int4
            // weight through float32 intermediates, peaking at 12 GB for a 0.5B model.
            tracing::warn!(
                variant,
                "ONNX Runtime unpacks portable int4 weights to float32 at load (peak memory several times the float32 model); {variant}-ort is its int4 path"
            );
        }
        if multiplies_8bit_blocks(v) {
            let rt = library::runtime(options.ort.library.as_deref())?;
            if library::parse_minor(&rt.version).unwrap_or(0) < NBITS8_MINOR {
                bail!(
                    "variant {variant} multiplies 8-bit weights with MatMulNBits, which ONNX Runtime runs from 1.{NBITS8_MINOR} on, and {} is {}; use int8 or int4-ort, or a newer library",
                    rt.path.display(),
                    rt.version
                );
            }
        }
        let identity = [&v.graph, &v.data]
            .iter()
            .map(|f| {
                bundle
                    .manifest
                    .files
                    .get(f.as_str())
                    .map_or_else(|| f.to_string(), |e| e.sha256.clone())
            })
            .collect::<Vec<_>>()
            .join("+");
        Self::load_graph(
            &GraphSource {
                graph: &bundle.dir.join(&v.graph),
                config: &bundle.config,
                mode,
                identity,
                label: format!("variant {variant}"),
                padded_mask: v.padded_attention_mask,
            },
            options,
        )
    }

    /// Loads any Qwen2 decoder-with-past graph with the bundle's I/O names (e.g. one exported
    /// by Hugging Face Optimum), given its config.json.
    pub fn load_onnx(model: &Path, config_json: &Path, options: &LoadOptions) -> Result<Self> {
        let text = std::fs::read_to_string(config_json)
            .with_context(|| format!("cannot read {}", config_json.display()))?;
        let config: ModelConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a Qwen2 config", config_json.display()))?;
        let meta =
            std::fs::metadata(model).with_context(|| format!("cannot read {}", model.display()))?;
        let identity = format!(
            "{}:{}:{:?}",
            model.display(),
            meta.len(),
            meta.modified().ok()
        );
        Self::load_graph(
            &GraphSource {
                graph: model,
                config: &config,
                mode: CacheMode::Chained,
                identity,
                label: model.display().to_string(),
                padded_mask: false,
            },
            options,
        )
    }

    pub fn load_graph(src: &GraphSource, options: &LoadOptions) -> Result<Self> {
        let o = &options.ort;
        o.validate()?;
        let rt = library::runtime(o.library.as_deref())?;
        let minor = library::parse_minor(&rt.version).unwrap_or(0);
        if src.mode == CacheMode::Shared && minor < GQA_FLOAT_MINOR {
            bail!(
                "{} is a profile ort graph: its GroupQueryAttention runs on float32 from ONNX Runtime 1.{GQA_FLOAT_MINOR} on, and {} is {}; use the portable variant or a newer library",
                src.label,
                rt.path.display(),
                rt.version
            );
        }
        let threads = if o.threads > 0 {
            o.threads
        } else {
            options.threads
        };
        let started = std::time::Instant::now();
        let (session, chain) = open_session(&rt.env, src, o, threads, &rt.version)?;
        let io = GraphIo::check(&session, src.config, &src.label)?;
        if io.kv_f16 && src.mode == CacheMode::Chained {
            bail!(
                "{}: a float16 KV cache is fed only to GroupQueryAttention graphs (profile gpu)",
                src.label
            );
        }
        let kv_memory = kv_memory(chain.primary(), o)?;
        let device = format!("onnxruntime {}: {}", rt.version, chain.describe());
        tracing::info!(
            graph = %src.graph.display(),
            library = %rt.path.display(),
            providers = %device,
            cache = ?src.mode,
            threads,
            load_s = started.elapsed().as_secs_f64(),
            "ort backend loaded"
        );
        Ok(Self {
            shared: Arc::new(Shared {
                session: Mutex::new(session),
                io,
                mode: src.mode,
                kv_memory,
                logits_memory: cpu_memory()?,
                // Before 1.20, GroupQueryAttention computes a multi-token call on top of a
                // non-empty cache (a prompt extending a cached prefix) wrongly; such calls are
                // then fed one token at a time.
                chunks_on_cache: src.mode == CacheMode::Chained || minor >= 20,
                padded_mask: src.padded_mask,
            }),
            config: src.config.clone(),
            device,
        })
    }
}

/// Oldest ONNX Runtime whose CPU MatMulNBits takes 8-bit weights (int8-ort); 1.18-1.21 refuse
/// them when the session starts ("Only 4b quantization is supported").
const NBITS8_MINOR: u32 = 22;

/// Whether a variant stores 8-bit MatMulNBits blocks (uint8 with 8 quantization bits).
fn multiplies_8bit_blocks(v: &crate::bundle::Variant) -> bool {
    v.weights
        .values()
        .any(|w| w.dtype == "uint8" && w.quant.as_ref().is_some_and(|q| q.bits == 8))
}

impl Backend for OrtBackend {
    fn name(&self) -> &'static str {
        "ort"
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn device(&self) -> String {
        self.device.clone()
    }

    fn create_session(&self, capacity: usize) -> Result<Box<dyn Session>> {
        let s = &self.shared;
        let session = s
            .session
            .lock()
            .map_err(|_| anyhow!("ort session lock poisoned"))?;
        let mut binding = session.create_binding().map_err(|e| anyhow!("{e}"))?;
        let layout = CacheLayout {
            past: &s.io.past,
            present: &s.io.present,
            kv_heads: s.io.kv_heads,
            head_dim: s.io.head_dim,
            f16: s.io.kv_f16,
            capacity,
            memory: &s.kv_memory,
        };
        let cache = KvCache::new(&session, &mut binding, s.mode, &layout)?;
        drop(session);
        Ok(Box::new(OrtSessionState {
            shared: Arc::clone(&self.shared),
            binding,
            cache,
            capacity,
            logits: Vec::new(),
            step: StepTensors::new(s.io.vocab, s.padded_mask.then_some(capacity))?,
        }))
    }
}
