//! What the daemon gives away: no secret (the MQTT password, the HTTP API key) in its log at the
//! most verbose level, in `health`, `stats` or `/metrics`, whatever clients send; its Unix
//! socket refuses a user outside its group; and over MQTT the broker's ACL decides who may
//! reload it.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::common::TempDir;
use crate::service_support::http::{self, Addr};
use crate::service_support::mqtt::{free_port, v5_client, Broker, Client};
use crate::service_support::{gen, health_until, python_as_nobody, store_install, Server, Spec};

const T: Duration = Duration::from_secs(30);
const PASSWORD: &str = "mqtt-pw-7Hq2vXk9";
const API_KEY: &str = "api-key-Zr4mW8cT";

#[test]
fn secrets_never_reach_the_log_health_stats_or_metrics() {
    let Some(broker) = Broker::start("secrets_never_reach_the_log_health_stats_or_metrics") else {
        return;
    };
    let port = free_port();
    let dir = TempDir::new("secrets");
    let key_file = dir.0.join("api-key");
    std::fs::write(&key_file, format!("{API_KEY}\n")).expect("key file");
    let password_file = dir.0.join("mqtt-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("password file");
    let mut spec = Spec::tiny()
        .mqtt(broker.service_lines(&[
            "username = \"edge\"",
            &format!("password_file = {:?}", password_file.display().to_string()),
            "stats_interval_s = 1",
        ]))
        .http(vec![
            format!("listen = [\"127.0.0.1:{port}\"]"),
            format!("api_key_file = {:?}", key_file.display().to_string()),
        ]);
    // Everything every crate logs, rumqttc's packets included.
    spec.env.push(("RUST_LOG".into(), "trace".into()));
    let server = Server::start(&spec);
    let tcp = Addr::Tcp(port);
    let auth = ("Authorization", &*format!("Bearer {API_KEY}"));
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    assert_eq!(
        http::post_json(&tcp, "/v1/chat/completions", &[auth], &body).status,
        200
    );
    // A client that sends a near miss, and one that sends the password as its key.
    for wrong in [&API_KEY[..API_KEY.len() - 1], PASSWORD] {
        let bad = ("Authorization", &*format!("Bearer {wrong}"));
        assert_eq!(
            http::post_json(&tcp, "/v1/chat/completions", &[bad], &body).status,
            401
        );
    }
    let metrics = http::request(&tcp, "GET", "/metrics", &[auth], b"")
        .expect("metrics")
        .text();
    let health = http::get(&tcp, "/health").expect("health").text();
    let (mut c, reply) = v5_client(broker.port, "secrets");
    c.request(
        "qwen2-edge",
        &gen("m", "hi", json!({"max_tokens": 3})),
        &reply,
    );
    c.inbox
        .wait_for(T, |m| m.topic == reply && m.json()["event"] == "done")
        .expect("an MQTT answer");
    let mut s = server.connect();
    s.send(&json!({"op": "stats", "id": "s"}));
    let stats = s.next(T).expect("stats").to_string();
    s.send(&json!({"op": "health", "id": "h"}));
    let health_op = s.next(T).expect("health").to_string();
    std::thread::sleep(Duration::from_millis(1200)); // a periodic stats publication
    let log = server.log();
    assert!(
        log.lines().count() > 50,
        "the trace log is suspiciously short:\n{log}"
    );
    for (what, text) in [
        ("log", &log),
        ("/metrics", &metrics),
        ("/health", &health),
        ("stats", &stats),
        ("health", &health_op),
    ] {
        for secret in [PASSWORD, API_KEY] {
            assert!(!text.contains(secret), "{what} contains {secret}");
        }
        // Nor the near miss a client sent.
        assert!(
            !text.contains(&API_KEY[..API_KEY.len() - 1]),
            "{what} contains the client's key"
        );
    }
}

#[test]
fn the_socket_refuses_a_user_outside_its_group() {
    // The shipped mode: owner and group may connect, others may not.
    let mut spec = Spec::tiny();
    spec.unix_socket = vec!["mode = \"0660\"".into()];
    let server = Server::start(&spec);
    // The directory lets anyone through, so only the socket's own mode decides.
    let dir = server.socket.parent().expect("socket dir");
    let mut perms = std::fs::metadata(dir).expect("dir").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(dir, perms).expect("chmod");
    // stat needs only the directories above to be searchable: if it works, a refused connect is
    // the socket's own mode speaking.
    let script = format!(
        "import os, socket\np={:?}\n\
         try: os.stat(p)\n\
         except OSError as e: print('unreachable', e.errno); raise SystemExit\n\
         s=socket.socket(socket.AF_UNIX)\n\
         try:\n  s.connect(p)\n  print('connected')\n\
         except OSError as e: print('refused', e.errno)",
        server.socket.display().to_string()
    );
    let Some(text) = python_as_nobody(&script) else {
        eprintln!("the_socket_refuses_a_user_outside_its_group skipped: needs root and runuser");
        return;
    };
    if text.starts_with("unreachable") {
        eprintln!(
            "the_socket_refuses_a_user_outside_its_group skipped: a directory above the socket is closed to nobody here ({text})"
        );
        return;
    }
    assert!(text.contains("refused 13"), "{text}"); // EACCES
                                                    // The service's own user still gets in.
    let mut c = server.connect();
    c.send(&json!({"op": "health", "id": "h"}));
    assert_eq!(c.next(T).expect("health")["status"], "ok");
}

/// With `mqtt.allow_reload`, who may reload is the broker's ACL: a device that may publish
/// requests cannot reload the box; the operator, who alone may write `<prefix>/reload`, can.
#[test]
fn the_broker_acl_decides_who_may_reload_over_mqtt() {
    let test = "the_broker_acl_decides_who_may_reload_over_mqtt";
    let secure = free_port();
    // The plain listener stays open to the harness (it reads the retained status there); the
    // other one wants a login and applies the ACL.
    let Some(broker) = Broker::start_with(test, "per_listener_settings true\n", &|dir| {
        for (i, user) in ["service", "operator", "device"].iter().enumerate() {
            let mut cmd = Command::new("mosquitto_passwd");
            cmd.arg("-b");
            if i == 0 {
                cmd.arg("-c");
            }
            let status = cmd
                .arg(dir.join("passwd"))
                .arg(user)
                .arg(format!("{user}-pw"))
                .status()
                .expect("run mosquitto_passwd");
            assert!(status.success());
        }
        std::fs::write(
            dir.join("acl"),
            "user service\ntopic readwrite qwen2-edge/#\ntopic write test/#\n\n\
             user operator\ntopic write qwen2-edge/reload\ntopic read test/#\n\n\
             user device\ntopic write qwen2-edge/request\ntopic read test/#\n",
        )
        .expect("acl");
        format!(
            "listener {secure} 127.0.0.1\nallow_anonymous false\n\
             password_file {d}/passwd\nacl_file {d}/acl\n",
            d = dir.display()
        )
    }) else {
        return;
    };
    let d = broker.dir.0.clone();
    std::fs::write(d.join("service-password"), "service-pw\n").expect("password file");
    let store = TempDir::new("acl-store");
    let v1 = store_install(&store.0, "tiny", "tiny-tied");
    let mut spec = Spec::tiny().mqtt(vec![
        format!("url = \"mqtt://127.0.0.1:{secure}\""),
        "username = \"service\"".into(),
        format!(
            "password_file = {:?}",
            d.join("service-password").display().to_string()
        ),
        "allow_reload = true".into(),
    ]);
    spec.status_port = Some(broker.port);
    spec.bundle = store.0.join("tiny/current");
    let server = Server::start(&spec);
    let v2 = store_install(&store.0, "tiny", "tiny-untied");
    let reload = json!({"op": "reload", "id": "r"}).to_string().into_bytes();

    // The device may ask questions...
    let mut device = Client::connect_as(secure, "acl-device", "device", "device-pw");
    device.subscribe("test/device/reply");
    device.request(
        "qwen2-edge",
        &gen("q", "hi", json!({"max_tokens": 3})),
        "test/device/reply",
    );
    device
        .inbox
        .wait_for(T, |m| m.json()["event"] == "done")
        .expect("the device's answer");
    // ...but its reload never reaches the service.
    device.publish(
        "qwen2-edge/reload",
        reload.clone(),
        Some("test/device/reply"),
        None,
    );
    std::thread::sleep(Duration::from_millis(1500));
    let h = health_until(&server, "after the device's reload", |_| true);
    assert_eq!(h["reload"]["state"], "none", "{h}");
    assert_eq!(h["version"], v1.as_str(), "{h}");

    let mut operator = Client::connect_as(secure, "acl-operator", "operator", "operator-pw");
    operator.subscribe("test/operator/reply");
    operator.publish(
        "qwen2-edge/reload",
        reload,
        Some("test/operator/reply"),
        None,
    );
    let answer = operator
        .inbox
        .wait_for(T, |m| m.topic == "test/operator/reply")
        .expect("the operator's answer")
        .json();
    assert_eq!(answer["event"], "health", "{answer}");
    let h = health_until(&server, "the operator's reload", |h| {
        h["reload"]["state"] == "done"
    });
    assert_eq!(h["version"], v2.as_str(), "{h}");
}
