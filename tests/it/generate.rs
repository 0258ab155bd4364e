//! The generation loop on a fixture model: stop rules, limits, cancellation, streaming and
//! KV-cache reuse. Expected tokens come from the transformers reference (greedy decode_ids).

use crate::common;

use anyhow::Result;
use qwen2_edge::backend::{self, Backend, BackendKind, LoadOptions};

use qwen2_edge::generate::{CancelHandle, FinishReason, GenerateOptions, Generation, Generator};
use qwen2_edge::sampling::SamplingParams;
use qwen2_edge::tokenizer::Tokenizer;

struct Fixture {
    backend: std::sync::Arc<dyn Backend>,
    tokenizer: Tokenizer,
    reference: common::Reference,
}

fn fixture() -> Fixture {
    let name = "tiny-untied";
    let bundle = common::fixture_bundle(name);
    Fixture {
        backend: backend::load(
            &bundle,
            BackendKind::Native,
            "fp32",
            &LoadOptions::default(),
        )
        .unwrap(),
        tokenizer: Tokenizer::from_bundle(&bundle).unwrap(),
        reference: common::reference(name),
    }
}

impl Fixture {
    /// One generation, not streamed and not cancelled.
    fn run(&self, g: &mut Generator, prompt: &[u32], o: &GenerateOptions) -> Result<Generation> {
        g.generate(
            &self.tokenizer,
            prompt,
            o,
            &CancelHandle::new(),
            &mut |_| {},
        )
    }
}

fn options(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        eos_token_ids: Vec::new(),
        prompt_lookup: 0,
    }
}

#[test]
fn greedy_generation_streams_the_reference_tokens() {
    let f = fixture();
    let mut g = Generator::new(f.backend.new_session(128).unwrap());
    let mut streamed = String::new();
    let out = g
        .generate(
            &f.tokenizer,
            &f.reference.prompt_ids,
            &options(8),
            &CancelHandle::new(),
            &mut |t| streamed.push_str(t),
        )
        .unwrap();
    assert_eq!(out.tokens, f.reference.decode_ids);
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(out.usage.completion_tokens, 8);
    assert_eq!(out.usage.prompt_tokens, f.reference.prompt_ids.len());
    assert_eq!(streamed, out.text);
    assert_eq!(out.text, f.tokenizer.decode(&out.tokens).unwrap());
    assert!(out.timings.ttft > std::time::Duration::ZERO);
}

#[test]
fn eos_stops_and_is_not_emitted() {
    let f = fixture();
    let eos = f.reference.decode_ids[3];
    let first = f
        .reference
        .decode_ids
        .iter()
        .position(|&t| t == eos)
        .unwrap();
    let mut g = Generator::new(f.backend.new_session(128).unwrap());
    let mut o = options(8);
    o.eos_token_ids = vec![eos];
    let out = f.run(&mut g, &f.reference.prompt_ids, &o).unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.tokens, f.reference.decode_ids[..first]);
    assert_eq!(out.usage.completion_tokens, first + 1);
}

#[test]
fn stop_string_cuts_the_text() {
    let f = fixture();
    let mut g = Generator::new(f.backend.new_session(128).unwrap());
    let full = f
        .run(&mut g, &f.reference.prompt_ids, &options(8))
        .unwrap()
        .text;
    // A stop string from the middle of the greedy text (on a character boundary).
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    assert!(chars.len() >= 4, "greedy text too short: {full:?}");
    let (start, _) = chars[chars.len() / 2];
    let end = chars.get(chars.len() / 2 + 2).map_or(full.len(), |c| c.0);
    let stop = full[start..end].to_string();
    let before = &full[..full.find(&stop).unwrap()];
    let mut o = options(8);
    o.stop = vec![stop.clone()];
    let mut streamed = String::new();
    let out = g
        .generate(
            &f.tokenizer,
            &f.reference.prompt_ids,
            &o,
            &CancelHandle::new(),
            &mut |t| streamed.push_str(t),
        )
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.text, before);
    assert_eq!(streamed, before);
    assert!(!streamed.contains(&stop));
}

#[test]
fn cancellation_is_checked_every_token() {
    let f = fixture();
    let mut g = Generator::new(f.backend.new_session(128).unwrap());
    let cancel = CancelHandle::new();
    let trigger = cancel.clone();
    let out = g
        .generate(
            &f.tokenizer,
            &f.reference.prompt_ids,
            &options(8),
            &cancel,
            &mut |_| trigger.cancel(),
        )
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    assert!(out.usage.completion_tokens < 8);
    let cancelled = CancelHandle::new();
    cancelled.cancel();
    let out = g
        .generate(
            &f.tokenizer,
            &f.reference.prompt_ids,
            &options(8),
            &cancelled,
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(out.usage.completion_tokens, 0);
}

#[test]
fn context_limits() {
    let f = fixture();
    let n = f.reference.prompt_ids.len();
    // A prompt that does not fit is an error, not a crash.
    let mut small = Generator::new(f.backend.new_session(n).unwrap());
    let err = f
        .run(&mut small, &f.reference.prompt_ids, &options(8))
        .expect_err("prompt over the context");
    assert!(err.to_string().contains("prompt too long"), "{err}");
    // A full context ends the generation with Length.
    let mut tight = Generator::new(f.backend.new_session(n + 3).unwrap());
    let out = f
        .run(&mut tight, &f.reference.prompt_ids, &options(8))
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(out.tokens, f.reference.decode_ids[..4]);
}

#[test]
fn a_repeated_prompt_reuses_the_cache() {
    let f = fixture();
    let mut g = Generator::new(f.backend.new_session(128).unwrap());
    let prompt = &f.reference.prompt_ids;
    let first = f.run(&mut g, prompt, &options(4)).unwrap();
    // The next "turn": the prompt plus the reply plus more tokens.
    let mut longer = prompt.clone();
    longer.extend(&first.tokens);
    longer.extend(&prompt[..3]);
    let second = f.run(&mut g, &longer, &options(4)).unwrap();
    // Everything but the last sampled token (never fed) was cached.
    assert_eq!(second.usage.cached_prompt_tokens, prompt.len() + 3);
    let again = f.run(&mut g, prompt, &options(4)).unwrap();
    assert_eq!(again.tokens, first.tokens);
    assert_eq!(again.usage.cached_prompt_tokens, prompt.len() - 1);
}
