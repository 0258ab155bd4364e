//! SIGHUP: the daemon loads the model its config names now (a store's `current` link moved by
//! `bundle install`) next to the running one, switches new requests to it, and lets the old one
//! finish its requests; a reload that fails leaves the old model serving and says why.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use crate::common::TempDir;
use crate::service_support::mqtt::{retained_status, v5_client, Broker};
use crate::service_support::{
    damaged_current, done_of, gen, health_until, python_as_nobody, store_install, Server, Spec,
};

const T: Duration = Duration::from_secs(30);

fn install(store: &Path, fixture_name: &str) -> String {
    store_install(store, "tiny", fixture_name)
}

fn spec(store: &Path) -> Spec {
    let mut spec = Spec::tiny();
    spec.bundle = store.join("tiny/current");
    spec.verify = true;
    // 40 tokens take two seconds: a request is still running when the reload happens.
    spec.limits(&["max_concurrent = 2", "min_token_interval_ms = 50"])
}

#[test]
fn sighup_switches_new_requests_to_the_new_version_and_finishes_the_old_ones() {
    let store = TempDir::new("reload-store");
    let v1 = install(&store.0, "tiny-tied");
    let server = Server::start(&spec(&store.0));
    let mut old = server.connect();
    old.send(&gen(
        "old",
        "Count to forty.",
        json!({"max_tokens": 40, "temperature": 0}),
    ));
    // It is running (a first token came) before the new version goes in.
    old.inbox
        .wait_for(T, |m| {
            m.json()["id"] == "old" && m.json()["event"] == "token"
        })
        .expect("a first token");
    let v2 = install(&store.0, "tiny-untied");
    assert_ne!(v1, v2);
    server.signal("HUP");
    let h = health_until(&server, "reload to v2", |h| h["reload"]["state"] == "done");
    assert!(
        h["bundle"].as_str().is_some_and(|b| b.ends_with(&v2)),
        "{h}"
    );
    // The request accepted before the reload ran to its end on the old model.
    let events = old.until_terminal("old", T);
    let done = done_of(&events);
    assert_ne!(done["finish_reason"], "cancelled", "{done}");
    let tokens = events.iter().filter(|e| e["event"] == "token").count();
    assert!(tokens > 1, "the old request stopped early: {events:?}");
    // New requests go to the new model.
    let mut new = server.connect();
    new.send(&gen(
        "new",
        "Hello",
        json!({"max_tokens": 3, "temperature": 0}),
    ));
    done_of(&new.until_terminal("new", T));
    let until = Instant::now() + T;
    while !server
        .log()
        .contains("the old version finished and was unloaded")
    {
        assert!(
            Instant::now() < until,
            "old model never unloaded:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_failed_reload_leaves_the_old_model_serving() {
    let store = TempDir::new("reload-fail");
    let v1 = install(&store.0, "tiny-tied");
    let server = Server::start(&spec(&store.0));
    // A damaged version made current behind the store's back.
    damaged_current(&store.0, "tiny");
    server.signal("HUP");
    let h = health_until(&server, "reload failure", |h| {
        h["reload"]["state"] == "failed"
    });
    assert!(
        h["reload"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("sha256")),
        "{h}"
    );
    assert!(
        h["bundle"].as_str().is_some_and(|b| b.ends_with(&v1)),
        "{h}"
    );
    assert_eq!(h["status"], "ok");
    let mut c = server.connect();
    c.send(&gen(
        "after",
        "Hello",
        json!({"max_tokens": 3, "temperature": 0}),
    ));
    done_of(&c.until_terminal("after", T));
    assert!(server.log().contains("reload failed"), "{}", server.log());
}

#[test]
fn the_retained_mqtt_health_follows_reloads() {
    let Some(broker) = Broker::start("the_retained_mqtt_health_follows_reloads") else {
        return;
    };
    let store = TempDir::new("reload-mqtt");
    let v1 = install(&store.0, "tiny-tied");
    let server = Server::start(&spec(&store.0).mqtt(broker.service_lines(&[])));
    let retained = |what: &str, done: &dyn Fn(&Json) -> bool| -> Json {
        let until = Instant::now() + T;
        loop {
            let text = retained_status(broker.port, "qwen2-edge/health").unwrap_or_default();
            let health: Json = serde_json::from_str(&text).unwrap_or(Json::Null);
            if done(&health) {
                return health;
            }
            assert!(Instant::now() < until, "{what}: retained health {text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let h = retained("at start", &|h| h["status"] == "ok");
    assert!(
        h["bundle"].as_str().is_some_and(|b| b.ends_with(&v1)),
        "{h}"
    );
    assert_eq!(h["reload"]["state"], "none");
    let v2 = install(&store.0, "tiny-untied");
    server.signal("HUP");
    let h = retained("after the reload", &|h| h["reload"]["state"] == "done");
    assert!(
        h["bundle"].as_str().is_some_and(|b| b.ends_with(&v2)),
        "{h}"
    );
    // A reload that fails (the config now names a variant the bundle lacks) is reported too.
    let config = server.dir.0.join("config.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("variant = \"fp32\"", "variant = \"fp3\""),
    )
    .expect("config");
    server.signal("HUP");
    let h = retained("after the failed reload", &|h| {
        h["reload"]["state"] == "failed"
    });
    assert!(
        h["reload"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("fp3")),
        "{h}"
    );
    assert!(
        h["bundle"].as_str().is_some_and(|b| b.ends_with(&v2)),
        "{h}"
    );
    // MQTT cannot vouch for who asks: a reload request there is refused.
    let (mut c, reply) = v5_client(broker.port, "reload");
    c.request("qwen2-edge", &json!({"op": "reload", "id": "r"}), &reply);
    let m = c
        .inbox
        .wait_for(T, |m| m.topic == reply)
        .expect("an answer");
    assert_eq!(m.json()["code"], "forbidden", "{}", m.json());
}

#[test]
fn a_reload_over_the_socket_needs_it_allowed_and_a_trusted_peer() {
    let store = TempDir::new("reload-socket");
    install(&store.0, "tiny-tied");
    // Off by default.
    let server = Server::start(&spec(&store.0));
    let mut c = server.connect();
    c.send(&json!({"op": "reload", "id": "r"}));
    let e = c.next(T).expect("answer");
    assert_eq!(e["code"], "forbidden", "{e}");
    drop(server);

    let mut allowed = spec(&store.0);
    allowed.unix_socket = vec!["allow_reload = true".into(), "mode = \"0666\"".into()];
    let server = Server::start(&allowed);
    let v2 = install(&store.0, "tiny-untied");
    let mut c = server.connect();
    c.send(&json!({"op": "reload", "id": "r"}));
    let h = c.next(T).expect("answer");
    assert_eq!(h["event"], "health", "{h}");
    assert_eq!(h["id"], "r");
    assert!(
        h["reload"]["state"] == "in_progress" || h["reload"]["state"] == "done",
        "{h}"
    );
    let h = health_until(&server, "socket reload", |h| h["reload"]["state"] == "done");
    assert!(
        h["bundle"].as_str().is_some_and(|b| b.ends_with(&v2)),
        "{h}"
    );
    // Another user who may connect (mode 0666) may not reload. Needs root to act as `nobody`.
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\n\
         try: s.connect({:?})\n\
         except OSError as e: print('unreachable', e); sys.exit()\n\
         s.sendall(b'{{\"op\":\"reload\",\"id\":\"n\"}}\\n')\n\
         sys.stdout.write(s.makefile().readline())",
        server.socket.display().to_string()
    );
    match python_as_nobody(&script) {
        None => eprintln!("the other-user part skipped: needs root and runuser"),
        // The temp directory is not open to other users here (TMPDIR under /root, say).
        Some(text) if text.starts_with("unreachable") => {
            eprintln!("the other-user part skipped: {text}")
        }
        Some(text) => assert!(
            text.contains("\"forbidden\"") && text.contains("only root"),
            "{text}"
        ),
    }
}
