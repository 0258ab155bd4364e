//! Speculative decoding with prompt-lookup drafts (`GenerateOptions::prompt_lookup`) gives
//! plain decoding's tokens exactly, greedy and sampled (same seed), with a repetition penalty
//! (it reads the history each token extends): on the fixture models, every weight type and
//! every kernel set this CPU has (float weights take another product path for several rows,
//! so `Logits::Each` must ask for the one-row one), and on the demo model (int4, int8), where
//! a code edit must also have drafts accepted. The same with a draft model's drafts, alone and
//! after prompt lookup's.

use crate::common;

use std::path::Path;

use qwen2_edge::backend::native::kernels;
use qwen2_edge::backend::{self, BackendKind, LmHead, LoadOptions, Logits};
use qwen2_edge::draft::DraftModel;
use qwen2_edge::engine::{Engine, EngineOptions};
use qwen2_edge::generate::{CancelHandle, GenerateOptions, Generation, Generator};
use qwen2_edge::sampling::SamplingParams;

fn engine(bundle: &Path, variant: &str, kernels: &str) -> Engine {
    let options =
        common::engine_options(bundle, BackendKind::Native, variant, 2, Default::default());
    Engine::load(&EngineOptions {
        kernels: kernels.into(),
        ..options
    })
    .unwrap_or_else(|e| panic!("{variant} on {kernels}: {e:#}"))
}

/// Greedy, and sampled at temperature 0.8 with top-p 0.95 and a fixed seed; both with a
/// repetition penalty of 1.1.
fn samplings() -> [SamplingParams; 2] {
    let greedy = SamplingParams {
        repetition_penalty: 1.1,
        ..SamplingParams::greedy()
    };
    let sampled = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: Some(11),
        ..greedy.clone()
    };
    [greedy, sampled]
}

/// `max` new tokens sampled by `sampling`, up to `lookup` drafted by prompt lookup a pass.
fn options(
    engine: &Engine,
    sampling: &SamplingParams,
    max: usize,
    lookup: usize,
) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: max,
        sampling: sampling.clone(),
        stop: Vec::new(),
        eos_token_ids: engine.default_options().eos_token_ids,
        prompt_lookup: lookup,
    }
}

fn generate(
    engine: &Engine,
    prompt: &[u32],
    sampling: &SamplingParams,
    max: usize,
    lookup: usize,
) -> Generation {
    let options = options(engine, sampling, max, lookup);
    // A context just large enough: drafts must also respect the room left.
    let generator = engine.generator(Some(prompt.len() + max)).unwrap();
    run(engine, generator, prompt, &options)
}

/// `generator`'s generation of `prompt`, its text discarded as it streams.
fn run(
    engine: &Engine,
    mut generator: Generator,
    prompt: &[u32],
    options: &GenerateOptions,
) -> Generation {
    generator
        .generate(
            &engine.tokenizer,
            prompt,
            options,
            &CancelHandle::new(),
            &mut |_| {},
        )
        .unwrap()
}

#[test]
fn each_row_is_the_one_token_logits_bit_for_bit() {
    // What the verification relies on: `Logits::Each` rows equal, bit for bit, the logits of
    // running the same tokens one at a time (`All` may sum in another order).
    let tokens = [5u32, 17, 42, 99, 5, 17, 42, 7, 5, 17, 3];
    for name in ["tiny-untied", "tiny-tied", "tiny-moe"] {
        let bundle = common::fixture_bundle(name);
        for variant in ["fp32", "fp16", "int8", "int4", "int4k"] {
            for k in kernels::available() {
                let options = LoadOptions {
                    threads: 2,
                    kernels: k.name.into(),
                    ..LoadOptions::default()
                };
                let model = backend::load(&bundle, BackendKind::Native, variant, &options).unwrap();
                let mut together = model.new_session(32).unwrap();
                together.forward(&tokens[..4], Logits::Last).unwrap();
                let each = together
                    .forward(&tokens[4..], Logits::Each)
                    .unwrap()
                    .to_vec();
                let mut alone = model.new_session(32).unwrap();
                alone.forward(&tokens[..4], Logits::Last).unwrap();
                let mut one_by_one = Vec::new();
                for &t in &tokens[4..] {
                    one_by_one.extend_from_slice(alone.forward(&[t], Logits::Last).unwrap());
                }
                let same = each
                    .iter()
                    .zip(&one_by_one)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{name} {variant} on {}: rows differ", k.name);
            }
        }
    }
}

