//! Harness for the service tests: the real `qwen2-edge serve` binary with a generated config
//! on temp paths, readiness from its systemd notify messages, a Unix socket client, and (in
//! `mqtt`) a private mosquitto on a free loopback port plus MQTT 5 / 3.1.1 test clients.

pub mod http;
pub mod mqtt;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

pub use crate::common::{fixture, stdout_of, TempDir};

pub const BIN: &str = env!("CARGO_BIN_EXE_qwen2-edge");

pub fn tiny() -> PathBuf {
    fixture("tiny-tied").join("bundle")
}

/// What to put in a generated config.
#[derive(Clone)]
pub struct Spec {
    pub bundle: PathBuf,
    pub variant: String,
    /// Lines of `[limits]`.
    pub limits: Vec<String>,
    /// Lines of `[mqtt]`; None: MQTT off.
    pub mqtt: Option<Vec<String>>,
    /// Lines of `[http]`; None: HTTP off.
    pub http: Option<Vec<String>>,
    /// `model.verify` (hash the bundle at start-up: a slower start).
    pub verify: bool,
    /// More lines of `[model]`.
    pub model: Vec<String>,
    /// `[[model]]` tables written instead of `[model]` (several models).
    pub model_tables: Option<String>,
    pub socket: bool,
    /// More lines of `[unix_socket]`.
    pub unix_socket: Vec<String>,
    /// Lines of `[lifecycle]`.
    pub lifecycle: Vec<String>,
    /// Lines of `[cache]`.
    pub cache: Vec<String>,
    /// Lines of `[log]`.
    pub log: Vec<String>,
    pub env: Vec<(String, String)>,
    /// A plain loopback port where the service's status can be read, when `[mqtt] url` is
    /// not one (TLS).
    pub status_port: Option<u16>,
}

impl Spec {
    pub fn tiny() -> Self {
        Self {
            bundle: tiny(),
            variant: "fp32".into(),
            limits: Vec::new(),
            mqtt: None,
            http: None,
            verify: false,
            model: Vec::new(),
            model_tables: None,
            socket: true,
            unix_socket: Vec::new(),
            lifecycle: Vec::new(),
            cache: Vec::new(),
            log: Vec::new(),
            env: Vec::new(),
            status_port: None,
        }
    }

    pub fn limits(mut self, lines: &[&str]) -> Self {
        self.limits.extend(lines.iter().map(|s| s.to_string()));
        self
    }

    pub fn lifecycle(mut self, lines: &[&str]) -> Self {
        self.lifecycle.extend(lines.iter().map(|s| s.to_string()));
        self
    }

    pub fn mqtt(mut self, lines: Vec<String>) -> Self {
        self.mqtt = Some(lines);
        self
    }

    pub fn http(mut self, lines: Vec<String>) -> Self {
        self.http = Some(lines);
        self
    }

    pub fn no_socket(mut self) -> Self {
        self.socket = false;
        self
    }

    fn render(&self, socket: &Path) -> String {
        let mut t = match &self.model_tables {
            Some(tables) => tables.clone(),
            None => format!(
                "[model]\nbundle = {:?}\nvariant = {:?}\nverify = {}\n",
                self.bundle.display().to_string(),
                self.variant,
                self.verify
            ),
        };
        for l in &self.model {
            t += l;
            t.push('\n');
        }
        t += "\n[limits]\n";
        for l in &self.limits {
            t += l;
            t.push('\n');
        }
        t += "\n[unix_socket]\n";
        if self.socket {
            t += &format!("path = {:?}\n", socket.display().to_string());
        } else {
            t += "path = \"\"\n";
        }
        for l in &self.unix_socket {
            t += l;
            t.push('\n');
        }
        for (section, lines) in [("mqtt", &self.mqtt), ("http", &self.http)] {
            if let Some(lines) = lines {
                t += &format!("\n[{section}]\n");
                for l in lines {
                    t += l;
                    t.push('\n');
                }
            }
        }
        t += "\n[lifecycle]\n";
        for l in &self.lifecycle {
            t += l;
            t.push('\n');
        }
        t += "\n[cache]\n";
        for l in &self.cache {
            t += l;
            t.push('\n');
        }
        t += "\n[log]\n";
        for l in &self.log {
            t += l;
            t.push('\n');
        }
        t
    }
}

