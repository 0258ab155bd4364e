//! `qwen2-edge serve` over its Unix socket, end to end on the tiny fixture model: answers,
//! limits, bad input, load with a small queue, cancellation, disconnects, deadlines, a client
//! that stops reading, more connections than the limit.

use crate::service_support;

use std::collections::HashMap;
use std::io::Write;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};
use service_support::{
    done_of, gen, generate, is_terminal, stdout_of, streamed_text, tiny, Server, Spec, UdsClient,
    BIN,
};

const T: Duration = Duration::from_secs(20);

#[test]
fn streamed_answers_equal_generate_with_the_same_seed() {
    let server = Server::start(&Spec::tiny());
    let mut c = server.connect();
    let prompt = "Tell me about the quick brown fox";
    let flags = [
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--top-k",
        "40",
        "--repetition-penalty",
        "1.1",
        "--seed",
        "7",
        "--max-tokens",
        "40",
    ];
    let expected = generate(&tiny(), &flags, prompt);
    let expected = expected.strip_suffix('\n').unwrap_or(&expected);

    let sampling = json!({"temperature": 0.8, "top_p": 0.9, "top_k": 40,
                          "repetition_penalty": 1.1, "seed": 7, "max_tokens": 40});
    c.send(&gen("chat", prompt, sampling.clone()));
    let events = c.until_terminal("chat", T);
    assert_eq!(streamed_text(&events), expected);
    assert_eq!(done_of(&events)["text"], expected);

    // A raw prompt matches `generate --raw`, and stream:false gives the same text in `done`.
    let mut raw = sampling.as_object().cloned().unwrap_or_default();
    raw.insert("op".into(), json!("generate"));
    raw.insert("id".into(), json!("raw"));
    raw.insert("prompt".into(), json!(prompt));
    raw.insert("stream".into(), json!(false));
    c.send(&Json::Object(raw));
    let mut raw_flags = flags.to_vec();
    raw_flags.push("--raw");
    let expected_raw = generate(&tiny(), &raw_flags, prompt);
    let events = c.until_terminal("raw", T);
    assert_eq!(events.len(), 1, "stream:false sends only done: {events:?}");
    assert_eq!(
        done_of(&events)["text"],
        expected_raw.strip_suffix('\n').unwrap_or(&expected_raw)
    );

    // The `ask` client prints exactly what `generate` prints. (Each comparison starts with a
    // token no earlier request on this session began with: a session reuses the KV cache of
    // a shared prompt prefix, whose logits then come from the one-token path instead of the
    // batched prompt pass and may differ from `generate` in the last float bits.)
    let ask_prompt = "Once upon a time";
    let mut ask_flags = flags.to_vec();
    ask_flags.push("--raw");
    let expected = generate(&tiny(), &ask_flags, ask_prompt);
    let printed = stdout_of(
        std::process::Command::new(BIN)
            .arg("ask")
            .arg("--socket")
            .arg(&server.socket)
            .args(ask_flags)
            .arg(ask_prompt),
        "ask",
    );
    assert_eq!(printed, expected);
}

#[test]
fn large_requests_are_accepted_and_oversized_ones_refused() {
    let server = Server::start(&Spec::tiny().limits(&["max_request_bytes = 131072"]));
    let mut c = server.connect();
    // A 100 KiB request line (well past the 64 KiB socket read buffer) is taken whole.
    let padding = "p".repeat(100 * 1024);
    c.send(&gen(
        "big-line",
        "hi",
        json!({"max_tokens": 4, "meta": padding}),
    ));
    done_of(&c.until_terminal("big-line", T));

    // A 100 KiB prompt arrives whole: the service tokenizes all of it (the count it reports
    // is the full prompt's), then refuses it for the model's 255-token prompt limit.
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(100 * 1024 / 45 + 1);
    let tokens = qwen2_edge::engine::Engine::load(&qwen2_edge::engine::EngineOptions {
        bundle: tiny(),
        verify: qwen2_edge::bundle::Verify::SizesOnly,
        backend: qwen2_edge::backend::BackendKind::Native,
        variant: "fp32".into(),
        threads: 1,
        kernels: String::new(),
        kv_cache: Default::default(),
        lm_head: Default::default(),
        prefix_cache_mib: 0,
        prefix_cache_file: None,
        no_mmap: false,
        ort: Default::default(),
        trusted_keys: Vec::new(),
    })
    .expect("engine")
    .raw_prompt(&prompt)
    .expect("tokens")
    .len();
    c.send(&json!({"op": "generate", "id": "big-prompt", "prompt": prompt}));
    let events = c.until_terminal("big-prompt", T);
    let e = &events[0];
    assert_eq!(e["code"], "too_long", "{e}");
    let message = e["message"].as_str().unwrap_or("");
    assert!(
        message.contains(&format!("is {tokens} tokens")),
        "{message} (expected {tokens} tokens)"
    );

    // Over the configured maximum: one too_long error; the connection keeps working.
    let huge = "x".repeat(200 * 1024);
    c.send(&json!({"op": "generate", "id": "huge", "prompt": huge}));
    let e = c.next(T).expect("an error event");
    assert_eq!(e["event"], "error");
    assert_eq!(e["code"], "too_long");
    c.send(&gen("after", "hello", json!({"max_tokens": 3})));
    done_of(&c.until_terminal("after", T));
}

