//! `qwen2-edge serve` over MQTT against a real mosquitto (Debian's package, started here on a
//! free loopback port with persistence in a temp dir), on the tiny fixture model.

use crate::service_support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};
use service_support::mqtt::{retained_status, v5_client, Broker, Client, Version};
use service_support::{
    gen, generate, is_terminal, now_nanos, stdout_of, streamed_text, tiny, Server, Spec, TempDir,
    BIN,
};

const T: Duration = Duration::from_secs(20);
const PREFIX: &str = "qwen2-edge";

fn unique(tag: &str) -> String {
    format!("{tag}-{}", now_nanos())
}

fn last(events: &[Json]) -> &Json {
    events.last().expect("events")
}

#[test]
fn mqtt5_and_mqtt311_answers_equal_generate() {
    let Some(broker) = Broker::start("mqtt5_and_mqtt311_answers_equal_generate") else {
        return;
    };
    let server = Server::start(&Spec::tiny().no_socket().mqtt(broker.service_lines(&[])));
    assert_eq!(
        retained_status(broker.port, "qwen2-edge/status").as_deref(),
        Some("online")
    );
    let prompt = "Where does the lazy dog sleep";
    let flags = [
        "--temperature",
        "0.9",
        "--top-k",
        "50",
        "--seed",
        "11",
        "--max-tokens",
        "48",
    ];
    let expected = generate(&tiny(), &flags, prompt);
    let expected = expected.strip_suffix('\n').unwrap_or(&expected).to_string();
    let sampling = json!({"temperature": 0.9, "top_k": 50, "seed": 11, "max_tokens": 48});

    // MQTT 5: response topic and correlation data.
    let (mut c5, reply5) = v5_client(broker.port, "v5");
    c5.request(PREFIX, &gen("a5", prompt, sampling.clone()), &reply5);
    let events = c5.inbox.until_terminal("a5", T);
    assert_eq!(streamed_text(&events), expected);
    assert_eq!(last(&events)["text"], expected.as_str());
    // Every reply carried the request's correlation data.
    c5.request(PREFIX, &gen("c5", "hi", json!({"max_tokens": 2})), &reply5);
    let m = c5
        .inbox
        .wait_for(T, |m| m.json()["event"] == "done")
        .expect("done");
    assert_eq!(m.correlation.as_deref(), Some(&b"c5"[..]));

    // MQTT 3.1.1: the reply topic travels in the request as `reply_to`. Raw prompts from here
    // on, each starting with a token no earlier request began with, so that the session's
    // prompt-prefix reuse does not come into play (see service_uds.rs).
    let mut raw_flags = flags.to_vec();
    raw_flags.push("--raw");
    let expected = generate(&tiny(), &raw_flags, prompt);
    let id4 = unique("v311");
    let mut c4 = Client::connect(broker.port, Version::V311, &id4, false);
    let reply4 = format!("test/{id4}/reply");
    c4.subscribe(&reply4);
    let mut r = sampling;
    r["op"] = json!("generate");
    r["id"] = json!("a4");
    r["prompt"] = json!(prompt);
    r["reply_to"] = json!(reply4);
    c4.request(PREFIX, &r, &reply4);
    let events = c4.inbox.until_terminal("a4", T);
    assert_eq!(format!("{}\n", streamed_text(&events)), expected);

    // `ask --mqtt` prints what `generate` prints (and finds the service online).
    let ask_prompt = "Once upon a time";
    let expected = generate(&tiny(), &raw_flags, ask_prompt);
    let printed = stdout_of(
        std::process::Command::new(BIN)
            .args(["ask", "--mqtt", &broker.url(), "--wait-online", "10"])
            .args(&raw_flags)
            .arg(ask_prompt),
        "ask",
    );
    assert_eq!(printed, expected);
    drop(server);
}

