//! The JSON messages every front end speaks (ARCHITECTURE.md, "Wire protocol"): requests
//! parsed and validated into plain types, events turned into one JSON object each.
//!
//! Everything a client sends is untrusted: parsing never panics, and every rejection is an
//! `error` event that carries the request's id whenever the id could be read. This module
//! knows nothing about sockets, MQTT or the model.

use std::time::Duration;

use serde_json::{json, Map, Value as Json};

/// Per-request sampling settings; None = the bundle's default.
pub use crate::sampling::SamplingOverrides;

/// Error codes of the wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    TooLong,
    Busy,
    Timeout,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::TooLong => "too_long",
            Self::Busy => "busy",
            Self::Timeout => "timeout",
            Self::Internal => "internal",
        }
    }
}

/// Why a generation ended (the `finish_reason` of a `done` event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
    Cancelled,
    Timeout,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
            Self::Timeout => "timeout",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DoneStats {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// From acceptance to the first token (queueing included: what the client waited).
    pub ttft_ms: f64,
    pub queue_ms: f64,
    pub decode_tokens_per_s: f64,
    pub total_ms: f64,
}

/// One message from the service to a client.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token {
        id: String,
        text: String,
    },
    Done {
        id: String,
        text: String,
        finish: Finish,
        stats: DoneStats,
    },
    Error {
        /// None when the request's id could not be read.
        id: Option<String>,
        code: ErrorCode,
        message: String,
    },
    /// The answer to `health` or `stats`: `body` holds the fields after `id` and `event`.
    Reply {
        id: Option<String>,
        event: &'static str,
        body: Map<String, Json>,
    },
}

impl Event {
    pub fn error(id: Option<&str>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error {
            id: id.map(str::to_string),
            code,
            message: message.into(),
        }
    }

    /// `done` or `error`: the last event of a request.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Done { .. } | Self::Error { .. })
    }

    pub fn id(&self) -> Option<&str> {
        match self {
            Self::Token { id, .. } | Self::Done { id, .. } => Some(id),
            Self::Error { id, .. } | Self::Reply { id, .. } => id.as_deref(),
        }
    }

    pub fn to_json(&self) -> Json {
        let id = |id: Option<&str>| id.map_or(Json::Null, |s| Json::String(s.to_string()));
        match self {
            Self::Token { id, text } => json!({"id": id, "event": "token", "text": text}),
            Self::Done {
                id,
                text,
                finish,
                stats,
            } => json!({
                "id": id,
                "event": "done",
                "text": text,
                "finish_reason": finish.as_str(),
                "usage": {
                    "prompt_tokens": stats.prompt_tokens,
                    "completion_tokens": stats.completion_tokens,
                },
                "timings": {
                    "ttft_ms": round3(stats.ttft_ms),
                    "queue_ms": round3(stats.queue_ms),
                    "decode_tokens_per_s": round3(stats.decode_tokens_per_s),
                    "total_ms": round3(stats.total_ms),
                },
            }),
            Self::Error {
                id: rid,
                code,
                message,
            } => json!({
                "id": id(rid.as_deref()),
                "event": "error",
                "code": code.as_str(),
                "message": message,
            }),
            Self::Reply {
                id: rid,
                event,
                body,
            } => {
                let mut m = Map::new();
                m.insert("id".into(), id(rid.as_deref()));
                m.insert("event".into(), Json::String((*event).into()));
                for (k, v) in body {
                    m.insert(k.clone(), v.clone());
                }
                Json::Object(m)
            }
        }
    }

    /// One line of JSON (no newline inside: serde_json escapes control characters).
    pub fn to_line(&self) -> String {
        self.to_json().to_string()
    }
}

