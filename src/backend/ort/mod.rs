//! The ONNX Runtime backend: a decoder-with-past graph (a bundle variant of either profile, or
//! a Qwen2 graph exported by Hugging Face Optimum with the same I/O names) run by ONNX Runtime
//! on the configured execution providers.
//!
//! One ONNX Runtime session per backend holds the weights; each `Session` of ours owns an
//! `IoBinding` and its KV cache (cache.rs). `ort` types stay inside this module.

mod cache;
mod library;
mod optimized;
mod providers;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use ort::environment::Environment;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{IoBinding, Session as OrtSession};
use ort::value::{Tensor, TensorElementType, ValueType};

use super::options::{OptimizationLevel, OrtOptions, Provider};
use super::{Backend, LoadOptions, Logits, Session};
use crate::bundle::{Bundle, ModelConfig};
use cache::{CacheLayout, KvCache};
pub use library::{HOW_TO_GET, MIN_MINOR};
use providers::ChainReport;

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
}

pub struct OrtBackend {
    shared: Arc<Shared>,
    config: ModelConfig,
    device: String,
}

/// What all sessions of one backend share.
struct Shared {
    session: Mutex<OrtSession>,
    io: GraphIo,
    mode: CacheMode,
    /// Where the KV cache lives (CPU memory, or the GPU's for CUDA / ROCm providers).
    kv_memory: MemoryInfo<'static>,
    /// Logits always come back to host memory (only they cross from a GPU).
    logits_memory: MemoryInfo<'static>,
    /// Whether several tokens may be run in one call when the cache is not empty.
    chunks_on_cache: bool,
    max_positions: usize,
}

/// Graph I/O names and the shapes the cache needs.
#[derive(Debug, Clone)]
struct GraphIo {
    has_position_ids: bool,
    past: Vec<String>,
    present: Vec<String>,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
}

impl OrtBackend {
    /// Loads a bundle variant (profile `portable` or `ort`).
    pub fn load(bundle: &Bundle, variant: &str, options: &LoadOptions) -> Result<Self> {
        let v = bundle.variant(variant)?;
        let mode = match v.profile.as_str() {
            "ort" => CacheMode::Shared,
            "portable" => CacheMode::Chained,
            other => bail!("variant {variant} has profile {other:?}, which the ort backend does not know (portable or ort)"),
        };
        if v.profile == "portable" && v.precision == "int4" {
            // Measured on the demo model: ONNX Runtime's constant folding unpacks every int4
            // weight through float32 intermediates, peaking at 12 GB for a 0.5B model.
            tracing::warn!(
                variant,
                "ONNX Runtime unpacks portable int4 weights to float32 at load (peak memory several times the float32 model); {variant}-ort is its int4 path"
            );
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
                max_positions: src.config.max_position_embeddings,
            }),
            config: src.config.clone(),
            device,
        })
    }
}

/// Builds the session with the provider chain. If ONNX Runtime refuses to create it with a
/// non-CPU provider (device missing at session start), that provider is dropped and the next
/// tried, unless `strict`.
fn open_session(
    env: &Environment,
    src: &GraphSource,
    o: &OrtOptions,
    threads: usize,
    ort_version: &str,
) -> Result<(OrtSession, ChainReport)> {
    let mut wanted = o.execution_providers.clone();
    let mut dropped: Vec<(Provider, String)> = Vec::new();
    loop {
        let mut builder = base_builder(env, o, threads)?;
        let defaults = provider_defaults(src, o);
        let mut chain = providers::register(
            &mut builder,
            &wanted,
            &|p| merged(&defaults, o, p),
            o.strict,
        )?;
        chain.skipped.splice(0..0, dropped.iter().cloned());
        let config = session_config(o, chain.primary());
        for (k, v) in &config {
            builder = builder
                .with_config_entry(k, v)
                .map_err(|e| anyhow!("ONNX Runtime session option {k}: {e}"))?;
        }
        let key = optimized::key(src, &config, o, &chain.registered, ort_version);
        match commit(builder, src, o, &key) {
            Ok(session) => return Ok((session, chain)),
            Err(e) => {
                let culprit = chain
                    .registered
                    .iter()
                    .copied()
                    .find(|p| *p != Provider::Cpu);
                match culprit {
                    Some(p) if !o.strict => {
                        let why = format!("{e:#}");
                        tracing::warn!(provider = %p, error = %why, "session creation failed with this execution provider; retrying without it");
                        wanted.retain(|w| *w != p);
                        if wanted.is_empty() {
                            wanted.push(Provider::Cpu);
                        }
                        dropped.push((p, why));
                    }
                    _ => {
                        return Err(e.context(format!(
                            "ONNX Runtime cannot load {} ({})",
                            src.label,
                            src.graph.display()
                        )))
                    }
                }
            }
        }
    }
}

