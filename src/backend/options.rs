//! Settings of the ONNX backends, as the service config's `[ort]` section and the command
//! line give them. Plain data with no `ort` or `tract` type, so the config parser, the CLI and
//! builds without those backends can all use it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Result};
use serde::Deserialize;

/// The `[ort]` section:
///
/// ```toml
/// [ort]
/// library = "/usr/lib/qwen2-edge/libonnxruntime.so"   # ORT_DYLIB_PATH wins; unset: well-known paths
/// execution_providers = ["tensorrt", "cuda", "cpu"]   # in order of preference
/// strict = false                  # true: a provider that cannot be used is an error, not a fall-back
/// threads = 0                     # intra-op threads; 0 = [model] threads
/// optimization_level = "all"      # disable | basic | extended | all
/// optimized_model_cache = "/var/cache/qwen2-edge/ort"   # optional: keep optimized graphs here
/// [ort.provider_options.openvino]
/// device_type = "NPU"
/// [ort.session_config]
/// "session.intra_op.allow_spinning" = "0"
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrtOptions {
    /// The ONNX Runtime shared library (`libonnxruntime.so[.1.x.y]`).
    pub library: Option<PathBuf>,
    pub execution_providers: Vec<Provider>,
    pub strict: bool,
    /// Intra-op threads; 0 = the model's thread setting.
    pub threads: usize,
    pub optimization_level: OptimizationLevel,
    /// Directory where the optimized graph is saved on first start and loaded afterwards.
    pub optimized_model_cache: Option<PathBuf>,
    /// Provider name → its ONNX Runtime options (the keys ONNX Runtime documents for it).
    pub provider_options: BTreeMap<String, BTreeMap<String, String>>,
    /// Raw ONNX Runtime session config entries (`session.intra_op.allow_spinning = "0"`, …),
    /// applied last so they override qwen2-edge's choices.
    pub session_config: BTreeMap<String, String>,
}

impl Default for OrtOptions {
    fn default() -> Self {
        Self {
            library: None,
            execution_providers: vec![Provider::Cpu],
            strict: false,
            threads: 0,
            optimization_level: OptimizationLevel::All,
            optimized_model_cache: None,
            provider_options: BTreeMap::new(),
            session_config: BTreeMap::new(),
        }
    }
}

impl OrtOptions {
    /// Checks what can be checked without loading ONNX Runtime.
    pub fn validate(&self) -> Result<()> {
        if self.execution_providers.is_empty() {
            bail!("[ort] execution_providers is empty (use [\"cpu\"] for the CPU)");
        }
        for (i, p) in self.execution_providers.iter().enumerate() {
            if self.execution_providers[..i].contains(p) {
                bail!("[ort] execution_providers names {p} twice");
            }
        }
        for (name, options) in &self.provider_options {
            let provider: Provider = name
                .parse()
                .map_err(|e| anyhow::anyhow!("[ort.provider_options.{name}]: {e}"))?;
            if !self.execution_providers.contains(&provider) {
                bail!(
                    "[ort.provider_options.{name}] is set but {name} is not in execution_providers"
                );
            }
            // ONNX Runtime takes these as C strings.
            for (k, v) in options {
                if k.contains('\0') || v.contains('\0') {
                    bail!("[ort.provider_options.{name}] {k:?} contains a NUL byte");
                }
            }
        }
        for (k, v) in &self.session_config {
            if k.contains('\0') || v.contains('\0') {
                bail!("[ort.session_config] {k:?} contains a NUL byte");
            }
        }
        if let Some(lib) = &self.library {
            if lib.as_os_str().is_empty() {
                bail!("[ort] library is empty");
            }
        }
        for (key, path) in [
            ("library", &self.library),
            ("optimized_model_cache", &self.optimized_model_cache),
        ] {
            if path
                .as_ref()
                .is_some_and(|p| p.as_os_str().as_encoded_bytes().contains(&0))
            {
                bail!("[ort] {key} contains a NUL byte");
            }
        }
        Ok(())
    }

