//! The fields of a `generate` request, each checked by hand so that its error names the field,
//! what it accepts and what came. Sampling ranges are `crate::sampling`'s; the limits that
//! depend on the service's config come in `RequestLimits`.

use std::time::Duration;

use serde_json::{Map, Value as Json};

use crate::chat::ChatMessage;
use crate::guide::tools::Tools;
use crate::guide::Constraint;
use crate::sampling::{self, SamplingOverrides};

use super::request::{short, GenerateRequest, PromptInput, RequestLimits};

/// Most stop strings a request may give, and their longest.
const MAX_STOP_STRINGS: usize = 16;
const MAX_STOP_BYTES: usize = 256;

/// A field's value, with null the same as absent ("the default").
fn field<'a>(obj: &'a Map<String, Json>, key: &str) -> Option<&'a Json> {
    obj.get(key).filter(|v| !v.is_null())
}

/// The fields of a generate request (`obj`, without `op`), checked; also what the HTTP front
/// end hands OpenAI's request bodies to, after renaming their fields.
pub fn parse_generate(
    id: String,
    obj: &Map<String, Json>,
    limits: &RequestLimits,
) -> Result<GenerateRequest, String> {
    let request = GenerateRequest {
        id,
        model: model(obj)?,
        input: prompt_input(obj)?,
        max_tokens: max_tokens(obj, limits)?,
        sampling: sampling_overrides(obj)?,
        stop: stop_strings(obj)?,
        stream: match field(obj, "stream") {
            None => true,
            Some(Json::Bool(b)) => *b,
            Some(v) => return Err(format!("stream must be true or false, got {}", short(v))),
        },
        timeout: timeout(obj, limits)?,
        constraint: constraint(obj)?,
        tools: Tools::parse(field(obj, "tools"), field(obj, "tool_choice"))?,
    };
    // A forced call has its own grammar (`Tools::constraint`): there is room for one.
    if request.tools.as_ref().is_some_and(Tools::forces_call) && request.constraint.is_some() {
        return Err(
            "tool_choice that forces a call cannot be combined with response_format or grammar"
                .into(),
        );
    }
    Ok(request)
}

/// `model`: the name of one of the service's models (checked when it is routed).
fn model(obj: &Map<String, Json>) -> Result<Option<String>, String> {
    match field(obj, "model") {
        None => Ok(None),
        Some(Json::String(s)) if !s.is_empty() && s.len() <= 256 => Ok(Some(s.clone())),
        Some(v) => Err(format!(
            "model must be the name of one of this service's models, got {}",
            short(v)
        )),
    }
}

/// `response_format` (OpenAI's) or `grammar`; at most one.
fn constraint(obj: &Map<String, Json>) -> Result<Option<Constraint>, String> {
    let format = field(obj, "response_format")
        .map(response_format)
        .transpose()?
        .flatten();
    let grammar = field(obj, "grammar").map(grammar).transpose()?;
    match (format, grammar) {
        (Some(_), Some(_)) => Err("give response_format or grammar, not both".into()),
        (f, g) => Ok(f.or(g)),
    }
}

const RESPONSE_FORMATS: &str = "{\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": {\"name\": …, \"schema\": {…}}}";

fn response_format(v: &Json) -> Result<Option<Constraint>, String> {
    let kind = v.get("type").and_then(Json::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject)),
        Some("json_schema") => match v.pointer("/json_schema/schema") {
            Some(schema @ Json::Object(_)) => Ok(Some(Constraint::JsonSchema(schema.clone()))),
            Some(other) => Err(format!(
                "response_format.json_schema.schema must be a JSON schema object, got {}",
                short(other)
            )),
            None => Err("response_format.json_schema.schema is missing".into()),
        },
        _ => Err(format!(
            "response_format must be {RESPONSE_FORMATS}, got {}",
            short(v)
        )),
    }
}

fn grammar(v: &Json) -> Result<Constraint, String> {
    let value = v.get("value").and_then(Json::as_str);
    match (v.get("type").and_then(Json::as_str), value) {
        (Some("lark"), Some(text)) => Ok(Constraint::Lark(text.to_string())),
        (Some("regex"), Some(rx)) => Ok(Constraint::Regex(rx.to_string())),
        _ => Err(format!(
            "grammar must be {{\"type\": \"lark\" or \"regex\", \"value\": \"…\"}}, got {}",
            short(v)
        )),
    }
}

