//! The shipped systemd units, checked with systemd's own tools and run the way systemd runs
//! them: `systemd-analyze verify` on the unit files (and the GPU/NPU drop-in), the service's
//! ExecStartPre/ExecStart with its watchdog and notify socket on the shipped example config,
//! and socket activation through `systemd-socket-activate` with the socket unit's ListenStream.
//! Only paths are replaced (binary, config, socket) so the test needs no root and no install.

use crate::common;
use crate::service_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use service_support::{stdout_of, streamed_text, tiny, Server, TempDir, BIN};

const T: Duration = Duration::from_secs(30);
const UNIT_BIN: &str = "/usr/bin/qwen2-edge";
const UNIT_CONFIG: &str = "/etc/qwen2-edge/qwen2-edge.toml";
const UNIT_SOCKET: &str = "/run/qwen2-edge/qwen2-edge.sock";

fn systemd_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(name)
}

/// `key -> values` of one section of a unit file (keys may repeat, e.g. ExecStartPre).
fn section(unit: &str, name: &str) -> HashMap<String, Vec<String>> {
    let text = std::fs::read_to_string(systemd_file(unit)).expect("read unit");
    let mut current = String::new();
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = s.to_string();
        } else if current == name {
            let (k, v) = line.split_once('=').expect("key=value");
            out.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    out
}

fn one(section: &HashMap<String, Vec<String>>, key: &str) -> String {
    match section.get(key).map(Vec::as_slice) {
        Some([v]) => v.clone(),
        other => panic!("{key}: expected one value, got {other:?}"),
    }
}

/// A systemd time span as the units use it ("30s", "2s", "45s").
fn seconds(span: &str) -> u64 {
    span.strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unsupported time span {span:?}"))
}

