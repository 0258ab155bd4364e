//! The bundle's chat template renders byte-identically to transformers' `apply_chat_template`
//! (fixtures made by onnx-export/tools/make_fixtures.py), tool sections included.

use crate::common;

use std::path::Path;

use qwen2_edge::tokenizer::Tokenizer;
use serde_json::Value;

fn check_cases(tokenizer: &Tokenizer, cases_file: &Path) -> usize {
    let text = std::fs::read_to_string(cases_file).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert!(!cases.is_empty());
    for (i, case) in cases.iter().enumerate() {
        let tools = case.get("tools").filter(|t| !t.is_null());
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = tokenizer
            .apply_chat_template(&case["messages"], tools, add)
            .unwrap_or_else(|e| panic!("{}: case {i}: {e}", cases_file.display()));
        let want = case["rendered"].as_str().unwrap();
        assert_eq!(rendered, want, "{}: case {i}", cases_file.display());
    }
    cases.len()
}

#[test]
fn fixture_templates_match_transformers() {
    for name in common::TINY {
        let bundle = common::fixture(name).join("bundle");
        let tokenizer = Tokenizer::from_files(
            &bundle.join("tokenizer.json"),
            Some(&bundle.join("tokenizer_config.json")),
        )
        .unwrap();
        check_cases(
            &tokenizer,
            &common::fixture(name).join("chat_template_cases.json"),
        );
    }
}

#[test]
fn demo_template_matches_transformers() {
    let Some(bundle) = common::demo_bundle("demo_template_matches_transformers") else {
        return;
    };
    let tokenizer = Tokenizer::from_files(
        &bundle.join("tokenizer.json"),
        Some(&bundle.join("tokenizer_config.json")),
    )
    .unwrap();
    let n = check_cases(
        &tokenizer,
        &common::fixture("demo").join("chat_template_cases.json"),
    );
    assert!(n >= 5);
}
