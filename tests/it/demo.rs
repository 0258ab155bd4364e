//! The demo model (Qwen2.5-Coder-0.5B-Instruct from GGUF) end to end. Needs
//! QWEN2_EDGE_DEMO_BUNDLE; skipped visibly without it, required when CI is set.

use crate::common;

use std::process::Command;

use qwen2_edge::backend::{BackendKind, Logits};
use qwen2_edge::engine::Engine;
use qwen2_edge::sampling::argmax;
use serde_json::Value;

fn generate(bundle: &str, extra: &[&str], prompt: &str) -> String {
    let mut args = vec![
        "generate",
        "--bundle",
        bundle,
        "--temperature",
        "0",
        "--repetition-penalty",
        "1",
    ];
    args.extend_from_slice(extra);
    args.push(prompt);
    let out = Command::new(env!("CARGO_BIN_EXE_qwen2-edge"))
        .args(&args)
        .output()
        .expect("run qwen2-edge");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The demo bundle's path as text, for the command line (or None, skipped).
fn demo(test: &str) -> Option<String> {
    common::demo_bundle(test).map(|b| b.to_string_lossy().into_owned())
}

#[test]
fn demo_answers_paris_and_writes_python() {
    let Some(bundle) = demo("demo_answers_paris_and_writes_python") else {
        return;
    };
    let answer = generate(
        &bundle,
        &["--variant", "fp32", "--max-tokens", "32"],
        "What is the capital of France?",
    );
    assert!(answer.contains("Paris"), "answer: {answer:?}");
    let code = generate(
        &bundle,
        &["--variant", "fp32", "--max-tokens", "64", "--no-verify"],
        "Write a Python function that reverses a string.",
    );
    assert!(code.contains("def "), "answer: {code:?}");
}

/// Against transformers on the same GGUF (tests/fixtures/demo/greedy_cases.json): the same
/// prompt tokens, the same greedy answer, and the same top logits at every position.
#[test]
fn demo_matches_transformers_greedy_trace() {
    let Some(bundle) = common::demo_bundle("demo_matches_transformers_greedy_trace") else {
        return;
    };
    let engine = common::engine(&bundle, BackendKind::Native, "fp32", 0, Default::default());
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("demo").join("greedy_cases.json")).unwrap(),
    )
    .unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let vocab = engine.backend.config().vocab_size;
    for case in &cases {
        let question = case["question"].as_str().unwrap();
        let prompt = engine
            .chat_prompt(&Engine::single_turn(None, question))
            .unwrap();
        assert_eq!(
            prompt,
            ids(&case["prompt_ids"]),
            "{question}: prompt tokens"
        );
        let want = ids(&case["answer_ids"]);

        let out = common::greedy(&engine, &prompt, want.len(), false);
        assert_eq!(out.tokens, want, "{question}: greedy answer");

        // Logits of the whole trace in one prefill; compare the reference's top 8.
        let mut session = engine.backend.new_session(512).unwrap();
        let trace: Vec<u32> = prompt.iter().chain(&want).copied().collect();
        let logits = session.forward(&trace, Logits::All).unwrap();
        let mut worst = 0.0f64;
        for (pos, (top_ids, top_logits)) in case["top_ids"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["top_logits"].as_array().unwrap())
            .enumerate()
        {
            let row = &logits[pos * vocab..(pos + 1) * vocab];
            let top_ids = ids(top_ids);
            assert_eq!(argmax(row), top_ids[0], "{question}: argmax at {pos}");
            for (id, want) in top_ids.iter().zip(top_logits.as_array().unwrap()) {
                let d = (row[*id as usize] as f64 - want.as_f64().unwrap()).abs();
                worst = worst.max(d);
            }
        }
        eprintln!("{question}: max |logit diff| over top-8 at every position: {worst:.2e}");
        assert!(worst < 1e-3, "{question}: logits differ by {worst}");
    }
}

#[test]
fn demo_fp16_answers_paris() {
    let Some(bundle) = common::demo_bundle("demo_fp16_answers_paris") else {
        return;
    };
    let bundle = bundle.to_string_lossy().into_owned();
    let answer = generate(
        &bundle,
        &["--variant", "fp16", "--max-tokens", "16", "--no-verify"],
        "What is the capital of France?",
    );
    assert!(answer.contains("Paris"), "answer: {answer:?}");
}
