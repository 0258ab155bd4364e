//! A model ready to use: a verified bundle, its tokenizer and a loaded backend, plus the
//! small policies every front end shares (how a prompt becomes tokens, the default sampling
//! settings, which ids end a generation).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::Result;

use crate::backend::options::OrtOptions;
use crate::backend::{self, Backend, BackendKind, KvCacheType, LmHead, LoadOptions};
use crate::bundle::{Bundle, Verify};
use crate::chat::{self, ChatMessage};
use crate::generate::{GenerateOptions, Generator};
use crate::guide::{self, Guides};
use crate::sampling::SamplingParams;
use crate::signature::TrustedKey;
use crate::tokenizer::Tokenizer;

/// Used when generation_config.json sets no `max_new_tokens`.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 512;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub bundle: PathBuf,
    pub verify: Verify,
    pub backend: BackendKind,
    pub variant: String,
    /// 0 = one per available core.
    pub threads: usize,
    /// Native kernel set ("" / "auto", "generic", or a tier name); see `LoadOptions::kernels`.
    pub kernels: String,
    /// Native KV cache element type.
    pub kv_cache: KvCacheType,
    /// Native backend: the LM head as stored, or requantized to int4 (`LmHead`).
    pub lm_head: LmHead,
    /// Native prefix cache size in MiB (0: off; one-shot commands and benchmarks leave it
    /// off, so repeated prompts are timed as computed).
    pub prefix_cache_mib: usize,
    /// Native backend: where the prefix cache is restored from and saved to (None: memory only;
    /// `LoadOptions::prefix_cache_file`).
    pub prefix_cache_file: Option<PathBuf>,
    /// Native backend: read the weights into memory instead of mapping them.
    pub no_mmap: bool,
    /// Settings of the ort backend (ignored by the others).
    pub ort: OrtOptions,
    /// Keys one of which must have signed the bundle (empty: not required); the files it
    /// vouches for are checked only with `Verify::Full`.
    pub trusted_keys: Vec<TrustedKey>,
}

pub struct Engine {
    pub bundle: Bundle,
    pub tokenizer: Tokenizer,
    pub backend: Arc<dyn Backend>,
    /// The bundle variant loaded ("int8", "fp16-ort", …).
    pub variant: String,
    /// Built on first use (the token trie and llguidance's token classes of the whole
    /// vocabulary: 0.65 s and ~58 MB for Qwen2's 151k tokens on a Zen 5 core), so a box that
    /// never constrains an output never pays for it.
    guides: OnceLock<Result<Guides, String>>,
}

impl Engine {
    pub fn load(options: &EngineOptions) -> Result<Self> {
        let bundle = Bundle::open_trusted(&options.bundle, options.verify, &options.trusted_keys)?;
        // Fail on a bad variant name or backend before paying for the tokenizer.
        bundle.variant(&options.variant)?;
        if options.verify == Verify::Full {
            bundle.verify_variant(&options.variant)?;
        }
        let tokenizer = Tokenizer::from_bundle(&bundle)?;
        // The tokens' bytes (the streaming decoder's table), built now rather than during the
        // first request; a tokenizer that is not byte-level streams without them.
        let _ = tokenizer.token_bytes();
        let backend = backend::load(
            &bundle,
            options.backend,
            &options.variant,
            &LoadOptions {
                threads: options.threads,
                prefill_chunk: 0,
                kernels: options.kernels.clone(),
                kv_cache: options.kv_cache,
                lm_head: options.lm_head,
                prefix_cache_bytes: options.prefix_cache_mib << 20,
                prefix_cache_file: options.prefix_cache_file.clone(),
                no_mmap: options.no_mmap,
                ort: options.ort.clone(),
            },
        )?;
        Ok(Self {
            bundle,
            tokenizer,
            backend,
            variant: options.variant.clone(),
            guides: OnceLock::new(),
        })
    }

    /// Compiles output constraints for this model's tokenizer (see `guide`).
    pub fn guides(&self) -> Result<&Guides> {
        let built = self.guides.get_or_init(|| {
            let started = std::time::Instant::now();
            let eos = self.default_options().eos_token_ids;
            let guides = Guides::new(&self.tokenizer, self.bundle.config.vocab_size, &eos)
                .map_err(|e| format!("{e:#}"));
            let ms = started.elapsed().as_millis();
            tracing::info!(ms, ok = guides.is_ok(), "constrained decoding set up");
            guides
        });
        built.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Generates a few greedy tokens from a short chat prompt: the check a freshly installed or
    /// reloaded model passes before it serves anyone.
    pub fn smoke_test(&self) -> Result<crate::generate::Generation> {
        let prompt = self.chat_prompt(&Self::single_turn(None, "Say hello."))?;
        let mut options = self.default_options();
        options.max_new_tokens = 4;
        options.sampling = SamplingParams::greedy();
        let out = self.generator(Some(prompt.len() + 8))?.generate(
            &self.tokenizer,
            &prompt,
            &options,
            &crate::generate::CancelHandle::new(),
            &mut |_| {},
        )?;
        if out.tokens.is_empty() {
            anyhow::bail!("the model generated no token");
        }
        Ok(out)
    }

    /// The model's context length on this backend (`Backend::max_positions`).
    pub fn max_context(&self) -> usize {
        self.backend.max_positions()
    }

    /// A generator whose cache holds `context` positions (default and maximum: the model's).
    pub fn generator(&self, context: Option<usize>) -> Result<Generator> {
        let capacity = context.unwrap_or(self.max_context());
        Ok(Generator::new(self.backend.new_session(capacity)?))
    }

    /// Chat messages for one user turn, with an optional system prompt (without one, the
    /// template's own default system prompt applies, as in transformers).
    pub fn single_turn(system: Option<&str>, user: &str) -> Vec<ChatMessage> {
        chat::single_turn(system, user)
    }

    /// Renders the conversation with the bundle's chat template (ready for the assistant's
    /// reply) and tokenizes it.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.chat_prompt_with_tools(messages, None)
    }

    /// `chat_prompt`, with tool definitions (OpenAI's `tools` list) for the template to show.
    pub fn chat_prompt_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>> {
        let messages = guide::tools::template_messages(messages);
        let text = self.tokenizer.apply_chat_template(&messages, tools, true)?;
        self.tokenizer.encode(&text, false)
    }

    /// Text sent as is (`--raw`).
    pub fn raw_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, true)
    }

    /// Sampling defaults from generation_config.json.
    pub fn default_sampling(&self) -> SamplingParams {
        SamplingParams::from_generation_config(&self.bundle.generation)
    }

    /// Options with the bundle's eos ids (falling back to ChatML's end tokens when
    /// generation_config.json names none).
    pub fn default_options(&self) -> GenerateOptions {
        let g = &self.bundle.generation;
        let mut eos = g.eos_token_ids.clone();
        if eos.is_empty() {
            eos.extend(
                ["<|im_end|>", "<|endoftext|>"]
                    .iter()
                    .filter_map(|t| self.tokenizer.token_to_id(t)),
            );
        }
        GenerateOptions {
            max_new_tokens: g.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS),
            sampling: self.default_sampling(),
            stop: Vec::new(),
            eos_token_ids: eos,
            prompt_lookup: 0,
        }
    }
}
