//! OpenAI's chat and text completion API over the wire protocol: a request body becomes a
//! `GenerateRequest` through the same field checks as a socket or MQTT request (after renaming
//! OpenAI's few different names), and the request's events become OpenAI's response object or
//! its server-sent chunks.
//!
//! Fields OpenAI has and this server does not implement are accepted only at their neutral
//! value (`n: 1`, `frequency_penalty: 0`, …), so a client never silently gets something other
//! than what it asked for; unknown fields are errors, as on the other transports.

use hyper::StatusCode;
use serde_json::{json, Map, Value as Json};

use crate::guide::tools::ToolChoice;
use crate::service::protocol::{
    parse_generate, ErrorCode, Event, EventBody, Finish, GenerateRequest, RequestLimits, Usage,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/completions`
    Completion,
}

/// A parsed request: what to generate and how to answer.
#[derive(Debug)]
pub struct Call {
    pub request: GenerateRequest,
    /// Server-sent events rather than one JSON object.
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the token counts.
    pub include_usage: bool,
}

/// Fields handed on to the wire protocol's checks under the same name.
const SHARED_FIELDS: [&str; 14] = [
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "response_format",
    "grammar",
    // Not OpenAI's, but llama.cpp's and vLLM's servers take them too.
    "top_k",
    "min_p",
    "repetition_penalty",
    "timeout_s",
    // Chat only (checked below).
    "messages",
    "tools",
    "tool_choice",
];

/// Fields read here, or accepted and ignored (`user`, `store`, `metadata`, …: bookkeeping of
/// OpenAI's service that changes nothing about the reply; llama.cpp's `cache_prompt`: the
/// prefix cache is always on here).
const OWN_FIELDS: [&str; 20] = [
    "model",
    "stream",
    "stream_options",
    "max_completion_tokens",
    "prompt",
    "n",
    "best_of",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "echo",
    "suffix",
    "parallel_tool_calls",
    "user",
    "store",
    "metadata",
    // llama.cpp's server's names, so its clients work unchanged.
    "cache_prompt",
    "repeat_penalty",
];

/// An error in OpenAI's shape with its HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`.
    pub kind: &'static str,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The error a refused or failed request's `error` event stands for; `busy` is 429 while
    /// the service takes requests and 503 once it is stopping.
    pub fn from_event(code: ErrorCode, message: String, accepting: bool) -> Self {
        match code {
            ErrorCode::BadRequest => Self::bad_request(message),
            ErrorCode::TooLong => Self::bad_request(message).with_code("context_length_exceeded"),
            ErrorCode::Busy if accepting => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
                    .with_code("queue_full")
            }
            ErrorCode::Busy => unavailable(message),
            ErrorCode::Timeout => Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", message)
                .with_code("timeout"),
            ErrorCode::Internal => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            }
            ErrorCode::Forbidden => Self::new(StatusCode::FORBIDDEN, "permission_error", message),
        }
    }

    pub fn body(&self) -> Json {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": null,
            "code": self.code,
        }})
    }
}

pub fn unavailable(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable_error",
        message,
    )
}

