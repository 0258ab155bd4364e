//! The daemon's lifecycle: SIGTERM with work in flight, systemd notify and watchdog, the
//! socket file (stale ones replaced, live ones left alone), config errors at start-up.

use crate::service_support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};
use service_support::{tiny, Server, Spec, TempDir, UdsClient, BIN};

const T: Duration = Duration::from_secs(20);

fn slow_request(id: &str, max_tokens: u32) -> Json {
    json!({"op": "generate", "id": id, "prompt": "count", "max_tokens": max_tokens})
}

/// A server that runs one request at a time, a token every `interval_ms`, with `grace_s` to
/// finish after SIGTERM, and a client whose `running` request has streamed its first token
/// while `queued` waits behind it.
fn one_running_one_queued(
    interval_ms: u64,
    grace_s: u64,
    running: (&str, u32),
    queued: (&str, u32),
) -> (Server, UdsClient) {
    let interval = format!("min_token_interval_ms = {interval_ms}");
    let grace = format!("grace_period_s = {grace_s}");
    let server = Server::start(
        &Spec::tiny()
            .limits(&["max_concurrent = 1", "max_queue = 4", &interval])
            .lifecycle(&[&grace]),
    );
    let mut c = server.connect();
    c.send(&slow_request(running.0, running.1));
    c.send(&slow_request(queued.0, queued.1));
    assert_eq!(c.next(T).expect("token")["event"], "token");
    (server, c)
}

#[test]
fn sigterm_lets_in_flight_requests_finish_within_the_grace_period() {
    let (mut server, mut c) = one_running_one_queued(10, 10, ("a", 40), ("b", 20));
    server.signal("TERM");
    server.wait_notify("STOPPING=1", T);
    // Intake is closed: a new request on the open connection is turned away...
    c.send(&slow_request("late", 5));
    let late = c.until_terminal("late", T);
    assert_eq!(late[0]["code"], "busy", "{late:?}");
    // ...while the accepted ones, running and queued, complete normally.
    for id in ["a", "b"] {
        let events = c.until_terminal(id, T);
        let last = events.last().expect("event");
        assert_eq!(last["event"], "done", "{last}");
        assert_eq!(last["finish_reason"], "length", "{last}");
    }
    let status = server.wait_exit(T);
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(!server.socket.exists(), "socket file left behind");
}

#[test]
fn sigterm_cancels_what_is_left_after_the_grace_period() {
    let (mut server, mut c) = one_running_one_queued(50, 1, ("long", 200), ("queued", 200));
    let start = Instant::now();
    server.signal("TERM");
    let long = c.until_terminal("long", T);
    let last = long.last().expect("event");
    assert_eq!(last["event"], "done", "{last}");
    assert_eq!(last["finish_reason"], "cancelled", "{last}");
    let queued = c.until_terminal("queued", T);
    assert_eq!(queued.last().expect("event")["code"], "busy", "{queued:?}");
    let status = server.wait_exit(T);
    assert_eq!(status.code(), Some(0), "{}", server.log());
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "{took:?}"
    );
    assert!(!server.socket.exists());
}

#[test]
fn systemd_ready_watchdog_and_stopping() {
    let mut spec = Spec::tiny();
    spec.env.push(("WATCHDOG_USEC".into(), "200000".into()));
    let mut server = Server::start(&spec);
    let messages = server.notify_messages(Duration::from_millis(700));
    let pings = messages.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(
        pings >= 3,
        "watchdog pings every 100 ms expected: {messages:?}"
    );
    server.signal("INT");
    server.wait_notify("STOPPING=1", T);
    assert_eq!(server.wait_exit(T).code(), Some(0));
}

