//! Tokenizer round trips and the streaming detokenizer on multilingual text.

use crate::common;

use std::path::Path;

use qwen2_edge::tokenizer::Tokenizer;
use serde_json::Value;

const MULTILINGUAL: [&str; 6] = [
    "Hello world, 你好！",
    "emoji: 🙂🚀👍🏽 and ñ, é, ü, ß, Ωμέγα, привет, مرحبا, こんにちは, 안녕하세요",
    "def reverse(s):\n    return s[::-1]  # 你好 🙂",
    "    indented\n\n\n  three newlines and   runs   of spaces  ",
    "tabs\tand\r\nwindows lines; don't it's we'll I'd",
    "家族👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
];

fn tokenizer_in(bundle: &Path) -> Tokenizer {
    Tokenizer::from_files(
        &bundle.join("tokenizer.json"),
        Some(&bundle.join("tokenizer_config.json")),
    )
    .unwrap()
}

/// Streams `ids` one at a time: every piece is whole text (no U+FFFD) and together they are
/// the full decode.
fn check_stream(tokenizer: &Tokenizer, text: &str) -> usize {
    let ids = tokenizer.encode(text, false).unwrap();
    let mut decoder = tokenizer.stream_decoder();
    let mut streamed = String::new();
    let mut pieces = 0;
    for &id in &ids {
        let piece = decoder.push(id).unwrap();
        assert!(
            !piece.contains('\u{FFFD}'),
            "half a character streamed for {text:?}"
        );
        if !piece.is_empty() {
            pieces += 1;
        }
        streamed.push_str(&piece);
    }
    streamed.push_str(&decoder.finish().unwrap());
    assert_eq!(streamed, text, "streamed text differs");
    assert_eq!(tokenizer.decode(&ids).unwrap(), text, "round trip differs");
    // Byte-level pieces of multi-byte characters: fewer pieces than tokens.
    pieces
}

#[test]
fn tiny_tokenizer_round_trips_and_streams() {
    let tokenizer = tokenizer_in(&common::fixture("tiny-tied").join("bundle"));
    for text in MULTILINGUAL {
        let ids = tokenizer.encode(text, false).unwrap();
        let pieces = check_stream(&tokenizer, text);
        if !text.is_ascii() {
            // The tiny vocabulary splits every CJK character and emoji into bytes.
            assert!(pieces < ids.len(), "{text:?}: expected split characters");
        }
    }
}

/// Invalid UTF-8 from a model (found by the `detokenizer` fuzz target): the streamed pieces
/// still add up to what decoding all the tokens at once gives.
#[test]
fn invalid_bytes_stream_as_the_whole_decoding_shows_them() {
    let tokenizer = tokenizer_in(&common::fixture("tiny-tied").join("bundle"));
    for ids in [
        vec![162, 245, 159, 224, 255],
        vec![
            162, 245, 98, 162, 250, 105, 164, 103, 263, 0, 223, 106, 159, 225,
        ],
    ] {
        let mut decoder = tokenizer.stream_decoder();
        let mut streamed = String::new();
        for &id in &ids {
            streamed.push_str(&decoder.push(id).unwrap());
        }
        streamed.push_str(&decoder.finish().unwrap());
        assert_eq!(streamed, tokenizer.decode(&ids).unwrap(), "{ids:?}");
    }
}

#[test]
fn special_tokens_encode_as_one_id_and_are_not_shown() {
    let tokenizer = tokenizer_in(&common::fixture("tiny-tied").join("bundle"));
    let im_start = tokenizer.token_to_id("<|im_start|>").unwrap();
    let ids = tokenizer.encode("<|im_start|>user", false).unwrap();
    assert_eq!(ids[0], im_start);
    assert_eq!(tokenizer.decode(&ids).unwrap(), "user");
    let mut decoder = tokenizer.stream_decoder();
    assert_eq!(decoder.push(im_start).unwrap(), "");
}

#[test]
fn demo_tokenizer_matches_transformers() {
    let Some(bundle) = common::demo_bundle("demo_tokenizer_matches_transformers") else {
        return;
    };
    let tokenizer = tokenizer_in(&bundle);
    assert_eq!(
        tokenizer.encode("Hello world, 你好！", false).unwrap(),
        vec![9707, 1879, 11, 220, 108386, 6313]
    );
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("demo").join("tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tokenizer.encode(text, false).unwrap(), want, "{text:?}");
        if !text.contains("<|") && !text.is_empty() {
            check_stream(&tokenizer, text);
        }
    }
    for text in MULTILINGUAL {
        check_stream(&tokenizer, text);
    }
}
