//! The `[http]` section: the OpenAI-compatible HTTP front end. Off unless the section is there.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{at_most, err, parse_mode, positive, socket_path_fits, ConfigError};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// false: the section is kept (and checked) but HTTP stays off.
    pub enabled: bool,
    /// Where to listen: TCP addresses ("127.0.0.1:8080", "[::1]:8080", "0.0.0.0:8080") and/or
    /// Unix socket paths (starting with '/'). Loopback only unless told otherwise.
    pub listen: Vec<String>,
    /// A file whose first line is the bearer token clients must send
    /// (`Authorization: Bearer …`); empty: no token. `/health` never needs it.
    pub api_key_file: PathBuf,
    /// Largest request body in bytes (larger: 413); 0: `limits.max_request_bytes`.
    pub max_body_bytes: usize,
    /// Largest request head (request line and headers) in bytes (larger: 431).
    pub max_header_bytes: usize,
    /// Most headers in a request (more: 431).
    pub max_headers: usize,
    /// A client that has not sent its whole request head in this long is disconnected.
    pub header_timeout_s: u64,
    /// Open connections at most; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Unix socket listeners: permission bits and group of the socket file.
    pub socket_mode: String,
    pub socket_group: String,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: vec!["127.0.0.1:8080".into()],
            api_key_file: PathBuf::new(),
            max_body_bytes: 0,
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            header_timeout_s: 30,
            max_connections: 256,
            socket_mode: "0660".into(),
            socket_group: String::new(),
        }
    }
}

/// One `listen` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl HttpSection {
    /// The `listen` entries, parsed (validated by `validate`).
    pub fn listeners(&self) -> Result<Vec<HttpListen>, ConfigError> {
        self.listen.iter().map(|l| parse_listen(l)).collect()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return err("http.listen must name at least one address (e.g. [\"127.0.0.1:8080\"])");
        }
        for l in self.listeners()? {
            if let HttpListen::Unix(path) = l {
                socket_path_fits("http.listen", &path)?;
            }
        }
        parse_mode("http.socket_mode", &self.socket_mode)?;
        at_most(
            "http.max_body_bytes",
            self.max_body_bytes as u64,
            128 * 1024 * 1024,
        )?;
        // hyper's read buffer is at least 8 KiB; a head must fit in it.
        if !(8192..=1024 * 1024).contains(&self.max_header_bytes) {
            return err(format!(
                "http.max_header_bytes must be between 8192 and 1048576, got {}",
                self.max_header_bytes
            ));
        }
        positive("http.max_headers", self.max_headers as u64)?;
        at_most("http.max_headers", self.max_headers as u64, 1000)?;
        positive("http.header_timeout_s", self.header_timeout_s)?;
        at_most("http.header_timeout_s", self.header_timeout_s, 3600)?;
        positive("http.max_connections", self.max_connections as u64)?;
        at_most("http.max_connections", self.max_connections as u64, 65_536)?;
        Ok(())
    }
}

fn parse_listen(text: &str) -> Result<HttpListen, ConfigError> {
    if text.starts_with('/') {
        return Ok(HttpListen::Unix(PathBuf::from(text)));
    }
    text.parse::<SocketAddr>()
        .map(HttpListen::Tcp)
        .map_err(|_| {
            ConfigError(format!(
                "http.listen: {text:?} is neither an IP address with a port (\"127.0.0.1:8080\", \
             \"[::1]:8080\") nor an absolute Unix socket path"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_entries() {
        assert_eq!(
            parse_listen("127.0.0.1:8080"),
            Ok(HttpListen::Tcp("127.0.0.1:8080".parse().unwrap()))
        );
        assert_eq!(
            parse_listen("/run/q/http.sock"),
            Ok(HttpListen::Unix("/run/q/http.sock".into()))
        );
        for bad in ["localhost:8080", "8080", "run/http.sock", ""] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
    }
}
