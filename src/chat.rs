//! Chat messages: the one type the CLI (`generate`, `chat`), the `ask` client, the service's
//! request parser and the chat template renderer share, so a conversation is built and read
//! the same way everywhere.
//!
//! A message is what transformers' `apply_chat_template` takes: a `role`, usually a `content`
//! string, and whatever else a template may read (`tool_calls`, `name`, …). Those other keys are
//! carried as given, so a client's tool-call turns reach the template unchanged.

use serde::Serialize;
use serde_json::{Map, Value as Json};

/// One turn of a conversation, serialized as the JSON object a chat template sees (and the
/// wire protocol's `messages` items): `{"role": …, "content": …, <other keys>}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, … (never empty on the wire).
    pub role: String,
    /// The text of the turn. `None`: the message has no text (absent or null on the wire; a
    /// null sent by a client stays in `extra`, so the template sees it as it was sent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Every other key as the client sent it (`tool_calls`, `name`, …), in its order, handed to
    /// the chat template unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Json>,
}

impl ChatMessage {
    /// A message with text and nothing else.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Some(content.into()),
            extra: Map::new(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// The messages of one user turn, with an optional system prompt first (without one, the
/// template's own default system prompt applies, as in transformers).
pub fn single_turn(system: Option<&str>, user: &str) -> Vec<ChatMessage> {
    system
        .map(ChatMessage::system)
        .into_iter()
        .chain([ChatMessage::user(user)])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_a_template_sees_it() {
        let messages = single_turn(Some("be brief"), "hi");
        assert_eq!(
            serde_json::to_string(&messages).expect("serialize"),
            r#"[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]"#
        );
        let mut extra = Map::new();
        extra.insert("content".into(), Json::Null);
        extra.insert("tool_calls".into(), serde_json::json!([{"name": "f"}]));
        let call = ChatMessage {
            role: "assistant".into(),
            content: None,
            extra,
        };
        assert_eq!(
            serde_json::to_string(&call).expect("serialize"),
            r#"{"role":"assistant","content":null,"tool_calls":[{"name":"f"}]}"#
        );
    }
}
