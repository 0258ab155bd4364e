//! Backend agreement on the demo model (Qwen2.5-Coder-0.5B-Instruct): native, ort and tract
//! on the fp32 variant produce the same greedy tokens for three chat prompts (40 new tokens,
//! end-of-turn ignored so every prompt runs the full length), and the ort backend's int8 /
//! int4 variants still answer "Paris". Needs QWEN2_EDGE_DEMO_BUNDLE and ORT_DYLIB_PATH.

#![cfg(all(feature = "ort", feature = "tract"))]

use crate::common;

use std::path::Path;
use std::sync::Mutex;

use qwen2_edge::backend::options::OrtOptions;
use qwen2_edge::backend::BackendKind;
use qwen2_edge::bundle::Verify;
use qwen2_edge::engine::{Engine, EngineOptions};
use qwen2_edge::generate::{CancelHandle, GenerateOptions};
use qwen2_edge::sampling::SamplingParams;

const PROMPTS: [&str; 3] = [
    "Write a Python function that checks whether a number is prime.",
    "Explain in a few sentences what a hash map is.",
    "What is the capital of France?",
];
const NEW_TOKENS: usize = 40;

/// Each test loads 0.5B models (GBs of weights): one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn engine(bundle: &Path, backend: BackendKind, variant: &str, library: &Path) -> Engine {
    Engine::load(&EngineOptions {
        bundle: bundle.to_path_buf(),
        verify: Verify::SizesOnly,
        backend,
        variant: variant.to_string(),
        threads: 2,
        kernels: String::new(),
        kv_cache: Default::default(),
        ort: OrtOptions {
            library: Some(library.to_path_buf()),
            ..OrtOptions::default()
        },
    })
    .unwrap_or_else(|e| panic!("{backend} {variant}: {e:#}"))
}

fn greedy(engine: &Engine, prompt: &str, tokens: usize, stop_at_eos: bool) -> (Vec<u32>, String) {
    let ids = engine
        .chat_prompt(&Engine::single_turn(None, prompt))
        .unwrap();
    let mut options = GenerateOptions {
        max_new_tokens: tokens,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        eos_token_ids: Vec::new(),
    };
    if stop_at_eos {
        options.eos_token_ids = engine.default_options().eos_token_ids;
    }
    let mut g = engine.generator(Some(ids.len() + tokens + 1)).unwrap();
    let out = g
        .generate(
            &engine.tokenizer,
            &ids,
            &options,
            &CancelHandle::new(),
            &mut |_| {},
        )
        .unwrap();
    (out.tokens, out.text)
}

#[test]
fn native_ort_and_tract_agree_on_fp32() {
    let Some(bundle) = common::demo_bundle("backend agreement") else {
        return;
    };
    let Some(lib) = common::ort_library("backend agreement") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut runs: Vec<(BackendKind, Vec<Vec<u32>>)> = Vec::new();
    for kind in [BackendKind::Native, BackendKind::Ort, BackendKind::Tract] {
        let e = engine(&bundle, kind, "fp32", &lib);
        let tokens: Vec<Vec<u32>> = PROMPTS
            .iter()
            .map(|p| {
                let (t, text) = greedy(&e, p, NEW_TOKENS, false);
                eprintln!("{kind}: {p:?} -> {text:?}");
                t
            })
            .collect();
        runs.push((kind, tokens));
    }
    let (_, reference) = &runs[0];
    for (kind, tokens) in &runs[1..] {
        for (i, p) in PROMPTS.iter().enumerate() {
            assert_eq!(tokens[i].len(), NEW_TOKENS);
            assert_eq!(
                &tokens[i], &reference[i],
                "{kind} differs from native on {p:?}"
            );
        }
    }
}

#[test]
fn ort_quantized_variants_still_know_paris() {
    let Some(bundle) = common::demo_bundle("quantized answers") else {
        return;
    };
    let Some(lib) = common::ort_library("quantized answers") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for variant in ["int8-ort", "int4-ort", "int8", "int4"] {
        let e = engine(&bundle, BackendKind::Ort, variant, &lib);
        let (_, text) = greedy(&e, "What is the capital of France?", 32, true);
        eprintln!("ort {variant}: {text:?}");
        assert!(text.contains("Paris"), "ort {variant} answered {text:?}");
    }
}
