//! Constrained decoding: a [`Guide`] limits each sampled token to those that keep the text
//! inside a JSON schema, a Lark grammar or a regular expression (through `llguidance`).
//!
//! [`Guides`] is built once per tokenizer (the token trie of the whole vocabulary) and compiles
//! a [`Constraint`] into a guide per request; a schema it cannot compile is an error before any
//! token is generated. A guide's mask for the next token depends only on the tokens so far, so a
//! driver can compute it ([`Guide::prepare`]) while the forward pass for the last token runs.
//! `llguidance` types do not leave this module.

pub mod tools;
mod vocab;

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::SimpleVob;
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value as Json};

use crate::tokenizer::Tokenizer;

/// What the output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against this schema.
    JsonSchema(Json),
    /// Text of a grammar in llguidance's Lark dialect.
    Lark(String),
    /// Text matching a regular expression (whole).
    Regex(String),
}

impl Constraint {
    /// The llguidance grammar. JSON is written compactly with `", "` and `": "` separators (the
    /// style Qwen2.5 writes JSON in) unless the schema's own `x-guidance` says otherwise: free
    /// whitespace lets a small model wander into runs of spaces and newlines.
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            Constraint::JsonObject => TopLevelGrammar::from_json_schema(with_json_style(json!({
                "type": "object"
            }))),
            Constraint::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(with_json_style(schema.clone()))
            }
            Constraint::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
            Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
        }
    }
}

/// The JSON layout options llguidance reads from a schema's `x-guidance` key.
pub(crate) fn with_json_style(mut schema: Json) -> Json {
    if let Json::Object(map) = &mut schema {
        map.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// Compiles constraints for one tokenizer; shared by every request (read-only).
pub struct Guides {
    factory: ParserFactory,
}

impl std::fmt::Debug for Guides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guides").finish_non_exhaustive()
    }
}

impl Guides {
    /// Builds the token trie of `tokenizer`'s vocabulary padded to the model's `vocab_size`
    /// (logit rows are that long), with `eos_token_ids` as the tokens that end a generation.
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize, eos_token_ids: &[u32]) -> Result<Self> {
        let env = vocab::token_env(tokenizer, vocab_size, eos_token_ids)?;
        let mut factory = ParserFactory::new_simple(&env)?;
        // Grammar problems come back as errors (to the client); nothing on stderr.
        factory.set_stderr_log_level(0);
        Ok(Self { factory })
    }

    /// A guide for one generation, or why `constraint` does not compile (a sentence for the
    /// client).
    pub fn compile(&self, constraint: &Constraint) -> Result<Guide> {
        let parser = self
            .factory
            .create_parser(constraint.grammar())
            .map_err(|e| anyhow!("the constraint does not compile: {}", first_line(&e)))?;
        Ok(Guide {
            matcher: Matcher::new(Ok(parser)),
            mask: None,
            mask_times: Vec::new(),
        })
    }
}

fn first_line(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    text.lines().next().unwrap_or_default().to_string()
}

/// The state of one constrained generation.
pub struct Guide {
    matcher: Matcher,
    /// The mask for the next token, once computed.
    mask: Option<SimpleVob>,
    /// How long each mask took to compute.
    mask_times: Vec<Duration>,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("masks", &self.mask_times.len())
            .finish_non_exhaustive()
    }
}

impl Guide {
    /// Computes the mask for the next token (once; cheap to call again). Once the grammar is
    /// complete the mask holds just the eos tokens.
    pub fn prepare(&mut self) -> Result<()> {
        if self.mask.is_none() {
            let start = Instant::now();
            let mask = self.matcher.compute_mask_or_eos();
            self.mask_times.push(start.elapsed());
            self.mask = Some(mask.map_err(|e| anyhow!("constrained decoding failed: {e:#}"))?);
        }
        Ok(())
    }