/// Reads a request body of `endpoint`; `id` becomes the request's id (and the response's).
pub fn parse(
    endpoint: Endpoint,
    body: &[u8],
    id: String,
    limits: &RequestLimits,
) -> Result<Call, ApiError> {
    let value: Json = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?;
    let Json::Object(obj) = value else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    let chat = endpoint == Endpoint::Chat;
    for key in obj.keys() {
        let known = SHARED_FIELDS.contains(&key.as_str()) || OWN_FIELDS.contains(&key.as_str());
        let wrong_endpoint = match key.as_str() {
            "messages"
            | "tools"
            | "tool_choice"
            | "max_completion_tokens"
            | "parallel_tool_calls"
            | "top_logprobs" => !chat,
            "prompt" | "echo" | "suffix" | "best_of" => chat,
            _ => false,
        };
        if !known || wrong_endpoint {
            let path = if chat {
                "/v1/chat/completions"
            } else {
                "/v1/completions"
            };
            return Err(ApiError::bad_request(format!(
                "unknown field {key:?} for {path}"
            )));
        }
    }
    neutral_only(&obj)?;
    // Which model: routed by the handler (with one model, any name goes to it).
    let model = match field(&obj, "model") {
        None => None,
        Some(Json::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::bad_request("model must be a string")),
    };
    let stream = match field(&obj, "stream") {
        None => false,
        Some(Json::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad_request("stream must be true or false")),
    };
    let include_usage = match field(&obj, "stream_options") {
        None => false,
        Some(Json::Object(o)) if stream => match o.get("include_usage") {
            None | Some(Json::Null) => false,
            Some(Json::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::bad_request(
                    "stream_options.include_usage must be true or false",
                ))
            }
        },
        Some(Json::Object(_)) => {
            return Err(ApiError::bad_request(
                "stream_options is only allowed with stream: true",
            ))
        }
        Some(_) => return Err(ApiError::bad_request("stream_options must be an object")),
    };

    let mut fields = Map::new();
    for key in SHARED_FIELDS {
        if let Some(v) = obj.get(key) {
            fields.insert(key.to_string(), v.clone());
        }
    }
    if let Some(n) = field(&obj, "max_completion_tokens") {
        match field(&obj, "max_tokens") {
            Some(m) if m != n => {
                return Err(ApiError::bad_request(
                    "max_tokens and max_completion_tokens differ; give one",
                ))
            }
            _ => fields.insert("max_tokens".into(), n.clone()),
        };
    }
    if let Some(p) = field(&obj, "repeat_penalty") {
        if field(&obj, "repetition_penalty").is_some_and(|r| r != p) {
            return Err(ApiError::bad_request(
                "repeat_penalty and repetition_penalty differ; give one",
            ));
        }
        fields.insert("repetition_penalty".into(), p.clone());
    }
    if field(&obj, "cache_prompt").is_some_and(|v| !v.is_boolean()) {
        return Err(ApiError::bad_request("cache_prompt must be true or false"));
    }
    if !chat {
        fields.insert("prompt".into(), prompt(&obj)?);
    }
    let mut request = parse_generate(id, &fields, limits).map_err(ApiError::bad_request)?;
    // A reply that may be a tool call is only known to be one (or not) at its end: its text
    // comes in the last chunks rather than as markup streamed token by token.
    let may_call = request
        .tools
        .as_ref()
        .is_some_and(|t| t.choice != ToolChoice::None);
    request.stream = stream && !may_call;
    request.model = model;
    Ok(Call {
        request,
        stream,
        include_usage,
    })
}

/// A field's value, with null the same as absent.
fn field<'a>(obj: &'a Map<String, Json>, key: &str) -> Option<&'a Json> {
    obj.get(key).filter(|v| !v.is_null())
}

/// The OpenAI fields this server does not implement, and what is said when one asks for
/// anything but the value that changes nothing (`is_neutral`).
const NEUTRAL_ONLY: [(&str, &str); 9] = [
    (
        "n",
        "n must be 1: this server returns one choice per request",
    ),
    ("best_of", "best_of must be 1"),
    (
        "frequency_penalty",
        "frequency_penalty is not supported (use repetition_penalty)",
    ),
    (
        "presence_penalty",
        "presence_penalty is not supported (use repetition_penalty)",
    ),
    ("logprobs", "logprobs are not supported"),
    ("top_logprobs", "top_logprobs are not supported"),
    ("logit_bias", "logit_bias is not supported"),
    ("echo", "echo is not supported"),
    ("suffix", "suffix is not supported"),
];

fn is_neutral(key: &str, v: &Json) -> bool {
    match key {
        "n" | "best_of" => v.as_u64() == Some(1),
        "frequency_penalty" | "presence_penalty" | "top_logprobs" => v.as_f64() == Some(0.0),
        "logprobs" | "echo" => v == &Json::Bool(false) || v.as_u64() == Some(0),
        "logit_bias" | "suffix" => {
            v.as_object().is_some_and(Map::is_empty) || v.as_str() == Some("")
        }
        _ => true,
    }
}

fn neutral_only(obj: &Map<String, Json>) -> Result<(), ApiError> {
    for (key, message) in NEUTRAL_ONLY {
        if field(obj, key).is_some_and(|v| !is_neutral(key, v)) {
            return Err(ApiError::bad_request(message));
        }
    }
    Ok(())
}

/// `/v1/completions`' prompt: a string, or a list holding one string.
fn prompt(obj: &Map<String, Json>) -> Result<Json, ApiError> {
    match field(obj, "prompt") {
        Some(p @ Json::String(_)) => Ok(p.clone()),
        Some(Json::Array(items)) => match items.as_slice() {
            [p @ Json::String(_)] => Ok(p.clone()),
            _ => Err(ApiError::bad_request(
                "prompt must be a string or a list of one string (token lists and batches are not supported)",
            )),
        },
        Some(_) => Err(ApiError::bad_request("prompt must be a string")),
        None => Err(ApiError::bad_request("missing field \"prompt\"")),
    }
}

