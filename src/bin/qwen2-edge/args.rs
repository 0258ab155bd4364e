//! The arguments the commands share: the model and its backend (`ModelArgs`, `OrtArgs`) and
//! sampling (`SamplingFlags`, `SamplingArgs`), speculative decoding's draft model (`DraftArgs`),
//! with what turns them into library options.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use qwen2_edge::backend::options::{OptimizationLevel, OrtOptions, Provider};
use qwen2_edge::backend::{BackendKind, KvCacheType, LmHead};
use qwen2_edge::bundle::Verify;
use qwen2_edge::config::environment::{self, layered};
use qwen2_edge::draft::{DraftModel, DEFAULT_DRAFT_TOKENS, DEFAULT_DRAFT_VOCABULARY};
use qwen2_edge::engine::{Engine, EngineOptions};
use qwen2_edge::generate::GenerateOptions;
use qwen2_edge::sampling::SamplingOverrides;

#[derive(Args)]
pub(crate) struct ModelArgs {
    /// Model bundle directory.
    #[arg(long)]
    pub(crate) bundle: PathBuf,
    /// native | ort | tract
    #[arg(long, default_value = "native")]
    pub(crate) backend: BackendKind,
    /// Bundle variant (fp32, fp16, …).
    #[arg(long, default_value = "fp32")]
    pub(crate) variant: String,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub(crate) threads: usize,
    /// Native kernel set: auto, generic, or a tier (avx512, avx2-vnni, avx2, neon-dotprod, neon) [env: QWEN2_EDGE_KERNELS; default: auto].
    #[arg(long)]
    pub(crate) kernels: Option<String>,
    /// Native KV cache element type: f32, f16 or int8 [env: QWEN2_EDGE_KV_CACHE; default: f32].
    #[arg(long, value_name = "TYPE")]
    pub(crate) kv_cache: Option<KvCacheType>,
    /// Native LM head: as the bundle stores it, or an int8 head requantized to int4 at load
    /// (faster decode and less memory, a little less accurate; a draft's: `--draft-lm-head`).
    #[arg(long, value_name = "PRECISION", default_value = "bundle")]
    pub(crate) lm_head: LmHead,
    /// Skip the sha256 check of the bundle's files (sizes are still checked).
    #[arg(long)]
    pub(crate) no_verify: bool,
    /// Native backend: read the weights into memory instead of mapping the file (no SIGBUS if
    /// the file changes on disk; costs the file's size in RAM).
    #[arg(long)]
    pub(crate) no_mmap: bool,
    #[command(flatten)]
    pub(crate) ort: OrtArgs,
}

impl ModelArgs {
    pub(crate) fn engine_options(&self) -> Result<EngineOptions> {
        Ok(EngineOptions {
            bundle: self.bundle.clone(),
            verify: verify(self.no_verify),
            backend: self.backend,
            variant: self.variant.clone(),
            threads: self.threads,
            kernels: layered(self.kernels.clone(), environment::KERNELS, "auto".into())?,
            kv_cache: layered(self.kv_cache, environment::KV_CACHE, KvCacheType::F32)?,
            lm_head: self.lm_head,
            prefix_cache_mib: 0,
            prefix_cache_file: None,
            no_mmap: self.no_mmap,
            ort: self.ort.options()?,
            trusted_keys: Vec::new(),
        })
    }
}

