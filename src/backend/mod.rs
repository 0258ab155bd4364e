//! The one seam between the engine and the things that run a model.
//!
//! A `Backend` is a loaded model (weights shared by all its sessions); a `Session` is one
//! sequence being generated: it owns its KV cache, allocated once at its full capacity and
//! written in place. Backends know nothing about tokenizers, sampling or the service.

pub mod native;
pub mod options;
#[cfg(feature = "ort")]
pub mod ort;
#[cfg(feature = "tract")]
pub mod tract;

use std::any::Any;
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::bundle::{Bundle, ModelConfig};

/// Which logits a forward call should return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position's row `[vocab]` (generation).
    Last,
    /// Every position's row, `[tokens, vocab]` (reference tests, scoring).
    All,
    /// Every position's row, each as the token would have given it run alone (speculative
    /// decoding verifies its drafts with these: the output must be the plain decoding's). The
    /// native backend computes them bit for bit so; ort and tract give `All`'s rows, equal to
    /// the one-token logits within float rounding.
    Each,
}

impl Logits {
    /// A row per token (`All`, `Each`), not only the last one.
    pub fn every_row(self) -> bool {
        self != Logits::Last
    }
}

pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    fn config(&self) -> &ModelConfig;
    /// What computes, for logs, `info` and `bench` (for ort: the library version and the
    /// execution providers actually registered).
    fn device(&self) -> String {
        "cpu".to_string()
    }
    /// Whether this backend computes Dual Chunk Attention (config.json's
    /// `dual_chunk_attention_config`; the native backend does, the ONNX graphs do not).
    fn dual_chunk_attention(&self) -> bool {
        false
    }
    /// The longest sequence this backend runs the model at: `max_position_embeddings`, or for
    /// a model with Dual Chunk Attention on a backend without it, one chunk (where DCA is plain
    /// attention), so no sequence gets attention other than the model's.
    fn max_positions(&self) -> usize {
        let cfg = self.config();
        match &cfg.dual_chunk_attention_config {
            Some(dca) if !self.dual_chunk_attention() => {
                cfg.max_position_embeddings.min(dca.chunk_len().max(1))
            }
            _ => cfg.max_position_embeddings,
        }
    }
    /// A new sequence whose cache holds up to `capacity` positions (at most `max_positions`).
    /// Backends implement `create_session`; the check is here.
    fn new_session(&self, capacity: usize) -> Result<Box<dyn Session>> {
        self.check_capacity(capacity)?;
        self.create_session(capacity)
    }
    /// That a session of `capacity` positions is possible: within 1..=max_positions.
    fn check_capacity(&self, capacity: usize) -> Result<()> {
        let max = self.max_positions();
        if capacity == 0 || capacity > max {
            let why = if max < self.config().max_position_embeddings {
                "one chunk of the model's Dual Chunk Attention, which this backend does not compute: the native backend runs longer contexts"
            } else {
                "the model's max_position_embeddings"
            };
            bail!("a context of {capacity} positions is outside 1..={max} ({why})");
        }
        Ok(())
    }
    /// `new_session` after its check: `capacity` is within 1..=max_positions.
    fn create_session(&self, capacity: usize) -> Result<Box<dyn Session>>;
    /// A session for drafting (speculative decoding) that needs only the logits of the tokens
    /// `vocabulary` (ids below `config().vocab_size`): where the backend can, its LM head
    /// computes only theirs, perhaps at lower precision, and the others are -inf (the native
    /// backend); else a plain session.
    fn new_draft_session(&self, capacity: usize, vocabulary: &[u32]) -> Result<Box<dyn Session>> {
        let _ = vocabulary;
        self.new_session(capacity)
    }
    /// Worker threads and compute kernels in use, for `info` / `bench` (e.g. "avx512-vnni").
    fn kernels(&self) -> Option<String> {
        None
    }
    fn threads(&self) -> Option<usize> {
        None
    }
    /// Weight bytes a decode step reads, where the backend knows it (bench: GB/s streamed).
    fn weight_bytes_per_token(&self) -> Option<u64> {
        None
    }
    /// One engine step of several sessions of this backend: `inputs[i]` (a decode step's
    /// token, perhaps with drafts to verify, or a slice of a prompt) runs at the end of
    /// `sessions[i]`, and the logits it asks for (its last row, or with `Logits::Each` every
    /// row) are handed to `each(i, logits)` (which may modify them). The native backend reads
    /// its weights once for all of them, and a session's logits do not depend on the others;
    /// the default runs one forward after another.
    fn step_batch(
        &self,
        sessions: &mut [&mut dyn Session],
        inputs: &[StepInput<'_>],
        each: &mut dyn FnMut(usize, &mut [f32]),
    ) -> Result<()> {
        step_one_by_one(sessions, inputs, each)
    }
    /// The prefix cache's counters, where the backend has one and it is on.
    fn prefix_cache(&self) -> Option<native::prefix::PrefixStats> {
        None
    }
    /// Writes the prefix cache to `LoadOptions::prefix_cache_file`, where the backend has one
    /// and a file was given: the number of blocks written.
    fn save_prefix_cache(&self) -> Result<Option<usize>> {
        Ok(None)
    }
}

