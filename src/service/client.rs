//! `qwen2-edge ask`: send one prompt to a running service and stream the answer to stdout.
//! An `error` event becomes an `Err` (the command exits non-zero); Ctrl-C cancels the request
//! and still prints what came back.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value as Json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::config::MqttSection;
use crate::sampling::SamplingOverrides;

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
    pub max_tokens: Option<usize>,
    pub sampling: SamplingOverrides,
    pub stop: Vec<String>,
    pub timeout_s: Option<f64>,
}

impl AskRequest {
    pub fn to_json(&self, id: &str) -> Json {
        let mut m = Map::new();
        m.insert("op".into(), json!("generate"));
        m.insert("id".into(), json!(id));
        if self.raw {
            m.insert("prompt".into(), json!(self.prompt));
        } else {
            let mut messages = Vec::new();
            if let Some(s) = &self.system {
                messages.push(json!({"role": "system", "content": s}));
            }
            messages.push(json!({"role": "user", "content": self.prompt}));
            m.insert("messages".into(), Json::Array(messages));
        }
        let mut opt = |k: &str, v: Option<Json>| {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        };
        opt("max_tokens", self.max_tokens.map(|v| json!(v)));
        let o = &self.sampling;
        opt("temperature", o.temperature.map(|v| json!(v)));
        opt("top_k", o.top_k.map(|v| json!(v)));
        opt("top_p", o.top_p.map(|v| json!(v)));
        opt("min_p", o.min_p.map(|v| json!(v)));
        opt("repetition_penalty", o.repetition_penalty.map(|v| json!(v)));
        opt("seed", o.seed.map(|v| json!(v)));
        opt("timeout_s", self.timeout_s.map(|v| json!(v)));
        if !self.stop.is_empty() {
            m.insert("stop".into(), json!(self.stop));
        }
        Json::Object(m)
    }
}

/// Prints events for one request; remembers whether text was streamed and how it ended.
struct Printer {
    streamed: bool,
    stats: bool,
    failure: Option<String>,
}

impl Printer {
    /// Returns true on the terminal event.
    fn event(&mut self, e: &Json) -> bool {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        match e.get("event").and_then(Json::as_str) {
            Some("token") => {
                if let Some(t) = e.get("text").and_then(Json::as_str) {
                    self.streamed = true;
                    let _ = out.write_all(t.as_bytes()).and_then(|()| out.flush());
                }
                false
            }
            Some("done") => {
                if !self.streamed {
                    if let Some(t) = e.get("text").and_then(Json::as_str) {
                        let _ = out.write_all(t.as_bytes());
                    }
                }
                let _ = writeln!(out).and_then(|()| out.flush());
                let finish = e.get("finish_reason").and_then(Json::as_str).unwrap_or("");
                if finish == "cancelled" || finish == "timeout" {
                    eprintln!("[{finish}]");
                }
                if self.stats {
                    eprintln!(
                        "[{finish}] usage {} timings {}",
                        e.get("usage").unwrap_or(&Json::Null),
                        e.get("timings").unwrap_or(&Json::Null)
                    );
                }
                true
            }
            Some("error") => {
                let code = e.get("code").and_then(Json::as_str).unwrap_or("error");
                let message = e.get("message").and_then(Json::as_str).unwrap_or("");
                if self.streamed {
                    let _ = writeln!(out);
                }
                self.failure = Some(format!("{code}: {message}"));
                true
            }
            _ => false,
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
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let id = format!("ask-{}-{nanos}", std::process::id());
    let body = request.to_json(&id);
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
                socket_exchange(path, &body, &id, &mut |e| printer.event(e)).await
            }
            Target::Mqtt(section) => {
                super::mqtt::client::exchange(section, &body, &id, wait_online, &mut |e| {
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
    request: &Json,
    id: &str,
    on_event: &mut dyn FnMut(&Json) -> bool,
) -> Result<()> {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .with_context(|| format!("cannot connect to {}", path.display()))?;
    let (reader, mut writer) = stream.into_split();
    let mut line = request.to_string();
    line.push('\n');
    writer.write_all(line.as_bytes()).await?;
    let mut lines = BufReader::new(reader).lines();
    let mut interrupted = false;
    loop {
        let next = tokio::select! {
            l = lines.next_line() => l,
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                let cancel = format!("{}\n", json!({"op": "cancel", "id": id}));
                writer.write_all(cancel.as_bytes()).await?;
                continue;
            }
        };
        let Some(text) = next? else {
            bail!("the service closed the connection before the answer was complete");
        };
        let Ok(event) = serde_json::from_str::<Json>(&text) else {
            continue;
        };
        let for_us = match event.get("id") {
            Some(Json::String(s)) => s == id,
            // An error about a line the service could not read names no id.
            Some(Json::Null) | None => event.get("event").and_then(Json::as_str) == Some("error"),
            _ => false,
        };
        if for_us && on_event(&event) {
            return Ok(());
        }
    }
}