/// A systemd tool, or None with a visible skip note (CI must have it: .ci/run installs systemd).
fn tool(name: &str, test: &str) -> Option<PathBuf> {
    ["/usr/bin", "/bin", "/usr/lib/systemd"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .or_else(|| common::unavailable(test, &format!("no {name} (apt-get install systemd)")))
}

/// The example config with the fixture bundle and socket paths under `dir`; every other key
/// (sha256 verification, threads, limits) as shipped.
fn example_config(dir: &Path, socket: &Path) -> PathBuf {
    let text = std::fs::read_to_string(systemd_file("qwen2-edge.toml")).expect("example config");
    let bundle_line = text
        .lines()
        .find(|l| l.starts_with("bundle = "))
        .expect("bundle key");
    let socket_line = format!("path = {UNIT_SOCKET:?}");
    assert!(text.contains(&socket_line), "example socket path changed");
    let text = text
        .replace(
            bundle_line,
            &format!("bundle = {:?}", tiny().display().to_string()),
        )
        .replace(
            &socket_line,
            &format!("path = {:?}", socket.display().to_string()),
        );
    let path = dir.join("qwen2-edge.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// A unit's command line with the installed paths replaced by the test's. The units use no
/// quoting or specifiers, so whitespace splitting is exact.
fn command_line(line: &str, config: &Path) -> Vec<String> {
    assert!(
        !line.contains(['"', '\'', '%', '$']),
        "unit command line needs a real parser now: {line}"
    );
    line.split_whitespace()
        .map(|w| match w {
            UNIT_BIN => BIN.to_string(),
            UNIT_CONFIG => config.display().to_string(),
            _ => w.to_string(),
        })
        .collect()
}

fn ask(server: &Server, socket: &Path) -> String {
    let mut c = service_support::UdsClient::connect(socket);
    c.send(&json!({"op": "generate", "id": "q", "prompt": "hello", "max_tokens": 4}));
    let events = c.until_terminal("q", T);
    let last = events.last().expect("events");
    assert_eq!(last["event"], "done", "{events:?}\nlog:\n{}", server.log());
    streamed_text(&events)
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let test = "units_pass_systemd_analyze_verify";
    let Some(analyze) = tool("systemd-analyze", test) else {
        return;
    };
    // verify wants ExecStart's binary to exist: point it at the one just built.
    let dir = TempDir::new("units");
    for unit in ["qwen2-edge.service", "qwen2-edge.socket"] {
        let text = std::fs::read_to_string(systemd_file(unit)).expect("unit");
        std::fs::write(dir.0.join(unit), text.replace(UNIT_BIN, BIN)).expect("copy unit");
    }
    let dropins = dir.0.join("qwen2-edge.service.d");
    std::fs::create_dir_all(&dropins).expect("mkdir");
    std::fs::copy(systemd_file("gpu-npu.conf"), dropins.join("gpu-npu.conf")).expect("drop-in");
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(dir.0.join("qwen2-edge.service"))
        .arg(dir.0.join("qwen2-edge.socket"))
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys and unparsable values, only warning: any line is a failure.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

/// `systemd-analyze security` rates the shipped unit's exposure at most 2.0 ("OK"; 1.7 when
/// this test was written: most of what is left is network access, which the MQTT and HTTP front
/// ends need, and `@privileged`/`@resources` system calls). `--threshold` is on its 0–100 scale.
#[test]
fn the_service_unit_is_rated_ok_by_systemd_analyze_security() {
    let test = "the_service_unit_is_rated_ok_by_systemd_analyze_security";
    let Some(analyze) = tool("systemd-analyze", test) else {
        return;
    };
    let out = Command::new(analyze)
        .args(["security", "--offline=true", "--threshold=20", "--no-pager"])
        .arg(systemd_file("qwen2-edge.service"))
        .output()
        .expect("run systemd-analyze security");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let overall = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("");
    assert!(
        out.status.success() && overall.contains(" OK"),
        "{overall}\n{}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn service_unit_starts_checks_and_stops_the_daemon_as_systemd_would() {
    let service = section("qwen2-edge.service", "Service");
    assert_eq!(one(&service, "Type"), "notify");
    let dir = TempDir::new("unit");
    let socket = dir.0.join("qwen2-edge.sock");
    let config = example_config(&dir.0, &socket);

    for pre in service.get("ExecStartPre").into_iter().flatten() {
        let argv = command_line(pre, &config);
        stdout_of(Command::new(&argv[0]).args(&argv[1..]), pre);
    }

    let argv = command_line(&one(&service, "ExecStart"), &config);
    let watchdog = seconds(&one(&service, "WatchdogSec"));
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("WATCHDOG_USEC", (watchdog * 1_000_000).to_string());
    for env in service.get("Environment").into_iter().flatten() {
        let (k, v) = env.split_once('=').expect("Environment=KEY=VALUE");
        cmd.env(k, v);
    }
    let mut server = Server::spawn(cmd, dir, socket.clone());
    assert!(!ask(&server, &socket).is_empty());

    // `systemctl reload`: the unit's ExecReload, with systemd's $MAINPID, makes the daemon
    // reload (the config is unchanged, so the reload finds nothing to replace and is done).
    let reload = one(&service, "ExecReload").replace("$MAINPID", &server.pid().to_string());
    let argv = command_line(&reload, &config);
    stdout_of(Command::new(&argv[0]).args(&argv[1..]), &reload);
    service_support::health_until(&server, "the reload ExecReload asked for", |h| {
        h["reload"]["state"] == "done"
    });
    assert!(server.log().contains("reload: done"), "{}", server.log());
    assert!(!ask(&server, &socket).is_empty());

    server.signal("TERM");
    server.wait_notify("STOPPING=1", T);
    let stop = Duration::from_secs(seconds(&one(&service, "TimeoutStopSec")));
    let status = server.wait_exit(stop);
    assert!(status.success(), "exit {status}\n{}", server.log());
    assert!(!socket.exists(), "the daemon's own socket file is removed");
}

#[test]
fn socket_unit_hands_its_listening_socket_to_the_daemon() {
    let test = "socket_unit_hands_its_listening_socket_to_the_daemon";
    let Some(activate) = tool("systemd-socket-activate", test) else {
        return;
    };
    let socket_unit = section("qwen2-edge.socket", "Socket");
    assert_eq!(one(&socket_unit, "ListenStream"), UNIT_SOCKET);
    assert_eq!(one(&socket_unit, "Accept"), "no");
    let service = section("qwen2-edge.service", "Service");

    let dir = TempDir::new("activate");
    // The config names another path: an activated daemon must serve on systemd's socket and
    // leave unix_socket.path alone.
    let configured = dir.0.join("configured.sock");
    let activated = dir.0.join("activated.sock");
    let config = example_config(&dir.0, &configured);
    let argv = command_line(&one(&service, "ExecStart"), &config);
    let mut cmd = Command::new(activate);
    // systemd-socket-activate starts the program with only the variables named by -E.
    cmd.arg("--listen")
        .arg(&activated)
        .args(["-E", "NOTIFY_SOCKET", "-E", "RUST_LOG"])
        .args(&argv);
    let mut server = Server::launch(cmd, dir, activated.clone());
    let until = std::time::Instant::now() + T;
    while !activated.exists() {
        assert!(
            std::time::Instant::now() < until,
            "no socket from systemd-socket-activate"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts the daemon; it is answered once the model has loaded.
    let answer = ask(&server, &activated);
    assert!(!answer.is_empty());
    server.wait_notify("READY=1", T);
    assert!(
        server.log().contains("socket activation"),
        "{}",
        server.log()
    );
    assert!(!configured.exists(), "unix_socket.path must not be bound");

    server.signal("TERM");
    let status = server.wait_exit(T);
    assert!(status.success(), "exit {status}\n{}", server.log());
    assert!(
        activated.exists(),
        "the socket file belongs to the socket unit and outlives the daemon"
    );
}

#[test]
fn socket_activation_hands_tcp_sockets_to_the_http_front_end() {
    let test = "socket_activation_hands_tcp_sockets_to_the_http_front_end";
    let Some(activate) = tool("systemd-socket-activate", test) else {
        return;
    };
    let dir = TempDir::new("activate-http");
    let activated = dir.0.join("activated.sock");
    let port = service_support::mqtt::free_port();
    let configured_port = service_support::mqtt::free_port();
    let config = dir.0.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\nbundle = {:?}\nverify = false\n[unix_socket]\npath = {:?}\n[http]\nlisten = [\"127.0.0.1:{configured_port}\"]\n",
            tiny().display().to_string(),
            dir.0.join("configured.sock").display().to_string()
        ),
    )
    .expect("config");
    let mut cmd = Command::new(activate);
    // As a socket unit with `ListenStream=/path` and `ListenStream=127.0.0.1:PORT` passes them.
    cmd.arg("--listen")
        .arg(&activated)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["-E", "NOTIFY_SOCKET", "-E", "RUST_LOG"])
        .args([BIN, "serve", "--config"])
        .arg(&config);
    let mut server = Server::launch(cmd, dir, activated.clone());
    // The first connection starts the daemon; /health says 200 once the model has loaded.
    let tcp = service_support::http::Addr::Tcp(port);
    let until = std::time::Instant::now() + T;
    loop {
        let status = service_support::http::get(&tcp, "/health").map(|r| r.status);
        if status == Some(200) {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "no 200 from the activated HTTP socket (last: {status:?})\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server.wait_notify("READY=1", T);
    assert!(
        server.log().contains("http: socket activation"),
        "{}",
        server.log()
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", configured_port)).is_err(),
        "http.listen must not be bound under socket activation"
    );
    assert!(!ask(&server, &activated).is_empty());
    server.signal("TERM");
    let status = server.wait_exit(T);
    assert!(status.success(), "exit {status}\n{}", server.log());
}