/// `serve --config config` that must refuse to start: its stderr.
fn refused_serve(config: &std::path::Path) -> String {
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .output()
        .expect("run serve");
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn stale_socket_is_replaced_but_a_live_one_is_not() {
    let dir = TempDir::new("socket-owner");
    let spec = Spec::tiny();
    let socket = dir.0.join("s.sock");
    let config = dir.0.join("config.toml");
    let mut first = Server::start_in(dir, &spec);
    // A second server on the same path refuses to start and leaves the first alone.
    let stderr = refused_serve(&config);
    assert!(stderr.contains("in use by a running server"), "{stderr}");
    let mut c = first.connect();
    c.send(&json!({"op": "health"}));
    assert_eq!(c.next(T).expect("health")["status"], "ok");

    // A crash (SIGKILL) leaves the socket file; the next start replaces it.
    let dir = first.take_dir();
    assert!(socket.exists());
    let second = Server::start_in(dir, &spec);
    let mut c = second.connect();
    c.send(&json!({"op": "health"}));
    assert_eq!(c.next(T).expect("health")["status"], "ok");
    drop(c);
    drop(second);
    drop(first);

    // Something that is not a socket is never removed.
    let dir = TempDir::new("not-a-socket");
    let path = dir.0.join("s.sock");
    std::fs::write(&path, b"precious").expect("write");
    let config = dir.0.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\nbundle = {:?}\nverify = false\n[unix_socket]\npath = {:?}\n",
            tiny().display().to_string(),
            path.display().to_string()
        ),
    )
    .expect("config");
    assert!(refused_serve(&config).contains("not a socket"));
    assert_eq!(std::fs::read(&path).expect("still there"), b"precious");
}