#[test]
fn ask_wait_online_gives_up_when_no_service_is_online() {
    let Some(broker) = Broker::start("ask_wait_online_gives_up_when_no_service_is_online") else {
        return;
    };
    let started = Instant::now();
    let out = std::process::Command::new(BIN)
        .args(["ask", "--mqtt", &broker.url(), "--wait-online", "1", "hi"])
        .output()
        .expect("run ask");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not online") && stderr.contains("qwen2-edge/status"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    let bad = std::process::Command::new(BIN)
        .args(["ask", "--mqtt", &broker.url(), "--wait-online", "-1", "hi"])
        .output()
        .expect("run ask");
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn large_requests_over_mqtt() {
    let Some(broker) = Broker::start("large_requests_over_mqtt") else {
        return;
    };
    let _server = Server::start(
        &Spec::tiny()
            .no_socket()
            .limits(&["max_request_bytes = 131072"])
            .mqtt(broker.service_lines(&[])),
    );
    let (mut c, reply) = v5_client(broker.port, "large");
    // 100 KiB messages: ten times rumqttc's default packet limit.
    let padding = "p".repeat(100 * 1024);
    c.request(
        PREFIX,
        &gen("big", "hi", json!({"max_tokens": 3, "meta": padding})),
        &reply,
    );
    assert_eq!(last(&c.inbox.until_terminal("big", T))["event"], "done");
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(100 * 1024 / 45 + 1);
    c.request(
        PREFIX,
        &json!({"op": "generate", "id": "bigp", "prompt": prompt}),
        &reply,
    );
    let e = c.inbox.until_terminal("bigp", T);
    assert_eq!(e[0]["code"], "too_long");
    assert!(
        e[0]["message"].as_str().unwrap_or("").contains("tokens"),
        "{e:?}"
    );
    // Over the configured maximum: refused with an error event; the subscription still works.
    let huge = json!({"op": "generate", "id": "huge", "prompt": "x".repeat(200 * 1024)});
    c.request(PREFIX, &huge, &reply);
    let e = c.inbox.error(T, "too long");
    assert_eq!(e["code"], "too_long");
    c.request(
        PREFIX,
        &gen("after", "hi", json!({"max_tokens": 2})),
        &reply,
    );
    assert_eq!(last(&c.inbox.until_terminal("after", T))["event"], "done");
}

#[test]
fn bad_input_over_mqtt_gets_one_error_each() {
    let Some(broker) = Broker::start("bad_input_over_mqtt_gets_one_error_each") else {
        return;
    };
    let _server = Server::start(
        &Spec::tiny()
            .no_socket()
            .limits(&["max_new_tokens = 50", "max_prompt_tokens = 16"])
            .mqtt(broker.service_lines(&[])),
    );
    let (mut c, reply) = v5_client(broker.port, "bad");
    let topic = format!("{PREFIX}/request");
    let cases: Vec<(Vec<u8>, Option<&str>)> = vec![
        (b"{not json".to_vec(), None),
        (b"[1]".to_vec(), None),
        (vec![0xff, 0xfe, 0x00], None),
        (br#"{"op":"sing","id":"u"}"#.to_vec(), Some("u")),
        (br#"{"op":"generate","id":"m"}"#.to_vec(), Some("m")),
        (
            br#"{"op":"generate","id":"w","prompt":false}"#.to_vec(),
            Some("w"),
        ),
        (
            br#"{"op":"generate","id":"c","prompt":"x","max_tokens":500}"#.to_vec(),
            Some("c"),
        ),
        (
            br#"{"op":"generate","id":"s","prompt":"x","top_p":2}"#.to_vec(),
            Some("s"),
        ),
        (
            json!({"op":"generate","id":"p","prompt":"word ".repeat(50)})
                .to_string()
                .into_bytes(),
            Some("p"),
        ),
    ];
    for (payload, _) in &cases {
        c.publish(&topic, payload.clone(), Some(&reply), Some(b"corr"));
    }
    let mut errors = Vec::new();
    while errors.len() < cases.len() {
        let Some(m) = c.inbox.wait_for(T, |m| m.json()["event"] == "error") else {
            break;
        };
        assert_eq!(m.correlation.as_deref(), Some(&b"corr"[..]));
        errors.push(m.json());
    }
    assert_eq!(errors.len(), cases.len(), "{errors:#?}");
    let mut got: Vec<Option<&str>> = errors.iter().map(|e| e["id"].as_str()).collect();
    let mut want: Vec<Option<&str>> = cases.iter().map(|(_, id)| *id).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    let extra = c.inbox.drain(Duration::from_millis(300));
    assert!(extra.is_empty(), "{extra:?}");

    // A 3.1.1 client's unreadable request has no reply topic: its error goes to <prefix>/error.
    let id4 = unique("bad311");
    let mut c4 = Client::connect(broker.port, Version::V311, &id4, false);
    c4.subscribe(&format!("{PREFIX}/error"));
    c4.publish(&topic, b"nonsense".to_vec(), None, None);
    let e = c4
        .inbox
        .wait_for(T, |m| m.topic == "qwen2-edge/error")
        .expect("error on the error topic")
        .json();
    assert_eq!(e["code"], "bad_request");
    // ...and a request without any reply topic is refused there too.
    c4.publish(
        &topic,
        gen("nr", "hi", json!({})).to_string().into_bytes(),
        None,
        None,
    );
    let e = c4
        .inbox
        .wait_for(T, |m| m.json()["id"] == "nr")
        .expect("error for nr")
        .json();
    assert!(e["message"].as_str().unwrap_or("").contains("reply"), "{e}");
    // The subscription keeps working.
    c.request(PREFIX, &json!({"op": "health", "id": "h"}), &reply);
    let h = c
        .inbox
        .wait_for(T, |m| m.json()["id"] == "h")
        .expect("health")
        .json();
    assert_eq!(h["status"], "ok");
}

#[test]
fn fifty_concurrent_mqtt_clients_each_get_one_answer() {
    let Some(broker) = Broker::start("fifty_concurrent_mqtt_clients_each_get_one_answer") else {
        return;
    };
    let server = Server::start(
        &Spec::tiny()
            .no_socket()
            .limits(&[
                "max_concurrent = 2",
                "max_queue = 6",
                "min_token_interval_ms = 4",
            ])
            .mqtt(broker.service_lines(&[])),
    );
    let rss_before = server.rss_kib();
    let port = broker.port;
    let handles: Vec<_> = (0..50)
        .map(|i| {
            std::thread::spawn(move || {
                let (mut c, reply) = v5_client(port, &format!("load{i}"));
                let id = format!("r{i}");
                c.request(
                    PREFIX,
                    &gen(&id, "count to ten", json!({"max_tokens": 30})),
                    &reply,
                );
                let events = c.inbox.until_terminal(&id, Duration::from_secs(90));
                let late = c.inbox.drain(Duration::from_millis(200));
                assert!(
                    !late.iter().any(|m| is_terminal(&m.json())),
                    "second terminal event: {late:?}"
                );
                let l = events.last().cloned().unwrap_or(Json::Null);
                match l["event"].as_str() {
                    Some("done") => "done".to_string(),
                    _ => format!("error:{}", l["code"].as_str().unwrap_or("")),
                }
            })
        })
        .collect();
    let mut totals: HashMap<String, usize> = HashMap::new();
    for h in handles {
        *totals.entry(h.join().expect("client")).or_insert(0) += 1;
    }
    let done = totals.get("done").copied().unwrap_or(0);
    let busy = totals.get("error:busy").copied().unwrap_or(0);
    assert_eq!(done + busy, 50, "{totals:?}");
    assert!(done >= 8, "{totals:?}");
    assert!(busy > 0, "{totals:?}");
    assert!(server.rss_kib() < rss_before + 64 * 1024);
}

#[test]
fn cancel_over_mqtt_on_both_topics() {
    let Some(broker) = Broker::start("cancel_over_mqtt_on_both_topics") else {
        return;
    };
    let _server = Server::start(
        &Spec::tiny()
            .no_socket()
            .limits(&["max_concurrent = 2", "min_token_interval_ms = 25"])
            .mqtt(broker.service_lines(&["token_interval_ms = 0"])),
    );
    let (mut c, reply) = v5_client(broker.port, "cancel");
    c.request(PREFIX, &gen("x1", "go", json!({"max_tokens": 200})), &reply);
    c.request(PREFIX, &gen("x2", "go", json!({"max_tokens": 200})), &reply);
    for id in ["x1", "x2"] {
        c.inbox
            .wait_for(T, |m| m.json()["id"] == id && m.json()["event"] == "token")
            .expect("a token");
    }
    let start = Instant::now();
    // On the request topic, with the response topic naming the request...
    c.request(PREFIX, &json!({"op": "cancel", "id": "x1"}), &reply);
    // ...and on the cancel topic (what reaches every box of a shared group).
    c.publish(
        &format!("{PREFIX}/cancel"),
        json!({"op": "cancel", "id": "x2"}).to_string().into_bytes(),
        Some(&reply),
        None,
    );
    for id in ["x1", "x2"] {
        let events = c.inbox.until_terminal(id, T);
        let d = last(&events);
        assert_eq!(d["finish_reason"], "cancelled", "{d}");
        assert!(d["usage"]["completion_tokens"].as_u64().unwrap_or(999) < 100);
    }
    assert!(start.elapsed() < Duration::from_secs(3));
}

/// An MQTT 5 client with a persistent session (its subscription and the replies it has not
/// received yet survive a broker restart), subscribed to its reply topic.
fn persistent_client(port: u16, tag: &str) -> (Client, String) {
    let cid = unique(tag);
    let c = Client::connect(port, Version::V5, &cid, true);
    let reply = format!("test/{cid}/reply");
    c.subscribe(&reply);
    (c, reply)
}

/// Every terminal event per id that arrives within `timeout` (stops early once each of `ids`
/// has one and nothing more came for a second).
fn terminal_events(
    c: &mut Client,
    ids: &[String],
    timeout: Duration,
) -> HashMap<String, Vec<Json>> {
    let mut finals: HashMap<String, Vec<Json>> = HashMap::new();
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        let all = ids.iter().all(|id| finals.contains_key(id));
        let wait = if all {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(500)
        };
        match c.inbox.wait_for(wait, |m| is_terminal(&m.json())) {
            Some(m) => {
                let j = m.json();
                let id = j["id"].as_str().unwrap_or("").to_string();
                finals.entry(id).or_default().push(j);
            }
            None if all => break,
            None => {}
        }
    }
    finals
}

/// Each id ended with `done`; a repeated ending is the same event (QoS 1 may deliver a message
/// twice around a broker restart), never a second, different one.
fn assert_each_done(finals: &HashMap<String, Vec<Json>>, ids: &[String], server: &Server) {
    for id in ids {
        let ends = finals
            .get(id)
            .unwrap_or_else(|| panic!("no terminal event for {id}: {finals:?}\n{}", server.log()));
        assert!(
            ends.iter().all(|e| e == &ends[0]),
            "{id} ended differently: {ends:?}"
        );
        assert_eq!(ends[0]["event"], "done", "{id}: {}", ends[0]);
    }
}

#[test]
fn a_broker_restart_loses_no_request() {
    let Some(mut broker) = Broker::start("a_broker_restart_loses_no_request") else {
        return;
    };
    let server = Server::start(
        &Spec::tiny()
            .no_socket()
            .limits(&[
                "max_concurrent = 1",
                "max_queue = 8",
                "min_token_interval_ms = 20",
            ])
            .mqtt(broker.service_lines(&[])),
    );
    let (mut c, reply) = persistent_client(broker.port, "survivor");
    for i in 0..4 {
        c.request(
            PREFIX,
            &gen(&format!("q{i}"), "tell a story", json!({"max_tokens": 40})),
            &reply,
        );
    }
    // q0 is streaming, q1..q3 are queued.
    c.inbox
        .wait_for(T, |m| {
            m.json()["id"] == "q0" && m.json()["event"] == "token"
        })
        .expect("q0 streams");
    broker.stop();
    // Published while the broker is down: the client holds it until it reconnects.
    c.request(
        PREFIX,
        &gen("q4", "tell a story", json!({"max_tokens": 5})),
        &reply,
    );
    std::thread::sleep(Duration::from_millis(1500));
    broker.start_again();
    assert!(
        c.wait_reconnected(Duration::from_secs(10)),
        "client did not reconnect"
    );
    let ids: Vec<String> = (0..5).map(|i| format!("q{i}")).collect();
    let finals = terminal_events(&mut c, &ids, Duration::from_secs(30));
    assert_each_done(&finals, &ids, &server);
    // Later requests are served, and the status topic says online again.
    c.request(
        PREFIX,
        &gen("later", "hi", json!({"max_tokens": 2})),
        &reply,
    );
    assert_eq!(last(&c.inbox.until_terminal("later", T))["event"], "done");
    assert_eq!(
        retained_status(broker.port, "qwen2-edge/status").as_deref(),
        Some("online")
    );
}

#[test]
fn sigkill_with_requests_queued_and_in_flight_then_each_gets_one_terminal_event() {
    let Some(broker) = Broker::start(
        "sigkill_with_requests_queued_and_in_flight_then_each_gets_one_terminal_event",
    ) else {
        return;
    };
    let journal = TempDir::new("mqtt-journal");
    let journal_dir = journal.0.join("journal");
    let spec = Spec::tiny()
        .no_socket()
        .limits(&[
            "max_concurrent = 1",
            "max_queue = 8",
            "min_token_interval_ms = 20",
        ])
        .mqtt(broker.service_lines(&[
            "client_id = \"killed-box\"",
            &format!("journal_dir = {:?}", journal_dir.display().to_string()),
        ]));
    let mut server = Server::start(&spec);
    let (mut c, reply) = persistent_client(broker.port, "kill-client");
    let ids: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    for id in &ids[..5] {
        c.request(
            PREFIX,
            &gen(id, "tell a story", json!({"max_tokens": 20})),
            &reply,
        );
    }
    // k0 is streaming, k1..k4 are queued: all five were acknowledged to the broker.
    c.inbox
        .wait_for(T, |m| {
            m.json()["id"] == "k0" && m.json()["event"] == "token"
        })
        .expect("k0 streams");
    server.signal("KILL");
    server.wait_exit(T);
    let taken = std::fs::read_dir(&journal_dir).expect("journal").count();
    assert!(
        taken >= 5,
        "the journal holds the five requests taken: {taken}"
    );
    // Published while the daemon is dead: the broker keeps it in the daemon's session.
    c.request(
        PREFIX,
        &gen(&ids[5], "tell a story", json!({"max_tokens": 5})),
        &reply,
    );
    let server = Server::start(&spec);
    let finals = terminal_events(&mut c, &ids, Duration::from_secs(60));
    for id in &ids {
        let ends = finals
            .get(id)
            .unwrap_or_else(|| panic!("no terminal event for {id}: {finals:?}\n{}", server.log()));
        assert_eq!(ends.len(), 1, "{id} ended more than once: {ends:?}");
        assert_eq!(ends[0]["event"], "done", "{id}: {}", ends[0]);
    }
    assert!(
        server.log().contains("running again 5 request(s)"),
        "{}",
        server.log()
    );
    // Each entry goes once the broker has acknowledged its terminal event.
    let until = Instant::now() + T;
    while std::fs::read_dir(&journal_dir).expect("journal").count() > 0 {
        assert!(Instant::now() < until, "the journal was not emptied");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn twenty_broker_restarts_under_load_lose_no_request() {
    let Some(mut broker) = Broker::start("twenty_broker_restarts_under_load_lose_no_request")
    else {
        return;
    };
    let server = Server::start(
        &Spec::tiny()
            .no_socket()
            .limits(&[
                "max_concurrent = 2",
                "max_queue = 64",
                "min_token_interval_ms = 10",
            ])
            .mqtt(broker.service_lines(&[])),
    );
    let (mut c, reply) = persistent_client(broker.port, "restarts");
    let mut ids = Vec::new();
    for round in 0..20 {
        for k in 0..3 {
            let id = format!("r{round}-{k}");
            c.request(
                PREFIX,
                &gen(&id, "tell a story", json!({"max_tokens": 6})),
                &reply,
            );
            ids.push(id);
        }
        std::thread::sleep(Duration::from_millis(150));
        broker.stop();
        std::thread::sleep(Duration::from_millis(100));
        broker.start_again();
        assert!(
            c.wait_reconnected(Duration::from_secs(10)),
            "client did not reconnect after restart {round}"
        );
    }
    let finals = terminal_events(&mut c, &ids, Duration::from_secs(90));
    assert_each_done(&finals, &ids, &server);
}

#[test]
fn requests_published_while_the_service_restarts_are_served() {
    let Some(broker) = Broker::start("requests_published_while_the_service_restarts_are_served")
    else {
        return;
    };
    let spec = Spec::tiny()
        .no_socket()
        .mqtt(broker.service_lines(&["client_id = \"restart-box\""]));
    let mut server = Server::start(&spec);
    let (mut c, reply) = v5_client(broker.port, "restart");
    server.signal("TERM");
    assert_eq!(server.wait_exit(T).code(), Some(0));
    assert_eq!(
        retained_status(broker.port, "qwen2-edge/status").as_deref(),
        Some("offline")
    );
    for i in 0..3 {
        c.request(
            PREFIX,
            &gen(&format!("w{i}"), "hello", json!({"max_tokens": 3})),
            &reply,
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let _server = Server::start(&spec);
    for i in 0..3 {
        let events = c.inbox.until_terminal(&format!("w{i}"), T);
        assert_eq!(last(&events)["event"], "done", "{events:?}");
    }
}

#[test]
fn a_shared_subscription_splits_the_load() {
    let Some(broker) = Broker::start("a_shared_subscription_splits_the_load") else {
        return;
    };
    let box_spec = |name: &str| {
        Spec::tiny()
            .no_socket()
            .limits(&[
                "max_concurrent = 1",
                "max_queue = 20",
                "min_token_interval_ms = 5",
            ])
            .mqtt(broker.service_lines(&[
                &format!("client_id = {name:?}"),
                "shared_group = \"boxes\"",
                &format!("status_topic = \"qwen2-edge/status/{name}\""),
            ]))
    };
    let a = Server::start(&box_spec("box-a"));
    let b = Server::start(&box_spec("box-b"));
    let (mut c, reply) = v5_client(broker.port, "shared");
    for i in 0..12 {
        c.request(
            PREFIX,
            &gen(&format!("s{i}"), "hi", json!({"max_tokens": 10})),
            &reply,
        );
    }
    for i in 0..12 {
        let events = c.inbox.until_terminal(&format!("s{i}"), T);
        assert_eq!(last(&events)["event"], "done");
    }
    let served = |s: &Server| s.log().matches("request done").count();
    let (na, nb) = (served(&a), served(&b));
    assert_eq!(na + nb, 12, "each request served exactly once");
    assert!(
        na > 0 && nb > 0,
        "both boxes should take requests: {na} / {nb}"
    );
}

#[test]
fn stats_are_published_retained_at_the_configured_interval() {
    let Some(broker) = Broker::start("stats_are_published_retained_at_the_configured_interval")
    else {
        return;
    };
    let server =
        Server::start(&Spec::tiny().no_socket().mqtt(
            broker.service_lines(&["stats_interval_s = 1", "stats_topic = \"box/7/stats\""]),
        ));
    let (mut c, reply) = v5_client(broker.port, "stats");
    c.request(PREFIX, &gen("s1", "hi", json!({"max_tokens": 3})), &reply);
    c.inbox.until_terminal("s1", T);
    // Within two periods the retained stats count the request, by transport.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let text = retained_status(broker.port, "box/7/stats").unwrap_or_default();
        let stats: Json = serde_json::from_str(&text).unwrap_or(Json::Null);
        if stats["requests"]["mqtt"]["served"] == 1 {
            assert_eq!(stats["served"], 1, "{stats}");
            assert_eq!(stats["requests"]["http"]["accepted"], 0);
            assert!(stats["ttft_seconds"]["count"] == 1, "{stats}");
            break;
        }
        assert!(
            Instant::now() < until,
            "no stats counting the request: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(server);
}
