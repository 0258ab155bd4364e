//! Tokenizer, chat template and streaming (UTF-8-safe) detokenizer.
//!
//! Wraps the `tokenizers` crate on the bundle's tokenizer.json; `tokenizers` and `minijinja`
//! types do not leave this module. Text produced here is what a user sees: the streaming
//! decoder never yields half a character, and stop strings are cut before they are shown.

mod template;

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value as Json;

use crate::bundle::Bundle;
pub use template::ChatTemplate;

/// Special-token attributes transformers passes to a chat template by name.
const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    special_tokens: Vec<(String, String)>,
    /// Every token's bytes (built on first use), or why there are none.
    byte_tokens: OnceLock<Result<Vec<TokenBytes>, String>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("chat_template", &self.template.is_some())
            .finish()
    }
}

impl Tokenizer {
    pub fn from_bundle(bundle: &Bundle) -> Result<Self> {
        let config = bundle.tokenizer_config_path();
        Self::from_files(
            &bundle.tokenizer_path(),
            config.exists().then_some(config.as_path()),
        )
    }

    /// Loads tokenizer.json and, when given, the chat template and special tokens of
    /// tokenizer_config.json (or a `chat_template.jinja` beside it, as transformers v5 saves).
    pub fn from_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", tokenizer_json.display()))?;
        let mut template_source = None;
        let mut special_tokens = Vec::new();
        if let Some(path) = tokenizer_config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let config: Json = serde_json::from_str(&text)
                .map_err(|e| anyhow!("{}: invalid JSON: {e}", path.display()))?;
            template_source = chat_template_source(&config);
            special_tokens = special_token_strings(&config);
            if template_source.is_none() {
                let jinja = path.with_file_name("chat_template.jinja");
                if jinja.exists() {
                    template_source = Some(
                        std::fs::read_to_string(&jinja)
                            .with_context(|| format!("cannot read {}", jinja.display()))?,
                    );
                }
            }
        }
        let template = template_source
            .map(|source| ChatTemplate::new(&source))
            .transpose()
            .map_err(|e| anyhow!("chat template does not compile: {e}"))?;
        Ok(Self {
            inner,
            template,
            special_tokens,
            byte_tokens: OnceLock::new(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether `other` maps every token to the same id (added tokens included): what a draft
    /// model needs to propose the target's own tokens.
    pub fn same_vocabulary(&self, other: &Tokenizer) -> bool {
        self.vocab_size() == other.vocab_size()
            && self.inner.get_vocab(true) == other.inner.get_vocab(true)
    }

    /// The ids of the tokens added to the byte-pair vocabulary (special tokens such as
    /// `<|im_end|>`), in no order.
    pub fn added_token_ids(&self) -> Vec<u32> {
        self.inner.get_added_tokens_decoder().into_keys().collect()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// `add_special_tokens` follows transformers: true for a raw prompt (`tokenizer(text)`),
    /// false for rendered chat text (`apply_chat_template` already placed the special tokens).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizer failed to encode: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes to text without special tokens (what a user should see).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("tokenizer failed to decode: {e}"))
    }

    /// `apply_chat_template(messages, tools=tools, add_generation_prompt=…, tokenize=False)`.
    /// `messages`: [`ChatMessage`](crate::chat::ChatMessage)s, or a JSON list of message
    /// objects, passed to the template as given.
    pub fn apply_chat_template<M: serde::Serialize + ?Sized>(
        &self,
        messages: &M,
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.template.as_ref().ok_or_else(|| {
            anyhow!("the bundle's tokenizer_config.json has no chat_template (use --raw)")
        })?;
        template
            .render(messages, tools, add_generation_prompt, &self.special_tokens)
            .map_err(|e| anyhow!("chat template failed: {}", one_line(&e)))
    }

    /// Every token's bytes, by id, for constrained decoding: what the token adds to the text
    /// (byte-level BPE symbols mapped back to bytes; an added token's own text), and whether it
    /// is special (never part of the text: `<|im_end|>` and the like). Ids the tokenizer does
    /// not name are empty. Only byte-level tokenizers (GPT-2 style, as Qwen2's) are supported.
    /// Built once (tens of milliseconds for Qwen2's vocabulary), shared by the streaming
    /// decoder and constrained decoding.
    pub fn token_bytes(&self) -> Result<&[TokenBytes]> {
        self.byte_tokens
            .get_or_init(|| self.build_token_bytes().map_err(|e| format!("{e:#}")))
            .as_deref()
            .map_err(|e| anyhow!("{e}"))
    }

    fn build_token_bytes(&self) -> Result<Vec<TokenBytes>> {
        if !matches!(
            self.inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        ) {
            bail!("constrained decoding needs a byte-level BPE tokenizer (as Qwen2's)");
        }
        let unicode_to_byte = byte_level_alphabet();
        let mut tokens = vec![TokenBytes::default(); self.vocab_size()];
        for (text, id) in self.inner.get_vocab(false) {
            let bytes: Option<Vec<u8>> = text
                .chars()
                .map(|c| unicode_to_byte.get(&c).copied())
                .collect();
            let bytes =
                bytes.ok_or_else(|| anyhow!("token {id} ({text:?}) is not byte-level BPE"))?;
            if let Some(slot) = tokens.get_mut(id as usize) {
                slot.bytes = bytes;
            }
        }
        for (id, added) in self.inner.get_added_tokens_decoder() {
            if let Some(slot) = tokens.get_mut(id as usize) {
                slot.bytes = added.content.into_bytes();
                slot.special = added.special;
            }
        }
        Ok(tokens)
    }

    /// A fresh streaming decoder for one generation.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            bytes: self.token_bytes().ok(),
            pending: Vec::new(),
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }
}

/// A minijinja error with its cause chain, on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text.replace('\n', " ")
}

