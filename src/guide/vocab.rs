//! The tokenizer as llguidance sees it: every token's bytes in a trie, special tokens marked
//! so that no grammar text can produce them, and the ids that end a generation.

use std::sync::Arc;

use anyhow::{bail, Result};
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};

use crate::tokenizer::Tokenizer;

struct Vocabulary {
    trie: TokTrie,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Greedy longest match over the trie. llguidance tokenizes only grammar literals with it
    /// (to find tokens it can force); a non-canonical split costs speed there, not correctness.
    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<u32> {
        self.trie.greedy_tokenize(bytes)
    }
}

pub(super) fn token_env(
    tokenizer: &Tokenizer,
    vocab_size: usize,
    eos_token_ids: &[u32],
) -> Result<TokEnv> {
    let tokens = tokenizer.token_bytes()?;
    if tokens.len() > vocab_size {
        bail!(
            "the tokenizer has {} tokens, more than the model's {vocab_size} logits",
            tokens.len()
        );
    }
    let Some(&eos) = eos_token_ids.first() else {
        bail!("constrained decoding needs an end-of-sequence token id");
    };
    let mut words: Vec<Vec<u8>> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| {
            if t.bytes.is_empty() {
                unnamed(id)
            } else if t.special {
                let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                marked.extend_from_slice(&t.bytes);
                marked
            } else {
                t.bytes.clone()
            }
        })
        .collect();
    // Ids past the tokenizer's (the embedding is padded) are never allowed.
    while words.len() < vocab_size {
        words.push(unnamed(words.len()));
    }
    let info = TokRxInfo::new(vocab_size as u32, eos);
    let trie = TokTrie::from(&info, &words).with_eos_tokens(eos_token_ids);
    Ok(Arc::new(Vocabulary { trie }))
}

/// An id the tokenizer does not name: a special token with a unique name, so that no grammar
/// allows it.
fn unnamed(id: usize) -> Vec<u8> {
    let mut name = format!("<[{id}]>").into_bytes();
    name.insert(0, TokTrie::SPECIAL_TOKEN_MARKER);
    name
}
