//! `qwen2-edge perplexity` against a perplexity computed from transformers' own logits: the
//! fixture's reference prompt is written out as text, scored by the command, and compared
//! with exp(mean NLL) of the reference prefill logits over the same tokens.

use crate::common;

use std::process::Command;

use common::{fixture, reference, stdout_of, TempDir};
use qwen2_edge::tokenizer::Tokenizer;

const BIN: &str = env!("CARGO_BIN_EXE_qwen2-edge");

fn reference_perplexity(ids: &[u32], logits: &[f32], vocab: usize) -> f64 {
    let nll: f64 = ids
        .windows(2)
        .enumerate()
        .map(|(pos, pair)| {
            let row = &logits[pos * vocab..(pos + 1) * vocab];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            -(row[pair[1] as usize] as f64 - max - sum.ln())
        })
        .sum();
    (nll / (ids.len() - 1) as f64).exp()
}

fn perplexity(
    bundle: &std::path::Path,
    file: &std::path::Path,
    extra: &[&str],
) -> serde_json::Value {
    let out = stdout_of(
        Command::new(BIN)
            .arg("perplexity")
            .arg("--bundle")
            .arg(bundle)
            .args(["--variant", "fp32", "--no-verify", "--json", "--file"])
            .arg(file)
            .args(extra),
        "perplexity",
    );
    serde_json::from_str(&out).expect("JSON report")
}

#[test]
fn perplexity_matches_transformers_logits() {
    for name in common::TINY {
        let r = reference(name);
        let bundle = fixture(name).join("bundle");
        let tokenizer = Tokenizer::from_files(
            &bundle.join("tokenizer.json"),
            Some(&bundle.join("tokenizer_config.json")),
        )
        .expect("tokenizer");
        let text = tokenizer.decode(&r.prompt_ids).expect("decode");
        // The command tokenizes the file itself: the text must give back the reference ids.
        assert_eq!(
            tokenizer.encode(&text, false).expect("encode"),
            r.prompt_ids
        );
        let dir = TempDir::new("ppl");
        let file = dir.0.join("text.txt");
        std::fs::write(&file, &text).expect("write");

        let want = reference_perplexity(&r.prompt_ids, &r.prefill_logits, r.vocab);
        let report = perplexity(&bundle, &file, &[]);
        assert_eq!(report["tokens"], r.prompt_ids.len());
        assert_eq!(report["scored"], r.prompt_ids.len() - 1);
        let got = report["perplexity"].as_f64().expect("perplexity");
        // fp32 logits agree with transformers' within 1e-4 (reference_logits.rs), so the mean
        // NLL does within ~2e-4 nats: a relative 1e-3 on perplexity has room to spare.
        assert!(
            (got / want - 1.0).abs() < 1e-3,
            "{name}: perplexity {got} vs transformers {want}"
        );
        // Windows of 3 tokens score fewer tokens (each window's first is context only).
        let windowed = perplexity(&bundle, &file, &["--context", "3"]);
        let n = r.prompt_ids.len();
        assert_eq!(windowed["scored"], n - n.div_ceil(3));
    }
}
