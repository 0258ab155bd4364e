//! What clients send: requests parsed and validated by hand into plain types.
//!
//! By hand rather than with serde's `Deserialize`, because the errors are part of the protocol:
//! the id and `reply_to` are read before anything else so that every later error can be
//! addressed, and each message names the field, what it accepts and (briefly) what came.
//! Everything a client sends is untrusted: parsing never panics.

use std::time::Duration;

use serde_json::{Map, Value as Json};

use crate::chat::ChatMessage;
use crate::guide::tools::Tools;
use crate::guide::Constraint;
use crate::sampling::SamplingOverrides;

use super::event::{ErrorCode, Event};
use super::generate::parse_generate;

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Chat messages, rendered with the bundle's chat template.
    Messages(Vec<ChatMessage>),
    /// Text sent as is (like `generate --raw`).
    Raw(String),
}

/// `{"op":"generate", …}`; None fields take the service's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// Non-empty, at most 256 bytes; echoed in every event of the request.
    pub id: String,
    /// `model`: which of the service's models answers (None: the first).
    pub model: Option<String>,
    /// `messages` (a non-empty list) or `prompt` (a non-empty string), never both.
    pub input: PromptInput,
    /// At least 1, at most `limits.max_new_tokens`.
    pub max_tokens: Option<usize>,
    /// `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`, `seed`.
    pub sampling: SamplingOverrides,
    /// `stop`: a string or up to 16 strings of 1–256 bytes.
    pub stop: Vec<String>,
    /// `stream` (default true): send `token` events.
    pub stream: bool,
    /// `timeout_s`: more than 0, at most `limits.request_timeout_s`.
    pub timeout: Option<Duration>,
    /// `response_format` (json_object, json_schema) or `grammar` (lark, regex): what the
    /// output must match. Compiled at submission.
    pub constraint: Option<Constraint>,
    /// `tools` and `tool_choice` (None without tools).
    pub tools: Option<Tools>,
}

/// The two questions about the service itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    Health,
    Stats,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Boxed: by far the largest op.
    Generate(Box<GenerateRequest>),
    /// Ends the request with this id (on this connection / reply topic).
    Cancel { id: String },
    /// `health` or `stats`, with an optional id echoed in the answer.
    Query { query: Query, id: Option<String> },
    /// Load the model the config names now (as SIGHUP does); the answer is `health`. Unix
    /// socket only, when `unix_socket.allow_reload` is on.
    Reload { id: Option<String> },
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

/// Longest id and reply topic we accept: ids are echoed in every event.
const MAX_ID_BYTES: usize = 256;
const MAX_REPLY_TOPIC_BYTES: usize = 1024;

const GENERATE_FIELDS: [&str; 21] = [
    "op",
    "id",
    "model",
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
    "response_format",
    "grammar",
    "tools",
    "tool_choice",
    "reply_to",
    // Free for the client (a trace id, a label): echoed nowhere, never an error.
    "meta",
];

/// The fields of `cancel`, `health` and `stats`.
const OTHER_FIELDS: [&str; 4] = ["op", "id", "reply_to", "meta"];

