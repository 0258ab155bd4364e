//! Tool (function) calls in OpenAI's shape, written the way Qwen2.5 writes them.
//!
//! The chat template renders the tool definitions into the system prompt; the model answers a
//! call as `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>` (one block per call).
//! With `tool_choice` `required` or a named function the output is constrained to such blocks,
//! their JSON to the tools' parameter schemas; with `auto` the model chooses and the blocks it
//! writes are parsed afterwards.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value as Json};
use sha2::{Digest, Sha256};

use crate::chat::ChatMessage;

use super::{with_json_style, Constraint};

/// Most tools a request may define.
pub const MAX_TOOLS: usize = 64;
const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides (the default when tools are given).
    Auto,
    /// No call: the tools are not shown to the model.
    None,
    /// At least one call, of any tool.
    Required,
    /// One or more calls of this tool.
    Function(String),
}

/// The tools of a request and how they may be used.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    /// The `tools` list as the client sent it (validated), for the chat template.
    pub definitions: Vec<Json>,
    pub choice: ToolChoice,
}

/// One call the model made (`tool_calls` of a `done` event), as OpenAI writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as JSON text (an object).
    pub arguments: String,
}

impl Tools {
    /// Reads `tools` and `tool_choice` as a client sent them; the error is a sentence naming
    /// the field.
    pub fn parse(tools: Option<&Json>, choice: Option<&Json>) -> Result<Option<Tools>, String> {
        let definitions = match tools {
            None => Vec::new(),
            Some(Json::Array(items)) => {
                if items.len() > MAX_TOOLS {
                    return Err(format!("at most {MAX_TOOLS} tools"));
                }
                items
                    .iter()
                    .enumerate()
                    .map(|(i, t)| check_tool(t).map_err(|e| format!("tools[{i}]: {e}")))
                    .collect::<Result<_, _>>()?
            }
            Some(_) => return Err("tools must be a list of {\"type\": \"function\", …}".into()),
        };
        let names: Vec<&str> = definitions.iter().filter_map(tool_name).collect();
        if let Some(dup) = names
            .iter()
            .enumerate()
            .find(|(i, n)| names[..*i].contains(n))
        {
            return Err(format!("tools: the name {:?} is defined twice", dup.1));
        }
        let choice = match choice {
            None => ToolChoice::Auto,
            Some(Json::String(s)) => match s.as_str() {
                "auto" => ToolChoice::Auto,
                "none" => ToolChoice::None,
                "required" => ToolChoice::Required,
                other => {
                    return Err(format!(
                        "tool_choice must be \"auto\", \"none\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": …}}}}, got {other:?}"
                    ))
                }
            },
            Some(v) => {
                let name = v
                    .pointer("/function/name")
                    .and_then(Json::as_str)
                    .filter(|_| v.get("type").and_then(Json::as_str) == Some("function"));
                match name {
                    Some(n) if names.contains(&n) => ToolChoice::Function(n.to_string()),
                    Some(n) => return Err(format!("tool_choice names {n:?}, which is not in tools")),
                    None => {
                        return Err(
                            "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}".into(),
                        )
                    }
                }
            }
        };
        if definitions.is_empty() {
            return match choice {
                ToolChoice::Auto | ToolChoice::None => Ok(None),
                _ => Err("tool_choice asks for a call, but no tools are given".into()),
            };
        }
        Ok(Some(Tools {
            definitions,
            choice,
        }))
    }

    /// The tools the chat template shows the model (none with `tool_choice: "none"`).
    pub fn for_template(&self) -> Option<Json> {
        (self.choice != ToolChoice::None).then(|| Json::Array(self.definitions.clone()))
    }

    /// Whether `tool_choice` forces a call (`required` or a named function): the output then
    /// follows [`Tools::constraint`].
    pub fn forces_call(&self) -> bool {
        matches!(self.choice, ToolChoice::Required | ToolChoice::Function(_))
    }

    /// The constraint `required` and a named function put on the output: one or more call
    /// blocks whose JSON names an allowed tool and matches its parameters.
    pub fn constraint(&self) -> Option<Constraint> {
        let allowed: Vec<&Json> = match &self.choice {
            ToolChoice::Auto | ToolChoice::None => return None,
            ToolChoice::Required => self.definitions.iter().collect(),
            ToolChoice::Function(name) => self
                .definitions
                .iter()
                .filter(|t| tool_name(t) == Some(name.as_str()))
                .collect(),
        };
        let calls: Vec<Json> = allowed
            .iter()
            .map(|t| {
                let parameters = t
                    .pointer("/function/parameters")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object"}));
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": tool_name(t)},
                        "arguments": parameters,
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let schema = with_json_style(json!({ "anyOf": calls }));
        Some(Constraint::Lark(format!(
            "start: call (\"\\n\" call)*\ncall: \"{CALL_OPEN}\\n\" body \"\\n{CALL_CLOSE}\"\nbody: %json {schema}\n"
        )))
    }
}

fn tool_name(tool: &Json) -> Option<&str> {
    tool.pointer("/function/name").and_then(Json::as_str)
}

/// One `tools` entry: `{"type": "function", "function": {"name", "description"?,
/// "parameters"?}}`, the name made of letters, digits, `_` and `-` (at most 64, as OpenAI's).
fn check_tool(tool: &Json) -> Result<Json, String> {
    if tool.get("type").and_then(Json::as_str) != Some("function") {
        return Err("type must be \"function\"".into());
    }
    let Some(function) = tool.get("function").and_then(Json::as_object) else {
        return Err("function must be an object with a name".into());
    };
    match function.get("name").and_then(Json::as_str) {
        Some(n)
            if !n.is_empty()
                && n.len() <= 64
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') => {}
        _ => return Err("function.name must be 1-64 letters, digits, '_' or '-'".into()),
    }
    match function.get("parameters") {
        None | Some(Json::Object(_)) => {}
        Some(_) => return Err("function.parameters must be a JSON schema object".into()),
    }
    match function.get("description") {
        None | Some(Json::String(_)) => {}
        Some(_) => return Err("function.description must be a string".into()),
    }
    Ok(tool.clone())
}

impl Tools {
    /// Splits a reply into its text and the calls it makes (see [`parse_calls`]); a reply
    /// without call blocks that is nothing but a call of one of these tools in JSON (bare or
    /// in a ```json fence: how small Qwen2.5 models often answer) is a call too.
    pub fn calls_in(&self, reply: &str, request_id: &str) -> (String, Vec<ToolCall>) {
        let (text, calls) = parse_calls(reply, request_id);
        if !calls.is_empty() {
            return (text, calls);
        }
        let body = strip_fence(reply.trim());
        let known = |c: &ToolCall| {
            self.definitions
                .iter()
                .any(|t| tool_name(t) == Some(c.function.name.as_str()))
        };
        let calls: Option<Vec<ToolCall>> = match serde_json::from_str::<Json>(body) {
            Ok(Json::Array(items)) if !items.is_empty() => items
                .iter()
                .enumerate()
                .map(|(i, item)| call_of(&item.to_string(), request_id, i))
                .collect(),
            Ok(object @ Json::Object(_)) => {
                call_of(&object.to_string(), request_id, 0).map(|c| vec![c])
            }
            _ => None,
        };
        match calls {
            Some(calls) if calls.iter().all(known) => (String::new(), calls),
            _ => (text, Vec::new()),
        }
    }
}

/// The inside of a Markdown code fence (```json … ```), or the text as it is.
fn strip_fence(text: &str) -> &str {
    let Some(rest) = text.strip_prefix("```") else {
        return text;
    };
    let rest = rest.trim_start_matches(|c: char| c.is_ascii_alphanumeric());
    rest.strip_suffix("```").unwrap_or(rest).trim()
}

/// Splits a reply into its text and the calls it makes: every `<tool_call>` block whose JSON
/// has a string `name` and object `arguments` becomes a call (ids derived from `request_id`);
/// anything else stays text. The text is what remains outside the blocks, trimmed.
fn parse_calls(reply: &str, request_id: &str) -> (String, Vec<ToolCall>) {
    let mut text = String::new();
    let mut calls = Vec::new();
    let mut rest = reply;
    while let Some(start) = rest.find(CALL_OPEN) {
        let after = &rest[start + CALL_OPEN.len()..];
        // A reply cut at the end (eos or max_tokens right after the JSON) may lack the close.
        let (body, next) = match after.find(CALL_CLOSE) {
            Some(end) => (&after[..end], &after[end + CALL_CLOSE.len()..]),
            None => (after, ""),
        };
        match call_of(body, request_id, calls.len()) {
            Some(call) => {
                text.push_str(&rest[..start]);
                calls.push(call);
            }
            None => text.push_str(&rest[..rest.len() - next.len()]),
        }
        rest = next;
    }
    text.push_str(rest);
    (text.trim().to_string(), calls)
}

fn call_of(body: &str, request_id: &str, index: usize) -> Option<ToolCall> {
    let value: Json = serde_json::from_str(body.trim()).ok()?;
    let name = value.get("name")?.as_str()?.to_string();
    let arguments = match value.get("arguments") {
        Some(Json::Object(a)) => Json::Object(a.clone()).to_string(),
        // Some fine-tunes write the arguments as JSON text already.
        Some(Json::String(s)) if matches!(serde_json::from_str(s), Ok(Json::Object(_))) => {
            s.clone()
        }
        None => "{}".to_string(),
        _ => return None,
    };
    // Unique across requests that reuse an id (a client counting from 1 on each connection).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let digest = Sha256::digest(format!("{request_id}\n{index}\n{now}\n{body}"));
    Some(ToolCall {
        id: format!("call_{}", &hex::encode(digest)[..24]),
        kind: "function".into(),
        function: FunctionCall { name, arguments },
    })
}

/// The conversation as the chat template expects it: OpenAI clients send a call's `arguments`
/// as JSON text, Qwen2.5's template writes them with `tojson` and wants the object (as
/// transformers documents). Text that is not a JSON object is passed on unchanged.
pub fn template_messages(messages: &[ChatMessage]) -> Vec<ChatMessage> {
    messages
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if let Some(Json::Array(calls)) = m.extra.get_mut("tool_calls") {
                for call in calls.iter_mut() {
                    if let Some(Json::Object(f)) = call.get_mut("function") {
                        parse_arguments(f);
                    }
                }
            }
            m
        })
        .collect()
}

