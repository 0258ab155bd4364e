//! The OpenAI-compatible HTTP front end, with clients nobody here wrote: OpenAI's Python
//! library (chat, streaming, tool calls, a JSON-schema reply, completions, models, its error
//! types), curl for server-sent events, and Prometheus' own text parser for `/metrics`. Their
//! answers are compared with the Unix socket's for the same greedy requests. On the tiny
//! fixture: readiness, the bearer token, body and header limits, 429 on a full queue, a client
//! that disconnects cancelling its request, and 503 while draining.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use crate::common::{self, TempDir};
use crate::service_support::http::{self, Addr};
use crate::service_support::mqtt::free_port;
use crate::service_support::{done_of, gen, Server, Spec};

const T: Duration = Duration::from_secs(120);
const KEY: &str = "test-key-5f1c";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/http")
}

/// `[http]` lines: TCP on `port`, a Unix socket in `dir`, the key file written there.
fn http_lines(dir: &Path, port: u16, extra: &[&str]) -> Vec<String> {
    let key_file = dir.join("api-key");
    std::fs::write(&key_file, format!("{KEY}\n")).expect("key file");
    let mut lines = vec![
        format!(
            "listen = [\"127.0.0.1:{port}\", {:?}]",
            dir.join("http.sock").display().to_string()
        ),
        format!("api_key_file = {:?}", key_file.display().to_string()),
    ];
    lines.extend(extra.iter().map(|s| s.to_string()));
    lines
}

const AUTH: (&str, &str) = ("Authorization", "Bearer test-key-5f1c");

/// The same question over the Unix socket: its `done` event.
fn socket_answer(server: &Server, id: &str, request: Json) -> Json {
    let mut c = server.connect();
    c.send(&request);
    done_of(&c.until_terminal(id, T)).clone()
}