#[test]
fn bad_configs_fail_at_start_with_a_usage_code_naming_the_key() {
    let dir = TempDir::new("bad-config");
    let bundle = format!("bundle = {:?}\n", tiny().display().to_string());
    let cases = [
        (format!("[model]\n{bundle}[limits]\nmax_queu = 3\n"), "max_queu"),
        (format!("[model]\n{bundle}[limits]\nmax_concurrent = 0\n"), "limits.max_concurrent"),
        (format!("[model]\n{bundle}[limits]\nmax_queue = \"x\"\n"), "limits.max_queue"),
        (format!("[model]\n{bundle}[unix_socket]\nmode = \"0999\"\n"), "unix_socket.mode"),
        (format!("[model]\n{bundle}[mqtt]\nurl = \"http://x\"\n"), "mqtt.url"),
        (format!("[model]\n{bundle}backend = \"onnx\"\n"), "model.backend"),
        (format!("[model]\n{bundle}variant = \"int3\"\n"), "model.variant"),
        ("[model]\nbundle = \"/nonexistent/bundle\"\n".to_string(), "model.bundle"),
        (
            format!("[model]\n{bundle}[mqtt]\nurl = \"mqtts://127.0.0.1\"\nca_file = \"/nonexistent/ca.pem\"\n"),
            "mqtt.ca_file",
        ),
        (format!("[model]\n{bundle}[unknown]\n"), "unknown"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.0.join(format!("c{i}.toml"));
        std::fs::write(&path, text).expect("write");
        for extra in [&["--check"][..], &[][..]] {
            let out = Command::new(BIN)
                .args(["serve", "--config"])
                .arg(&path)
                .args(extra)
                .output()
                .expect("run serve");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
            assert!(stderr.contains(key), "{text}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        }
    }
}

#[test]
fn the_example_config_documents_a_valid_config() {
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/qwen2-edge.toml"),
    )
    .expect("systemd/qwen2-edge.toml");
    let dir = TempDir::new("example-config");
    let mut text = String::new();
    for line in example.lines() {
        if line.starts_with("bundle = ") {
            text += &format!("bundle = {:?}\n", tiny().display().to_string());
        } else if line.starts_with("path = ") {
            text += &format!("path = {:?}\n", dir.0.join("s.sock").display().to_string());
        } else {
            text += line;
            text.push('\n');
        }
    }
    let path = dir.0.join("example.toml");
    std::fs::write(&path, text).expect("write");
    let out = Command::new(BIN)
        .args(["serve", "--check", "--config"])
        .arg(&path)
        .output()
        .expect("run serve --check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let mut spec = Spec::tiny();
    spec.log.push("format = \"json\"".into());
    let mut server = Server::start(&spec);
    let mut c = server.connect();
    c.send(&slow_request("j", 3));
    c.until_terminal("j", T);
    server.signal("TERM");
    assert_eq!(server.wait_exit(T).code(), Some(0));
    let log = server.log();
    assert!(log.lines().count() >= 3, "{log}");
    for line in log.lines() {
        let j: Json = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(j["level"].is_string(), "{line}");
    }
    assert!(log.contains("request done"));
}

#[test]
fn ask_exits_non_zero_on_an_error_event() {
    let server = Server::start(&Spec::tiny().limits(&["max_new_tokens = 10"]));
    let out = Command::new(BIN)
        .arg("ask")
        .arg("--socket")
        .arg(&server.socket)
        .args(["--max-tokens", "11", "hello"])
        .output()
        .expect("run ask");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad_request") && stderr.contains("max_tokens"),
        "{stderr}"
    );
    // Neither socket nor broker: a usage error.
    let out = Command::new(BIN)
        .args(["ask", "hello"])
        .output()
        .expect("ask");
    assert_eq!(out.status.code(), Some(2));
}

/// What a truncated weights file does to a running daemon (issue 18's fault injection): with
/// the file mapped (the default) the next token faults and the daemon dies of SIGBUS (systemd
/// restarts it, and the start-up check then refuses the changed file by name); with
/// `mmap = false` the weights were read into memory at load and nothing on disk can reach them.
#[test]
fn a_weights_file_truncated_while_running() {
    use std::os::unix::process::ExitStatusExt;
    for mmap in [false, true] {
        let dir = TempDir::new("truncated-weights");
        let bundle = dir.0.join("bundle");
        crate::common::copy_dir(&tiny(), &bundle);
        let mut spec = Spec::tiny();
        spec.bundle = bundle.clone();
        spec.model.push(format!("mmap = {mmap}"));
        let mut server = Server::start(&spec);
        let mut c = server.connect();
        let request = |id: &str| {
            service_support::gen(id, "Hello", json!({"max_tokens": 6, "temperature": 0}))
        };
        c.send(&request("before"));
        let before = service_support::done_of(&c.until_terminal("before", T))["text"].clone();
        std::fs::OpenOptions::new()
            .write(true)
            .open(bundle.join("onnx/fp32/model.onnx.data"))
            .and_then(|f| f.set_len(0))
            .expect("truncate the weights");
        c.send(&request("after"));
        if mmap {
            let status = server.wait_exit(T);
            assert_eq!(status.signal(), Some(7), "SIGBUS expected: {status:?}");
            let refused = Command::new(BIN)
                .args(["serve", "--check", "--config"])
                .arg(server.dir.0.join("config.toml"))
                .output()
                .expect("serve --check");
            let message = String::from_utf8_lossy(&refused.stderr);
            assert!(
                !refused.status.success() && message.contains("model.onnx.data"),
                "a restart must refuse the truncated file by name: {message}"
            );
        } else {
            let after = service_support::done_of(&c.until_terminal("after", T))["text"].clone();
            assert_eq!(before, after);
            service_support::health_until(&server, "ok after the truncation", |h| {
                h["status"] == "ok"
            });
        }
    }
}

/// One greedy answer to `prompt` and the prefix cache's counters after it.
fn answer_and_prefix_stats(server: &Server, prompt: &str) -> (String, Json) {
    let mut c = server.connect();
    c.send(&service_support::gen(
        "p",
        prompt,
        json!({"max_tokens": 6, "temperature": 0}),
    ));
    let events = c.until_terminal("p", T);
    service_support::done_of(&events);
    c.send(&json!({"op": "stats", "id": "s"}));
    let stats = c.next(T).expect("stats");
    let prefix = stats["models"][0]["prefix_cache"].clone();
    (service_support::streamed_text(&events), prefix)
}

#[test]
fn the_prefix_cache_is_saved_at_shutdown_and_restored_at_start() {
    let dir = TempDir::new("prefix-restart");
    let state = dir.0.join("state");
    let mut spec = Spec::tiny();
    spec.cache = vec![format!("dir = {:?}", state.display().to_string())];
    let prompt = "The greenhouse controller reads every soil sensor once a minute. ".repeat(3);
    let stop = |server: &mut Server| {
        server.signal("TERM");
        assert!(server.wait_exit(T).success(), "{}", server.log());
    };

    let mut first = Server::start_in(dir, &spec);
    let (cold, stats) = answer_and_prefix_stats(&first, &prompt);
    assert_eq!(stats["hits"], 0, "{stats}");
    assert!(
        stats["blocks"].as_u64() >= Some(2),
        "a long prompt: {stats}"
    );
    stop(&mut first);
    assert!(
        first.log().contains("prefix cache saved"),
        "{}",
        first.log()
    );
    let saved: Vec<_> = std::fs::read_dir(&state)
        .expect("the cache directory was created")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(saved.len(), 1, "one file, no temporary left: {saved:?}");
    assert!(saved[0].to_string_lossy().ends_with(".prefix-cache"));

    // A new process: its slots hold nothing, so a hit can only come from the saved file.
    let mut second = Server::start_in(first.take_dir(), &spec);
    assert!(
        second.log().contains("prefix cache restored"),
        "{}",
        second.log()
    );
    let (warm, stats) = answer_and_prefix_stats(&second, &prompt);
    assert_eq!(
        warm, cold,
        "the same greedy answer from restored keys and values"
    );
    assert_eq!(stats["hits"], 1, "{stats}");
    assert!(stats["tokens_saved"].as_u64() >= Some(64), "{stats}");
    stop(&mut second);

    // A damaged file is reported and ignored: the service starts with an empty cache, answers
    // the same, and replaces the file when it stops.
    let mut bytes = std::fs::read(&saved[0]).expect("saved file");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&saved[0], &bytes).expect("damage the file");
    let mut third = Server::start_in(second.take_dir(), &spec);
    let log = third.log();
    assert!(
        log.contains("damaged") && log.contains("starts empty"),
        "{log}"
    );
    let (again, stats) = answer_and_prefix_stats(&third, &prompt);
    assert_eq!(again, cold);
    assert_eq!(stats["hits"], 0, "{stats}");
    stop(&mut third);
    assert_ne!(std::fs::read(&saved[0]).expect("saved again"), bytes);

    // Keys and values of another element type (or model version, or kernel set) are not used.
    spec.model.push(r#"kv_cache = "f16""#.into());
    let mut fourth = Server::start_in(third.take_dir(), &spec);
    let log = fourth.log();
    assert!(log.contains("saved by another model version"), "{log}");
    let (_, stats) = answer_and_prefix_stats(&fourth, &prompt);
    assert_eq!(stats["hits"], 0, "{stats}");
    stop(&mut fourth);
}

#[test]
fn an_unusable_prefix_cache_directory_is_reported_and_serving_goes_on() {
    let dir = TempDir::new("prefix-unusable");
    // A directory cannot be made under a regular file (not even by root).
    let blocker = dir.0.join("not-a-directory");
    std::fs::write(&blocker, "x").expect("write");
    let mut spec = Spec::tiny();
    spec.cache = vec![format!(
        "dir = {:?}",
        blocker.join("cache").display().to_string()
    )];
    let mut server = Server::start_in(dir, &spec);
    assert!(
        server.log().contains("the prefix cache will not be saved"),
        "{}",
        server.log()
    );
    let prompt = "Report the water level of tank 3 in litres, please. ".repeat(3);
    let (_, stats) = answer_and_prefix_stats(&server, &prompt);
    assert!(stats["blocks"].as_u64() >= Some(1), "{stats}");
    server.signal("TERM");
    assert!(server.wait_exit(T).success(), "{}", server.log());
    assert!(
        server.log().contains("prefix cache not saved"),
        "{}",
        server.log()
    );
}
