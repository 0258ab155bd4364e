//! What the daemon gives away: no secret (the MQTT password, the HTTP API key) in its log at the
//! most verbose level, in `health`, `stats` or `/metrics`, whatever clients send; and its Unix
//! socket refuses a user outside its group.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::service_support::http::{self, Addr};
use crate::service_support::mqtt::{free_port, v5_client, Broker};
use crate::service_support::{gen, Server, Spec};

const T: Duration = Duration::from_secs(30);
const PASSWORD: &str = "mqtt-pw-7Hq2vXk9";
const API_KEY: &str = "api-key-Zr4mW8cT";

#[test]
fn secrets_never_reach_the_log_health_stats_or_metrics() {
    let Some(broker) = Broker::start("secrets_never_reach_the_log_health_stats_or_metrics") else {
        return;
    };
    let port = free_port();
    let dir = crate::common::TempDir::new("secrets");
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
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if !is_root || Command::new("runuser").arg("--help").output().is_err() {
        eprintln!("the_socket_refuses_a_user_outside_its_group skipped: needs root and runuser");
        return;
    }
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
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", "python3", "-c", &script])
        .output()
        .expect("runuser");
    let text = String::from_utf8_lossy(&out.stdout);
    if text.starts_with("unreachable") {
        eprintln!(
            "the_socket_refuses_a_user_outside_its_group skipped: a directory above the socket is closed to nobody here ({text})"
        );
        return;
    }
    assert!(
        text.contains("refused 13"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    ); // EACCES
       // The service's own user still gets in.
    let mut c = server.connect();
    c.send(&json!({"op": "health", "id": "h"}));
    assert_eq!(c.next(T).expect("health")["status"], "ok");
}
