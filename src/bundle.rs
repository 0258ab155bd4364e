//! Find, verify and describe a model bundle (see docs/bundle-format.md).
//!
//! The bundle is the one deployable artifact, so everything in it is treated as untrusted
//! input: paths in bundle.json must stay inside the bundle, every listed file must have the
//! recorded size (always checked, it is cheap) and sha256 (skippable for a fast start), and
//! every failure is one line that names the offending file.
//!
//! This module knows nothing about backends: it describes what is on disk.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::signature::{self, SignatureStatus, TrustedKey};

pub const FORMAT: &str = "qwen2-edge-bundle";
pub const FORMAT_VERSION: u32 = 1;

/// How much of the bundle to check when opening it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Sizes of every file and sha256 of the shared ones (the default); a variant's own
    /// files are hashed with `Bundle::verify_variant` (reading 2 GB costs seconds).
    Full,
    /// Sizes only (`--no-verify`): catches truncation, not tampering.
    SizesOnly,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    #[serde(default)]
    pub exporter: Option<String>,
    #[serde(default)]
    pub source: Option<Source>,
    pub files: BTreeMap<String, FileEntry>,
    pub variants: Vec<Variant>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Source {
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FileEntry {
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Variant {
    pub name: String,
    pub precision: String,
    pub profile: String,
    pub graph: String,
    pub data: String,
    #[serde(default)]
    pub opset: Option<u32>,
    #[serde(default)]
    pub kv_dtype: Option<String>,
    /// The graph takes an `attention_mask` wider than the sequence, zero-padded on the right
    /// (profiles `ort` and `gpu` since December 2026: lengths from the mask's sums).
    #[serde(default)]
    pub padded_attention_mask: bool,
    #[serde(default)]
    pub inputs: Vec<String>,
    #[serde(default)]
    pub outputs: Vec<String>,
    #[serde(default)]
    pub weights: BTreeMap<String, WeightEntry>,
}

/// One tensor's place in a variant's `model.onnx.data`.
#[derive(Debug, Clone, Deserialize)]
pub struct WeightEntry {
    pub dtype: String,
    pub shape: Vec<usize>,
    #[serde(default)]
    pub transposed: bool,
    pub offset: u64,
    pub nbytes: u64,
    #[serde(default)]
    pub quant: Option<Quantization>,
    #[serde(default)]
    pub packed_shape: Option<Vec<usize>>,
}

/// `quant` of a quantized weight (docs/bundle-format.md): symmetric, int8 per row or int4 per
/// 32-weight block, with float32 scales in the same data file; or (`scheme: "kquant"`, variant
/// int4k) 4-bit sub-blocks of 32 with 6-bit scale and min codes packed per super-block as GGUF's
/// Q4_K packs them (`codes`; bundles exported before 2026-12-06 hold them a byte each, `scale`
/// and `min`) under float16 super-block scales (`d`, `dmin`) of `super_block` (8) sub-blocks
/// each; or
/// (`scheme: "q6k"`, an int4k variant's wide matrices) 6-bit values as low nibbles and top bits
/// (`high`) with int8 scale codes (`scale`) per sub-block of 16 under float16 super-block
/// scales (`d`) of 16 sub-blocks. The other
/// fields the exporter writes (`axis`, `packed_shape`, the scales' `shape`) follow from these.
#[derive(Debug, Clone, Deserialize)]
pub struct Quantization {
    #[serde(default)]
    pub scheme: Option<String>,
    pub bits: u32,
    pub block_size: u64,
    #[serde(default)]
    pub super_block: Option<u64>,
    #[serde(default)]
    pub scale: Option<ScaleEntry>,
    #[serde(default)]
    pub min: Option<ScaleEntry>,
    #[serde(default)]
    pub codes: Option<ScaleEntry>,
    #[serde(default)]
    pub d: Option<ScaleEntry>,
    #[serde(default)]
    pub dmin: Option<ScaleEntry>,
    #[serde(default)]
    pub high: Option<ScaleEntry>,
}

/// `Quantization::scheme` of the int4k variant's matrices.
pub const KQUANT_SCHEME: &str = "kquant";
/// `Quantization::scheme` of the int4k variant's 6-bit wide matrices (`--int4k-wide q6k`).
pub const Q6K_SCHEME: &str = "q6k";

/// Where a quantized weight's scales lie in the variant's data file.
#[derive(Debug, Clone, Deserialize)]
pub struct ScaleEntry {
    pub dtype: String,
    pub offset: u64,
    pub nbytes: u64,
}

/// The parts of config.json (Hugging Face `Qwen2Config`) the engine needs.
///
/// RoPE settings are kept raw: transformers v4 writes `rope_theta` + `rope_scaling`, v5 writes
/// `rope_parameters`; the backend that computes frequencies interprets them.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    /// Top level in some configs (Phi-3 style); transformers prefers it for YaRN.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Qwen2-MoE (`model_type` "qwen2_moe"): experts per sparse layer.
    #[serde(default)]
    pub num_experts: Option<usize>,
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    #[serde(default)]
    pub moe_intermediate_size: Option<usize>,
    #[serde(default)]
    pub shared_expert_intermediate_size: Option<usize>,
    #[serde(default)]
    pub norm_topk_prob: Option<bool>,
    #[serde(default)]
    pub decoder_sparse_step: Option<usize>,
    #[serde(default)]
    pub mlp_only_layers: Option<Vec<usize>>,
    /// Dual Chunk Attention for inputs past the trained window (Qwen2.5-1M's configs).
    #[serde(default)]
    pub dual_chunk_attention_config: Option<DualChunkConfig>,
}

/// config.json's `dual_chunk_attention_config` (other keys in it, such as Qwen2.5-1M's sparse
/// attention settings, are not read).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct DualChunkConfig {
    pub chunk_size: usize,
    pub local_size: usize,
}

