//! The execution-provider chain: the configured providers, in order, each checked (compiled into
//! this binary? built into the loaded ONNX Runtime?) and registered on a session builder.
//!
//! Nothing fails silently: a provider that cannot be used is a warning naming the reason and
//! the fall-back, or an error when the config says `strict = true`. ONNX Runtime itself places
//! each node on the first registered provider that supports it, with the CPU as the implicit
//! last resort, so `["tensorrt", "cuda", "cpu"]` means what it says.

use std::ffi::{c_char, c_int, CStr};

use anyhow::{bail, Result};
#[allow(unused_imports)] // used only when a configurable provider's feature is on
use ort::ep::ArbitrarilyConfigurableExecutionProvider;
use ort::ep::{self, ExecutionProviderDispatch};
use ort::session::builder::SessionBuilder;

use crate::backend::options::Provider;

/// What happened to each requested provider.
#[derive(Debug, Clone, Default)]
pub struct ChainReport {
    /// Registered, in priority order.
    pub registered: Vec<Provider>,
    /// Requested but not usable, with the reason.
    pub skipped: Vec<(Provider, String)>,
}

impl ChainReport {
    /// The provider that gets every node it supports: the first registered one.
    pub fn primary(&self) -> Provider {
        self.registered.first().copied().unwrap_or(Provider::Cpu)
    }

    pub fn describe(&self) -> String {
        let mut s = self.primary().ort_name().to_string();
        let rest: Vec<&str> = self.registered.iter().skip(1).map(|p| p.as_str()).collect();
        if !rest.is_empty() {
            s.push_str(&format!(" (then {})", rest.join(", ")));
        }
        for (p, why) in &self.skipped {
            s.push_str(&format!("; {p} unavailable: {why}"));
        }
        s
    }
}