fn base_builder(env: &Environment, o: &OrtOptions, threads: usize) -> Result<SessionBuilder> {
    let err = |e: ort::Error<SessionBuilder>| anyhow!("ONNX Runtime session options: {e}");
    let mut b = OrtSession::builder(env)
        .map_err(|e| anyhow!("{e}"))?
        .with_optimization_level(level(o))
        .map_err(err)?
        .with_inter_threads(1)
        .map_err(err)?;
    if threads > 0 {
        b = b.with_intra_threads(threads).map_err(err)?;
    }
    Ok(b)
}

/// Session config entries: qwen2-edge's defaults for the primary provider, then the config's
/// own `[ort.session_config]`, which wins.
fn session_config(o: &OrtOptions, primary: Provider) -> Vec<(String, String)> {
    let mut entries = Vec::new();
    // The int8 weights of the bundles (and the int4 variants' embedding and LM head) reach
    // MatMul through DequantizeLinear. ONNX Runtime keeps such nodes unfolded by default so
    // that providers which run quantized graphs natively see them; the CPU and CUDA providers
    // then dequantize every weight at every step (measured here: int8 decode 3x slower).
    // Folding turns them into float32 weights once, at load. TensorRT, OpenVINO and QNN
    // consume the DequantizeLinear nodes themselves, so they keep them.
    let keeps_qdq = matches!(
        primary,
        Provider::TensorRt | Provider::NvTensorRtRtx | Provider::OpenVino | Provider::Qnn
    );
    if !keeps_qdq {
        entries.push(("session.disable_quant_qdq".to_string(), "1".to_string()));
    }
    for (k, v) in &o.session_config {
        entries.retain(|(ek, _)| ek != k);
        entries.push((k.clone(), v.clone()));
    }
    entries
}

fn level(o: &OrtOptions) -> GraphOptimizationLevel {
    match o.optimization_level {
        OptimizationLevel::Disable => GraphOptimizationLevel::Disable,
        OptimizationLevel::Basic => GraphOptimizationLevel::Level1,
        OptimizationLevel::Extended => GraphOptimizationLevel::Level2,
        OptimizationLevel::All => GraphOptimizationLevel::All,
    }
}

/// Commits the builder, through the optimized-model cache when one is configured.
fn commit(
    mut builder: SessionBuilder,
    src: &GraphSource,
    o: &OrtOptions,
    key: &str,
) -> Result<OrtSession> {
    match &o.optimized_model_cache {
        Some(dir) => optimized::commit_cached(builder, src.graph, dir, key, level(o)),
        None => builder
            .commit_from_file(src.graph)
            .map_err(|e| anyhow!("{e}")),
    }
}

/// Options qwen2-edge sets for a provider unless the config overrides them.
fn provider_defaults(src: &GraphSource, o: &OrtOptions) -> Vec<(Provider, String, String)> {
    let mut d = Vec::new();
    let c = src.config;
    // TensorRT builds an engine per input-shape range: without explicit ranges every new
    // past length would trigger a rebuild. Ranges cover a context of up to MAX_TRT_CONTEXT.
    let max = c.max_position_embeddings.min(MAX_TRT_CONTEXT);
    let (kvh, hd) = (c.kv_heads(), c.head_dim());
    let shapes = |seq: usize, past: usize| {
        let mut s = vec![
            format!("input_ids:1x{seq}"),
            format!("attention_mask:1x{}", past + seq),
            format!("position_ids:1x{seq}"),
        ];
        for i in 0..c.num_hidden_layers {
            for kind in ["key", "value"] {
                s.push(format!("past_key_values.{i}.{kind}:1x{kvh}x{past}x{hd}"));
            }
        }
        s.join(",")
    };
    for (k, v) in [
        ("trt_profile_min_shapes", shapes(1, 0)),
        ("trt_profile_opt_shapes", shapes(1, max / 2)),
        ("trt_profile_max_shapes", shapes(max, max)),
    ] {
        d.push((Provider::TensorRt, k.to_string(), v));
    }
    if let Some(dir) = &o.optimized_model_cache {
        let trt = dir.join("tensorrt");
        d.push((
            Provider::TensorRt,
            "trt_engine_cache_enable".into(),
            "1".into(),
        ));
        d.push((
            Provider::TensorRt,
            "trt_engine_cache_path".into(),
            trt.display().to_string(),
        ));
        d.push((
            Provider::TensorRt,
            "trt_timing_cache_enable".into(),
            "1".into(),
        ));
        d.push((
            Provider::TensorRt,
            "trt_timing_cache_path".into(),
            trt.display().to_string(),
        ));
    }
    d
}

