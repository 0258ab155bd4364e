//! The optimized-model cache: ONNX Runtime's graph optimizations (fusions, constant folding,
//! layout changes) run once, the result is saved, and later starts load it with optimization
//! off, so a box does not re-optimize at every start.
//!
//! An optimized graph can hold provider- and CPU-specific nodes, so the cache key covers the
//! graph's checksums, the optimization level, the registered providers, the ONNX Runtime
//! version and the CPU's SIMD level. Files: `<key>.onnx` and its weights, `<key>.onnx.data`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;
use sha2::{Digest, Sha256};

use super::GraphSource;
use crate::backend::options::{OrtOptions, Provider};

pub fn key(
    src: &GraphSource,
    session_config: &[(String, String)],
    o: &OrtOptions,
    providers: &[Provider],
    ort_version: &str,
) -> String {
    let mut h = Sha256::new();
    h.update(src.identity.as_bytes());
    h.update(
        format!(
            "|{}|{ort_version}|{}|",
            o.optimization_level,
            cpu_signature()
        )
        .as_bytes(),
    );
    for p in providers {
        h.update(p.as_str().as_bytes());
        h.update(b",");
    }
    for (k, v) in session_config {
        h.update(format!("{k}={v};").as_bytes());
    }
    hex::encode(&h.finalize()[..12])
}

/// What makes a CPU-optimized graph valid elsewhere: architecture and vector extensions.
fn cpu_signature() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let f = [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            (
                "avx512vnni",
                std::arch::is_x86_feature_detected!("avx512vnni"),
            ),
        ];
        let on: Vec<&str> = f.iter().filter(|(_, b)| *b).map(|(n, _)| *n).collect();
        format!("x86_64:{}", on.join("+"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

/// Loads `<dir>/<key>.onnx` if a previous start saved it; otherwise optimizes `graph` and
/// saves the result there for the next start. A broken or unwritable cache is a warning, never
/// a failed start.
pub fn commit_cached(
    mut builder: SessionBuilder,
    graph: &Path,
    dir: &Path,
    key: &str,
    level: GraphOptimizationLevel,
) -> Result<Session> {
    let onnx = dir.join(format!("{key}.onnx"));
    let data_name = format!("{key}.onnx.data");
    if onnx.is_file() {
        builder = builder
            .with_optimization_level(GraphOptimizationLevel::Disable)
            .map_err(|e| anyhow!("{e}"))?;
        match builder.commit_from_file(&onnx) {
            Ok(session) => {
                tracing::info!(path = %onnx.display(), "loaded the optimized graph from the cache");
                return Ok(session);
            }
            Err(e) => {
                tracing::warn!(path = %onnx.display(), error = %e, "cached optimized graph unusable; optimizing again");
                let _ = std::fs::remove_file(&onnx);
                let _ = std::fs::remove_file(dir.join(&data_name));
            }
        }
        builder = builder
            .with_optimization_level(level)
            .map_err(|e| anyhow!("{e}"))?;
    }
    let saving = match std::fs::create_dir_all(dir) {
        Ok(()) => {
            let tmp = dir.join(format!("{key}.onnx.tmp-{}", std::process::id()));
            let err = |e: ort::Error<SessionBuilder>| anyhow!("{e}");
            // Weights go to a file beside the graph: a protobuf cannot exceed 2 GB.
            builder = builder
                .with_optimized_model_path(&tmp)
                .map_err(err)?
                .with_config_entry(
                    "session.optimized_model_external_initializers_file_name",
                    &data_name,
                )
                .map_err(err)?
                .with_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes",
                    "1024",
                )
                .map_err(err)?;
            Some(tmp)
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot create the optimized-model cache; not caching");
            None
        }
    };
    let session = builder
        .commit_from_file(graph)
        .map_err(|e| anyhow!("{e}"))?;
    if let Some(tmp) = saving {
        match publish(&tmp, &onnx) {
            Ok(()) => {
                tracing::info!(path = %onnx.display(), "saved the optimized graph for the next start")
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not save the optimized graph")
            }
        }
    }
    Ok(session)
}

/// Makes the saved graph visible under its final name only once it is complete (its weights
/// file was written before it).
fn publish(tmp: &Path, onnx: &PathBuf) -> Result<()> {
    std::fs::rename(tmp, onnx)
        .with_context(|| format!("renaming {} to {}", tmp.display(), onnx.display()))
}
