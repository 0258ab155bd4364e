//! Building the ONNX Runtime session: session options, the execution-provider chain with its
//! fall-back, qwen2-edge's per-provider defaults, and where the KV cache lives.

use anyhow::{anyhow, Result};
use ort::environment::Environment;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session as OrtSession;

use super::providers::{self, ChainReport};
use super::{library, optimized, CacheMode, GraphSource};
use crate::backend::options::{OptimizationLevel, OrtOptions, Provider};

/// Builds the session with the provider chain. If ONNX Runtime refuses to create it with a
/// non-CPU provider (device missing at session start), that provider is dropped and the next
/// tried, unless `strict`.
pub fn open_session(
    env: &Environment,
    src: &GraphSource,
    o: &OrtOptions,
    threads: usize,
    ort_version: &str,
) -> Result<(OrtSession, ChainReport)> {
    let mut wanted = o.execution_providers.clone();
    let mut dropped: Vec<(Provider, String)> = Vec::new();
    loop {
        let mut builder = base_builder(env, o, threads, memory_pattern(src, ort_version))?;
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

/// Whether ONNX Runtime may reuse a memory layout recorded for earlier input shapes. ONNX Runtime
/// 1.18 with a profile ort graph (shared past/present buffers) reads a wrong
/// `total_sequence_length` in GroupQueryAttention from such a reused layout once a sequence is
/// truncated and grows again (measured with the 3-D graphs: "cos_cache dimension 0 should not
/// be less than total_sequence_length"), so it is off before 1.20, the same versions that get
/// one token per call on a non-empty cache.
fn memory_pattern(src: &GraphSource, ort_version: &str) -> bool {
    src.mode != CacheMode::Shared || library::parse_minor(ort_version).unwrap_or(0) >= 20
}

fn base_builder(
    env: &Environment,
    o: &OrtOptions,
    threads: usize,
    memory_pattern: bool,
) -> Result<SessionBuilder> {
    let err = |e: ort::Error<SessionBuilder>| anyhow!("ONNX Runtime session options: {e}");
    let mut b = OrtSession::builder(env)
        .map_err(|e| anyhow!("{e}"))?
        .with_optimization_level(level(o))
        .map_err(err)?
        .with_inter_threads(1)
        .map_err(err)?
        .with_memory_pattern(memory_pattern)
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
pub const GQA_FLOAT_MINOR: u32 = 18;

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
pub fn kv_memory(primary: Provider, o: &OrtOptions) -> Result<MemoryInfo<'static>> {
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

pub fn cpu_memory() -> Result<MemoryInfo<'static>> {
    MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Device,
        MemoryType::Default,
    )
    .map_err(|e| anyhow!("{e}"))
}
