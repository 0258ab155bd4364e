//! The peer's transport: an OpenAI-compatible `POST /v1/chat/completions` with `"stream": true`
//! (llama.cpp's llama-server), over a small HTTP/1.1 client on `std::net::TcpStream`, loopback
//! only. One keep-alive connection per client, reopened when the server closes it. Bodies are
//! read as they arrive, chunked (`Transfer-Encoding: chunked`), sized (`Content-Length`) or up to
//! the end of the connection, and cut into server-sent events; TTFT is the first `data:` event
//! with non-empty `choices[0].delta.content`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use crate::{Conn, Sample, Work};

/// Longest status, header or chunk-size line accepted.
const MAX_LINE: usize = 16 * 1024;
/// Largest error body kept for the message.
const MAX_ERROR_BODY: usize = 64 * 1024;

pub struct Http {
    addr: SocketAddr,
    host: String,
    conn: Option<BufReader<TcpStream>>,
}

/// How the end of a response body is known.
enum Framing {
    Chunked,
    Length(usize),
    UntilClose,
}

struct Head {
    status: u16,
    framing: Framing,
    keep_alive: bool,
}

impl Http {
    /// Resolves `host` (which must be a loopback name or address) and opens the first connection,
    /// so a wrong port fails before the level starts.
    pub fn connect(host: &str, port: u16) -> Result<Self, String> {
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("{host}:{port}: {e}"))?
            .find(|a| a.ip().is_loopback())
            .ok_or_else(|| format!("{host}: no loopback address"))?;
        let host = match addr {
            SocketAddr::V4(_) => format!("{}:{port}", addr.ip()),
            SocketAddr::V6(_) => format!("[{}]:{port}", addr.ip()),
        };
        let mut http = Self {
            addr,
            host,
            conn: None,
        };
        http.open()?;
        Ok(http)
    }

    fn open(&mut self) -> Result<&mut BufReader<TcpStream>, String> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(10))
                .map_err(|e| format!("{}: {e}", self.addr))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(300)))
                .map_err(|e| e.to_string())?;
            self.conn = Some(BufReader::with_capacity(64 * 1024, s));
        }
        Ok(self.conn.as_mut().expect("opened above"))
    }

    /// Sends one POST and reads the response head. A kept-alive connection the server closed
    /// while idle fails at once, before any response byte: then once more on a new connection.
    fn post(&mut self, path: &str, body: &str) -> Result<Head, String> {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Accept: text/event-stream\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        let reused = self.conn.is_some();
        match self.try_post(&request) {
            Ok(head) => Ok(head),
            Err(_) if reused => {
                self.conn = None;
                self.try_post(&request)
            }
            Err(e) => Err(e),
        }
    }

    fn try_post(&mut self, request: &str) -> Result<Head, String> {
        let r = self.open()?;
        r.get_mut()
            .write_all(request.as_bytes())
            .map_err(|e| format!("sending: {e}"))?;
        let result = read_head(r);
        if result.is_err() {
            self.conn = None;
        }
        result
    }
}

fn read_line(r: &mut impl BufRead) -> Result<String, String> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("reading: {e}"))?;
    if n == 0 {
        return Err("connection closed".into());
    }
    if line.last() != Some(&b'\n') {
        return Err("line too long or cut short".into());
    }
    String::from_utf8(line)
        .map(|l| l.trim_end_matches(['\r', '\n']).to_string())
        .map_err(|_| "a line that is not UTF-8".into())
}