impl DualChunkConfig {
    /// Positions of one chunk, `chunk_size - local_size` (0 for a config the native backend
    /// refuses: `local_size` not below `chunk_size`).
    pub fn chunk_len(&self) -> usize {
        self.chunk_size.saturating_sub(self.local_size)
    }
}

/// Qwen2-MoE's sparse MLP settings (transformers' `Qwen2MoeConfig`, its defaults where a key is
/// absent).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub experts: usize,
    pub top_k: usize,
    pub intermediate: usize,
    pub shared_intermediate: usize,
    pub norm_topk_prob: bool,
    sparse_step: usize,
    mlp_only_layers: Vec<usize>,
}

impl MoeConfig {
    /// Whether layer `i` has the sparse MLP (transformers' `Qwen2MoeDecoderLayer` rule); the
    /// others keep a dense one of `intermediate_size`.
    pub fn is_sparse(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer)
            && self.experts > 0
            && self.sparse_step > 0
            && (layer + 1).is_multiple_of(self.sparse_step)
    }
}

fn default_act() -> String {
    "silu".to_string()
}

fn default_eps() -> f64 {
    1e-6
}

impl ModelConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The attention window of layer `i` (None = full causal attention), following
    /// transformers' Qwen2Config: sliding only when `use_sliding_window`, and then for the
    /// layers at or above `max_window_layers` unless `layer_types` says otherwise.
    pub fn sliding_window_of(&self, layer: usize) -> Option<usize> {
        let window = if self.use_sliding_window {
            self.sliding_window
        } else {
            None
        }?;
        let sliding = match &self.layer_types {
            Some(types) => types.get(layer).is_some_and(|t| t == "sliding_attention"),
            None => layer >= self.max_window_layers.unwrap_or(28),
        };
        sliding.then_some(window)
    }

    /// The sparse MLP settings of a Qwen2-MoE model; None for a dense Qwen2.
    pub fn moe(&self) -> Option<MoeConfig> {
        (self.model_type.as_deref() == Some("qwen2_moe")).then(|| MoeConfig {
            experts: self.num_experts.unwrap_or(60),
            top_k: self.num_experts_per_tok.unwrap_or(4),
            intermediate: self.moe_intermediate_size.unwrap_or(1408),
            shared_intermediate: self.shared_expert_intermediate_size.unwrap_or(5632),
            norm_topk_prob: self.norm_topk_prob.unwrap_or(false),
            sparse_step: self.decoder_sparse_step.unwrap_or(1),
            mlp_only_layers: self.mlp_only_layers.clone().unwrap_or_default(),
        })
    }

    fn check(&self) -> Result<()> {
        if let Some(moe) = self.moe() {
            if (0..self.num_hidden_layers).any(|i| moe.is_sparse(i)) {
                if moe.top_k == 0 || moe.top_k > moe.experts {
                    bail!(
                        "num_experts_per_tok ({}) must be between 1 and num_experts ({})",
                        moe.top_k,
                        moe.experts
                    );
                }
                if moe.intermediate == 0 || moe.shared_intermediate == 0 {
                    bail!("moe_intermediate_size and shared_expert_intermediate_size must be positive");
                }
            }
        }
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_dim()),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in nonzero {
            if value == 0 {
                bail!("{name} must be positive");
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            bail!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.kv_heads()
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!(
                "head_dim ({}) must be even for rotary embedding",
                self.head_dim()
            );
        }
        Ok(())
    }
}