#[test]
fn prompt_lookup_gives_plain_decodings_tokens_on_the_fixtures() {
    // Random weights loop on short cycles, so drafts come often and are often right.
    let prompt: Vec<u32> = [5u32, 17, 42, 99, 5, 17, 42, 7, 5, 17].to_vec();
    let mut drafted = 0;
    for name in ["tiny-untied", "tiny-tied"] {
        let bundle = common::fixture(name).join("bundle");
        for variant in ["fp32", "fp16", "int8", "int4", "int4k"] {
            for k in kernels::available() {
                let e = engine(&bundle, variant, k.name);
                for sampling in &samplings() {
                    let plain = generate(&e, &prompt, sampling, 40, 0);
                    for lookup in [1, 4, 16] {
                        let fast = generate(&e, &prompt, sampling, 40, lookup);
                        let what = format!("{name} {variant} {} lookup {lookup}", k.name);
                        assert_eq!(fast.tokens, plain.tokens, "{what}, {sampling:?}");
                        assert_eq!(fast.finish_reason, plain.finish_reason, "{what}");
                        assert_eq!(fast.usage, plain.usage, "{what}");
                        assert!(fast.speculation.accepted <= fast.speculation.drafted);
                        drafted += fast.speculation.drafted;
                    }
                }
            }
        }
    }
    assert!(drafted > 0, "no draft at all: the test checked nothing");
}

#[test]
fn prompt_lookup_gives_plain_decodings_tokens_on_the_demo_model() {
    let Some(bundle) = common::demo_bundle("prompt lookup on the demo model") else {
        return;
    };
    let edit =
        "Rename the variable result to merged in this function. Reply with the code only.\n\n\
        def merge_sorted(left, right):\n    result = []\n    i = j = 0\n    \
        while i < len(left) and j < len(right):\n        if left[i] <= right[j]:\n            \
        result.append(left[i])\n            i += 1\n        else:\n            \
        result.append(right[j])\n            j += 1\n    result.extend(left[i:])\n    \
        result.extend(right[j:])\n    return result";
    let mut edit_accepted = Vec::new();
    for variant in ["int4", "int8"] {
        let e = engine(&bundle, variant, "");
        for prompt in [edit, "What is the capital of France?"] {
            let ids = e.chat_prompt(&Engine::single_turn(None, prompt)).unwrap();
            for sampling in &samplings() {
                let plain = generate(&e, &ids, sampling, 64, 0);
                let fast = generate(&e, &ids, sampling, 64, 8);
                assert_eq!(
                    fast.tokens, plain.tokens,
                    "{variant}, {prompt:?}, {sampling:?}"
                );
                assert_eq!(fast.text, plain.text);
                let s = fast.speculation;
                eprintln!("{variant} {:?}: {s:?}", &prompt[..20]);
                if prompt == edit && sampling.temperature == 0.0 {
                    edit_accepted.push(s.accepted);
                }
            }
        }
    }
    // Accepted drafts are what the equality above has to survive (the rollback past a
    // rejection runs anyway). How many depends on the greedy answer, which differs between
    // kernel tiers: on AVX-512 (2026-12-04) int4 copied the whole function, 55 and 6 of 55 and
    // 32 drafted; on an AVX2-only Zen 2 (2026-12-06) 4 of 17 each.
    assert!(
        edit_accepted.iter().all(|&a| a > 0),
        "drafts accepted on the code edit (int4, int8): {edit_accepted:?}"
    );
}

/// `generate` with drafts proposed by `draft` (a draft model of `draft_tokens` tokens a pass,
/// from the first `vocabulary` ids and the added tokens where that is not 0), after up to
/// `lookup` of prompt lookup's where that is not 0.
fn generate_with_draft(
    target: &Engine,
    draft: &Engine,
    prompt: &[u32],
    sampling: &SamplingParams,
    max: usize,
    (draft_tokens, lookup, vocabulary): (usize, usize, usize),
) -> Generation {
    let options = options(target, sampling, max, lookup);
    let capacity = prompt.len() + max;
    let model = DraftModel::new(draft, target, capacity, draft_tokens, vocabulary).unwrap();
    let generator = target
        .generator(Some(capacity))
        .unwrap()
        .with_draft_model(model);
    run(target, generator, prompt, &options)
}

