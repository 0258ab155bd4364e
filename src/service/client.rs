//! `qwen2-edge ask`: send one prompt to a running service and stream the answer to stdout.
//! An `error` event becomes an `Err` (the command exits non-zero); Ctrl-C cancels the request
//! and still prints what came back.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::chat::{self, ChatMessage};
use crate::config::MqttSection;
use crate::sampling::SamplingOverrides;

use super::protocol::{Event, EventBody, Finish};

pub enum Target {
    Socket(PathBuf),
    /// Broker address, topic prefix and credentials as in the service's `[mqtt]` section.
    Mqtt(Box<MqttSection>),
}

#[derive(Debug, Clone, Default)]
pub struct AskRequest {
    pub prompt: String,
    /// Send the prompt as is instead of as one user message.
    pub raw: bool,
    pub system: Option<String>,
    /// The service's model to ask (None: its default).
    pub model: Option<String>,
    pub max_tokens: Option<usize>,
    pub sampling: SamplingOverrides,
    pub stop: Vec<String>,
    pub timeout_s: Option<f64>,
}

impl AskRequest {
    /// The `generate` request, one line of JSON.
    pub fn to_line(&self, id: &str) -> String {
        let (prompt, messages) = if self.raw {
            (Some(self.prompt.as_str()), None)
        } else {
            (
                None,
                Some(chat::single_turn(self.system.as_deref(), &self.prompt)),
            )
        };
        let o = &self.sampling;
        to_line(&Generate {
            op: "generate",
            id,
            model: self.model.as_deref(),
            prompt,
            messages,
            max_tokens: self.max_tokens,
            temperature: o.temperature,
            top_k: o.top_k,
            top_p: o.top_p,
            min_p: o.min_p,
            repetition_penalty: o.repetition_penalty,
            seed: o.seed,
            timeout_s: self.timeout_s,
            stop: &self.stop,
        })
    }
}

/// What `ask` sends: a `generate` request with only the fields it sets (the service's parser,
/// `protocol::parse_request`, documents each).
#[derive(Serialize)]
struct Generate<'a> {
    op: &'static str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<Vec<ChatMessage>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    repetition_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_s: Option<f64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
}

/// `{"op":"cancel","id":…}`, sent on Ctrl-C.
#[derive(Serialize)]
struct Cancel<'a> {
    op: &'static str,
    id: &'a str,
}

/// The cancel request for `id`, one line of JSON.
pub(super) fn cancel_line(id: &str) -> String {
    to_line(&Cancel { op: "cancel", id })
}

/// Requests are plain structs of strings and numbers: serializing them cannot fail.
fn to_line<T: Serialize>(request: &T) -> String {
    serde_json::to_string(request).unwrap_or_default()
}

/// Nanoseconds since the epoch (0 if the clock is before it): unique enough for request and
/// client ids, and a cheap source of jitter.
pub(super) fn clock_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Prints events for one request; remembers whether text was streamed and how it ended.
struct Printer {
    streamed: bool,
    stats: bool,
    failure: Option<String>,
}

impl Printer {
    /// Returns true on the terminal event.
    fn event(&mut self, e: &Event) -> bool {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        match &e.body {
            EventBody::Token { text } => {
                self.streamed = true;
                let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
                false
            }
            EventBody::Done {
                text,
                finish_reason,
                tool_calls,
                usage,
                timings,
                ..
            } => {
                if !self.streamed {
                    let _ = out.write_all(text.as_bytes());
                }
                for call in tool_calls {
                    let _ = writeln!(out, "{}", to_line(call));
                }
                let _ = writeln!(out).and_then(|()| out.flush());
                let finish = finish_reason.as_str();
                if matches!(finish_reason, Finish::Cancelled | Finish::Timeout) {
                    eprintln!("[{finish}]");
                }
                if self.stats {
                    eprintln!(
                        "[{finish}] usage {} timings {}",
                        to_line(usage),
                        to_line(timings)
                    );
                }
                true
            }
            EventBody::Error { code, message } => {
                if self.streamed {
                    let _ = writeln!(out);
                }
                self.failure = Some(format!("{}: {message}", code.as_str()));
                true
            }
            EventBody::Health(_) | EventBody::Stats(_) => false,
        }
    }
}

/// Sends the request and streams the answer to stdout.
/// `wait_online` (MQTT only): hold the request until the service's status says `online`.
pub fn ask(
    target: &Target,
    request: &AskRequest,
    wait_online: Option<std::time::Duration>,
    stats: bool,
) -> Result<()> {
    let id = format!("ask-{}-{}", std::process::id(), clock_nanos());
    let line = request.to_line(&id);
    let mut printer = Printer {
        streamed: false,
        stats,
        failure: None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match target {
            Target::Socket(path) => {
                socket_exchange(path, &line, &id, &mut |e| printer.event(e)).await
            }
            Target::Mqtt(section) => {
                super::mqtt::client::exchange(section, &line, &id, wait_online, &mut |e| {
                    printer.event(e)
                })
                .await
            }
        }
    })?;
    match printer.failure {
        Some(f) => Err(anyhow!(f)),
        None => Ok(()),
    }
}

async fn socket_exchange(
    path: &std::path::Path,
    request: &str,
    id: &str,
    on_event: &mut dyn FnMut(&Event) -> bool,
) -> Result<()> {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .with_context(|| format!("cannot connect to {}", path.display()))?;
    let (reader, mut writer) = stream.into_split();
    writer.write_all(format!("{request}\n").as_bytes()).await?;
    let mut lines = BufReader::new(reader).lines();
    let mut interrupted = false;
    loop {
        let next = tokio::select! {
            l = lines.next_line() => l,
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                writer.write_all(format!("{}\n", cancel_line(id)).as_bytes()).await?;
                continue;
            }
        };
        let Some(text) = next? else {
            bail!("the service closed the connection before the answer was complete");
        };
        let Ok(event) = serde_json::from_str::<Event>(&text) else {
            continue;
        };
        let for_us = match event.id() {
            Some(s) => s == id,
            // An error about a line the service could not read names no id.
            None => matches!(event.body, EventBody::Error { .. }),
        };
        if for_us && on_event(&event) {
            return Ok(());
        }
    }
}