fn prompt_input(obj: &Map<String, Json>) -> Result<PromptInput, String> {
    match (obj.get("messages"), obj.get("prompt")) {
        (Some(_), Some(_)) => Err("give either \"messages\" or \"prompt\", not both".into()),
        (None, None) => Err("missing field \"messages\" (or \"prompt\")".into()),
        (Some(m), None) => Ok(PromptInput::Messages(messages(m)?)),
        (None, Some(Json::String(p))) if p.is_empty() => Err("prompt must not be empty".into()),
        (None, Some(Json::String(p))) => Ok(PromptInput::Raw(p.clone())),
        (None, Some(v)) => Err(format!("prompt must be a string, got {}", short(v))),
    }
}

fn max_tokens(obj: &Map<String, Json>, limits: &RequestLimits) -> Result<Option<usize>, String> {
    let Some(v) = field(obj, "max_tokens") else {
        return Ok(None);
    };
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
    Ok(Some(n as usize))
}

/// The sampling fields; their ranges are `crate::sampling`'s.
fn sampling_overrides(obj: &Map<String, Json>) -> Result<SamplingOverrides, String> {
    Ok(SamplingOverrides {
        temperature: float(obj, &sampling::TEMPERATURE)?,
        top_p: float(obj, &sampling::TOP_P)?,
        top_k: field(obj, "top_k")
            .map(|v| uint(v, "top_k").map(|k| k.min(usize::MAX as u64) as usize))
            .transpose()?,
        min_p: float(obj, &sampling::MIN_P)?,
        repetition_penalty: float(obj, &sampling::REPETITION_PENALTY)?,
        seed: field(obj, "seed").map(|v| uint(v, "seed")).transpose()?,
    })
}

fn stop_strings(obj: &Map<String, Json>) -> Result<Vec<String>, String> {
    match field(obj, "stop") {
        None => Ok(Vec::new()),
        Some(Json::String(s)) => Ok(vec![stop_string(s)?]),
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
                .collect()
        }
        Some(v) => Err(format!(
            "stop must be a string or a list of strings, got {}",
            short(v)
        )),
    }
}

fn timeout(obj: &Map<String, Json>, limits: &RequestLimits) -> Result<Option<Duration>, String> {
    let Some(v) = field(obj, "timeout_s") else {
        return Ok(None);
    };
    let max = limits.max_timeout.as_secs_f64();
    match v.as_f64() {
        Some(t) if t > 0.0 && t <= max => Ok(Some(Duration::from_secs_f64(t))),
        Some(t) if t > max => Err(format!(
            "timeout_s is {t}, above this service's limit of {max}"
        )),
        _ => Err(format!("timeout_s must be a number > 0, got {}", short(v))),
    }
}

/// A non-empty list of message objects, each with a string role and (if any) string content.
fn messages(v: &Json) -> Result<Vec<ChatMessage>, String> {
    let Json::Array(items) = v else {
        return Err(format!(
            "messages must be a list of objects, got {}",
            short(v)
        ));
    };
    if items.is_empty() {
        return Err("messages must not be empty".into());
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| match m {
            Json::Object(m) => message(i, m),
            _ => Err(format!("messages[{i}] must be an object")),
        })
        .collect()
}

/// `messages[i]`: the role and content checked and taken out, every other key (a null content
/// included) kept as sent for the chat template.
fn message(i: usize, m: &Map<String, Json>) -> Result<ChatMessage, String> {
    let role = match m.get("role") {
        Some(Json::String(r)) if !r.is_empty() => r.clone(),
        Some(other) => {
            return Err(format!(
                "messages[{i}].role must be a non-empty string, got {}",
                short(other)
            ))
        }
        None => return Err(format!("messages[{i}] has no \"role\"")),
    };
    let content = match m.get("content") {
        None | Some(Json::Null) => None,
        Some(Json::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(format!(
                "messages[{i}].content must be a string, got {}",
                short(other)
            ))
        }
    };
    let extra = m
        .iter()
        .filter(|(k, _)| *k != "role" && !(*k == "content" && content.is_some()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(ChatMessage {
        role,
        content,
        extra,
    })
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

/// A sampling number checked against its range (finite as an f32 too: 1e300 is no temperature).
fn float(obj: &Map<String, Json>, range: &sampling::Range) -> Result<Option<f32>, String> {
    let Some(v) = field(obj, range.name) else {
        return Ok(None);
    };
    match v.as_f64() {
        Some(x) if x.is_finite() && (x as f32).is_finite() && range.accepts(x as f32) => {
            Ok(Some(x as f32))
        }
        _ => Err(format!(
            "{} must be {}, got {}",
            range.name,
            range.expected,
            short(v)
        )),
    }
}