#[test]
fn bad_input_gets_one_error_each_and_the_connection_survives() {
    let server = Server::start(&Spec::tiny().limits(&[
        "max_prompt_tokens = 16",
        "max_new_tokens = 50",
        "max_request_bytes = 4096",
    ]));
    let mut c = server.connect();
    let long_line = format!(
        r#"{{"op":"generate","id":"x","prompt":"{}"}}"#,
        "a".repeat(5000)
    );
    let long_prompt = "word ".repeat(100);
    // (line, the id its error must carry)
    let cases: Vec<(String, Option<&str>)> = vec![
        ("{not json".into(), None),
        ("[1,2,3]".into(), None),
        ("42".into(), None),
        (r#"{"op":"fly","id":"u1"}"#.into(), Some("u1")),
        (r#"{"id":"m0"}"#.into(), Some("m0")),
        (r#"{"op":"generate","prompt":"hi"}"#.into(), None),
        (r#"{"op":"generate","id":"m1"}"#.into(), Some("m1")),
        (
            r#"{"op":"generate","id":"m2","messages":[{"content":"x"}]}"#.into(),
            Some("m2"),
        ),
        (
            r#"{"op":"generate","id":"w1","prompt":7}"#.into(),
            Some("w1"),
        ),
        (
            r#"{"op":"generate","id":"w2","prompt":"x","max_tokens":"9"}"#.into(),
            Some("w2"),
        ),
        (
            r#"{"op":"generate","id":"w3","prompt":"x","stream":1}"#.into(),
            Some("w3"),
        ),
        (r#"{"op":"generate","id":7,"prompt":"x"}"#.into(), None),
        (long_line, None),
        (
            json!({"op": "generate", "id": "p1", "prompt": long_prompt}).to_string(),
            Some("p1"),
        ),
        (
            r#"{"op":"generate","id":"c1","prompt":"x","max_tokens":51}"#.into(),
            Some("c1"),
        ),
        (
            r#"{"op":"generate","id":"s1","prompt":"x","temperature":-0.5}"#.into(),
            Some("s1"),
        ),
        (
            r#"{"op":"generate","id":"s2","prompt":"x","top_p":0}"#.into(),
            Some("s2"),
        ),
        (
            r#"{"op":"generate","id":"s3","prompt":"x","min_p":1.5}"#.into(),
            Some("s3"),
        ),
        (
            r#"{"op":"generate","id":"s4","prompt":"x","repetition_penalty":0}"#.into(),
            Some("s4"),
        ),
        (
            r#"{"op":"generate","id":"s5","prompt":"x","top_k":-1}"#.into(),
            Some("s5"),
        ),
    ];
    for (line, _) in &cases {
        c.send_line(line.as_bytes());
    }
    c.send(&json!({"op": "health", "id": "h"}));
    // Collect until the health answer (it comes after every error: errors of parsing come
    // at once, the prompt-length refusal from the scheduler, so wait for that too).
    let mut errors: Vec<Json> = Vec::new();
    let until = Instant::now() + T;
    while errors.len() < cases.len() && Instant::now() < until {
        let Some(e) = c.next(Duration::from_secs(5)) else {
            break;
        };
        if e["event"] == "error" {
            errors.push(e);
        }
    }
    assert_eq!(errors.len(), cases.len(), "{errors:#?}");
    let mut expected: Vec<Option<&str>> = cases.iter().map(|(_, id)| *id).collect();
    let mut got: Vec<Option<&str>> = errors.iter().map(|e| e["id"].as_str()).collect();
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    for e in &errors {
        let code = e["code"].as_str().unwrap_or("");
        let id = e["id"].as_str();
        let want = if id == Some("p1")
            || (id.is_none() && e["message"].as_str().unwrap_or("").contains("longer than"))
        {
            "too_long"
        } else {
            "bad_request"
        };
        assert_eq!(code, want, "{e}");
    }
    // Nothing more arrives (exactly one event per bad request), and the connection works.
    let extra = c.inbox.drain(Duration::from_millis(300));
    assert!(
        extra.iter().all(|m| m.json()["event"] == "health"),
        "unexpected extra events: {extra:?}"
    );
    // (A raw prompt: the chat template alone is over this config's 16 tokens.)
    c.send(&json!({"op": "generate", "id": "ok", "prompt": "hello", "max_tokens": 3}));
    done_of(&c.until_terminal("ok", T));
}

#[test]
fn fifty_concurrent_clients_with_a_small_queue_each_get_one_answer() {
    let server = Server::start(&Spec::tiny().limits(&[
        "max_concurrent = 2",
        "max_queue = 6",
        "min_token_interval_ms = 4",
    ]));
    let rss_before = server.rss_kib();
    let mut totals = HashMap::new();
    for round in 0..2 {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let socket = server.socket.clone();
                std::thread::spawn(move || {
                    let mut c = UdsClient::connect(&socket);
                    let id = format!("r{round}-{i}");
                    c.send(&gen(&id, "count to ten", json!({"max_tokens": 30})));
                    let events = c.until_terminal(&id, Duration::from_secs(60));
                    // Exactly one terminal event, and nothing after it.
                    assert_eq!(events.iter().filter(|e| is_terminal(e)).count(), 1);
                    let late = c.inbox.drain(Duration::from_millis(50));
                    assert!(late.is_empty(), "events after the terminal one: {late:?}");
                    let last = events.last().cloned().unwrap_or(Json::Null);
                    match last["event"].as_str() {
                        Some("done") => "done".to_string(),
                        _ => format!("error:{}", last["code"].as_str().unwrap_or("")),
                    }
                })
            })
            .collect();
        for h in handles {
            *totals.entry(h.join().expect("client thread")).or_insert(0) += 1;
        }
    }
    let done = totals.get("done").copied().unwrap_or(0);
    let busy = totals.get("error:busy").copied().unwrap_or(0);
    assert_eq!(done + busy, 100, "{totals:?}");
    assert!(done >= 2 * 8, "{totals:?}");
    assert!(
        busy > 0,
        "a queue of 6 should turn some of 50 away: {totals:?}"
    );
    // Bounded memory: two rounds of 50 clients leave the resident set about where it was.
    let rss_after = server.rss_kib();
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    let mut c = server.connect();
    c.send(&json!({"op": "stats", "id": "s"}));
    let stats = c.next(T).expect("stats");
    assert_eq!(stats["served"], done as u64, "{stats}");
    assert_eq!(stats["rejected"], busy as u64, "{stats}");
    assert_eq!(stats["queue_depth"], 0);
    assert!(
        stats["ttft_ms"]["p99"].as_f64().unwrap_or(0.0) > 0.0,
        "{stats}"
    );
    assert!(
        stats["decode_tokens_per_s"]["p50"].as_f64().unwrap_or(0.0) > 0.0,
        "{stats}"
    );
    assert!(stats["tokens_generated"].as_u64().unwrap_or(0) >= done as u64);
}

#[test]
fn several_requests_in_flight_on_one_connection() {
    let server = Server::start(&Spec::tiny().limits(&[
        "max_concurrent = 2",
        "max_queue = 8",
        "min_token_interval_ms = 10",
    ]));
    let mut c = server.connect();
    for i in 0..6 {
        c.send(&gen(
            &format!("m{i}"),
            "hi there",
            json!({"max_tokens": 12, "seed": i}),
        ));
    }
    // A second request with an id still in flight is refused, without ending the first.
    c.send(&gen("m5", "again", json!({"max_tokens": 12})));
    let dup = c.inbox.error(T, "duplicate refused");
    assert_eq!(dup["id"], "m5");
    assert_eq!(dup["code"], "bad_request");
    for i in 0..6 {
        let events = c.until_terminal(&format!("m{i}"), T);
        done_of(&events);
    }
}

#[test]
fn cancel_mid_stream_and_while_queued() {
    let server = Server::start(&Spec::tiny().limits(&[
        "max_concurrent = 1",
        "max_queue = 4",
        "min_token_interval_ms = 25",
    ]));
    let mut c = server.connect();
    c.send(&gen("long", "go", json!({"max_tokens": 200})));
    c.send(&gen("queued", "go", json!({"max_tokens": 5})));
    // Three tokens in, cancel the running one.
    let mut seen = 0;
    while seen < 3 {
        let e = c.next(T).expect("token");
        if e["id"] == "long" && e["event"] == "token" {
            seen += 1;
        }
    }
    // The queued request is cancelled at once, without having run.
    c.send(&json!({"op": "cancel", "id": "queued"}));
    let q = c.until_terminal("queued", T);
    let q = done_of(&q);
    assert_eq!(q["finish_reason"], "cancelled");
    assert_eq!(q["usage"]["completion_tokens"], 0);
    let sent = Instant::now();
    c.send(&json!({"op": "cancel", "id": "long"}));
    let events = c.until_terminal("long", T);
    let d = done_of(&events);
    assert_eq!(d["finish_reason"], "cancelled", "{d}");
    // Within one token (25 ms apart), with slack for a loaded machine.
    assert!(sent.elapsed() < Duration::from_millis(1500));
    assert!(d["usage"]["completion_tokens"].as_u64().unwrap_or(999) < 100);
    // A cancel for something already finished is ignored: no second terminal event.
    c.send(&json!({"op": "cancel", "id": "long"}));
    c.send(&gen("next", "go", json!({"max_tokens": 2})));
    let events = c.until_terminal("next", T);
    done_of(&events);
    let stray = c.inbox.drain(Duration::from_millis(100));
    assert!(stray.is_empty(), "{stray:?}");
}

#[test]
fn a_disconnecting_client_frees_its_session() {
    let server = Server::start(&Spec::tiny().limits(&[
        "max_concurrent = 1",
        "max_queue = 0",
        "min_token_interval_ms = 25",
    ]));
    {
        let mut c = server.connect();
        c.send(&gen("gone", "go", json!({"max_tokens": 200})));
        let e = c.next(T).expect("first token");
        assert_eq!(e["event"], "token");
        // Dropped here: the socket closes mid-stream.
    }
    // The only session is freed within about a token: a new request is accepted (not busy).
    let mut c = server.connect();
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        c.send(&gen("next", "go", json!({"max_tokens": 3})));
        let events = c.until_terminal("next", T);
        let last = events.last().cloned().unwrap_or(Json::Null);
        if last["event"] == "done" {
            break;
        }
        assert_eq!(last["code"], "busy");
        assert!(Instant::now() < until, "the session was not freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.send(&json!({"op": "stats"}));
    let stats = c.next(T).expect("stats");
    assert_eq!(stats["cancelled"], 1, "{stats}");

    // A client that only half-closes (end of its input) still gets its answer.
    let mut h = server.connect();
    h.send(&gen("half", "go", json!({"max_tokens": 4})));
    h.stream.shutdown(Shutdown::Write).expect("shutdown");
    let events = h.until_terminal("half", T);
    assert_eq!(done_of(&events)["finish_reason"], "length");
}

#[test]
fn deadlines_end_running_and_queued_requests() {
    let server = Server::start(&Spec::tiny().limits(&[
        "max_concurrent = 1",
        "max_queue = 4",
        "min_token_interval_ms = 20",
        "request_timeout_s = 30",
    ]));
    let mut c = server.connect();
    let start = Instant::now();
    c.send(&gen(
        "slow",
        "go",
        json!({"max_tokens": 200, "timeout_s": 0.5}),
    ));
    c.send(&gen(
        "waits",
        "go",
        json!({"max_tokens": 5, "timeout_s": 0.2}),
    ));
    let waits = c.until_terminal("waits", T);
    let e = waits.last().expect("event");
    assert_eq!(e["event"], "error", "{e}");
    assert_eq!(e["code"], "timeout");
    let slow = c.until_terminal("slow", T);
    let d = done_of(&slow);
    assert_eq!(d["finish_reason"], "timeout", "{d}");
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed < Duration::from_millis(2000),
        "{elapsed:?}"
    );
    assert!(d["usage"]["completion_tokens"].as_u64().unwrap_or(999) < 100);
    c.send(&json!({"op": "stats"}));
    let stats = c.next(T).expect("stats");
    assert_eq!(stats["timed_out"], 2, "{stats}");
}

#[test]
fn health_answers_and_socket_mode() {
    let server = Server::start(&Spec::tiny());
    let mut c = server.connect();
    c.send(&json!({"op": "health", "id": "h1"}));
    let h = c.next(T).expect("health");
    assert_eq!(h["event"], "health");
    assert_eq!(h["id"], "h1");
    assert_eq!(h["status"], "ok");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&server.socket)
            .expect("socket")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o660);
    // Writing a line in pieces works too.
    c.stream.write_all(br#"{"op":"he"#).expect("write");
    std::thread::sleep(Duration::from_millis(50));
    c.stream.write_all(b"alth\"}\n").expect("write");
    assert_eq!(c.next(T).expect("health")["event"], "health");
}

/// A client that sends requests and never reads its answers: once they back up the service
/// reads no more of its requests, answers every other client meanwhile, and drops it after
/// `unix_socket.write_timeout_s`; memory stays bounded.
#[test]
fn a_client_that_stops_reading_is_dropped_and_harms_no_one() {
    use std::io::Read;
    let mut spec = Spec::tiny();
    spec.unix_socket = vec!["write_timeout_s = 2".into()];
    let server = Server::start(&spec);
    let rss_before = server.rss_kib();
    let mut slow = std::os::unix::net::UnixStream::connect(&server.socket).expect("connect");
    // A `stats` answer is ~3 KB: 4,000 of them are ~12 MB, far more than socket buffers hold.
    let lines = b"{\"op\":\"stats\"}\n".repeat(4000);
    let mut writer = slow.try_clone().expect("clone");
    // The service stops reading once its answers back up, so this write may block: a thread.
    std::thread::spawn(move || {
        let _ = writer.write_all(&lines);
    });
    let until = Instant::now() + T;
    let mut served = 0;
    while !server.log().contains("read none of its answers") {
        assert!(Instant::now() < until, "never dropped:\n{}", server.log());
        let asked = Instant::now();
        let mut other = server.connect();
        other.send(&json!({"op": "health", "id": "h"}));
        let h = other
            .next(Duration::from_secs(2))
            .expect("another client is answered");
        assert_eq!(h["status"], "ok");
        assert!(asked.elapsed() < Duration::from_secs(2));
        served += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        served >= 5,
        "only {served} other requests while the slow client stalled"
    );
    // Dropped: after what was already in its buffer, its socket ends.
    slow.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match slow.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the slow client's socket did not end: {e}"),
        }
    }
    let grown_mib = server.rss_kib().saturating_sub(rss_before) / 1024;
    assert!(grown_mib < 64, "the service grew by {grown_mib} MiB");
}