#[test]
fn a_draft_model_gives_the_target_models_tokens_on_the_fixtures() {
    // The tiny fixtures share one tokenizer (vocabulary 384): a quantized copy of the target
    // drafts mostly right, another model's weights mostly wrong.
    let prompt: Vec<u32> = [5u32, 17, 42, 99, 5, 17, 42, 7, 5, 17].to_vec();
    let (mut drafted, mut accepted) = (0, 0);
    for (target, draft) in [
        (("tiny-tied", "fp32"), ("tiny-tied", "int4")),
        (("tiny-tied", "int4"), ("tiny-yarn", "int8")),
        (("tiny-moe", "fp32"), ("tiny-moe", "int8")),
        (("tiny-moe", "int4"), ("tiny-tied", "fp32")),
    ] {
        let load = |(name, variant): (&str, &str)| {
            engine(&common::fixture(name).join("bundle"), variant, "")
        };
        let (t, d) = (load(target), load(draft));
        for sampling in &samplings() {
            let plain = generate(&t, &prompt, sampling, 40, 0);
            // The last: drafts only from the ids below 200 (of 384).
            for drafts in [(1, 0, 0), (4, 0, 0), (3, 8, 0), (3, 0, 200)] {
                let fast = generate_with_draft(&t, &d, &prompt, sampling, 40, drafts);
                let what = format!("{target:?} drafted by {draft:?}, {drafts:?}, {sampling:?}");
                assert_eq!(fast.tokens, plain.tokens, "{what}");
                assert_eq!(fast.finish_reason, plain.finish_reason, "{what}");
                drafted += fast.speculation.drafted;
                accepted += fast.speculation.accepted;
            }
        }
    }
    eprintln!("{accepted} of {drafted} drafts accepted");
    assert!(
        0 < accepted && accepted < drafted,
        "{accepted} of {drafted}"
    );
    // The same model drafting for itself, greedy without a penalty (drafts are the draft
    // model's plain argmax): every draft holds.
    let same = engine(&common::fixture("tiny-tied").join("bundle"), "int8", "");
    let greedy = SamplingParams::greedy();
    let g = generate_with_draft(&same, &same, &prompt, &greedy, 40, (4, 0, 0));
    assert_eq!(g.speculation.accepted, g.speculation.drafted);
    assert!(g.speculation.steps < 20, "{:?}", g.speculation);
}

#[test]
fn a_draft_model_caught_up_in_slices_proposes_what_it_proposes_at_once() {
    let e = engine(&common::fixture("tiny-tied").join("bundle"), "fp32", "");
    let context: Vec<u32> = (0..150u32).map(|i| (i * 37 + 11) % 384).collect();
    let mut at_once = DraftModel::new(&e, &e, 200, 4, 0).unwrap();
    let mut sliced = DraftModel::new(&e, &e, 200, 4, 0).unwrap();
    assert_eq!(sliced.behind(&context), 150);
    for left in [86, 22] {
        sliced.catch_up(&context, 64).unwrap();
        assert_eq!(sliced.behind(&context), left);
    }
    // The last position is left for `propose` (its logits give the first draft).
    sliced.catch_up(&context, 64).unwrap();
    assert_eq!(sliced.behind(&context), 1);
    assert_eq!(
        sliced.propose(&context, &[], 4).unwrap().tokens,
        at_once.propose(&context, &[], 4).unwrap().tokens
    );
}