/// generation_config.json: eos ids and sampling defaults.
#[derive(Debug, Clone, Default)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// Parses leniently: every key is optional and `eos_token_id` may be an int or a list,
    /// as transformers writes it.
    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| anyhow!("not a JSON object"))?;
        let id = |v: &Value| -> Result<u32> {
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| anyhow!("token id {v} is not a non-negative integer"))
        };
        let eos_token_ids = match obj.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items.iter().map(id).collect::<Result<_>>()?,
            Some(v) => vec![id(v)?],
        };
        let opt_id = |key: &str| -> Result<Option<u32>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => id(v).map(Some).with_context(|| key.to_string()),
            }
        };
        let float = |key: &str| -> Result<Option<f64>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| anyhow!("{key} is not a number")),
            }
        };
        let uint = |key: &str| -> Result<Option<usize>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|x| Some(x as usize))
                    .ok_or_else(|| anyhow!("{key} is not a non-negative integer")),
            }
        };
        Ok(Self {
            eos_token_ids,
            bos_token_id: opt_id("bos_token_id")?,
            pad_token_id: opt_id("pad_token_id")?,
            do_sample: obj.get("do_sample").and_then(Value::as_bool),
            temperature: float("temperature")?,
            top_k: uint("top_k")?,
            top_p: float("top_p")?,
            min_p: float("min_p")?,
            repetition_penalty: float("repetition_penalty")?,
            max_new_tokens: uint("max_new_tokens")?,
        })
    }
}

/// An opened, verified bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The directory with symbolic links resolved when it was opened: every later read (the
    /// hashes, the weights) goes to the version a store's `current` link named then, even if
    /// the link moves meanwhile.
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub config: ModelConfig,
    pub generation: GenerationConfig,
    /// Whether and by whom bundle.json is signed (checked when keys were trusted).
    pub signature: SignatureStatus,
}

impl Bundle {
    pub fn open(dir: impl AsRef<Path>, verify: Verify) -> Result<Self> {
        Self::open_trusted(dir, verify, &[])
    }

    /// Opens a bundle that, when `trusted` is not empty, one of those keys must have signed.
    /// The signature vouches for the files through their hashes: with `Verify::SizesOnly` the
    /// caller hashes what it uses (`verify_variant`) before relying on it.
    pub fn open_trusted(
        dir: impl AsRef<Path>,
        verify: Verify,
        trusted: &[TrustedKey],
    ) -> Result<Self> {
        let given = dir.as_ref();
        if !given.is_dir() {
            bail!("bundle directory {} not found", given.display());
        }
        let dir = std::fs::canonicalize(given)
            .with_context(|| format!("cannot resolve {}", given.display()))?;
        let manifest_path = dir.join("bundle.json");
        // One read: the bytes whose signature is checked are the bytes parsed.
        let bytes = std::fs::read(&manifest_path)
            .with_context(|| format!("cannot read {}", manifest_path.display()))?;
        let signature = signature::check(&dir, &bytes, trusted)?;
        let text = String::from_utf8(bytes)
            .map_err(|_| anyhow!("{}: not UTF-8", manifest_path.display()))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: invalid bundle manifest: {e}", manifest_path.display()))?;
        check_manifest(&manifest).map_err(|e| anyhow!("{}: {e}", manifest_path.display()))?;

        // Every size is checked (cheap); hashes here only for the files all variants share.
        // A variant's own graph and weights (gigabytes, and a bundle holds several variants)
        // are hashed by `verify_variant` when that variant is used.
        let variant_files: Vec<&str> = manifest
            .variants
            .iter()
            .flat_map(|v| [v.graph.as_str(), v.data.as_str()])
            .collect();
        for (name, entry) in &manifest.files {
            let hash = verify == Verify::Full && !variant_files.contains(&name.as_str());
            verify_file(&dir, name, entry, hash)?;
        }

        let config: ModelConfig = read_json(&dir, "config.json")?;
        config
            .check()
            .map_err(|e| anyhow!("{}: {e}", dir.join("config.json").display()))?;
        let generation = if dir.join("generation_config.json").exists() {
            let value: Value = read_json(&dir, "generation_config.json")?;
            GenerationConfig::from_json(&value)
                .map_err(|e| anyhow!("{}: {e}", dir.join("generation_config.json").display()))?
        } else {
            GenerationConfig::default()
        };
        Ok(Self {
            dir,
            manifest,
            config,
            generation,
            signature,
        })
    }