/// Parses one request (a socket line or an MQTT payload).
pub fn parse_request(bytes: &[u8], limits: &RequestLimits) -> Result<Request, Rejection> {
    let unaddressed = |message: &str| Rejection {
        event: Box::new(Event::error(None, ErrorCode::BadRequest, message)),
        reply_to: None,
    };
    let value: Json =
        serde_json::from_slice(bytes).map_err(|e| unaddressed(&format!("invalid JSON: {e}")))?;
    let Json::Object(obj) = value else {
        return Err(unaddressed("a request is a JSON object"));
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
    match parse_op(&obj, id.as_deref(), reply_to.is_some(), limits) {
        Ok(op) => Ok(Request { op, reply_to }),
        Err(message) => Err(Rejection {
            event: Box::new(Event::error(id.as_deref(), ErrorCode::BadRequest, message)),
            reply_to,
        }),
    }
}

/// The op and its fields; `id` is the request's id when it is valid, `reply_to_ok` whether a
/// `reply_to` field (if any) is.
fn parse_op(
    obj: &Map<String, Json>,
    id: Option<&str>,
    reply_to_ok: bool,
    limits: &RequestLimits,
) -> Result<Op, String> {
    if let Some(v) = obj.get("reply_to") {
        if !reply_to_ok {
            return Err(format!(
                "reply_to must be an MQTT topic name (no '+', '#', no leading '$', at most {MAX_REPLY_TOPIC_BYTES} bytes), got {}",
                short(v)
            ));
        }
    }
    let op = match obj.get("op") {
        None => {
            return Err("missing field \"op\" (generate, cancel, health, stats or reload)".into())
        }
        Some(Json::String(s)) => s.as_str(),
        Some(v) => return Err(format!("op must be a string, got {}", short(v))),
    };
    match op {
        "generate" => {
            if let Some(k) = obj.keys().find(|k| !GENERATE_FIELDS.contains(&k.as_str())) {
                return Err(format!("unknown field {k:?} in a generate request"));
            }
            let id = required_id(obj, "generate")?;
            Ok(Op::Generate(Box::new(parse_generate(id, obj, limits)?)))
        }
        "cancel" => {
            only_fields(obj, &OTHER_FIELDS)?;
            Ok(Op::Cancel {
                id: required_id(obj, "cancel")?,
            })
        }
        "health" | "stats" | "reload" => {
            only_fields(obj, &OTHER_FIELDS)?;
            if let Some(v) = obj.get("id") {
                if id.is_none() {
                    return Err(format!(
                        "id must be a non-empty string of at most {MAX_ID_BYTES} bytes, got {}",
                        short(v)
                    ));
                }
            }
            let id = id.map(str::to_string);
            Ok(match op {
                "health" => Op::Query {
                    query: Query::Health,
                    id,
                },
                "stats" => Op::Query {
                    query: Query::Stats,
                    id,
                },
                _ => Op::Reload { id },
            })
        }
        other => Err(format!(
            "unknown op {other:?} (expected generate, cancel, health, stats or reload)"
        )),
    }
}

/// The id of an op that needs one (`what` names the op in the error).
fn required_id(obj: &Map<String, Json>, what: &str) -> Result<String, String> {
    match obj.get("id") {
        None => Err(format!("missing field \"id\" ({what} needs one)")),
        Some(Json::String(s)) if s.is_empty() => Err("id must not be empty".into()),
        Some(Json::String(s)) if s.len() > MAX_ID_BYTES => {
            Err(format!("id is longer than {MAX_ID_BYTES} bytes"))
        }
        Some(Json::String(s)) => Ok(s.clone()),
        Some(v) => Err(format!("id must be a string, got {}", short(v))),
    }
}

fn only_fields(obj: &Map<String, Json>, allowed: &[&str]) -> Result<(), String> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!("unknown field {k:?} for this op")),
        None => Ok(()),
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
pub(super) fn short(v: &Json) -> String {
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
    use crate::service::protocol::EventBody;

    const LIMITS: RequestLimits = RequestLimits {
        max_new_tokens: 100,
        max_timeout: Duration::from_secs(60),
    };

    fn parse(s: &str) -> Result<Request, Rejection> {
        parse_request(s.as_bytes(), &LIMITS)
    }

    fn rejected(s: &str) -> (Option<String>, ErrorCode, String) {
        let event = *parse(s).expect_err(s).event;
        match event.body {
            EventBody::Error { code, message } => (event.id, code, message),
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
        assert_eq!(g.model, None);
        let r = parse(r#"{"op":"generate","id":"r2","prompt":"x","reply_to":"me/replies"}"#)
            .expect("valid");
        assert_eq!(r.reply_to.as_deref(), Some("me/replies"));
        let r = parse(r#"{"op":"generate","id":"r3","prompt":"x","model":"assistant"}"#)
            .expect("valid");
        let Op::Generate(g) = r.op else {
            panic!("not generate")
        };
        assert_eq!(g.model.as_deref(), Some("assistant"));
    }

    #[test]
    fn other_ops() {
        assert_eq!(
            parse(r#"{"op":"cancel","id":"a"}"#).expect("cancel").op,
            Op::Cancel { id: "a".into() }
        );
        assert_eq!(
            parse(r#"{"op":"health"}"#).expect("health").op,
            Op::Query {
                query: Query::Health,
                id: None
            }
        );
        assert_eq!(
            parse(r#"{"op":"stats","id":"s"}"#).expect("stats").op,
            Op::Query {
                query: Query::Stats,
                id: Some("s".into())
            }
        );
        assert_eq!(
            parse(r#"{"op":"reload","id":"r"}"#).expect("reload").op,
            Op::Reload {
                id: Some("r".into())
            }
        );
        assert!(parse(r#"{"op":"reload","bundle":"/x"}"#).is_err());
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
                r#"{"op":"generate","id":"a","prompt":"x","model":7}"#,
                Some("a"),
                "model must be the name",
            ),
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
    fn messages_keep_what_the_template_may_read() {
        let r = parse(
            r#"{"op":"generate","id":"m","messages":[
                {"role":"system","content":"be brief"},
                {"role":"assistant","content":null,"tool_calls":[{"name":"f"}]},
                {"content":"hi","role":"user","name":"ann"}]}"#,
        )
        .expect("valid");
        let Op::Generate(g) = r.op else {
            panic!("not generate")
        };
        let PromptInput::Messages(m) = g.input else {
            panic!("not messages")
        };
        assert_eq!(m[0], ChatMessage::system("be brief"));
        assert_eq!(
            serde_json::to_string(&m).expect("serialize"),
            concat!(
                r#"[{"role":"system","content":"be brief"},"#,
                r#"{"role":"assistant","content":null,"tool_calls":[{"name":"f"}]},"#,
                r#"{"role":"user","content":"hi","name":"ann"}]"#
            )
        );
    }

    #[test]
    fn reply_topics() {
        assert!(valid_reply_topic("clients/abc/replies"));
        assert!(!valid_reply_topic(""));
        assert!(!valid_reply_topic("a/+/b"));
        assert!(!valid_reply_topic("$SYS/x"));
    }

    #[test]
    fn structured_output_fields() {
        let generate = |extra: &str| {
            let line = format!(r#"{{"op":"generate","id":"s","prompt":"x",{extra}}}"#);
            match parse(&line).expect(&line).op {
                Op::Generate(g) => *g,
                other => panic!("{other:?}"),
            }
        };
        let g = generate(r#""response_format":{"type":"json_object"}"#);
        assert_eq!(g.constraint, Some(Constraint::JsonObject));
        let g = generate(
            r#""response_format":{"type":"json_schema","json_schema":{"name":"n","schema":{"type":"object"},"strict":true}}"#,
        );
        assert!(matches!(g.constraint, Some(Constraint::JsonSchema(_))));
        assert_eq!(
            generate(r#""response_format":{"type":"text"}"#).constraint,
            None
        );
        let g = generate(r#""grammar":{"type":"regex","value":"a+"}"#);
        assert_eq!(g.constraint, Some(Constraint::Regex("a+".into())));
        let g = generate(
            r#""tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"required""#,
        );
        let tools = g.tools.expect("tools");
        assert_eq!(tools.choice, crate::guide::tools::ToolChoice::Required);
        assert!(tools.constraint().is_some());
        for (extra, needle) in [
            (r#""response_format":"json""#, "response_format must be"),
            (
                r#""response_format":{"type":"json_schema","json_schema":{"name":"n"}}"#,
                "schema is missing",
            ),
            (r#""grammar":{"type":"lark"}"#, "grammar must be"),
            (
                r#""grammar":{"type":"regex","value":"a"},"response_format":{"type":"json_object"}"#,
                "not both",
            ),
            (
                r#""tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"required","response_format":{"type":"json_object"}"#,
                "cannot be combined",
            ),
            (r#""tools":"f""#, "tools must be a list"),
        ] {
            let line = format!(r#"{{"op":"generate","id":"s","prompt":"x",{extra}}}"#);
            let (id, code, message) = rejected(&line);
            assert_eq!((id.as_deref(), code), (Some("s"), ErrorCode::BadRequest));
            assert!(message.contains(needle), "{line}: {message}");
        }
    }
}