/// A running `qwen2-edge serve`. Killed on drop if still running.
pub struct Server {
    pub child: Child,
    pub dir: TempDir,
    pub socket: PathBuf,
    notify: UnixDatagram,
    log: PathBuf,
}

impl Server {
    /// Starts the server and waits for `READY=1` (at most 60 s).
    pub fn start(spec: &Spec) -> Self {
        let dir = TempDir::new("serve");
        Self::start_in(dir, spec)
    }

    /// Starts the server without waiting for readiness (to watch it start).
    pub fn launch_spec(spec: &Spec) -> Self {
        Self::launch_in(TempDir::new("serve"), spec)
    }

    /// Writes the config into `dir` and starts `serve` on it, without waiting.
    fn launch_in(dir: TempDir, spec: &Spec) -> Self {
        let socket = dir.0.join("s.sock");
        let config = dir.0.join("config.toml");
        std::fs::write(&config, spec.render(&socket)).expect("write config");
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config"]).arg(&config);
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        Self::launch(cmd, dir, socket)
    }

    /// Starts in a given directory (its socket path stays the same across restarts).
    pub fn start_in(dir: TempDir, spec: &Spec) -> Self {
        let mut server = Self::launch_in(dir, spec);
        server.wait_notify("READY=1", Duration::from_secs(60));
        if let Some(lines) = &spec.mqtt {
            // READY means the service takes work, not that the broker has its subscription
            // yet: wait for the retained "online" it publishes right after subscribing.
            let value = |key: &str| {
                lines.iter().find_map(|l| {
                    let (k, v) = l.split_once('=')?;
                    (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
                })
            };
            let port: u16 = spec
                .status_port
                .or_else(|| value("url").and_then(|u| u.rsplit(':').next()?.parse().ok()))
                .expect("mqtt url with a port");
            let topic = value("status_topic").unwrap_or_else(|| "qwen2-edge/status".into());
            let until = Instant::now() + Duration::from_secs(20);
            while mqtt::retained_status(port, &topic).as_deref() != Some("online") {
                assert!(
                    Instant::now() < until,
                    "service never said online; log:\n{}",
                    server.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        server
    }

    /// Spawns a server command (`serve` and its arguments already set) with a notify socket in
    /// `dir` and its stderr in a log file there, and waits for `READY=1` (at most 60 s).
    /// `socket` is where clients connect.
    pub fn spawn(cmd: Command, dir: TempDir, socket: PathBuf) -> Self {
        let mut server = Self::launch(cmd, dir, socket);
        server.wait_notify("READY=1", Duration::from_secs(60));
        server
    }

    /// `spawn` without waiting for readiness (a socket-activated server starts on the first
    /// connection).
    pub fn launch(mut cmd: Command, dir: TempDir, socket: PathBuf) -> Self {
        let notify_path = dir.0.join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
        let log = dir.0.join(format!("serve-{}.log", now_nanos()));
        let stderr = std::fs::File::create(&log).expect("log file");
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info,qwen2_edge=debug");
        }
        cmd.env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd.spawn().expect("spawn qwen2-edge serve");
        Self {
            child,
            dir,
            socket,
            notify,
            log,
        }
    }

    /// Waits for a notify datagram containing `what`; panics with the log on timeout.
    pub fn wait_notify(&mut self, what: &str, timeout: Duration) {
        let until = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "no {what} from the server in {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            self.notify
                .set_read_timeout(Some(left.min(Duration::from_millis(200))))
                .expect("timeout");
            match self.notify.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    if text.lines().any(|l| l == what) {
                        return;
                    }
                }
                Err(_) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        panic!(
                            "server exited ({status}) before {what}; log:\n{}",
                            self.log()
                        );
                    }
                }
            }
        }
    }

    /// Every notify message received from now until `timeout`.
    pub fn notify_messages(&self, timeout: Duration) -> Vec<String> {
        let until = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < until {
            let left = until.saturating_duration_since(Instant::now());
            let _ = self
                .notify
                .set_read_timeout(Some(left.max(Duration::from_millis(1))));
            if let Ok(n) = self.notify.recv(&mut buf) {
                out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        out
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the process to exit (panics after `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let until = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!(
                    "server did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (if running) and hands over its directory, to start another server
    /// on the same socket path.
    pub fn take_dir(&mut self) -> TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::replace(&mut self.dir, TempDir(PathBuf::new()))
    }

    pub fn connect(&self) -> UdsClient {
        UdsClient::connect(&self.socket)
    }

    /// Memory in use (VmRSS, KiB) from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- server log (last 60 lines) ---\n{}",
                tail(&self.log(), 60)
            );
        }
    }
}

/// The last `n` lines of a text.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// One received message: a socket line, or an MQTT payload with its topic and correlation.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub correlation: Option<Vec<u8>>,
}

impl Msg {
    pub fn json(&self) -> Json {
        serde_json::from_slice(&self.payload).unwrap_or(Json::Null)
    }
}

/// Messages arriving on a channel, searchable out of order.
pub struct Inbox {
    rx: mpsc::Receiver<Msg>,
    pending: Vec<Msg>,
}

impl Inbox {
    pub fn new(rx: mpsc::Receiver<Msg>) -> Self {
        Self {
            rx,
            pending: Vec::new(),
        }
    }

    /// The next `error` event, within `timeout` (`what` names it if none comes).
    pub fn error(&mut self, timeout: Duration, what: &str) -> Json {
        self.wait_for(timeout, |m| m.json()["event"] == "error")
            .unwrap_or_else(|| panic!("no error event: {what}"))
            .json()
    }

    /// The first message (received or still to come within `timeout`) matching `pred`.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&Msg) -> bool) -> Option<Msg> {
        if let Some(i) = self.pending.iter().position(&pred) {
            return Some(self.pending.remove(i));
        }
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(m) if pred(&m) => return Some(m),
                Ok(m) => self.pending.push(m),
                Err(_) => return None,
            }
        }
    }

    /// Everything that arrives within `timeout`, plus what is pending.
    pub fn drain(&mut self, timeout: Duration) -> Vec<Msg> {
        let until = Instant::now() + timeout;
        let mut out = std::mem::take(&mut self.pending);
        while let Ok(m) = self
            .rx
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            out.push(m);
        }
        out
    }

    /// The events of request `id` up to and including its terminal one (panics on timeout).
    pub fn until_terminal(&mut self, id: &str, timeout: Duration) -> Vec<Json> {
        let until = Instant::now() + timeout;
        let mut events = Vec::new();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let Some(m) = self.wait_for(left, |m| m.json()["id"] == id) else {
                panic!("no terminal event for {id} within {timeout:?}; got {events:?}");
            };
            let j = m.json();
            let terminal = is_terminal(&j);
            events.push(j);
            if terminal {
                return events;
            }
        }
    }
}

pub fn is_terminal(j: &Json) -> bool {
    matches!(j["event"].as_str(), Some("done") | Some("error"))
}

/// The concatenated `token` texts of a list of events.
pub fn streamed_text(events: &[Json]) -> String {
    events
        .iter()
        .filter(|e| e["event"] == "token")
        .filter_map(|e| e["text"].as_str())
        .collect()
}

/// A Unix socket client: a reader thread feeds an `Inbox`.
pub struct UdsClient {
    pub stream: UnixStream,
    pub inbox: Inbox,
}

impl UdsClient {
    pub fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).expect("connect to the service socket");
        let reader = stream.try_clone().expect("clone");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(reader);
            let mut line = Vec::new();
            loop {
                line.clear();
                match lines.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if line.last() == Some(&b'\n') {
                            line.pop();
                        }
                        let m = Msg {
                            topic: String::new(),
                            payload: line.clone(),
                            correlation: None,
                        };
                        if tx.send(m).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Self {
            stream,
            inbox: Inbox::new(rx),
        }
    }

    pub fn send_line(&mut self, line: &[u8]) {
        self.stream.write_all(line).expect("write");
        self.stream.write_all(b"\n").expect("write");
    }

    pub fn send(&mut self, request: &Json) {
        self.try_send(request).expect("write");
    }

    /// `send`, for a connection the service may already have closed (a refusal): the error
    /// instead of a panic.
    pub fn try_send(&mut self, request: &Json) -> std::io::Result<()> {
        self.stream.write_all(format!("{request}\n").as_bytes())
    }

    /// Waits for the next message (any id).
    pub fn next(&mut self, timeout: Duration) -> Option<Json> {
        self.inbox.wait_for(timeout, |_| true).map(|m| m.json())
    }

    pub fn until_terminal(&mut self, id: &str, timeout: Duration) -> Vec<Json> {
        self.inbox.until_terminal(id, timeout)
    }
}

/// The `done` event that ends `events` (panics if they end otherwise).
pub fn done_of(events: &[Json]) -> &Json {
    let last = events.last().expect("events");
    assert_eq!(last["event"], "done", "{events:?}");
    last
}

/// A chat `generate` request with one user message, plus the fields of `extra`.
pub fn gen(id: &str, prompt: &str, extra: Json) -> Json {
    let mut r =
        json!({"op": "generate", "id": id, "messages": [{"role": "user", "content": prompt}]});
    if let (Some(r), Some(extra)) = (r.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            r.insert(k.clone(), v.clone());
        }
    }
    r
}

/// `qwen2-edge generate` with the given flags; its stdout.
pub fn generate(bundle: &Path, flags: &[&str], prompt: &str) -> String {
    stdout_of(
        Command::new(BIN)
            .arg("generate")
            .arg("--bundle")
            .arg(bundle)
            .args(["--no-verify"])
            .args(flags)
            .arg(prompt),
        "generate",
    )
}

/// `bundle install` of fixture `fixture_name` as model `name` of `store`; the version `current`
/// names now.
pub fn store_install(store: &Path, name: &str, fixture_name: &str) -> String {
    let out = Command::new(BIN)
        .args(["bundle", "install"])
        .arg(fixture(fixture_name).join("bundle"))
        .args(["--store", &store.to_string_lossy(), "--name", name])
        .env_remove("RUST_LOG")
        .output()
        .expect("bundle install");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_link(store.join(name).join("current"))
        .expect("current")
        .to_string_lossy()
        .into_owned()
}

/// Asks for `health` over the socket until `done` says it is what we wait for (at most 30 s).
pub fn health_until(server: &Server, what: &str, done: impl Fn(&Json) -> bool) -> Json {
    let limit = Duration::from_secs(30);
    let until = Instant::now() + limit;
    loop {
        let mut c = server.connect();
        c.send(&json!({"op": "health", "id": "h"}));
        let h = c.next(limit).expect("health");
        if done(&h) {
            return h;
        }
        assert!(
            Instant::now() < until,
            "{what}: last health {h}; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Makes a damaged copy of the tiny-untied fixture (one weight byte flipped: its sha256 no
/// longer matches) the `current` version of model `name` in `store`, behind the store's back.
pub fn damaged_current(store: &Path, name: &str) {
    let model = store.join(name);
    let bad = model.join("damaged");
    crate::common::copy_dir(&fixture("tiny-untied").join("bundle"), &bad);
    let data = bad.join("onnx/fp32/model.onnx.data");
    let mut bytes = std::fs::read(&data).expect("read");
    bytes[64] ^= 0x40;
    std::fs::write(&data, bytes).expect("write");
    let link = model.join(".current.test");
    std::os::unix::fs::symlink("damaged", &link).expect("symlink");
    std::fs::rename(&link, model.join("current")).expect("flip");
}

/// Runs a Python script as user `nobody` (through runuser; needs root, as CI has); its stdout,
/// or None when this machine cannot (the caller says it skipped).
pub fn python_as_nobody(script: &str) -> Option<String> {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if !is_root || Command::new("runuser").arg("--help").output().is_err() {
        return None;
    }
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", "python3", "-c", script])
        .output()
        .expect("runuser");
    Some(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}