    pub fn variant(&self, name: &str) -> Result<&Variant> {
        self.manifest
            .variants
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.variant_names();
                anyhow!(
                    "bundle {} has no variant {name:?} (it has: {})",
                    self.dir.display(),
                    names.join(", ")
                )
            })
    }

    /// Hashes the graph and weight files of `name` against bundle.json.
    pub fn verify_variant(&self, name: &str) -> Result<()> {
        let v = self.variant(name)?;
        for file in [&v.graph, &v.data] {
            if let Some(entry) = self.manifest.files.get(file.as_str()) {
                verify_file(&self.dir, file, entry, true)?;
            }
        }
        Ok(())
    }

    pub fn variant_names(&self) -> Vec<&str> {
        self.manifest
            .variants
            .iter()
            .map(|v| v.name.as_str())
            .collect()
    }

    /// A path inside the bundle; the manifest was checked to hold only relative, inner paths.
    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.join(relative)
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }

    pub fn tokenizer_config_path(&self) -> PathBuf {
        self.dir.join("tokenizer_config.json")
    }
}

fn read_json<T: serde::de::DeserializeOwned>(dir: &Path, name: &str) -> Result<T> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}: invalid JSON: {e}", path.display()))
}

fn check_manifest(m: &Manifest) -> Result<()> {
    if m.format != FORMAT {
        bail!("format is {:?}, expected {FORMAT:?}", m.format);
    }
    if m.format_version != FORMAT_VERSION {
        bail!(
            "format_version {} is not supported (this build reads {FORMAT_VERSION})",
            m.format_version
        );
    }
    for name in m.files.keys() {
        check_relative(name)?;
        if m.files[name].sha256.len() != 64 {
            bail!("file {name}: sha256 is not 64 hex digits");
        }
    }
    for required in ["config.json", "tokenizer.json"] {
        if !m.files.contains_key(required) {
            bail!("{required} is not listed in files");
        }
    }
    if m.variants.is_empty() {
        bail!("no variants");
    }
    for v in &m.variants {
        for path in [&v.graph, &v.data] {
            check_relative(path)?;
            if !m.files.contains_key(path.as_str()) {
                bail!("variant {}: {path} is not listed in files", v.name);
            }
        }
        let data_size = m.files[v.data.as_str()].size;
        for (name, w) in &v.weights {
            let end = w.offset.checked_add(w.nbytes);
            if end.is_none_or(|end| end > data_size) {
                bail!(
                    "variant {}: weight {name} (offset {}, {} bytes) lies outside {} ({data_size} bytes)",
                    v.name,
                    w.offset,
                    w.nbytes,
                    v.data
                );
            }
        }
    }
    Ok(())
}

/// Only plain relative paths: bundle.json must not point outside its directory.
fn check_relative(path: &str) -> Result<()> {
    let p = Path::new(path);
    let ok = !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if !ok {
        bail!("file path {path:?} is not a plain relative path inside the bundle");
    }
    Ok(())
}

fn verify_file(dir: &Path, name: &str, entry: &FileEntry, hash: bool) -> Result<()> {
    let path = dir.join(name);
    let meta = std::fs::metadata(&path)
        .map_err(|e| anyhow!("{}: missing from bundle ({e})", path.display()))?;
    if meta.len() != entry.size {
        bail!(
            "{}: size {} bytes, bundle.json says {} (truncated or replaced file)",
            path.display(),
            meta.len(),
            entry.size
        );
    }
    if hash {
        let actual = sha256_file(&path)?;
        if !actual.eq_ignore_ascii_case(&entry.sha256) {
            bail!(
                "{}: sha256 mismatch (bundle.json {}, file {actual}): the file was modified",
                path.display(),
                entry.sha256
            );
        }
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_only() {
        assert!(check_relative("onnx/fp32/model.onnx").is_ok());
        assert!(check_relative("../etc/passwd").is_err());
        assert!(check_relative("/etc/passwd").is_err());
        assert!(check_relative("").is_err());
    }

    #[test]
    fn eos_int_or_list() {
        let g = GenerationConfig::from_json(&serde_json::json!({"eos_token_id": 5})).unwrap();
        assert_eq!(g.eos_token_ids, vec![5]);
        let g = GenerationConfig::from_json(&serde_json::json!({"eos_token_id": [1, 2],
            "temperature": 0.7, "top_k": 20}))
        .unwrap();
        assert_eq!(g.eos_token_ids, vec![1, 2]);
        assert_eq!(g.top_k, Some(20));
        assert!(GenerationConfig::from_json(&serde_json::json!({"eos_token_id": -1})).is_err());
    }

    #[test]
    fn sliding_window_layers() {
        let mut c: ModelConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 4, "num_attention_heads": 2,
            "max_position_embeddings": 64, "sliding_window": 16, "max_window_layers": 2
        }))
        .unwrap();
        assert_eq!(c.sliding_window_of(3), None);
        c.use_sliding_window = true;
        assert_eq!(c.sliding_window_of(1), None);
        assert_eq!(c.sliding_window_of(2), Some(16));
        assert_eq!(c.head_dim(), 4);
        assert_eq!(c.kv_heads(), 2);
    }
}
