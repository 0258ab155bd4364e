//! The `[mqtt]` section: broker address, topics, session and TLS settings, and their checks.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{at_most, err, positive, ConfigError};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    /// false: the section is kept (and checked) but MQTT stays off.
    pub enabled: bool,
    /// mqtt://host:port, or mqtts://host:port for TLS.
    pub url: String,
    pub client_id: String,
    pub topic_prefix: String,
    /// Non-empty: subscribe as $share/<group>/<prefix>/request so several boxes split the load.
    pub shared_group: String,
    /// Retained online/offline topic; empty: <prefix>/status.
    pub status_topic: String,
    /// Retained JSON of the `stats` op, published every `stats_interval_s`; empty:
    /// <prefix>/stats.
    pub stats_topic: String,
    /// 0: stats are not published.
    pub stats_interval_s: u64,
    pub username: String,
    pub password: String,
    /// A file holding the password (first line); wins over `password`.
    pub password_file: PathBuf,
    /// PEM CA certificate(s) that sign the broker's certificate (mqtts:// only).
    pub ca_file: PathBuf,
    /// PEM client certificate and key for brokers that require one (mqtts:// only).
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    pub keep_alive_s: u64,
    /// How long the broker keeps the service's session (subscription and queued requests)
    /// while it is away, e.g. during a restart.
    pub session_expiry_s: u32,
    /// Token events for one request are collected for this long and sent as one message
    /// (0: one message per text piece).
    pub token_interval_ms: u64,
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
    /// Take `{"op":"reload"}` on `<prefix>/reload` (never shared: every box on the prefix
    /// reloads). MQTT cannot say who published: only turn it on with a broker whose ACL lets
    /// nobody but the fleet's operator write that topic.
    pub allow_reload: bool,
    /// Non-empty: accepted requests are written here before they are acknowledged and run
    /// again at the next start if the daemon died before their terminal event was delivered.
    pub journal_dir: PathBuf,
}

impl Default for MqttSection {
    fn default() -> Self {
        Self {
            enabled: true,
            url: "mqtt://127.0.0.1:1883".into(),
            client_id: "qwen2-edge".into(),
            topic_prefix: "qwen2-edge".into(),
            shared_group: String::new(),
            status_topic: String::new(),
            stats_topic: String::new(),
            stats_interval_s: 60,
            username: String::new(),
            password: String::new(),
            password_file: PathBuf::new(),
            ca_file: PathBuf::new(),
            client_cert_file: PathBuf::new(),
            client_key_file: PathBuf::new(),
            keep_alive_s: 30,
            session_expiry_s: 3600,
            token_interval_ms: 100,
            reconnect_initial_ms: 500,
            reconnect_max_ms: 30_000,
            allow_reload: false,
            journal_dir: PathBuf::new(),
        }
    }
}

/// Where an MQTT URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl MqttSection {
    pub fn broker(&self) -> Result<BrokerAddress, ConfigError> {
        parse_mqtt_url(&self.url).map_err(|m| ConfigError(format!("mqtt.url: {m}")))
    }

    pub fn request_topic(&self) -> String {
        format!("{}/request", self.topic_prefix)
    }

    /// Cancels are also taken here, never as a shared subscription, so that a cancel reaches
    /// the box that runs the request even when several boxes split the load.
    pub fn cancel_topic(&self) -> String {
        format!("{}/cancel", self.topic_prefix)
    }

    /// Where errors go for requests that name no reply topic (unreadable or 3.1.1 without
    /// `reply_to`), so that such clients can still find out what went wrong.
    pub fn error_topic(&self) -> String {
        format!("{}/error", self.topic_prefix)
    }

    /// Reload commands (`allow_reload`), never a shared subscription.
    pub fn reload_topic(&self) -> String {
        format!("{}/reload", self.topic_prefix)
    }

    pub fn subscription(&self) -> String {
        if self.shared_group.is_empty() {
            self.request_topic()
        } else {
            format!("$share/{}/{}", self.shared_group, self.request_topic())
        }
    }

    pub fn stats_topic(&self) -> String {
        if self.stats_topic.is_empty() {
            format!("{}/stats", self.topic_prefix)
        } else {
            self.stats_topic.clone()
        }
    }

    /// Where the `health` answer is published, retained, on connect and after each reload.
    pub fn health_topic(&self) -> String {
        format!("{}/health", self.topic_prefix)
    }

    pub fn status_topic(&self) -> String {
        if self.status_topic.is_empty() {
            format!("{}/status", self.topic_prefix)
        } else {
            self.status_topic.clone()
        }
    }
}