/// Oldest ONNX Runtime whose GroupQueryAttention takes float32 on the CPU (1.17 fails to load
/// profile ort graphs with a type error).
const GQA_FLOAT_MINOR: u32 = 18;

/// Longest context the TensorRT shape profile covers by default (attention scores of a longer
/// prompt would not fit an edge GPU anyway); override with trt_profile_max_shapes.
const MAX_TRT_CONTEXT: usize = 4096;

fn merged(
    defaults: &[(Provider, String, String)],
    o: &OrtOptions,
    p: Provider,
) -> Vec<(String, String)> {
    let user = o.options_for(p);
    let mut out: Vec<(String, String)> = defaults
        .iter()
        .filter(|(q, k, _)| *q == p && !user.iter().any(|(uk, _)| uk == k))
        .map(|(_, k, v)| (k.clone(), v.clone()))
        .collect();
    out.extend(user);
    out
}

/// The KV cache lives where the primary provider computes: GPU memory for CUDA-class and
/// ROCm-class providers (so present → past never crosses to the host), else CPU memory.
fn kv_memory(primary: Provider, o: &OrtOptions) -> Result<MemoryInfo<'static>> {
    let device_id = o
        .options_for(primary)
        .iter()
        .find(|(k, _)| k == "device_id")
        .map(|(_, v)| v.parse::<i32>())
        .transpose()
        .map_err(|e| anyhow!("[ort.provider_options.{primary}] device_id: {e}"))?
        .unwrap_or(0);
    let device = match primary {
        Provider::Cuda | Provider::TensorRt | Provider::NvTensorRtRtx => AllocationDevice::CUDA,
        Provider::Rocm | Provider::MigraphX => AllocationDevice::HIP,
        _ => return cpu_memory(),
    };
    MemoryInfo::new(
        device,
        device_id,
        AllocatorType::Device,
        MemoryType::Default,
    )
    .map_err(|e| anyhow!("{e}"))
}

fn cpu_memory() -> Result<MemoryInfo<'static>> {
    MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Device,
        MemoryType::Default,
    )
    .map_err(|e| anyhow!("{e}"))
}