/// A draft session (`Backend::new_draft_session`) computes the logits of its vocabulary's
/// tokens as a plain session does, with an int8 head (every quantized variant's) as one
/// requantized to int4 at load (`LmHead::Int4`), bit for bit with quantized heads (their rows are summed alone either
/// way), and -inf for the others, in every weight format, tied head or not; told not to keep
/// to its vocabulary, it computes every token's as a plain session.
#[test]
fn a_draft_session_gives_its_vocabularys_logits_and_no_others() {
    let tokens: Vec<u32> = (0..9u32).map(|i| (i * 53 + 7) % 333).collect();
    for fixture in ["tiny-tied", "tiny-untied"] {
        let bundle = common::fixture(fixture).join("bundle");
        for variant in ["fp32", "fp16", "int8", "int4", "int4k"] {
            let e = engine(&bundle, variant, "");
            let int4_head = variant.starts_with("int").then(|| {
                let options = common::engine_options(
                    &bundle,
                    BackendKind::Native,
                    variant,
                    2,
                    Default::default(),
                );
                Engine::load(&EngineOptions {
                    lm_head: LmHead::Int4,
                    ..options
                })
                .unwrap()
            });
            let reference = int4_head.as_ref().unwrap_or(&e);
            let vocab = e.backend.config().vocab_size as u32;
            // Not in order, and the head's last row too.
            let ids: Vec<u32> = (0..vocab).filter(|i| i % 3 != 1).rev().collect();
            for which in [Logits::Last, Logits::All] {
                let what = format!("{fixture} {variant} {which:?}");
                let mut draft = e.backend.new_draft_session(32, &ids).unwrap();
                let got = draft.forward(&tokens, which).unwrap().to_vec();
                let want = reference
                    .backend
                    .new_session(32)
                    .unwrap()
                    .forward(&tokens, which)
                    .unwrap()
                    .to_vec();
                assert_eq!(got.len(), want.len());
                let rows = got.chunks(vocab as usize).zip(want.chunks(vocab as usize));
                for (row, (got, want)) in rows.enumerate() {
                    for (id, (&g, &w)) in got.iter().zip(want).enumerate() {
                        if id % 3 == 1 {
                            assert_eq!(g, f32::NEG_INFINITY, "{what}: row {row}, token {id}");
                        } else if variant.starts_with("int") {
                            assert_eq!(g, w, "{what}: row {row}, token {id}");
                        } else {
                            // Float heads: another product shape (and f16 widened to f32)
                            // may sum in another order; these logits are O(1).
                            assert!(
                                (g - w).abs() < 1e-4,
                                "{what}: row {row}, token {id}: {g} {w}"
                            );
                        }
                    }
                }
                // Every token's logits again, the model's own head.
                draft.truncate(0);
                draft.keep_to_vocabulary(false);
                let wide = draft.forward(&tokens, which).unwrap().to_vec();
                let mut plain = e.backend.new_session(32).unwrap();
                assert_eq!(wide, plain.forward(&tokens, which).unwrap(), "{what}");
            }
        }
    }
}

/// A draft model with a vocabulary drafts from it while the context keeps to it, and from
/// every token where the context does not (a language whose tokens lie past it).
#[test]
fn a_draft_vocabulary_holds_while_the_context_keeps_to_it() {
    let e = engine(&common::fixture("tiny-tied").join("bundle"), "int8", "");
    let added = e.tokenizer.added_token_ids();
    let propose = |vocabulary: usize, context: &[u32]| {
        DraftModel::new(&e, &e, 80, 6, vocabulary)
            .unwrap()
            .propose(context, &[], 6)
            .unwrap()
            .tokens
    };
    let inside: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 200).collect();
    let narrow = propose(200, &inside);
    assert!(
        narrow.iter().all(|t| *t < 200 || added.contains(t)),
        "{narrow:?}"
    );
    let every = propose(0, &inside);
    assert!(
        every.iter().any(|&t| t >= 200),
        "the test needs drafts past 200: {every:?}"
    );
    // One token in five past the vocabulary: drafts from every token's logits.
    let mixed: Vec<u32> = inside
        .iter()
        .enumerate()
        .map(|(i, &t)| if i % 5 == 0 { 250 + t % 100 } else { t })
        .collect();
    assert_eq!(propose(200, &mixed), propose(0, &mixed));
}