/// Settings of `--backend ort` (the service config's `[ort]` section).
#[derive(Args)]
pub(crate) struct OrtArgs {
    /// ONNX Runtime library (default: ORT_DYLIB_PATH, then well-known install paths).
    #[arg(long, value_name = "PATH")]
    pub(crate) ort_library: Option<PathBuf>,
    /// Execution providers in order of preference, e.g. "tensorrt,cuda,cpu".
    #[arg(long, value_name = "LIST", default_value = "cpu")]
    pub(crate) ort_providers: String,
    /// A provider that cannot be used is an error instead of a fall-back.
    #[arg(long)]
    pub(crate) ort_strict: bool,
    /// Graph optimization level: disable, basic, extended, all.
    #[arg(long, value_name = "LEVEL", default_value = "all")]
    pub(crate) ort_optimization: OptimizationLevel,
    /// Keep ONNX Runtime's optimized graph in this directory between starts.
    #[arg(long, value_name = "DIR")]
    pub(crate) ort_cache: Option<PathBuf>,
    /// An ONNX Runtime session config entry, KEY=VALUE; may be repeated.
    #[arg(long, value_name = "KEY=VALUE")]
    pub(crate) ort_config: Vec<String>,
    /// An execution provider option, PROVIDER.KEY=VALUE (e.g. cuda.device_id=1); may be repeated.
    #[arg(long, value_name = "P.KEY=VALUE")]
    pub(crate) ort_provider_option: Vec<String>,
}

impl OrtArgs {
    pub(crate) fn options(&self) -> Result<OrtOptions> {
        let mut provider_options = std::collections::BTreeMap::new();
        for item in &self.ort_provider_option {
            let parsed = item
                .split_once('=')
                .and_then(|(pk, v)| pk.split_once('.').map(|(p, k)| (p, k, v)));
            let Some((provider, key, value)) = parsed else {
                bail!("--ort-provider-option {item:?}: expected PROVIDER.KEY=VALUE");
            };
            provider_options
                .entry(provider.to_string())
                .or_insert_with(std::collections::BTreeMap::new)
                .insert(key.to_string(), value.to_string());
        }
        let o = OrtOptions {
            library: environment::layered_path(
                self.ort_library.clone(),
                environment::ORT_LIBRARY,
                None,
            ),
            provider_options,
            execution_providers: Provider::parse_list(&self.ort_providers)
                .map_err(|e| anyhow::anyhow!("--ort-providers: {e}"))?,
            strict: self.ort_strict,
            optimization_level: self.ort_optimization,
            optimized_model_cache: self.ort_cache.clone(),
            session_config: self
                .ort_config
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .ok_or_else(|| anyhow::anyhow!("--ort-config {kv:?}: expected KEY=VALUE"))
                })
                .collect::<Result<_>>()?,
            ..OrtOptions::default()
        };
        o.validate()?;
        Ok(o)
    }
}

/// Sampling flags, shared by `generate`, `chat` and `ask`.
#[derive(Args)]
pub(crate) struct SamplingFlags {
    /// 0 = greedy. Default: generation_config.json.
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) temperature: Option<f32>,
    /// 0 = off.
    #[arg(long)]
    pub(crate) top_k: Option<usize>,
    /// In (0, 1]; 1 = off.
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) top_p: Option<f32>,
    /// In [0, 1]; 0 = off.
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) min_p: Option<f32>,
    /// > 0; 1 = off.
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) repetition_penalty: Option<f32>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Maximum new tokens.
    #[arg(long)]
    pub(crate) max_tokens: Option<usize>,
    /// Stop when this text appears (not printed); may be repeated.
    #[arg(long)]
    pub(crate) stop: Vec<String>,
}