impl GraphIo {
    /// Checks the graph has the decoder-with-past interface this backend feeds.
    fn check(session: &OrtSession, config: &ModelConfig, label: &str) -> Result<Self> {
        let input = |name: &str| session.inputs().iter().find(|i| i.name() == name);
        let output = |name: &str| session.outputs().iter().find(|o| o.name() == name);
        let expect = |found: Option<&ort::value::Outlet>,
                      name: &str,
                      ty: TensorElementType|
         -> Result<Vec<i64>> {
            match found.map(|o| o.dtype()) {
                None => bail!("{label}: the graph has no {name:?} (not a decoder-with-past graph with the Optimum / ONNX Runtime GenAI names)"),
                Some(ValueType::Tensor { ty: t, shape, .. }) if *t == ty => Ok(shape.to_vec()),
                Some(other) => bail!("{label}: {name:?} is {other}, expected a {ty} tensor"),
            }
        };
        expect(input("input_ids"), "input_ids", TensorElementType::Int64)?;
        expect(
            input("attention_mask"),
            "attention_mask",
            TensorElementType::Int64,
        )?;
        let has_position_ids = match input("position_ids") {
            Some(_) => {
                expect(
                    input("position_ids"),
                    "position_ids",
                    TensorElementType::Int64,
                )?;
                true
            }
            None => false,
        };
        let logits = expect(output("logits"), "logits", TensorElementType::Float32)?;
        let layers = config.num_hidden_layers;
        let found = session
            .inputs()
            .iter()
            .filter(|i| i.name().starts_with("past_key_values.") && i.name().ends_with(".key"))
            .count();
        if found != layers {
            bail!("{label}: the graph has {found} past_key_values.*.key inputs, config.json says {layers} layers");
        }
        let (kvh, hd) = (config.kv_heads(), config.head_dim());
        let mut past = Vec::new();
        let mut present = Vec::new();
        for i in 0..layers {
            for kind in ["key", "value"] {
                let p = format!("past_key_values.{i}.{kind}");
                let shape = expect(input(&p), &p, TensorElementType::Float32)
                    .context("the ort backend feeds float32 KV caches")?;
                let fixed = |ax: usize, want: usize| {
                    shape.get(ax).is_none_or(|&d| d < 0 || d as usize == want)
                };
                if shape.len() != 4 || !fixed(1, kvh) || !fixed(3, hd) {
                    bail!("{label}: {p} has shape {shape:?}, expected [batch, {kvh}, past_seq, {hd}] from config.json");
                }
                let q = format!("present.{i}.{kind}");
                expect(output(&q), &q, TensorElementType::Float32)?;
                past.push(p);
                present.push(q);
            }
        }
        let vocab = config.vocab_size;
        if logits
            .last()
            .is_some_and(|&d| d >= 0 && d as usize != vocab)
        {
            bail!(
                "{label}: logits have {} entries per position, config.json says vocab_size {vocab}",
                logits[logits.len() - 1]
            );
        }
        Ok(Self {
            has_position_ids,
            past,
            present,
            kv_heads: kvh,
            head_dim: hd,
            vocab,
        })
    }
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

    fn new_session(&self, capacity: usize) -> Result<Box<dyn Session>> {
        let max = self.shared.max_positions;
        if capacity == 0 || capacity > max {
            bail!("session capacity must be 1..={max} positions (max_position_embeddings), got {capacity}");
        }
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
        }))
    }
}

pub struct OrtSessionState {
    shared: Arc<Shared>,
    binding: IoBinding,
    cache: KvCache,
    capacity: usize,
    logits: Vec<f32>,
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

    fn forward(&mut self, tokens: &[u32], which: Logits) -> Result<&[f32]> {
        let vocab = self.shared.io.vocab;
        if tokens.is_empty() {
            bail!("forward called with no tokens");
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the model's vocabulary ({vocab})");
        }
        let past = self.cache.len();
        if tokens.len() > self.capacity - past {
            bail!(
                "context full: {past} tokens cached, {} more do not fit in {}",
                tokens.len(),
                self.capacity
            );
        }
        if past > 0 && tokens.len() > 1 && !self.shared.chunks_on_cache {
            let mut rows = Vec::new();
            for &t in tokens {
                self.run(&[t], Logits::Last)?;
                if which == Logits::All {
                    rows.extend_from_slice(&self.logits);
                }
            }
            if which == Logits::All {
                self.logits = rows;
            }
            return Ok(&self.logits);
        }
        self.run(tokens, which)?;
        Ok(&self.logits)
    }
}

impl OrtSessionState {
    /// One graph call: `tokens` at the next positions; leaves the requested logits in
    /// `self.logits`.
    fn run(&mut self, tokens: &[u32], which: Logits) -> Result<()> {
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
        if data.len() != n * vocab {
            bail!("logits have shape {shape:?}, expected [1, {n}, {vocab}]");
        }
        // The graph computes every position's logits; only the requested rows are copied.
        let rows = match which {
            Logits::Last => &data[(n - 1) * vocab..],
            Logits::All => data,
        };
        self.logits.clear();
        self.logits.extend_from_slice(rows);
        self.cache.advance(n, &mut outputs)?;
        Ok(())
    }
}

/// The library the process would load (for `info` and error messages), without loading it.
pub fn describe_library(configured: Option<&Path>) -> Result<PathBuf> {
    library::locate_path(configured)
}