fn parse_arguments(function: &mut Map<String, Json>) {
    if let Some(Json::String(text)) = function.get("arguments") {
        if let Ok(Json::Object(object)) = serde_json::from_str(text) {
            function.insert("arguments".into(), Json::Object(object));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Json {
        json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"]}}}])
    }

    #[test]
    fn parses_choices_and_refuses_bad_tools() {
        let tools = weather();
        let t = Tools::parse(Some(&tools), None)
            .expect("valid")
            .expect("some");
        assert_eq!(t.choice, ToolChoice::Auto);
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let t = Tools::parse(Some(&tools), Some(&named))
            .expect("valid")
            .expect("some");
        assert_eq!(t.choice, ToolChoice::Function("get_weather".into()));
        for (tools, choice, needle) in [
            (json!({}), None, "must be a list"),
            (json!([{"type": "x"}]), None, "tools[0]: type"),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                None,
                "letters",
            ),
            (weather(), Some(json!("sometimes")), "tool_choice must be"),
            (
                weather(),
                Some(json!({"type": "function", "function": {"name": "nope"}})),
                "not in tools",
            ),
            (json!([]), Some(json!("required")), "no tools"),
        ] {
            let e = Tools::parse(Some(&tools), choice.as_ref()).expect_err(needle);
            assert!(e.contains(needle), "{e}");
        }
        assert_eq!(Tools::parse(None, Some(&json!("none"))), Ok(None));
    }

    #[test]
    fn splits_text_and_calls() {
        let reply = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"x\", \"arguments\": {}}";
        let (text, calls) = parse_calls(reply, "r1");
        assert_eq!(text, "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(calls[0].function.arguments, r#"{"city":"Oslo"}"#);
        assert_eq!(calls[1].function.arguments, "{}");
        assert_ne!(calls[0].id, calls[1].id);
        // A block that is not a call stays text.
        let (text, calls) = parse_calls("a <tool_call>oops</tool_call> b", "r");
        assert_eq!(
            (text.as_str(), calls.len()),
            ("a <tool_call>oops</tool_call> b", 0)
        );
    }

    #[test]
    fn a_bare_json_call_of_a_known_tool_counts() {
        let tools = Tools::parse(Some(&weather()), None)
            .expect("valid")
            .expect("some");
        let fenced =
            "```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n```";
        let (text, calls) = tools.calls_in(fenced, "r");
        assert_eq!((text.as_str(), calls.len()), ("", 1));
        assert_eq!(calls[0].function.arguments, r#"{"city":"Oslo"}"#);
        // Unknown tool, or JSON that is not a call: text.
        for reply in [
            "{\"name\": \"launch\", \"arguments\": {}}",
            "{\"city\": \"Oslo\"}",
            "It is sunny.",
        ] {
            let (text, calls) = tools.calls_in(reply, "r");
            assert_eq!((text.as_str(), calls.len()), (reply, 0));
        }
    }

    #[test]
    fn call_arguments_reach_the_template_as_objects() {
        let mut m = ChatMessage::assistant("");
        m.extra.insert(
            "tool_calls".into(),
            json!([{"id": "c", "type": "function",
                "function": {"name": "f", "arguments": "{\"a\": 1}"}}]),
        );
        let out = template_messages(&[m]);
        assert_eq!(
            out[0].extra["tool_calls"][0]["function"]["arguments"],
            json!({"a": 1})
        );
    }
}