/// Runs a Python script with `args`, `stdin` fed in; its stdout as JSON.
fn run_python(python: &Path, script: &str, args: &[&str], stdin: &str) -> Json {
    let mut child = Command::new(python)
        .arg(fixtures().join(script))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("feed python");
    let out = child.wait_with_output().expect("python output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}):\n{}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The data lines of a server-sent event stream.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_string))
        .collect()
}

#[test]
fn openai_library_curl_and_prometheus_agree_with_the_socket_demo() {
    let test = "openai_library_curl_and_prometheus_agree_with_the_socket_demo";
    let Some(bundle) = common::demo_bundle(test) else {
        return;
    };
    let Some(python) = common::python(test) else {
        return;
    };
    let keys = TempDir::new("http-demo");
    let port = free_port();
    let mut spec = Spec::tiny()
        .limits(&["max_concurrent = 2"])
        .http(http_lines(&keys.0, port, &[]));
    spec.bundle = bundle;
    spec.variant = "int8".into();
    // Hashing the bundle makes the start slow enough to watch readiness change.
    spec.verify = true;
    let mut server = Server::launch_spec(&spec);
    let tcp = Addr::Tcp(port);
    let until = Instant::now() + T;
    let mut seen = Vec::new();
    loop {
        assert!(
            Instant::now() < until,
            "never healthy: {seen:?}\n{}",
            server.log()
        );
        if let Some(r) = http::get(&tcp, "/health") {
            let status = r.json()["status"].as_str().unwrap_or("?").to_string();
            if seen.last() != Some(&(r.status, status.clone())) {
                seen.push((r.status, status));
            }
            if r.status == 200 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        seen,
        [(503, "loading".to_string()), (200, "ok".to_string())],
        "readiness while starting"
    );
    server.wait_notify("READY=1", T);

    let schema_file = keys.0.join("schema.json");
    let schemas: Json = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("structured/schemas.json")).expect("schemas"),
    )
    .expect("schemas json");
    std::fs::write(&schema_file, schemas["nested"].to_string()).expect("schema file");
    let base = format!("http://127.0.0.1:{port}");
    let out = run_python(
        &python,
        "openai_client.py",
        &[&base, KEY, &schema_file.display().to_string()],
        "",
    );
    eprintln!("openai client: {out}");

    // Plain and streamed chat: the socket's greedy answer, token counts included.
    let question = "What is the capital of France? Answer in one sentence.";
    let socket = socket_answer(
        &server,
        "q",
        gen("q", question, json!({"temperature": 0, "max_tokens": 32})),
    );
    let chat = &out["chat"];
    assert_eq!(chat["content"], socket["text"], "{out}");
    assert!(chat["content"].as_str().unwrap_or("").contains("Paris"));
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["role"], "assistant");
    assert_eq!(chat["finish"], socket["finish_reason"]);
    assert_eq!(
        chat["usage"]["prompt_tokens"],
        socket["usage"]["prompt_tokens"]
    );
    assert_eq!(
        chat["usage"]["completion_tokens"],
        socket["usage"]["completion_tokens"]
    );
    let stream = &out["stream"];
    assert_eq!(stream["content"], chat["content"]);
    assert!(stream["pieces"].as_u64().unwrap_or(0) >= 2, "{stream}");
    assert_eq!(stream["roles"], json!(["assistant"]));
    assert_eq!(stream["usage"], chat["usage"]);
    assert_eq!(stream["finish"], chat["finish"]);

    // The forced tool call, whole and streamed.
    let tool = &out["tool"];
    assert_eq!(tool["finish"], "tool_calls", "{tool}");
    assert_eq!(tool["calls"][0]["name"], "get_weather");
    assert_eq!(tool["calls"][0]["type"], "function");
    assert!(tool["calls"][0]["arguments"]["city"].is_string(), "{tool}");
    assert_eq!(out["tool_stream"]["names"], json!(["get_weather"]));
    assert_eq!(
        out["tool_stream"]["arguments"],
        tool["calls"][0]["arguments"]
    );
    assert_eq!(out["tool_stream"]["finish"], "tool_calls");
    // The schema reply was validated in Python; it ended by itself.
    assert_eq!(out["schema"]["finish"], "stop", "{}", out["schema"]);

    // A text completion is the socket's raw prompt.
    let raw = socket_answer(
        &server,
        "raw",
        json!({"op": "generate", "id": "raw", "prompt": "def add(a, b):",
               "max_tokens": 16, "temperature": 0}),
    );
    assert_eq!(out["completion"]["object"], "text_completion");
    assert_eq!(out["completion"]["text"], raw["text"]);
    let models = out["models"].as_array().expect("models");
    assert_eq!(models.len(), 1);
    assert_eq!(out["wrong_key"]["status"], 401);
    assert_eq!(out["wrong_key"]["code"], "invalid_api_key");
    assert_eq!(out["n2"]["status"], 400);

    // curl, server-sent events, over TCP: the chunks add up to the same answer.
    let body = json!({"messages": [{"role": "user", "content": question}],
                      "temperature": 0, "max_tokens": 32, "stream": true});
    let curl = Command::new("curl")
        .args([
            "-sS",
            "-N",
            "--fail-with-body",
            "-H",
            &format!("Authorization: Bearer {KEY}"),
        ])
        .args([
            "-H",
            "Content-Type: application/json",
            "-d",
            &body.to_string(),
        ])
        .arg(format!("{base}/v1/chat/completions"))
        .output()
        .expect("run curl (Debian package curl)");
    let text = String::from_utf8_lossy(&curl.stdout).into_owned();
    assert!(
        curl.status.success(),
        "curl: {text}{}",
        String::from_utf8_lossy(&curl.stderr)
    );
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    let content: String = data[..data.len() - 1]
        .iter()
        .map(|d| {
            let chunk: Json = serde_json::from_str(d).expect("chunk JSON");
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(content, chat["content"].as_str().unwrap_or(""));

    // /metrics, read by Prometheus' parser, says what the stats op says.
    let metrics = http::request(&tcp, "GET", "/metrics", &[AUTH], b"").expect("metrics");
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")));
    let families = run_python(&python, "metrics.py", &[], &metrics.text());
    let mut c = server.connect();
    c.send(&json!({"op": "stats", "id": "s"}));
    let stats = c.next(T).expect("stats");
    let sample = |family: &str, name: &str, labels: Json| -> f64 {
        let f = &families[family]["samples"];
        f.as_array()
            .and_then(|s| s.iter().find(|s| s[0] == name && s[1] == labels))
            .and_then(|s| s[2].as_f64())
            .unwrap_or_else(|| panic!("no {name} {labels} in {}", families[family]))
    };
    let http_counts = &stats["requests"]["http"];
    for outcome in ["accepted", "served", "rejected", "cancelled"] {
        let v = sample(
            "qwen2_edge_requests",
            "qwen2_edge_requests_total",
            json!({"model": models[0], "transport": "http", "outcome": outcome}),
        );
        assert_eq!(Some(v as u64), http_counts[outcome].as_u64(), "{outcome}");
    }
    assert!(http_counts["served"].as_u64().unwrap_or(0) >= 7, "{stats}");
    assert_eq!(stats["requests"]["unix_socket"]["served"], 2);
    assert_eq!(
        families["qwen2_edge_time_to_first_token_seconds"]["type"],
        "histogram"
    );
    let ttft_count = sample(
        "qwen2_edge_time_to_first_token_seconds",
        "qwen2_edge_time_to_first_token_seconds_count",
        json!({"model": models[0]}),
    );
    assert_eq!(
        Some(ttft_count as u64),
        stats["ttft_seconds"]["count"].as_u64()
    );
    assert!(
        sample(
            "qwen2_edge_inter_token_latency_seconds",
            "qwen2_edge_inter_token_latency_seconds_count",
            json!({"model": models[0]}),
        ) > 0.0
    );
    let info = &families["qwen2_edge_model_info"]["samples"][0][1];
    assert_eq!(info["backend"], "native");
    assert_eq!(info["variant"], "int8");
    assert_eq!(info["model"], models[0]);
}

/// A completion request sent on a raw TCP connection, left open for the caller to read or drop.
fn send_completion(port: u16, body: &Json) -> std::net::TcpStream {
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("send");
    s
}

/// A streamed completion on a raw TCP connection, read until its first chunk.
fn open_stream(port: u16, max_tokens: u32) -> std::net::TcpStream {
    let body = json!({"prompt": "go", "max_tokens": max_tokens, "stream": true});
    let mut s = send_completion(port, &body);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data: ") {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s
}

fn http_stats(addr: &Addr) -> Json {
    let r = http::get(addr, "/health").expect("health");
    r.json()
}

/// Waits until the scheduler runs `active` requests (from `/health`).
fn wait_active(addr: &Addr, active: u64) {
    let until = Instant::now() + T;
    while http_stats(addr)["active"].as_u64() != Some(active) {
        assert!(Instant::now() < until, "never {active} active");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn cancelled_over_http(server: &Server) -> u64 {
    let mut c = server.connect();
    c.send(&json!({"op": "stats"}));
    let stats = c.next(T).expect("stats");
    stats["requests"]["http"]["cancelled"].as_u64().unwrap_or(0)
}

fn wait_cancelled(server: &Server, n: u64) {
    let until = Instant::now() + Duration::from_secs(10);
    while cancelled_over_http(server) < n {
        assert!(Instant::now() < until, "the request was not cancelled");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn limits_auth_full_queue_disconnects_and_draining() {
    let keys = TempDir::new("http-limits");
    let port = free_port();
    let spec = Spec::tiny()
        .limits(&[
            "max_concurrent = 1",
            "max_queue = 0",
            "min_token_interval_ms = 25",
        ])
        .lifecycle(&["grace_period_s = 30"])
        .http(http_lines(&keys.0, port, &["max_body_bytes = 4096"]));
    let mut server = Server::start(&spec);
    let tcp = Addr::Tcp(port);
    let unix = Addr::Unix(keys.0.join("http.sock"));

    // The token: needed everywhere but /health.
    let health = http::get(&unix, "/health").expect("health over the Unix socket");
    assert_eq!(health.status, 200, "{}", health.text());
    let r = http::get(&tcp, "/v1/models").expect("models");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = http::request(
        &tcp,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer nope")],
        b"",
    )
    .expect("models");
    assert_eq!(r.status, 401);
    let r = http::request(&tcp, "GET", "/v1/models", &[AUTH], b"").expect("models");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["object"], "list");

    // Limits and bad requests, each with an OpenAI error object.
    let big = json!({"prompt": "x".repeat(10_000)});
    let r = http::post_json(&tcp, "/v1/completions", &[AUTH], &big);
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    let huge_header = "y".repeat(20_000);
    let r = http::request(
        &tcp,
        "GET",
        "/v1/models",
        &[AUTH, ("X-Big", &huge_header)],
        b"",
    )
    .expect("reply");
    assert_eq!(r.status, 431);
    let r = http::request(&tcp, "POST", "/v1/completions", &[AUTH], b"{not json").expect("reply");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("invalid JSON"));
    let r = http::post_json(
        &tcp,
        "/v1/completions",
        &[AUTH],
        &json!({"prompt": "go", "colour": 1}),
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("unknown field"), "{}", r.text());
    assert_eq!(
        http::request(&tcp, "GET", "/v1/nothing", &[AUTH], b"")
            .expect("r")
            .status,
        404
    );
    assert_eq!(
        http::request(&tcp, "GET", "/v1/completions", &[AUTH], b"")
            .expect("r")
            .status,
        405
    );

    // A full service (one running, no queue) answers 429 with Retry-After.
    let running = open_stream(port, 200);
    let r = http::post_json(
        &tcp,
        "/v1/completions",
        &[AUTH],
        &json!({"prompt": "go", "max_tokens": 2}),
    );
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");

    // A streaming client that goes away cancels its request, and so does one waiting for a
    // whole answer.
    drop(running);
    wait_cancelled(&server, 1);
    wait_active(&unix, 0);
    {
        let _waiting = send_completion(port, &json!({"prompt": "go", "max_tokens": 200}));
        wait_active(&unix, 1);
    }
    wait_cancelled(&server, 2);
    wait_active(&unix, 0);

    // Draining: /health says 503 and new requests are refused with 503 while the one in
    // flight streams to its end.
    let mut last = open_stream(port, 60);
    server.signal("TERM");
    let until = Instant::now() + T;
    loop {
        let r = http::get(&unix, "/health").expect("health while draining");
        if r.status == 503 {
            assert_eq!(r.json()["status"], "draining");
            break;
        }
        assert!(Instant::now() < until, "health never said draining");
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = http::post_json(
        &tcp,
        "/v1/completions",
        &[AUTH],
        &json!({"prompt": "go", "max_tokens": 2}),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    let mut rest = String::new();
    last.read_to_string(&mut rest)
        .expect("the rest of the stream");
    assert!(rest.contains("data: [DONE]"), "{rest}");
    assert!(rest.contains("\"finish_reason\":\""), "{rest}");
    let status = server.wait_exit(T);
    assert!(status.success(), "{status}: {}", server.log());
    assert!(
        !keys.0.join("http.sock").exists(),
        "the HTTP socket file is removed"
    );
}