/// Prompt lookup's proposal goes to the draft model, which keeps the part it predicts itself
/// (checked in one pass) and adds its own token after it.
#[test]
fn a_draft_model_keeps_the_lookup_tokens_it_predicts_too() {
    let e = engine(&common::fixture("tiny-tied").join("bundle"), "fp32", "");
    let context: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 384).collect();
    let own = DraftModel::new(&e, &e, 80, 4, 0)
        .unwrap()
        .propose(&context, &[], 5)
        .unwrap();
    assert_eq!((own.tokens.len(), own.from_lookup), (5, 0));
    let checked = |lookup: &[u32], max: usize| {
        let mut model = DraftModel::new(&e, &e, 80, 4, 0).unwrap();
        let drafts = model.propose(&context, lookup, max).unwrap();
        // Its cache holds the context and the lookup tokens it kept, nothing it rejected: the
        // next proposal goes on from there as a fresh model's would.
        let mut longer = context.clone();
        longer.extend_from_slice(&drafts.tokens);
        let again = model.propose(&longer, &[], 2).unwrap();
        let fresh = DraftModel::new(&e, &e, 80, 4, 0)
            .unwrap()
            .propose(&longer, &[], 2)
            .unwrap();
        assert_eq!(again.tokens, fresh.tokens, "{lookup:?}");
        drafts
    };
    // All of it predicted: kept, the model's next token after it, then its own up to `max`.
    let d = checked(&own.tokens[..3], 5);
    assert_eq!((d.tokens.as_slice(), d.from_lookup), (&own.tokens[..], 3));
    let d = checked(&own.tokens[..3], 0);
    assert_eq!((d.tokens.as_slice(), d.from_lookup), (&own.tokens[..4], 3));
    // The second token wrong: the first kept, then the model's own instead.
    let wrong = [own.tokens[0], (own.tokens[1] + 1) % 384, own.tokens[2]];
    let d = checked(&wrong, 1);
    assert_eq!((d.tokens.as_slice(), d.from_lookup), (&own.tokens[..2], 1));
}

#[test]
fn a_draft_model_with_another_vocabulary_is_refused() {
    let target = engine(&common::fixture("tiny-tied").join("bundle"), "fp32", "");
    let other = engine(&common::fixture("tiny-untied").join("bundle"), "fp32", "");
    let e = DraftModel::new(&other, &target, 64, 4, 0)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("vocabulary"), "{e}");
}

#[test]
fn a_draft_model_gives_the_target_models_tokens_on_the_demo_model() {
    let Some(bundle) = common::demo_bundle("a draft model on the demo model") else {
        return;
    };
    // The demo model's int4 drafting for its int8: the same vocabulary, nearly the same model;
    // the draft's head requantized to int4 (`--draft-lm-head int4`): other logits, same output.
    let target = engine(&bundle, "int8", "");
    let options =
        common::engine_options(&bundle, BackendKind::Native, "int4", 2, Default::default());
    let draft = Engine::load(&EngineOptions {
        lm_head: LmHead::Int4,
        ..options
    })
    .unwrap();
    // A question drafted by the model alone, from the first 32,768 ids (and the added tokens);
    // a code edit, which copies its prompt, by prompt lookup first and the model where lookup
    // has nothing.
    let edit = "Add a docstring to this function and change nothing else. Reply with the code \
        only.\n\ndef parse_header(line):\n    name, _, value = line.partition(\":\")\n    \
        if not name or not value:\n        raise ValueError(f\"not a header: {line!r}\")\n    \
        return name.strip().lower(), value.strip()";
    for (prompt, drafts) in [
        (
            "Write a Python function that reverses a string.",
            (4, 0, 32768),
        ),
        (edit, (3, 8, 0)),
    ] {
        let ids = target
            .chat_prompt(&Engine::single_turn(None, prompt))
            .unwrap();
        for sampling in &samplings() {
            let plain = generate(&target, &ids, sampling, 48, 0);
            let fast = generate_with_draft(&target, &draft, &ids, sampling, 48, drafts);
            assert_eq!(
                fast.tokens,
                plain.tokens,
                "{:?} {sampling:?}",
                &prompt[..20]
            );
            assert_eq!(fast.text, plain.text);
            let s = fast.speculation;
            eprintln!("int4 drafting for int8, {drafts:?}: {s:?}");
            assert!(s.accepted * 2 > s.drafted, "most drafts hold: {s:?}");
            if drafts.1 > 0 && sampling.temperature == 0.0 {
                assert!(s.lookup_accepted > 0, "lookup drafts held: {s:?}");
            }
        }
    }
}