/// What every response object and chunk of one request carries.
#[derive(Debug, Clone)]
pub struct Reply {
    pub id: String,
    pub endpoint: Endpoint,
    pub created: u64,
    pub model: String,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn wrap(&self, chunk: bool, choices: Json) -> Map<String, Json> {
        let mut m = Map::new();
        m.insert("id".into(), self.id.clone().into());
        m.insert("object".into(), self.object(chunk).into());
        m.insert("created".into(), self.created.into());
        m.insert("model".into(), self.model.clone().into());
        m.insert("system_fingerprint".into(), FINGERPRINT.into());
        m.insert("choices".into(), choices);
        m
    }

    /// The whole answer (`stream: false`) from the `done` event.
    pub fn response(&self, done: &EventBody) -> Json {
        let EventBody::Done {
            text,
            finish_reason,
            tool_calls,
            usage,
            ..
        } = done
        else {
            return Json::Null;
        };
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut message = Map::new();
                message.insert("role".into(), "assistant".into());
                let content = if text.is_empty() && !tool_calls.is_empty() {
                    Json::Null
                } else {
                    text.clone().into()
                };
                message.insert("content".into(), content);
                if !tool_calls.is_empty() {
                    message.insert("tool_calls".into(), json!(tool_calls));
                }
                json!({"index": 0, "message": message, "logprobs": null,
                       "finish_reason": finish_reason.as_str()})
            }
            Endpoint::Completion => json!({"index": 0, "text": text, "logprobs": null,
                                           "finish_reason": finish_reason.as_str()}),
        };
        let mut m = self.wrap(false, json!([choice]));
        m.insert("usage".into(), usage_json(usage));
        Json::Object(m)
    }
}

const FINGERPRINT: &str = concat!("qwen2-edge-", env!("CARGO_PKG_VERSION"));

fn usage_json(u: &Usage) -> Json {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// Turns one request's events into server-sent event chunks.
#[derive(Debug)]
pub struct ChunkWriter {
    reply: Reply,
    include_usage: bool,
    /// The request's text comes as `token` events (not: a reply that may be a tool call,
    /// whose text comes with its end).
    streamed: bool,
    /// Chat: the first chunk says the role.
    started: bool,
}

impl ChunkWriter {
    pub fn new(reply: Reply, call: &Call) -> Self {
        Self {
            reply,
            include_usage: call.include_usage,
            streamed: call.request.stream,
            started: false,
        }
    }

    /// Appends the chunks `event` stands for; true when it was the last (then `data: [DONE]`
    /// has been written too).
    pub fn push(&mut self, event: &Event, out: &mut Vec<u8>) -> bool {
        match &event.body {
            EventBody::Token { text } => {
                self.text(text, out);
                false
            }
            EventBody::Done {
                text,
                finish_reason,
                tool_calls,
                usage,
                ..
            } => {
                if !self.streamed && !text.is_empty() {
                    self.text(text, out);
                }
                if !tool_calls.is_empty() {
                    let calls: Vec<Json> = tool_calls
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            let mut v = json!(c);
                            v["index"] = i.into();
                            v
                        })
                        .collect();
                    self.delta(json!({"tool_calls": calls}), None, out);
                }
                self.finish(*finish_reason, out);
                if self.include_usage {
                    let mut m = self.reply.wrap(true, json!([]));
                    m.insert("usage".into(), usage_json(usage));
                    data(&Json::Object(m), out);
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                true
            }
            EventBody::Error { code, message } => {
                // After the response has begun, an error can only be a chunk of its own;
                // OpenAI's client libraries raise it.
                let e = ApiError::from_event(*code, message.clone(), true);
                data(&e.body(), out);
                out.extend_from_slice(b"data: [DONE]\n\n");
                true
            }
            EventBody::Health(_) | EventBody::Stats(_) => false,
        }
    }

    fn text(&mut self, text: &str, out: &mut Vec<u8>) {
        match self.reply.endpoint {
            Endpoint::Chat => self.delta(json!({"content": text}), None, out),
            Endpoint::Completion => {
                let choice = json!([{"index": 0, "text": text, "logprobs": null,
                                     "finish_reason": null}]);
                data(&Json::Object(self.reply.wrap(true, choice)), out);
                self.started = true;
            }
        }
    }

    fn finish(&mut self, reason: Finish, out: &mut Vec<u8>) {
        match self.reply.endpoint {
            Endpoint::Chat => self.delta(json!({}), Some(reason), out),
            Endpoint::Completion => {
                let choice = json!([{"index": 0, "text": "", "logprobs": null,
                                     "finish_reason": reason.as_str()}]);
                data(&Json::Object(self.reply.wrap(true, choice)), out);
            }
        }
    }

    /// A chat chunk; the first of a reply also carries the role.
    fn delta(&mut self, delta: Json, finish: Option<Finish>, out: &mut Vec<u8>) {
        let delta = if self.started {
            delta
        } else {
            self.started = true;
            let mut first = Map::new();
            first.insert("role".into(), "assistant".into());
            if let Json::Object(fields) = delta {
                first.extend(fields);
            }
            Json::Object(first)
        };
        let choice = json!([{"index": 0, "delta": delta, "logprobs": null,
                             "finish_reason": finish.map(Finish::as_str)}]);
        data(&Json::Object(self.reply.wrap(true, choice)), out);
    }
}