fn read_head(r: &mut impl BufRead) -> Result<Head, String> {
    let status_line = read_line(r)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|_| version.starts_with("HTTP/1."))
        .ok_or_else(|| format!("not an HTTP/1.x status line: {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    let mut keep_alive = version == "HTTP/1.1";
    loop {
        let line = read_line(r)?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad header line {line:?}"));
        };
        let value = value.trim().to_ascii_lowercase();
        match name.trim().to_ascii_lowercase().as_str() {
            "transfer-encoding" => chunked = value.split(',').any(|v| v.trim() == "chunked"),
            "content-length" => {
                length = Some(value.parse().map_err(|_| "bad Content-Length")?);
            }
            "connection" => {
                if value.split(',').any(|v| v.trim() == "close") {
                    keep_alive = false;
                } else if value.split(',').any(|v| v.trim() == "keep-alive") {
                    keep_alive = true;
                }
            }
            _ => {}
        }
    }
    // RFC 9112 6.3: chunked wins over a Content-Length.
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => {
            keep_alive = false;
            Framing::UntilClose
        }
    };
    Ok(Head {
        status,
        framing,
        keep_alive,
    })
}

/// Reads a response body to its end, handing each piece to `sink` as soon as it arrives.
fn read_body<R: BufRead>(
    r: &mut R,
    framing: &Framing,
    sink: &mut dyn FnMut(&[u8]),
) -> Result<(), String> {
    let mut copy = |r: &mut R, mut left: Option<usize>| loop {
        if left == Some(0) {
            return Ok(());
        }
        let buf = r.fill_buf().map_err(|e| format!("reading: {e}"))?;
        if buf.is_empty() {
            return match left {
                None => Ok(()),
                Some(_) => Err("connection closed inside a body".to_string()),
            };
        }
        let n = left.map_or(buf.len(), |l| l.min(buf.len()));
        sink(&buf[..n]);
        r.consume(n);
        left = left.map(|l| l - n);
    };
    match framing {
        Framing::Length(n) => copy(r, Some(*n)),
        Framing::UntilClose => copy(r, None),
        Framing::Chunked => loop {
            let line = read_line(r)?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| format!("bad chunk size line {line:?}"))?;
            if size == 0 {
                // Trailer fields, up to the empty line.
                while !read_line(r)?.is_empty() {}
                return Ok(());
            }
            copy(r, Some(size))?;
            if !read_line(r)?.is_empty() {
                return Err("no CRLF after a chunk".into());
            }
        },
    }
}

/// Cuts a byte stream into lines and hands over the payload of each `data:` line (events of
/// more than one `data:` line do not occur in this API: every event is one JSON object).
#[derive(Default)]
struct Sse {
    pending: Vec<u8>,
}

impl Sse {
    fn push(&mut self, bytes: &[u8], on_data: &mut dyn FnMut(&str)) {
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(nl) = self.pending[start..].iter().position(|&b| b == b'\n') {
            let line = &self.pending[start..start + nl];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(data) = line.strip_prefix(b"data:") {
                on_data(String::from_utf8_lossy(data).trim_start());
            }
            start += nl + 1;
        }
        self.pending.drain(..start);
    }
}

