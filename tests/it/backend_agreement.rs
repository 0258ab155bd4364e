//! Backend agreement on the demo model (Qwen2.5-Coder-0.5B-Instruct): native, ort and tract
//! on the fp32 variant produce the same greedy tokens for three chat prompts (40 new tokens,
//! end-of-turn ignored so every prompt runs the full length), and the ort backend's int8 /
//! int4 variants still answer "Paris". Needs QWEN2_EDGE_DEMO_BUNDLE and ORT_DYLIB_PATH.

#![cfg(all(feature = "ort", feature = "tract"))]

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use qwen2_edge::backend::options::OrtOptions;
use qwen2_edge::backend::BackendKind;
use qwen2_edge::engine::Engine;

const PROMPTS: [&str; 3] = [
    "Write a Python function that checks whether a number is prime.",
    "Explain in a few sentences what a hash map is.",
    "What is the capital of France?",
];
const NEW_TOKENS: usize = 40;

/// Each test loads 0.5B models (GBs of weights): one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn engine(bundle: &Path, backend: BackendKind, variant: &str, library: &Path) -> Engine {
    let ort = OrtOptions {
        library: Some(library.to_path_buf()),
        ..OrtOptions::default()
    };
    common::engine(bundle, backend, variant, 2, ort)
}

fn greedy(engine: &Engine, prompt: &str, tokens: usize, stop_at_eos: bool) -> (Vec<u32>, String) {
    let ids = engine
        .chat_prompt(&Engine::single_turn(None, prompt))
        .unwrap();
    let out = common::greedy(engine, &ids, tokens, stop_at_eos);
    (out.tokens, out.text)
}

/// The demo bundle and ONNX Runtime (or None, skipped), holding the one-at-a-time lock.
fn demo_and_ort(test: &str) -> Option<(PathBuf, PathBuf, MutexGuard<'static, ()>)> {
    let bundle = common::demo_bundle(test)?;
    let lib = common::ort_library(test)?;
    let one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    Some((bundle, lib, one))
}

#[test]
fn native_ort_and_tract_agree_on_fp32() {
    let Some((bundle, lib, _one)) = demo_and_ort("backend agreement") else {
        return;
    };
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
    let Some((bundle, lib, _one)) = demo_and_ort("quantized answers") else {
        return;
    };
    for variant in ["int8-ort", "int4-ort", "int8", "int4"] {
        let e = engine(&bundle, BackendKind::Ort, variant, &lib);
        let (_, text) = greedy(&e, "What is the capital of France?", 32, true);
        eprintln!("ort {variant}: {text:?}");
        assert!(text.contains("Paris"), "ort {variant} answered {text:?}");
    }
}