fn round3(x: f64) -> f64 {
    if x.is_finite() {
        (x * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Chat messages, rendered with the bundle's chat template.
    Messages(Json),
    /// Text sent as is (like `generate --raw`).
    Raw(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub id: String,
    pub input: PromptInput,
    pub max_tokens: Option<usize>,
    pub sampling: SamplingOverrides,
    pub stop: Vec<String>,
    pub stream: bool,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Generate(GenerateRequest),
    Cancel { id: String },
    Health { id: Option<String> },
    Stats { id: Option<String> },
}

/// A parsed request and the MQTT 3.1.1 reply topic it named, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub op: Op,
    pub reply_to: Option<String>,
}

/// A request that was refused before it reached the scheduler.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// Boxed: a `Result` carrying it stays small.
    pub event: Box<Event>,
    /// The `reply_to` field, when it could be read (MQTT 3.1.1 clients get their error there).
    pub reply_to: Option<String>,
}

/// The limits a request is checked against while parsing (the rest need the tokenizer).
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_new_tokens: usize,
    pub max_timeout: Duration,
}

/// Longest id, stop string and reply topic we accept: ids are echoed in every event.
const MAX_ID_BYTES: usize = 256;
const MAX_STOP_STRINGS: usize = 16;
const MAX_STOP_BYTES: usize = 256;
const MAX_REPLY_TOPIC_BYTES: usize = 1024;

const GENERATE_FIELDS: [&str; 16] = [
    "op",
    "id",
    "messages",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
    "stream",
    "timeout_s",
    "reply_to",
    // Free for the client (a trace id, a label): echoed nowhere, never an error.
    "meta",
];

/// Parses one request (a socket line or an MQTT payload).
pub fn parse_request(bytes: &[u8], limits: &RequestLimits) -> Result<Request, Rejection> {
    let value: Json = serde_json::from_slice(bytes).map_err(|e| Rejection {
        event: Box::new(Event::error(
            None,
            ErrorCode::BadRequest,
            format!("invalid JSON: {e}"),
        )),
        reply_to: None,
    })?;
    let Json::Object(obj) = value else {
        return Err(Rejection {
            event: Box::new(Event::error(
                None,
                ErrorCode::BadRequest,
                "a request is a JSON object",
            )),
            reply_to: None,
        });
    };
    // The id and reply topic first, so that every later error can be addressed.
    let id = match obj.get("id") {
        Some(Json::String(s)) if !s.is_empty() && s.len() <= MAX_ID_BYTES => Some(s.clone()),
        _ => None,
    };
    let reply_to = match obj.get("reply_to") {
        Some(Json::String(s)) if valid_reply_topic(s) => Some(s.clone()),
        _ => None,
    };
    let reject = |code: ErrorCode, message: String| Rejection {
        event: Box::new(Event::error(id.as_deref(), code, message)),
        reply_to: reply_to.clone(),
    };
    let bad = |message: String| reject(ErrorCode::BadRequest, message);
    if let Some(v) = obj.get("reply_to") {
        if reply_to.is_none() {
            return Err(bad(format!(
                "reply_to must be an MQTT topic name (no '+', '#', no leading '$', at most {MAX_REPLY_TOPIC_BYTES} bytes), got {}",
                short(v)
            )));
        }
    }
    let op = match obj.get("op") {
        None => {
            return Err(bad(
                "missing field \"op\" (generate, cancel, health or stats)".into(),
            ))
        }
        Some(Json::String(s)) => s.as_str(),
        Some(v) => return Err(bad(format!("op must be a string, got {}", short(v)))),
    };
    let require_id = |what: &str| -> Result<String, Rejection> {
        match obj.get("id") {
            None => Err(bad(format!("missing field \"id\" ({what} needs one)"))),
            Some(Json::String(s)) if s.is_empty() => Err(bad("id must not be empty".into())),
            Some(Json::String(s)) if s.len() > MAX_ID_BYTES => {
                Err(bad(format!("id is longer than {MAX_ID_BYTES} bytes")))
            }
            Some(Json::String(s)) => Ok(s.clone()),
            Some(v) => Err(bad(format!("id must be a string, got {}", short(v)))),
        }
    };
    let op = match op {
        "generate" => {
            if let Some(k) = obj.keys().find(|k| !GENERATE_FIELDS.contains(&k.as_str())) {
                return Err(bad(format!("unknown field {k:?} in a generate request")));
            }
            let id = require_id("generate")?;
            Op::Generate(parse_generate(id, &obj, limits).map_err(bad)?)
        }
        "cancel" => {
            only_fields(&obj, &["op", "id", "reply_to", "meta"]).map_err(bad)?;
            Op::Cancel {
                id: require_id("cancel")?,
            }
        }
        "health" | "stats" => {
            only_fields(&obj, &["op", "id", "reply_to", "meta"]).map_err(bad)?;
            if let Some(v) = obj.get("id") {
                if id.is_none() {
                    return Err(bad(format!(
                        "id must be a non-empty string of at most {MAX_ID_BYTES} bytes, got {}",
                        short(v)
                    )));
                }
            }
            if op == "health" {
                Op::Health { id: id.clone() }
            } else {
                Op::Stats { id: id.clone() }
            }
        }
        other => {
            return Err(bad(format!(
                "unknown op {other:?} (expected generate, cancel, health or stats)"
            )))
        }
    };
    Ok(Request { op, reply_to })
}