impl Conn for Http {
    fn roundtrip(&mut self, work: &Work) -> Result<Sample, String> {
        // llama.cpp's names where OpenAI has none: `cache_prompt` (reuse the slot's KV cache for
        // the common prefix) and `repeat_penalty` (1 = off, as our requests send it).
        let mut body = json!({
            "messages": work.messages,
            "max_tokens": work.max_tokens,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
            "cache_prompt": true,
        });
        if work.no_repetition_penalty {
            body["repeat_penalty"] = json!(1.0);
        }
        let start = Instant::now();
        let mut sample = Sample::new(work.index);
        let head = self.post("/v1/chat/completions", &body.to_string())?;
        let r = self.conn.as_mut().expect("post leaves a connection");
        if !(200..300).contains(&head.status) {
            let mut text = Vec::new();
            let result = read_body(r, &head.framing, &mut |b| {
                if text.len() < MAX_ERROR_BODY {
                    text.extend_from_slice(b);
                }
            });
            if result.is_err() || !head.keep_alive {
                self.conn = None;
            }
            sample.latency = start.elapsed();
            sample.error = Some(format!(
                "HTTP {}: {}",
                head.status,
                String::from_utf8_lossy(&text).trim()
            ));
            return Ok(sample);
        }
        let mut sse = Sse::default();
        let mut done = false;
        let mut failure = None;
        let result = read_body(r, &head.framing, &mut |bytes| {
            sse.push(bytes, &mut |data| {
                if data == "[DONE]" {
                    done = true;
                    return;
                }
                let Ok(e) = serde_json::from_str::<Json>(data) else {
                    failure.get_or_insert_with(|| format!("not JSON: {data}"));
                    return;
                };
                if !e["error"].is_null() {
                    failure.get_or_insert_with(|| e["error"].to_string());
                }
                let text = e["choices"][0]["delta"]["content"].as_str().unwrap_or("");
                if !text.is_empty() {
                    sample.ttft.get_or_insert_with(|| start.elapsed());
                    sample.chunks += 1;
                }
                if let Some(usage) = e["usage"].as_object() {
                    sample.prompt_tokens = usage.get("prompt_tokens").and_then(Json::as_u64);
                    sample.cached_tokens =
                        e["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
                    sample.completion_tokens =
                        usage.get("completion_tokens").and_then(Json::as_u64);
                }
            })
        });
        sample.latency = start.elapsed();
        if result.is_err() || !head.keep_alive {
            self.conn = None;
        }
        result?;
        sample.error = match (failure, done) {
            (Some(f), _) => Some(f),
            (None, false) => Some("the stream ended without [DONE]".into()),
            (None, true) => None,
        };
        Ok(sample)
    }
}

#[cfg(test)]
mod tests {
    use super::{read_body, read_head, Framing, Sse};

    #[test]
    fn sse_lines_split_anywhere() {
        let stream = b"data: {\"a\":1}\r\n\r\ndata: [DONE]\n\n";
        for cut in 0..stream.len() {
            let mut sse = Sse::default();
            let mut got = Vec::new();
            sse.push(&stream[..cut], &mut |d| got.push(d.to_string()));
            sse.push(&stream[cut..], &mut |d| got.push(d.to_string()));
            assert_eq!(got, ["{\"a\":1}", "[DONE]"], "cut at {cut}");
        }
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers() {
        let response =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n\
            5;ext=1\r\nhello\r\nB\r\n, streaming\r\n0\r\nX-Trailer: y\r\n\r\nNEXT";
        let mut r = std::io::BufReader::with_capacity(4, &response[..]);
        let head = read_head(&mut r).unwrap();
        assert_eq!(head.status, 200);
        assert!(head.keep_alive);
        assert!(matches!(head.framing, Framing::Chunked));
        let mut body = Vec::new();
        read_body(&mut r, &head.framing, &mut |b| body.extend_from_slice(b)).unwrap();
        assert_eq!(body, b"hello, streaming");
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut r, &mut rest).unwrap();
        assert_eq!(rest, "NEXT");
    }

    #[test]
    fn sized_and_close_delimited_bodies() {
        let response = b"HTTP/1.0 503 Unavailable\r\ncontent-length: 4\r\n\r\nbusyMORE";
        let mut r = &response[..];
        let head = read_head(&mut r).unwrap();
        assert_eq!(head.status, 503);
        assert!(!head.keep_alive);
        let mut body = Vec::new();
        read_body(&mut r, &head.framing, &mut |b| body.extend_from_slice(b)).unwrap();
        assert_eq!(body, b"busy");
        let response = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it";
        let mut r = &response[..];
        let head = read_head(&mut r).unwrap();
        assert!(!head.keep_alive);
        let mut body = Vec::new();
        read_body(&mut r, &head.framing, &mut |b| body.extend_from_slice(b)).unwrap();
        assert_eq!(body, b"all of it");
        assert!(read_head(&mut &b"HTTP/1.1 200 OK\r\nX: y"[..]).is_err());
    }
}