impl SamplingFlags {
    pub(crate) fn overrides(&self) -> SamplingOverrides {
        SamplingOverrides {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
    }

    /// Flags over the bundle's defaults, validated.
    pub(crate) fn options(&self, engine: &Engine) -> Result<GenerateOptions> {
        let mut o = engine.default_options();
        self.overrides().apply(&mut o.sampling);
        o.sampling.validate()?;
        if let Some(m) = self.max_tokens {
            if m == 0 {
                bail!("--max-tokens must be at least 1");
            }
            o.max_new_tokens = m;
        }
        o.stop = self.stop.clone();
        Ok(o)
    }

    /// Checks that need no model, so bad flags fail before a slow load.
    pub(crate) fn precheck(&self) -> Result<()> {
        let mut s = qwen2_edge::sampling::SamplingParams::greedy();
        self.overrides().apply(&mut s);
        s.validate()?;
        Ok(())
    }
}

#[derive(Args)]
pub(crate) struct SamplingArgs {
    #[command(flatten)]
    pub(crate) flags: SamplingFlags,
    /// Context positions to allocate (default: the model's max_position_embeddings).
    #[arg(long)]
    pub(crate) context: Option<usize>,
    /// Print token counts and timings to stderr when done.
    #[arg(long)]
    pub(crate) stats: bool,
    /// Speculative decoding with prompt lookup: verify up to N tokens drafted from the context
    /// (what followed the last 2-3 tokens where they occurred before) per forward pass. Same
    /// output, faster when the reply copies from the prompt (code edits, quotes). 0 = off.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=MAX_PROMPT_LOOKUP as i64))]
    pub(crate) prompt_lookup: u16,
}

/// Speculative decoding with a draft model (`generate`, `chat`).
#[derive(Args)]
pub(crate) struct DraftArgs {
    /// Speculative decoding with a draft model: a smaller bundle with the same vocabulary (the
    /// 0.5B for the 1.5B) proposes tokens greedily, this model verifies them in one pass. Same
    /// output; faster where verifying several rows costs little more than one (a GPU, AVX-512;
    /// on 2-core AVX2 CPUs the 1.5B int8 gained 1.25-1.35x, int4 1.0-1.15x: README). With
    /// --prompt-lookup too, the context's own continuation is drafted first, as far as the
    /// draft model predicts it.
    #[arg(long, value_name = "DIR")]
    pub(crate) draft_bundle: Option<PathBuf>,
    /// The draft bundle's variant.
    #[arg(long, default_value = "int4")]
    pub(crate) draft_variant: String,
    /// Tokens the draft model proposes per verification pass (with its token, four rows: the
    /// most one pass over the weights takes).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_DRAFT_TOKENS as u16,
          value_parser = clap::value_parser!(u16).range(1..=MAX_PROMPT_LOOKUP as i64))]
    pub(crate) draft_tokens: u16,
    /// The draft model's LM head (as `--lm-head`) where it drafts from every token
    /// (`--draft-vocab`): int4 makes the 0.5B int4 draft 14–21% faster and 57 MiB smaller.
    #[arg(long, value_name = "PRECISION", default_value = "bundle")]
    pub(crate) draft_lm_head: LmHead,
    /// The draft model proposes from the first N token ids (the most common byte-pair pieces)
    /// and the special tokens, its LM head computing only theirs, an int8 head's in int4: a
    /// quarter cheaper a draft for the 0.5B. While more than one token in 8 of the context lies
    /// outside them (Chinese, Russian), it drafts from every token. 0 = every token always
    #[arg(long, value_name = "N", default_value_t = DEFAULT_DRAFT_VOCABULARY)]
    pub(crate) draft_vocab: usize,
}

impl DraftArgs {
    /// The draft model for a `target` generator of `capacity` positions, loaded like the
    /// target (`model`'s backend, threads, kernels) from `--draft-bundle`; None without it.
    pub(crate) fn load(
        &self,
        model: &ModelArgs,
        target: &Engine,
        capacity: usize,
    ) -> Result<Option<DraftModel>> {
        let Some(bundle) = &self.draft_bundle else {
            return Ok(None);
        };
        let options = EngineOptions {
            bundle: bundle.clone(),
            variant: self.draft_variant.clone(),
            lm_head: self.draft_lm_head,
            ..model.engine_options()?
        };
        let draft = Engine::load(&options)
            .map_err(|e| anyhow::anyhow!("draft model {}: {e:#}", bundle.display()))?;
        DraftModel::new(
            &draft,
            target,
            capacity,
            usize::from(self.draft_tokens),
            self.draft_vocab,
        )
        .map(Some)
    }
}

/// The most drafted tokens a forward pass verifies: a wider pass costs more when its drafts
/// fail (on 2 cores a 9-row pass of the 1.5B int4 costs ~2.7 one-row passes, README).
pub(crate) const MAX_PROMPT_LOOKUP: u16 = qwen2_edge::lookup::MAX_DRAFT as u16;

pub(crate) fn verify(no_verify: bool) -> Verify {
    if no_verify {
        Verify::SizesOnly
    } else {
        Verify::Full
    }
}