fn only_fields(obj: &Map<String, Json>, allowed: &[&str]) -> Result<(), String> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!("unknown field {k:?} for this op")),
        None => Ok(()),
    }
}

fn parse_generate(
    id: String,
    obj: &Map<String, Json>,
    limits: &RequestLimits,
) -> Result<GenerateRequest, String> {
    let input = match (obj.get("messages"), obj.get("prompt")) {
        (Some(_), Some(_)) => return Err("give either \"messages\" or \"prompt\", not both".into()),
        (None, None) => return Err("missing field \"messages\" (or \"prompt\")".into()),
        (Some(m), None) => PromptInput::Messages(messages(m)?),
        (None, Some(Json::String(p))) if p.is_empty() => {
            return Err("prompt must not be empty".into())
        }
        (None, Some(Json::String(p))) => PromptInput::Raw(p.clone()),
        (None, Some(v)) => return Err(format!("prompt must be a string, got {}", short(v))),
    };
    let max_tokens = match obj.get("max_tokens") {
        None | Some(Json::Null) => None,
        Some(v) => {
            let n = uint(v, "max_tokens")?;
            if n == 0 {
                return Err("max_tokens must be at least 1".into());
            }
            if n > limits.max_new_tokens as u64 {
                return Err(format!(
                    "max_tokens is {n}, above this service's limit of {}",
                    limits.max_new_tokens
                ));
            }
            Some(n as usize)
        }
    };
    let sampling = SamplingOverrides {
        temperature: float(
            obj,
            "temperature",
            |t| t >= 0.0,
            "a number >= 0 (0 = greedy)",
        )?,
        top_p: float(obj, "top_p", |p| p > 0.0 && p <= 1.0, "a number in (0, 1]")?,
        top_k: obj
            .get("top_k")
            .filter(|v| !v.is_null())
            .map(|v| uint(v, "top_k").map(|k| k.min(usize::MAX as u64) as usize))
            .transpose()?,
        min_p: float(
            obj,
            "min_p",
            |p| (0.0..=1.0).contains(&p),
            "a number in [0, 1]",
        )?,
        repetition_penalty: float(obj, "repetition_penalty", |r| r > 0.0, "a number > 0")?,
        seed: obj
            .get("seed")
            .filter(|v| !v.is_null())
            .map(|v| uint(v, "seed"))
            .transpose()?,
    };
    let stop = match obj.get("stop") {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::String(s)) => vec![stop_string(s)?],
        Some(Json::Array(items)) => {
            if items.len() > MAX_STOP_STRINGS {
                return Err(format!("at most {MAX_STOP_STRINGS} stop strings"));
            }
            items
                .iter()
                .map(|v| match v {
                    Json::String(s) => stop_string(s),
                    other => Err(format!(
                        "stop strings must be strings, got {}",
                        short(other)
                    )),
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => {
            return Err(format!(
                "stop must be a string or a list of strings, got {}",
                short(v)
            ))
        }
    };
    let stream = match obj.get("stream") {
        None | Some(Json::Null) => true,
        Some(Json::Bool(b)) => *b,
        Some(v) => return Err(format!("stream must be true or false, got {}", short(v))),
    };
    let timeout = match obj.get("timeout_s") {
        None | Some(Json::Null) => None,
        Some(v) => {
            let max = limits.max_timeout.as_secs_f64();
            match v.as_f64() {
                Some(t) if t > 0.0 && t <= max => Some(Duration::from_secs_f64(t)),
                Some(t) if t > max => {
                    return Err(format!(
                        "timeout_s is {t}, above this service's limit of {max}"
                    ))
                }
                _ => return Err(format!("timeout_s must be a number > 0, got {}", short(v))),
            }
        }
    };
    Ok(GenerateRequest {
        id,
        input,
        max_tokens,
        sampling,
        stop,
        stream,
        timeout,
    })
}

/// A non-empty list of message objects, each with a string role and (if any) string content.
fn messages(v: &Json) -> Result<Json, String> {
    let Json::Array(items) = v else {
        return Err(format!(
            "messages must be a list of objects, got {}",
            short(v)
        ));
    };
    if items.is_empty() {
        return Err("messages must not be empty".into());
    }
    for (i, m) in items.iter().enumerate() {
        let Json::Object(m) = m else {
            return Err(format!("messages[{i}] must be an object"));
        };
        match m.get("role") {
            Some(Json::String(r)) if !r.is_empty() => {}
            Some(other) => {
                return Err(format!(
                    "messages[{i}].role must be a non-empty string, got {}",
                    short(other)
                ))
            }
            None => return Err(format!("messages[{i}] has no \"role\"")),
        }
        match m.get("content") {
            None | Some(Json::Null) | Some(Json::String(_)) => {}
            Some(other) => {
                return Err(format!(
                    "messages[{i}].content must be a string, got {}",
                    short(other)
                ))
            }
        }
    }
    Ok(v.clone())
}

fn stop_string(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("stop strings must not be empty".into());
    }
    if s.len() > MAX_STOP_BYTES {
        return Err(format!("stop strings are at most {MAX_STOP_BYTES} bytes"));
    }
    Ok(s.to_string())
}

fn uint(v: &Json, key: &str) -> Result<u64, String> {
    v.as_u64()
        .ok_or_else(|| format!("{key} must be a non-negative integer, got {}", short(v)))
}

fn float(
    obj: &Map<String, Json>,
    key: &str,
    ok: impl Fn(f32) -> bool,
    expected: &str,
) -> Result<Option<f32>, String> {
    match obj.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && ok(x as f32) && (x as f32).is_finite() => {
                Ok(Some(x as f32))
            }
            _ => Err(format!("{key} must be {expected}, got {}", short(v))),
        },
    }
}