/// The providers the loaded ONNX Runtime was built with (ONNX Runtime's names).
pub fn available() -> Vec<String> {
    let api = ort::api();
    let mut list: *mut *mut c_char = std::ptr::null_mut();
    let mut len: c_int = 0;
    // SAFETY: plain C API call with out-pointers; the list is released below.
    let status = unsafe { (api.GetAvailableProviders)(&mut list, &mut len) };
    if !status.0.is_null() {
        // SAFETY: a non-null status is owned by the caller.
        unsafe { (api.ReleaseStatus)(status.0) };
        return Vec::new();
    }
    if list.is_null() {
        return Vec::new();
    }
    let names = (0..len.max(0) as usize)
        .filter_map(|i| {
            // SAFETY: ONNX Runtime returned a list of `len` string pointers; i < len.
            let p = unsafe { *list.add(i) };
            (!p.is_null()).then(|| {
                // SAFETY: each non-null entry is a valid NUL-terminated string, alive until
                // the list is released below.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            })
        })
        .collect();
    // SAFETY: releasing the list ONNX Runtime gave us, once.
    let status = unsafe { (api.ReleaseAvailableProviders)(list, len) };
    if !status.0.is_null() {
        // SAFETY: a non-null status is owned by the caller.
        unsafe { (api.ReleaseStatus)(status.0) };
    }
    names
}

/// Registers `wanted` on `builder` in order. `options(p)` gives each provider's ONNX Runtime
/// options (defaults merged with the config's). Unusable providers are skipped with a warning,
/// or fail the whole call when `strict`.
pub fn register(
    builder: &mut SessionBuilder,
    wanted: &[Provider],
    options: &dyn Fn(Provider) -> Vec<(String, String)>,
    strict: bool,
) -> Result<ChainReport> {
    let have = available();
    let mut report = ChainReport::default();
    for &p in wanted {
        let outcome = if p != Provider::Cpu && !have.iter().any(|n| n == p.ort_name()) {
            Err(format!(
                "the loaded ONNX Runtime was built without {} (it has {})",
                p.ort_name(),
                have.join(", ")
            ))
        } else {
            dispatch(p, &options(p)).and_then(|d| d.register(builder).map_err(|e| e.to_string()))
        };
        match outcome {
            Ok(()) => {
                tracing::info!(provider = %p, "execution provider registered");
                report.registered.push(p);
            }
            Err(why) if strict => {
                bail!("execution provider {p} cannot be used (strict = true): {why}")
            }
            Err(why) => {
                tracing::warn!(provider = %p, reason = %why, "execution provider unavailable, falling back to the next one");
                report.skipped.push((p, why));
            }
        }
    }
    if report.registered.is_empty() {
        // Every requested provider failed: ONNX Runtime's CPU provider is always there.
        tracing::warn!("no requested execution provider could be used; running on the CPU");
        report.registered.push(Provider::Cpu);
    }
    Ok(report)
}

/// The `ort` crate's registration object for `p`, or why there is none.
fn dispatch(p: Provider, opts: &[(String, String)]) -> Result<ExecutionProviderDispatch, String> {
    #[allow(unused_macros)]
    macro_rules! configurable {
        ($ep:expr) => {{
            let mut e = $ep;
            for (k, v) in opts {
                e = e.with_arbitrary_config(k, v);
            }
            Ok(e.build())
        }};
    }
    #[allow(unused_macros)]
    macro_rules! fixed {
        ($ep:expr) => {{
            if let Some((k, _)) = opts.first() {
                return Err(format!(
                    "qwen2-edge passes no options to {} (got {k:?})",
                    p.as_str()
                ));
            }
            Ok($ep.build())
        }};
    }
    match p {
        // The arena stays on, as ONNX Runtime has it by default: the `ort` crate's default turns
        // it off, and with it off ONNX Runtime 1.18-1.19 computes GroupQueryAttention on a
        // shared past/present buffer wrongly (measured: garbage logits; 1.20+ is fine).
        Provider::Cpu => fixed!(ep::CPU::default().with_arena_allocator(true)),
        #[cfg(feature = "ort-cuda")]
        Provider::Cuda => configurable!(ep::CUDA::default()),
        #[cfg(feature = "ort-tensorrt")]
        Provider::TensorRt => configurable!(ep::TensorRT::default()),
        #[cfg(feature = "ort-nvrtx")]
        Provider::NvTensorRtRtx => configurable!(ep::NVRTX::default()),
        #[cfg(feature = "ort-rocm")]
        Provider::Rocm => configurable!(ep::ROCm::default()),
        #[cfg(feature = "ort-migraphx")]
        Provider::MigraphX => fixed!(ep::MIGraphX::default()),
        #[cfg(feature = "ort-openvino")]
        Provider::OpenVino => configurable!(ep::OpenVINO::default()),
        #[cfg(feature = "ort-onednn")]
        Provider::OneDnn => configurable!(ep::OneDNN::default()),
        #[cfg(feature = "ort-xnnpack")]
        Provider::Xnnpack => configurable!(ep::XNNPACK::default()),
        #[cfg(feature = "ort-qnn")]
        Provider::Qnn => configurable!(ep::QNN::default()),
        #[cfg(feature = "ort-acl")]
        Provider::Acl => fixed!(ep::ACL::default()),
        #[cfg(feature = "ort-rknpu")]
        Provider::Rknpu => fixed!(ep::RKNPU::default()),
        #[cfg(feature = "ort-cann")]
        Provider::Cann => configurable!(ep::CANN::default()),
        #[cfg(feature = "ort-tvm")]
        Provider::Tvm => fixed!(ep::TVM::default()),
        #[cfg(feature = "ort-vsinpu")]
        Provider::VsiNpu => fixed!(ep::VSINPU),
        #[cfg(feature = "ort-webgpu")]
        Provider::WebGpu => configurable!(ep::WebGPU::default()),
        #[allow(unreachable_patterns)]
        other => Err(format!(
            "this qwen2-edge was built without cargo feature {}",
            other.cargo_feature()
        )),
    }
}