/// One session's part of a `Backend::step_batch`.
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    pub tokens: &'a [u32],
    /// `Last`, or `Each` (a token and its drafts: every row, as each would be alone).
    pub logits: Logits,
}

impl<'a> StepInput<'a> {
    /// Tokens whose last row's logits are wanted (a decode token, a prompt slice).
    pub fn last(tokens: &'a [u32]) -> Self {
        Self {
            tokens,
            logits: Logits::Last,
        }
    }

    /// How many rows of logits `each` gets.
    pub fn rows(&self) -> usize {
        if self.logits.every_row() {
            self.tokens.len()
        } else {
            1
        }
    }
}

/// The checks of `step_batch`: an input per session, each valid for its session.
fn check_batch(sessions: &[&mut dyn Session], inputs: &[StepInput<'_>]) -> Result<()> {
    if sessions.len() != inputs.len() {
        bail!(
            "step_batch: {} sessions, {} inputs",
            sessions.len(),
            inputs.len()
        );
    }
    for (s, input) in sessions.iter().zip(inputs) {
        s.check(input.tokens)?;
    }
    Ok(())
}

/// `Backend::step_batch` without batching.
fn step_one_by_one(
    sessions: &mut [&mut dyn Session],
    inputs: &[StepInput<'_>],
    each: &mut dyn FnMut(usize, &mut [f32]),
) -> Result<()> {
    check_batch(sessions, inputs)?;
    for (i, (s, input)) in sessions.iter_mut().zip(inputs).enumerate() {
        each(i, s.forward(input.tokens, input.logits)?);
    }
    Ok(())
}

pub trait Session: Send {
    /// Positions the cache can hold.
    fn capacity(&self) -> usize;
    /// Positions filled so far.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Forgets positions from `len` on (to reuse a shared prefix of the next prompt).
    fn truncate(&mut self, len: usize);
    /// Token ids run must be below this.
    fn vocab(&self) -> usize;
    /// The session as `Any`, so a backend can batch its own sessions (`step_batch`).
    fn as_any_mut(&mut self) -> &mut dyn Any;
    /// Fills positions from the backend's prefix cache: `tokens` are the prompt's tokens
    /// that may be reused (all but the last), of which this session already holds the first
    /// `held`. Returns how many of them it holds now (the caller truncates to that and runs
    /// the rest). Backends without a prefix cache keep what they hold.
    fn restore_prefix(&mut self, tokens: &[u32], held: usize) -> usize {
        let _ = tokens;
        held
    }
    /// A draft session (`Backend::new_draft_session`): whether its LM head keeps to its
    /// vocabulary (as made) or computes every token's logits from now on. Other sessions
    /// compute every token's anyway.
    fn keep_to_vocabulary(&mut self, on: bool) {
        let _ = on;
    }
    /// Offers the positions this session holds for `tokens` (from position 0) to the
    /// backend's prefix cache.
    fn save_prefix(&mut self, tokens: &[u32]) {
        let _ = tokens;
    }
    /// Runs `tokens` at positions `len()..len() + tokens.len()`, appends their keys and
    /// values to the cache, and returns the requested logits (the caller may modify them in
    /// place, e.g. the sampler: no copy per token). Backends implement `run`; the checks of
    /// the arguments, the same for every backend, are here.
    fn forward(&mut self, tokens: &[u32], which: Logits) -> Result<&mut [f32]> {
        self.check(tokens)?;
        self.run(tokens, which)
    }
    /// The checks of `forward`: `tokens` non-empty, in the vocabulary, and room for them.
    fn check(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.vocab();
        if tokens.is_empty() {
            bail!("forward called with no tokens");
        }
        // Checked before any backend sees an id: tract's Gather panics on one out of range.
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the model's vocabulary ({vocab})");
        }
        let (cached, capacity) = (self.len(), self.capacity());
        if tokens.len() > capacity - cached {
            bail!(
                "context full: {cached} tokens cached, {} more do not fit in {capacity}",
                tokens.len()
            );
        }
        Ok(())
    }
    /// `forward` after its checks: `tokens` is non-empty, every id is in the vocabulary, and
    /// they fit in the cache.
    fn run(&mut self, tokens: &[u32], which: Logits) -> Result<&mut [f32]>;
}

named_enum! {
    pub enum BackendKind("backend") {
        Native = "native",
        Ort = "ort",
        Tract = "tract",
    }
}

named_enum! {
    /// Element type of the native backend's KV cache: f32 is exact; f16 halves its memory and
    /// the bytes attention reads; int8 (a scale per 32 elements) takes 28% of f32.
    #[derive(Default)]
    pub enum KvCacheType("KV cache type") {
        #[default]
        F32 = "f32",
        F16 = "f16",
        Int8 = "int8",
    }
}

named_enum! {
    /// Native backend: the LM head as the bundle stores it, or an int8 head requantized to
    /// int4 blocks at load. On the 0.5B int4 (2-core Zen 3, 2026-12-06) int4 decodes 14–21%
    /// faster (278 against 338 MB of weights a token) in 57 MiB less memory, for +1.8%
    /// perplexity (8.482 against 8.329): for a board where speed or memory come first, or a
    /// draft model, whose guesses the target checks anyway.
    #[derive(Default)]
    pub enum LmHead("LM head") {
        #[default]
        Bundle = "bundle",
        Int4 = "int4",
    }
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Worker threads; 0 = one per available core.
    pub threads: usize,
    /// Prompt tokens computed together (activation memory grows with it); 0 = the
    /// backend's default.
    pub prefill_chunk: usize,
    /// Native backend kernel set: "" or "auto" = the best this CPU has, "generic" = the
    /// portable kernels, or a tier name.
    pub kernels: String,
    /// Native backend: the KV cache's element type.
    pub kv_cache: KvCacheType,
    /// Native backend: the LM head's precision.
    pub lm_head: LmHead,
    /// Native backend: bytes of prompt-prefix keys and values kept for reuse (0: off).
    pub prefix_cache_bytes: usize,
    /// Native backend: where the prefix cache is loaded from at load and saved to by
    /// `Backend::save_prefix_cache` (None: kept in memory only).
    pub prefix_cache_file: Option<std::path::PathBuf>,
    /// Native backend: read the weights into memory instead of mapping the file (llama.cpp's
    /// `--no-mmap`): no SIGBUS if the file changes on disk, at the cost of its size in RAM.
    pub no_mmap: bool,
    /// The `[ort]` settings (library, execution providers, session options).
    pub ort: options::OrtOptions,
}

/// Loads `variant` of the bundle on the chosen backend.
pub fn load(
    bundle: &Bundle,
    kind: BackendKind,
    variant: &str,
    options: &LoadOptions,
) -> Result<Arc<dyn Backend>> {
    match kind {
        BackendKind::Native => Ok(Arc::new(native::NativeBackend::load(
            bundle, variant, options,
        )?)),
        #[cfg(feature = "ort")]
        BackendKind::Ort => Ok(Arc::new(ort::OrtBackend::load(bundle, variant, options)?)),
        #[cfg(feature = "tract")]
        BackendKind::Tract => Ok(Arc::new(tract::TractBackend::load(
            bundle, variant, options,
        )?)),
        #[allow(unreachable_patterns)]
        other => {
            bail!("this qwen2-edge was built without the {other} backend (cargo feature {other})")
        }
    }
}