/// 1,000 connections at once against `max_connections = 100`: 100 are served, each of the
/// others gets one `busy` line and is closed; the service's file descriptors stay bounded and
/// it serves normally once they are gone.
#[test]
fn a_thousand_connections_at_once_are_refused_cleanly_past_the_limit() {
    use std::io::{BufRead, BufReader};
    let mut spec = Spec::tiny();
    spec.unix_socket = vec!["max_connections = 100".into()];
    let server = Server::start(&spec);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let fds_before = fds();
    let streams: Vec<std::os::unix::net::UnixStream> = (0..1000)
        .map(|_| std::os::unix::net::UnixStream::connect(&server.socket).expect("connect"))
        .collect();
    // The service refuses as it accepts: a second later every refusal has been written.
    std::thread::sleep(Duration::from_secs(1));
    let mut served = Vec::new();
    let mut refused = 0;
    for s in streams {
        s.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let mut line = String::new();
        match BufReader::new(&s).read_line(&mut line) {
            Ok(n) if n > 0 => {
                let e: Json = serde_json::from_str(&line).expect("a JSON line");
                assert_eq!(e["code"], "busy", "{e}");
                assert!(
                    e["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("max_connections")),
                    "{e}"
                );
                refused += 1;
            }
            // Served: nothing to read until it asks.
            _ => served.push(s),
        }
    }
    assert_eq!((served.len(), refused), (100, 900));
    assert!(
        fds() < fds_before + 110,
        "{} descriptors with 100 clients ({fds_before} before)",
        fds()
    );
    // The served ones are answered.
    for s in served.iter_mut().take(5) {
        s.set_read_timeout(Some(T)).expect("timeout");
        s.write_all(b"{\"op\":\"health\",\"id\":\"h\"}\n")
            .expect("write");
        let mut line = String::new();
        BufReader::new(&*s).read_line(&mut line).expect("answer");
        assert!(line.contains("\"health\""), "{line}");
    }
    drop(served);
    // Once they have gone, new clients are served again.
    let until = Instant::now() + T;
    loop {
        let mut c = server.connect();
        // Until the service has seen the 100 go, a new client is refused and closed, perhaps
        // before its request is written (a broken pipe): try again.
        let answer = match c.try_send(&json!({"op": "health", "id": "h"})) {
            Ok(()) => c.next(Duration::from_secs(2)),
            Err(e) => Some(json!({"write": e.to_string()})),
        };
        match answer {
            Some(h) if h["event"] == "health" => break,
            other => assert!(Instant::now() < until, "not served again: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(server.log().contains("refusing more"), "{}", server.log());
}