    /// Sets the logit of every token the grammar does not allow next to -inf.
    pub fn constrain(&mut self, logits: &mut [f32]) -> Result<()> {
        self.prepare()?;
        let Some(mask) = &self.mask else {
            bail!("constrained decoding failed: no mask");
        };
        let words = mask.as_slice();
        if words.iter().all(|&w| w == 0) {
            bail!("constrained decoding failed: the grammar allows no token here");
        }
        for (i, chunk) in logits.chunks_mut(32).enumerate() {
            let word = words.get(i).copied().unwrap_or(0);
            if word == u32::MAX {
                continue;
            }
            for (bit, logit) in chunk.iter_mut().enumerate() {
                if word >> bit & 1 == 0 {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        Ok(())
    }

    /// Advances past `token` (one the last mask allowed).
    pub fn commit(&mut self, token: u32) -> Result<()> {
        self.mask = None;
        self.matcher
            .consume_token(token)
            .map_err(|e| anyhow!("constrained decoding failed: {e:#}"))
    }

    /// Whether the text so far is a complete match (the grammar could end here).
    pub fn is_complete(&mut self) -> bool {
        !self.matcher.is_error() && self.matcher.is_accepting().unwrap_or(false)
    }

    /// How long each mask took to compute, in order.
    pub fn mask_times(&self) -> &[Duration] {
        &self.mask_times
    }

    /// Runs `work` (a forward pass) while a helper thread computes this guide's next mask.
    /// Fails if computing the mask panicked (the guide must not be used then).
    pub fn prepare_during<T>(&mut self, work: impl FnOnce() -> T) -> Result<T> {
        std::thread::scope(|scope| {
            // An error is found again (and reported) when the guide constrains logits.
            let masking = scope.spawn(|| drop(self.prepare()));
            let out = work();
            masking
                .join()
                .map_err(|_| anyhow!("internal error: computing a token mask panicked"))?;
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::{RngCore, SeedableRng};

    /// The tiny fixture's byte-level tokenizer (381 tokens and three special ones).
    fn tiny() -> (Tokenizer, Guides) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-tied/bundle");
        let tokenizer = Tokenizer::from_files(&dir.join("tokenizer.json"), None).expect("load");
        // 383 = <|im_end|>, 381 = <|endoftext|>: the fixture's eos ids.
        let guides = Guides::new(&tokenizer, 384, &[383, 381]).expect("guides");
        (tokenizer, guides)
    }

    /// Picks random allowed tokens until the guide allows only eos, or eos is picked: what the
    /// worst sampler could produce. Returns the text and whether it ended on eos.
    fn random_walk(guide: &mut Guide, tokenizer: &Tokenizer, seed: u64) -> (String, bool) {
        let bytes = tokenizer.token_bytes().expect("bytes");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut text = Vec::new();
        for _ in 0..400 {
            let mut logits = vec![0.0f32; 384];
            guide.constrain(&mut logits).expect("a mask");
            let allowed: Vec<u32> = (0..384u32).filter(|&t| logits[t as usize] == 0.0).collect();
            assert!(!allowed.contains(&382), "a special token was allowed");
            let pick = allowed[rng.next_u32() as usize % allowed.len()];
            if pick == 383 || pick == 381 {
                assert!(guide.is_complete(), "eos allowed before the end");
                return (String::from_utf8(text).expect("utf-8"), true);
            }
            guide.commit(pick).expect("commit");
            text.extend_from_slice(&bytes[pick as usize].bytes);
        }
        (String::from_utf8_lossy(&text).into_owned(), false)
    }

    #[test]
    fn any_path_the_mask_allows_is_valid_json_of_the_schema() {
        let (tokenizer, guides) = tiny();
        let schema = json!({
            "type": "object",
            "properties": {
                "mode": {"enum": ["on", "off"]},
                "level": {"type": "integer", "minimum": 0, "maximum": 9},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 3},
                         "maxItems": 2}
            },
            "required": ["mode", "level", "tags"],
            "additionalProperties": false
        });
        let mut ended = 0;
        for seed in 0..40 {
            let mut guide = guides
                .compile(&Constraint::JsonSchema(schema.clone()))
                .expect("compiles");
            let (text, eos) = random_walk(&mut guide, &tokenizer, seed);
            if !eos {
                continue;
            }
            ended += 1;
            let v: Json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert!(
                ["on", "off"].contains(&v["mode"].as_str().expect("mode")),
                "{text}"
            );
            let level = v["level"].as_i64().expect("integer level");
            assert!((0..=9).contains(&level), "{text}");
            let tags = v["tags"].as_array().expect("tags");
            assert!(tags.len() <= 2, "{text}");
            assert!(tags
                .iter()
                .all(|t| t.as_str().is_some_and(|s| s.chars().count() <= 3)));
            assert_eq!(v.as_object().expect("object").len(), 3, "{text}");
        }
        assert!(ended >= 20, "only {ended} of 40 random walks ended");
    }

    #[test]
    fn regex_and_lark_constrain_and_bad_ones_are_errors() {
        let (tokenizer, guides) = tiny();
        let mut guide = guides
            .compile(&Constraint::Regex("(yes|no)".into()))
            .expect("regex");
        let (text, eos) = random_walk(&mut guide, &tokenizer, 7);
        assert!(eos && (text == "yes" || text == "no"), "{text:?}");
        let lark = "start: \"light \" state\nstate: \"on\" | \"off\"\n";
        let mut guide = guides
            .compile(&Constraint::Lark(lark.into()))
            .expect("lark");
        let (text, eos) = random_walk(&mut guide, &tokenizer, 3);
        assert!(eos && text.starts_with("light o"), "{text:?}");
        for bad in [
            Constraint::Lark("start: nowhere".into()),
            Constraint::Regex("(unclosed".into()),
            Constraint::JsonSchema(json!({"type": "no-such-type"})),
        ] {
            let e = guides.compile(&bad).expect_err("must not compile");
            assert!(e.to_string().contains("does not compile"), "{e}");
        }
    }
}