    /// Options given for `provider` (empty when none).
    pub fn options_for(&self, provider: Provider) -> Vec<(String, String)> {
        self.provider_options
            .iter()
            .filter(|(name, _)| name.parse::<Provider>().ok() == Some(provider))
            .flat_map(|(_, kv)| kv.iter().map(|(k, v)| (k.clone(), v.clone())))
            .collect()
    }
}

named_enum! {
    /// ONNX Runtime's graph optimization levels.
    pub enum OptimizationLevel("optimization level") {
        Disable = "disable" | "none",
        Basic = "basic",
        Extended = "extended",
        All = "all",
    }
}

/// The execution providers the `ort` crate exposes for Linux boxes. Left out: DirectML, CoreML,
/// NNAPI, WebNN and WASM (other systems), Azure (calls a remote endpoint), ArmNN (removed from
/// ONNX Runtime; use ACL or XNNPACK) and Vitis AI (the crate needs API level 18 for it, which
/// would lock out the JetPack 5 libraries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum Provider {
    Cpu,
    Cuda,
    TensorRt,
    /// TensorRT for RTX GPUs (`NvTensorRTRTXExecutionProvider`).
    NvTensorRtRtx,
    Rocm,
    MigraphX,
    OpenVino,
    OneDnn,
    Xnnpack,
    Qnn,
    Acl,
    Rknpu,
    Cann,
    Tvm,
    VsiNpu,
    WebGpu,
}

impl Provider {
    pub const ALL: [Provider; 16] = [
        Self::Cpu,
        Self::Cuda,
        Self::TensorRt,
        Self::NvTensorRtRtx,
        Self::Rocm,
        Self::MigraphX,
        Self::OpenVino,
        Self::OneDnn,
        Self::Xnnpack,
        Self::Qnn,
        Self::Acl,
        Self::Rknpu,
        Self::Cann,
        Self::Tvm,
        Self::VsiNpu,
        Self::WebGpu,
    ];

    /// The name used in configs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::TensorRt => "tensorrt",
            Self::NvTensorRtRtx => "nvtensorrtrtx",
            Self::Rocm => "rocm",
            Self::MigraphX => "migraphx",
            Self::OpenVino => "openvino",
            Self::OneDnn => "onednn",
            Self::Xnnpack => "xnnpack",
            Self::Qnn => "qnn",
            Self::Acl => "acl",
            Self::Rknpu => "rknpu",
            Self::Cann => "cann",
            Self::Tvm => "tvm",
            Self::VsiNpu => "vsinpu",
            Self::WebGpu => "webgpu",
        }
    }

    /// ONNX Runtime's own name for it (what `GetAvailableProviders` lists).
    pub fn ort_name(self) -> &'static str {
        match self {
            Self::Cpu => "CPUExecutionProvider",
            Self::Cuda => "CUDAExecutionProvider",
            Self::TensorRt => "TensorrtExecutionProvider",
            Self::NvTensorRtRtx => "NvTensorRTRTXExecutionProvider",
            Self::Rocm => "ROCMExecutionProvider",
            Self::MigraphX => "MIGraphXExecutionProvider",
            Self::OpenVino => "OpenVINOExecutionProvider",
            Self::OneDnn => "DnnlExecutionProvider",
            Self::Xnnpack => "XnnpackExecutionProvider",
            Self::Qnn => "QNNExecutionProvider",
            Self::Acl => "ACLExecutionProvider",
            Self::Rknpu => "RknpuExecutionProvider",
            Self::Cann => "CANNExecutionProvider",
            Self::Tvm => "TvmExecutionProvider",
            Self::VsiNpu => "VSINPUExecutionProvider",
            Self::WebGpu => "WebGpuExecutionProvider",
        }
    }

    /// The cargo feature that compiles its registration.
    pub fn cargo_feature(self) -> &'static str {
        match self {
            Self::Cpu => "ort",
            Self::Cuda => "ort-cuda",
            Self::TensorRt => "ort-tensorrt",
            Self::NvTensorRtRtx => "ort-nvrtx",
            Self::Rocm => "ort-rocm",
            Self::MigraphX => "ort-migraphx",
            Self::OpenVino => "ort-openvino",
            Self::OneDnn => "ort-onednn",
            Self::Xnnpack => "ort-xnnpack",
            Self::Qnn => "ort-qnn",
            Self::Acl => "ort-acl",
            Self::Rknpu => "ort-rknpu",
            Self::Cann => "ort-cann",
            Self::Tvm => "ort-tvm",
            Self::VsiNpu => "ort-vsinpu",
            Self::WebGpu => "ort-webgpu",
        }
    }

    /// Parses a comma-separated list (`"cuda,cpu"`), as the command line gives it.
    pub fn parse_list(s: &str) -> Result<Vec<Provider>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::parse)
            .collect()
    }
}

