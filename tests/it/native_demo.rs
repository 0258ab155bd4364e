//! The demo model (Qwen2.5-Coder-0.5B-Instruct) on the native backend's quantized weights.
//! Needs QWEN2_EDGE_DEMO_BUNDLE; skipped visibly without it, required when CI is set.
//!
//! * int8 and int4k: teacher-forced agreement with fp32 greedy decoding — fp32 answers ten
//!   prompts greedily (64 tokens each), the variant runs the same prompt + answer through one
//!   prefill and its argmax at each answer position is compared with fp32's token. At least
//!   95% (int8) and 90% (int4k).
//! * int4: the "capital of France" and "reverse a string" answers are still right.

use crate::common;

use qwen2_edge::backend::{BackendKind, Logits};
use qwen2_edge::engine::Engine;
use qwen2_edge::sampling::argmax;

const PROMPTS: [&str; 10] = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain what a mutex is in two sentences.",
    "Write a SQL query that counts the rows of a table named users.",
    "What does the Linux command `ls -la` show?",
    "Write a Rust function that returns the largest element of a slice of i32.",
    "Give three tips for writing readable code.",
    "What is the difference between TCP and UDP?",
    "Write a bash one-liner that counts the lines of all .py files in a directory.",
    "Translate to French: The weather is nice today.",
];

fn engine(bundle: &std::path::Path, variant: &str) -> Engine {
    common::engine(bundle, BackendKind::Native, variant, 0, Default::default())
}

/// Greedy answer (no repetition penalty, stops at eos): its token ids and text.
fn greedy(engine: &Engine, prompt: &[u32], max: usize) -> (Vec<u32>, String) {
    let g = common::greedy(engine, prompt, max, true);
    (g.tokens, g.text)
}

/// Teacher-forced agreement of `variant` with fp32's greedy `answers` (first 64 tokens each):
/// the prompt and answer run through one prefill, and the argmax at each answer position is
/// compared with fp32's token. Returns (agreeing, total).
fn agreement(
    bundle: &std::path::Path,
    variant: &str,
    prompts: &[Vec<u32>],
    answers: &[Vec<u32>],
) -> (usize, usize) {
    let engine = engine(bundle, variant);
    let vocab = engine.backend.config().vocab_size;
    let (mut same, mut total) = (0, 0);
    for (prompt, answer) in prompts.iter().zip(answers) {
        let answer = &answer[..answer.len().min(64)];
        let mut session = engine
            .backend
            .new_session(prompt.len() + answer.len())
            .unwrap();
        let mut ids = prompt.clone();
        ids.extend_from_slice(answer);
        let logits = session.forward(&ids, Logits::All).unwrap();
        for (i, &want) in answer.iter().enumerate() {
            let row = prompt.len() - 1 + i;
            same += (argmax(&logits[row * vocab..(row + 1) * vocab]) == want) as usize;
            total += 1;
        }
    }
    (same, total)
}

/// int8 agrees with fp32 on at least 95% of the answer tokens, int4k (issue 22's target) on at
/// least 90%; int4's rate is printed for comparison (measured 2026-12-04 on the avx512 tier:
/// int8 98.2%, int4k 95.6%, int4 92.1% of 454 tokens).
#[test]
fn int8_and_int4k_agree_with_fp32_on_ten_prompts() {
    let Some(bundle) = common::demo_bundle("int8_and_int4k_agree_with_fp32_on_ten_prompts") else {
        return;
    };
    let fp32 = engine(&bundle, "fp32");
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| fp32.chat_prompt(&Engine::single_turn(None, p)).unwrap())
        .collect();
    let answers: Vec<Vec<u32>> = prompts.iter().map(|p| greedy(&fp32, p, 64).0).collect();
    drop(fp32);
    let mut failures = Vec::new();
    for (variant, bound) in [("int8", Some(0.95)), ("int4k", Some(0.90)), ("int4", None)] {
        let (same, total) = agreement(&bundle, variant, &prompts, &answers);
        let rate = same as f64 / total as f64;
        eprintln!(
            "{variant} vs fp32 greedy: {same}/{total} tokens agree ({:.1}%)",
            rate * 100.0
        );
        if bound.is_some_and(|b| rate < b) {
            failures.push(format!("{variant} agrees on {:.1}%", rate * 100.0));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn int4_still_answers_paris_and_reverses_a_string() {
    let Some(bundle) = common::demo_bundle("int4_still_answers_paris_and_reverses_a_string") else {
        return;
    };
    let int4 = engine(&bundle, "int4");
    let ask = |q: &str, max: usize| {
        let prompt = int4.chat_prompt(&Engine::single_turn(None, q)).unwrap();
        greedy(&int4, &prompt, max).1
    };
    let paris = ask("What is the capital of France?", 24);
    assert!(paris.contains("Paris"), "int4 answer: {paris:?}");
    let code = ask("Write a Python function that reverses a string.", 96);
    assert!(
        code.contains("def ") && (code.contains("[::-1]") || code.contains("reverse")),
        "int4 answer: {code:?}"
    );
    eprintln!("int4: {paris:?}\n{code}");
}