impl MqttSection {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let broker = self.broker()?;
        if self.client_id.is_empty() {
            // A persistent session is found again by its client id.
            return err("mqtt.client_id must not be empty (the broker keeps the session under it)");
        }
        topic_name("mqtt.topic_prefix", &self.topic_prefix)?;
        if !self.status_topic.is_empty() {
            topic_name("mqtt.status_topic", &self.status_topic)?;
        }
        if !self.stats_topic.is_empty() {
            topic_name("mqtt.stats_topic", &self.stats_topic)?;
        }
        super::at_most("mqtt.stats_interval_s", self.stats_interval_s, 24 * 3600)?;
        if !self.shared_group.is_empty()
            && self
                .shared_group
                .chars()
                .any(|c| matches!(c, '/' | '+' | '#'))
        {
            return err(format!(
                "mqtt.shared_group must not contain '/', '+' or '#', got {:?}",
                self.shared_group
            ));
        }
        let tls_files = [
            ("mqtt.ca_file", &self.ca_file),
            ("mqtt.client_cert_file", &self.client_cert_file),
            ("mqtt.client_key_file", &self.client_key_file),
        ];
        if !broker.tls {
            if let Some((key, _)) = tls_files.iter().find(|(_, p)| !p.as_os_str().is_empty()) {
                return err(format!("{key} is set but mqtt.url is not mqtts://"));
            }
        }
        if self.client_cert_file.as_os_str().is_empty()
            != self.client_key_file.as_os_str().is_empty()
        {
            return err(
                "mqtt.client_cert_file and mqtt.client_key_file go together: set both or neither",
            );
        }
        if (!self.password.is_empty() || !self.password_file.as_os_str().is_empty())
            && self.username.is_empty()
        {
            return err("mqtt.password / mqtt.password_file need mqtt.username");
        }
        if self.keep_alive_s < 5 || self.keep_alive_s > 65_535 {
            return err(format!(
                "mqtt.keep_alive_s must be between 5 and 65535, got {}",
                self.keep_alive_s
            ));
        }
        positive("mqtt.reconnect_initial_ms", self.reconnect_initial_ms)?;
        if self.reconnect_max_ms < self.reconnect_initial_ms {
            return err(format!(
                "mqtt.reconnect_max_ms ({}) must be at least mqtt.reconnect_initial_ms ({})",
                self.reconnect_max_ms, self.reconnect_initial_ms
            ));
        }
        at_most("mqtt.reconnect_max_ms", self.reconnect_max_ms, 3_600_000)?;
        at_most("mqtt.token_interval_ms", self.token_interval_ms, 60_000)?;
        Ok(())
    }
}

/// A topic we publish to or build filters from: no wildcards, not empty, no '$' start.
fn topic_name(key: &str, topic: &str) -> Result<(), ConfigError> {
    if topic.is_empty()
        || topic.starts_with('$')
        || topic.contains(['+', '#', '\0'])
        || topic.len() > 60_000
    {
        return err(format!(
            "{key} must be a non-empty MQTT topic without '+', '#' or a leading '$', got {topic:?}"
        ));
    }
    Ok(())
}

/// `mqtt://host[:port]` or `mqtts://host[:port]` (also `tcp://`, `ssl://`); IPv6 in brackets.
pub(super) fn parse_mqtt_url(url: &str) -> Result<BrokerAddress, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("expected mqtt://host:port or mqtts://host:port, got {url:?}"))?;
    let tls = match scheme {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        other => return Err(format!("unknown scheme {other:?} (expected mqtt or mqtts)")),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "{url:?}: only scheme, host and port are allowed (credentials go in mqtt.username / mqtt.password)"
        ));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: unclosed '[' in an IPv6 address"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("{url:?}: unexpected text after ']'")),
        };
        (host.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("{url:?}: invalid port {p:?}")),
        },
    };
    Ok(BrokerAddress { host, port, tls })
}