impl FromStr for Provider {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        let alias = match lower.as_str() {
            "dnnl" => "onednn",
            "tensorrt-rtx" | "nvrtx" => "nvtensorrtrtx",
            "trt" => "tensorrt",
            other => other,
        };
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == alias || p.ort_name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|p| p.as_str()).collect();
                format!(
                    "unknown execution provider {s:?} (known: {})",
                    names.join(", ")
                )
            })
    }
}

impl TryFrom<String> for Provider {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_provider_names_and_aliases() {
        assert_eq!("cuda".parse::<Provider>(), Ok(Provider::Cuda));
        assert_eq!("TensorRT".parse::<Provider>(), Ok(Provider::TensorRt));
        assert_eq!("dnnl".parse::<Provider>(), Ok(Provider::OneDnn));
        assert_eq!(
            "CUDAExecutionProvider".parse::<Provider>(),
            Ok(Provider::Cuda)
        );
        assert!("gpu"
            .parse::<Provider>()
            .unwrap_err()
            .contains("known: cpu"));
        assert_eq!(
            Provider::parse_list("tensorrt, cuda,cpu"),
            Ok(vec![Provider::TensorRt, Provider::Cuda, Provider::Cpu])
        );
        for p in Provider::ALL {
            assert_eq!(p.as_str().parse::<Provider>(), Ok(p));
        }
    }

    #[test]
    fn validation_catches_mistakes() {
        let mut o = OrtOptions::default();
        o.validate().unwrap();
        o.execution_providers = vec![];
        assert!(o.validate().is_err());
        o.execution_providers = vec![Provider::Cuda, Provider::Cuda];
        assert!(o.validate().unwrap_err().to_string().contains("twice"));
        o.execution_providers = vec![Provider::Cpu];
        o.provider_options.insert(
            "openvino".into(),
            [("device_type".into(), "NPU".into())].into(),
        );
        assert!(o
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not in execution_providers"));
        o.execution_providers = vec![Provider::OpenVino, Provider::Cpu];
        o.validate().unwrap();
        assert_eq!(
            o.options_for(Provider::OpenVino),
            vec![("device_type".to_string(), "NPU".to_string())]
        );
        o.provider_options
            .insert("openvino".into(), [("a\0".into(), "b".into())].into());
        assert!(o.validate().unwrap_err().to_string().contains("NUL"));
    }

    #[test]
    fn deserializes_from_json_like_toml() {
        // The daemon reads TOML; serde sees the same structure either way.
        let o: OrtOptions = serde_json::from_value(serde_json::json!({
            "library": "/usr/lib/libonnxruntime.so",
            "execution_providers": ["cuda", "cpu"],
            "strict": true,
            "optimization_level": "extended",
        }))
        .unwrap();
        assert_eq!(o.execution_providers, vec![Provider::Cuda, Provider::Cpu]);
        assert!(o.strict);
        assert_eq!(o.optimization_level, OptimizationLevel::Extended);
        let bad = serde_json::from_value::<OrtOptions>(serde_json::json!({
            "execution_providers": ["gpu"]
        }));
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("unknown execution provider"));
        let bad = serde_json::from_value::<OrtOptions>(serde_json::json!({"strickt": true}));
        assert!(bad.is_err());
    }
}