/// `chat_template` is a string, or a list of named templates of which "default" is used.
fn chat_template_source(config: &Json) -> Option<String> {
    match config.get("chat_template")? {
        Json::String(s) => Some(s.clone()),
        Json::Array(items) => {
            let named = |name: &str| {
                items.iter().find_map(|t| {
                    (t.get("name")?.as_str()? == name)
                        .then(|| t.get("template")?.as_str().map(str::to_string))
                        .flatten()
                })
            };
            named("default")
                .or_else(|| items.first()?.get("template")?.as_str().map(str::to_string))
        }
        _ => None,
    }
}

/// Special tokens are strings or `{"content": …}` objects (AddedToken) in tokenizer_config.json.
fn special_token_strings(config: &Json) -> Vec<(String, String)> {
    SPECIAL_TOKEN_KEYS
        .iter()
        .filter_map(|&key| {
            let value = config.get(key)?;
            let text = value.as_str().or_else(|| value.get("content")?.as_str())?;
            Some((key.to_string(), text.to_string()))
        })
        .collect()
}

/// One vocabulary entry as bytes (see [`Tokenizer::token_bytes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenBytes {
    pub bytes: Vec<u8>,
    pub special: bool,
}

/// Byte-level BPE writes each byte as a printable character: the printable Latin-1 bytes as
/// themselves, the other 68 as U+0100 onwards in byte order (GPT-2's table). The inverse map.
fn byte_level_alphabet() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (char::from(b), b)
            } else {
                let c = char::from_u32(next).unwrap_or('\0');
                next += 1;
                (c, b)
            }
        })
        .collect()
}

/// Turns a stream of token ids into text pieces that are always whole UTF-8 characters, which
/// together are exactly what decoding all the ids at once gives.
///
/// Byte-level BPE (Qwen2's) splits a Chinese character or an emoji over several tokens. With
/// such a tokenizer the decoder collects the tokens' bytes (special tokens have none) and
/// releases every whole character, holding at most the 3 bytes of one that is not complete
/// yet; bytes that can never make a character become U+FFFD exactly as the whole decoding's
/// `from_utf8_lossy` makes them (releasing held text by token count instead let the pieces
/// and the whole decoding disagree on invalid bytes: the `detokenizer` fuzz target found it).
/// Other tokenizers: a window of ids is decoded twice (before and after the new token) and text
/// is released once it no longer ends in U+FFFD; the window then moves forward.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    /// Every token's bytes (byte-level tokenizers), and those not released yet.
    bytes: Option<&'a [TokenBytes]>,
    pending: Vec<u8>,
    ids: Vec<u32>,
    /// Start of the decoding window (context so that spacing decodes correctly).
    prefix: usize,
    /// End of the text already released.
    read: usize,
}

impl StreamDecoder<'_> {
    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        if let Some(table) = self.bytes {
            if let Some(token) = table.get(id as usize).filter(|t| !t.special) {
                self.pending.extend_from_slice(&token.bytes);
            }
            return Ok(release_whole_chars(&mut self.pending, false));
        }
        self.ids.push(id);
        let after = self.tokenizer.decode(&self.ids[self.prefix..])?;
        if after.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let piece = delta(&before, &after);
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(piece)
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn finish(&mut self) -> Result<String> {
        if self.bytes.is_some() {
            return Ok(release_whole_chars(&mut self.pending, true));
        }
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let after = self.tokenizer.decode(&self.ids[self.prefix..])?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(delta(&before, &after))
    }
}