/// One server-sent event.
fn data(value: &Json, out: &mut Vec<u8>) {
    out.extend_from_slice(b"data: ");
    // Cannot fail: every key is a string.
    let _ = serde_json::to_writer(&mut *out, value);
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::service::protocol::{PromptInput, Timings};

    const LIMITS: RequestLimits = RequestLimits {
        max_new_tokens: 256,
        max_timeout: Duration::from_secs(60),
    };

    fn chat(body: Json) -> Result<Call, ApiError> {
        parse(
            Endpoint::Chat,
            body.to_string().as_bytes(),
            "c1".into(),
            &LIMITS,
        )
    }

    #[test]
    fn chat_bodies_become_generate_requests() {
        let call = chat(json!({
            "model": "anything", "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 7, "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true}, "n": 1, "user": "u", "seed": 3,
        }))
        .expect("valid");
        assert!(call.stream && call.include_usage && call.request.stream);
        assert_eq!(call.request.max_tokens, Some(7));
        assert_eq!(call.request.sampling.seed, Some(3));
        assert!(matches!(call.request.input, PromptInput::Messages(_)));
    }

    #[test]
    fn tool_requests_do_not_stream_markup() {
        let call = chat(json!({
            "messages": [{"role": "user", "content": "hi"}], "stream": true,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        }))
        .expect("valid");
        assert!(call.stream && !call.request.stream);
    }

    #[test]
    fn unsupported_and_unknown_fields_are_400() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        for (body, says) in [
            (json!({"messages": msgs, "n": 2}), "n must be 1"),
            (
                json!({"messages": msgs, "frequency_penalty": 0.5}),
                "frequency_penalty",
            ),
            (
                json!({"messages": msgs, "prompt": "x"}),
                "unknown field \"prompt\"",
            ),
            (
                json!({"messages": msgs, "colour": 1}),
                "unknown field \"colour\"",
            ),
            (
                json!({"messages": msgs, "stream_options": {}}),
                "only allowed with stream",
            ),
            (
                json!({"messages": msgs, "max_tokens": 3, "max_completion_tokens": 4}),
                "differ",
            ),
            (json!({"messages": msgs, "max_tokens": 0}), "max_tokens"),
            (json!({}), "messages"),
        ] {
            let e = chat(body.clone()).expect_err(&body.to_string());
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains(says), "{} lacks {says}", e.message);
        }
        let e = parse(Endpoint::Chat, b"{", "c".into(), &LIMITS).expect_err("bad json");
        assert!(e.message.starts_with("invalid JSON"));
    }

    #[test]
    fn completion_prompts() {
        let ok = |p: Json| {
            let body = json!({"prompt": p}).to_string();
            parse(Endpoint::Completion, body.as_bytes(), "x".into(), &LIMITS)
        };
        assert!(ok(json!("a")).is_ok());
        assert!(ok(json!(["a"])).is_ok());
        assert!(ok(json!(["a", "b"])).is_err());
        assert!(ok(json!([1, 2])).is_err());
    }

    #[test]
    fn chunks_end_with_done() {
        let reply = Reply {
            id: "c1".into(),
            endpoint: Endpoint::Chat,
            created: 1,
            model: "m".into(),
        };
        let call = chat(
            json!({"messages": [{"role": "user", "content": "hi"}], "stream": true,
                               "stream_options": {"include_usage": true}}),
        )
        .expect("valid");
        let mut w = ChunkWriter::new(reply, &call);
        let mut out = Vec::new();
        assert!(!w.push(&Event::token("c1", "Hi"), &mut out));
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: 1,
        };
        let done = Event::done("c1", "Hi".into(), Finish::Stop, usage, Timings::default());
        assert!(w.push(&done, &mut out));
        let text = String::from_utf8(out).expect("utf8");
        let events: Vec<&str> = text.split("\n\n").filter(|s| !s.is_empty()).collect();
        assert_eq!(events.len(), 4, "{text}");
        assert!(events[0].contains(r#""delta":{"role":"assistant","content":"Hi"}"#));
        assert!(events[1].contains(r#""finish_reason":"stop""#));
        assert!(
            events[2].contains(r#""choices":[],"#) && events[2].contains(r#""total_tokens":4"#)
        );
        assert_eq!(events[3], "data: [DONE]");
    }
}
