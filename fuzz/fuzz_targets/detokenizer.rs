//! The streaming detokenizer on any token sequence (split characters, special tokens, ids the
//! vocabulary lacks): pieces or an error, never a panic; the pieces are whole text and,
//! together, what decoding all the tokens at once gives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qwen2_edge::service::fuzzing::fixture_tokenizer;

fuzz_target!(|data: &[u8]| {
    let t = fixture_tokenizer();
    // Two bytes an id, a few past the vocabulary included.
    let vocab = t.vocab_size() as u32 + 4;
    let ids: Vec<u32> = data
        .chunks_exact(2)
        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])) % vocab)
        .collect();
    let mut stream = t.stream_decoder();
    let mut text = String::new();
    for &id in &ids {
        match stream.push(id) {
            Ok(piece) => text += &piece,
            Err(_) => return,
        }
    }
    let Ok(rest) = stream.finish() else {
        return;
    };
    text += &rest;
    if let Ok(whole) = t.decode(&ids) {
        assert_eq!(text, whole, "ids {ids:?}");
    }
});