/// The text `pending` makes, as `String::from_utf8_lossy` decodes it, less (unless `at_end`) an
/// incomplete character at its end, which stays in `pending`.
fn release_whole_chars(pending: &mut Vec<u8>, at_end: bool) -> String {
    let mut text = String::new();
    let mut rest: &[u8] = pending;
    loop {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                text.push_str(valid);
                rest = &[];
                break;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                match e.error_len() {
                    Some(invalid) => {
                        text.push('\u{FFFD}');
                        rest = &after[invalid..];
                    }
                    None if at_end => {
                        text.push('\u{FFFD}');
                        rest = &[];
                        break;
                    }
                    None => {
                        rest = after;
                        break;
                    }
                }
            }
        }
    }
    let held = rest.len();
    pending.drain(..pending.len() - held);
    text
}

/// The new text of `after` past `before`; if a decoder rewrote earlier text (it should not
/// for byte-level BPE), fall back to the part after the longest common prefix.
fn delta(before: &str, after: &str) -> String {
    if let Some(rest) = after.strip_prefix(before) {
        return rest.to_string();
    }
    let common = before
        .char_indices()
        .zip(after.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(before.len().min(after.len()));
    after.get(common..).unwrap_or_default().to_string()
}

/// User stop strings on the streamed text: text that might begin a stop string is held back
/// until it can be ruled out, and the stop string itself is never emitted.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopStep {
    /// Text safe to show; generation goes on.
    Emit(String),
    /// A stop string was found: show this text (everything before it) and stop.
    Stop(String),
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopStep {
        self.pending.push_str(text);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return StopStep::Stop(out);
        }
        let hold = self.held_suffix_len();
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopStep::Emit(out)
    }

    /// The held-back text, released when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn held_suffix_len(&self) -> usize {
        let p = &self.pending;
        (1..=p.len())
            .rev()
            .filter(|&n| p.is_char_boundary(p.len() - n))
            .find(|&n| {
                let suffix = &p[p.len() - n..];
                self.stops
                    .iter()
                    .any(|s| s.len() > n && s.starts_with(suffix))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopStep::Emit(t) => out.push_str(&t),
                StopStep::Stop(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_strings_are_cut() {
        assert_eq!(
            run(&["\n\n"], &["Hello", "\n", "\nworld"]),
            ("Hello".into(), true)
        );
        assert_eq!(
            run(&["END"], &["abcE", "N", "D tail"]),
            ("abc".into(), true)
        );
        assert_eq!(run(&["END"], &["abcE", "N", "x"]), ("abcENx".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["你好"], &["说你", "好吗"]), ("说".into(), true));
    }

    #[test]
    fn held_text_is_released_when_ruled_out() {
        let mut m = StopMatcher::new(&["STOP".to_string()]);
        assert_eq!(m.push("xST"), StopStep::Emit("x".into()));
        assert_eq!(m.push("x"), StopStep::Emit("STx".into()));
    }

    /// Bytes released whole characters at a time, split anywhere, make what
    /// `String::from_utf8_lossy` makes of all of them (invalid and cut sequences included).
    #[test]
    fn released_characters_add_up_to_the_lossy_decoding() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet: &[u8] = b"a\xc3\xa9\xe3\x82\xad\xf0\x9f\x99\x82\x80\xbf\xc0\xf5\xff\xe0\xed";
        for _ in 0..20_000 {
            let len = (next() % 12) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let mut pending = Vec::new();
            let mut text = String::new();
            let mut at = 0;
            while at < bytes.len() {
                let take = 1 + (next() % 3) as usize;
                let end = (at + take).min(bytes.len());
                pending.extend_from_slice(&bytes[at..end]);
                let piece = release_whole_chars(&mut pending, false);
                assert!(pending.len() <= 3, "{bytes:x?}");
                text += &piece;
                at = end;
            }
            text += &release_whole_chars(&mut pending, true);
            assert_eq!(text, String::from_utf8_lossy(&bytes), "{bytes:x?}");
        }
    }

    #[test]
    fn delta_falls_back_to_common_prefix() {
        assert_eq!(delta("ab", "abc"), "c");
        assert_eq!(delta("ab", "aXc"), "Xc");
        assert_eq!(delta("", "é"), "é");
    }

    #[test]
    fn template_source_forms() {
        let c = serde_json::json!({"chat_template": "x"});
        assert_eq!(chat_template_source(&c).as_deref(), Some("x"));
        let c = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "t"},
            {"name": "default", "template": "d"}]});
        assert_eq!(chat_template_source(&c).as_deref(), Some("d"));
        let c = serde_json::json!({"eos_token": {"content": "<e>"}, "bos_token": null,
            "pad_token": "<p>"});
        assert_eq!(
            special_token_strings(&c),
            vec![
                ("eos_token".to_string(), "<e>".to_string()),
                ("pad_token".to_string(), "<p>".to_string())
            ]
        );
    }
}