/// A topic we may publish replies to: a plain topic name, never a wildcard (publishing to one
/// gets the service disconnected) nor a `$` system topic.
pub fn valid_reply_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= MAX_REPLY_TOPIC_BYTES
        && !topic.starts_with('$')
        && !topic.contains(['+', '#', '\0'])
}

/// A value quoted in an error message, cut short (clients may send megabytes).
fn short(v: &Json) -> String {
    let text = v.to_string();
    if text.len() <= 60 {
        text
    } else {
        let mut end = 57;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &text[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits {
        max_new_tokens: 100,
        max_timeout: Duration::from_secs(60),
    };

    fn parse(s: &str) -> Result<Request, Rejection> {
        parse_request(s.as_bytes(), &LIMITS)
    }

    fn rejected(s: &str) -> (Option<String>, ErrorCode, String) {
        match *parse(s).expect_err(s).event {
            Event::Error { id, code, message } => (id, code, message),
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn full_generate_request() {
        let r = parse(
            r#"{"op":"generate","id":"r1","messages":[{"role":"user","content":"hi"}],
                "max_tokens":12,"temperature":0.7,"top_p":0.8,"top_k":20,"min_p":0,
                "repetition_penalty":1.05,"seed":7,"stop":["\n\n"],"stream":false,"timeout_s":2.5}"#,
        )
        .expect("valid");
        let Op::Generate(g) = r.op else {
            panic!("not generate")
        };
        assert_eq!(g.id, "r1");
        assert_eq!(g.max_tokens, Some(12));
        assert_eq!(g.sampling.temperature, Some(0.7));
        assert_eq!(g.sampling.top_k, Some(20));
        assert_eq!(g.sampling.seed, Some(7));
        assert_eq!(g.stop, vec!["\n\n".to_string()]);
        assert!(!g.stream);
        assert_eq!(g.timeout, Some(Duration::from_millis(2500)));
        assert!(matches!(g.input, PromptInput::Messages(_)));
        let r = parse(r#"{"op":"generate","id":"r2","prompt":"x","reply_to":"me/replies"}"#)
            .expect("valid");
        assert_eq!(r.reply_to.as_deref(), Some("me/replies"));
    }

    #[test]
    fn other_ops() {
        assert_eq!(
            parse(r#"{"op":"cancel","id":"a"}"#).expect("cancel").op,
            Op::Cancel { id: "a".into() }
        );
        assert_eq!(
            parse(r#"{"op":"health"}"#).expect("health").op,
            Op::Health { id: None }
        );
        assert_eq!(
            parse(r#"{"op":"stats","id":"s"}"#).expect("stats").op,
            Op::Stats {
                id: Some("s".into())
            }
        );
    }

    #[test]
    fn bad_input_is_one_error_with_the_id_when_readable() {
        for (line, id, needle) in [
            ("{not json", None, "invalid JSON"),
            ("[1,2]", None, "JSON object"),
            ("\"hi\"", None, "JSON object"),
            (r#"{"id":"a"}"#, Some("a"), "missing field \"op\""),
            (r#"{"op":"dance","id":"a"}"#, Some("a"), "unknown op"),
            (r#"{"op":7,"id":"a"}"#, Some("a"), "op must be a string"),
            (
                r#"{"op":"generate","prompt":"x"}"#,
                None,
                "missing field \"id\"",
            ),
            (
                r#"{"op":"generate","id":5,"prompt":"x"}"#,
                None,
                "id must be a string",
            ),
            (
                r#"{"op":"generate","id":"a"}"#,
                Some("a"),
                "missing field \"messages\"",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":3}"#,
                Some("a"),
                "prompt must be a string",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":""}"#,
                Some("a"),
                "must not be empty",
            ),
            (
                r#"{"op":"generate","id":"a","messages":"hi"}"#,
                Some("a"),
                "messages must be a list",
            ),
            (
                r#"{"op":"generate","id":"a","messages":[]}"#,
                Some("a"),
                "must not be empty",
            ),
            (
                r#"{"op":"generate","id":"a","messages":[{"content":"x"}]}"#,
                Some("a"),
                "no \"role\"",
            ),
            (
                r#"{"op":"generate","id":"a","messages":[{"role":"user","content":1}]}"#,
                Some("a"),
                "content must be a string",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","max_tokens":0}"#,
                Some("a"),
                "at least 1",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","max_tokens":101}"#,
                Some("a"),
                "limit of 100",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","max_tokens":"5"}"#,
                Some("a"),
                "max_tokens must be",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","max_tokens":1.5}"#,
                Some("a"),
                "max_tokens must be",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","temperature":-1}"#,
                Some("a"),
                "temperature",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","temperature":"hot"}"#,
                Some("a"),
                "temperature",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","temperature":1e300}"#,
                Some("a"),
                "temperature",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","top_p":0}"#,
                Some("a"),
                "top_p",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","top_p":1.5}"#,
                Some("a"),
                "top_p",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","min_p":2}"#,
                Some("a"),
                "min_p",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","top_k":-3}"#,
                Some("a"),
                "top_k",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","repetition_penalty":0}"#,
                Some("a"),
                "repetition_penalty",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","seed":-1}"#,
                Some("a"),
                "seed",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","stop":[1]}"#,
                Some("a"),
                "stop strings",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","stop":[""]}"#,
                Some("a"),
                "stop strings",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","stream":"yes"}"#,
                Some("a"),
                "stream",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","timeout_s":0}"#,
                Some("a"),
                "timeout_s",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","timeout_s":61}"#,
                Some("a"),
                "limit of 60",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","max_token":5}"#,
                Some("a"),
                "unknown field \"max_token\"",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","messages":[]}"#,
                Some("a"),
                "not both",
            ),
            (
                r#"{"op":"generate","id":"a","prompt":"x","reply_to":"a/#"}"#,
                Some("a"),
                "reply_to",
            ),
            (r#"{"op":"cancel"}"#, None, "missing field \"id\""),
            (
                r#"{"op":"cancel","id":"a","x":1}"#,
                Some("a"),
                "unknown field",
            ),
            (r#"{"op":"health","id":3}"#, None, "id must be"),
        ] {
            let (got_id, code, message) = rejected(line);
            assert_eq!(got_id.as_deref(), id, "{line}");
            assert_eq!(code, ErrorCode::BadRequest, "{line}");
            assert!(message.contains(needle), "{line}: {message}");
        }
    }

    #[test]
    fn rejections_keep_a_readable_reply_to() {
        let r = parse(r#"{"op":"generate","id":"a","reply_to":"c/r"}"#).expect_err("no prompt");
        assert_eq!(r.reply_to.as_deref(), Some("c/r"));
    }

    #[test]
    fn error_messages_quote_values_briefly() {
        let long = format!(
            r#"{{"op":"generate","id":"a","prompt":"x","temperature":"{}"}}"#,
            "é".repeat(500)
        );
        let (_, _, message) = rejected(&long);
        assert!(message.len() < 200, "{message}");
    }

    #[test]
    fn events_serialize_as_in_the_protocol() {
        let token = Event::Token {
            id: "r1".into(),
            text: "Hel\nlo".into(),
        };
        assert_eq!(
            token.to_line(),
            r#"{"id":"r1","event":"token","text":"Hel\nlo"}"#
        );
        assert!(!token.is_terminal());
        let done = Event::Done {
            id: "r1".into(),
            text: "Hello".into(),
            finish: Finish::Length,
            stats: DoneStats {
                prompt_tokens: 9,
                completion_tokens: 31,
                ..DoneStats::default()
            },
        };
        let j = done.to_json();
        assert_eq!(j["finish_reason"], "length");
        assert_eq!(j["usage"]["completion_tokens"], 31);
        assert!(j["timings"]["ttft_ms"].is_number());
        assert!(done.is_terminal());
        let e = Event::error(None, ErrorCode::Busy, "queue full");
        assert_eq!(
            e.to_line(),
            r#"{"id":null,"event":"error","code":"busy","message":"queue full"}"#
        );
    }

    #[test]
    fn reply_topics() {
        assert!(valid_reply_topic("clients/abc/replies"));
        assert!(!valid_reply_topic(""));
        assert!(!valid_reply_topic("a/+/b"));
        assert!(!valid_reply_topic("$SYS/x"));
    }
}
