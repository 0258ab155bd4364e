//! A private mosquitto (Debian's package) on a free loopback port, with persistence in a temp
//! dir, and MQTT test clients (rumqttc: v5 with response topics, v3.1.1 with `reply_to`).

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use super::{Inbox, Msg, TempDir};

fn mosquitto_binary() -> Option<PathBuf> {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// A mosquitto of our own. Stopped (SIGTERM, so it saves its persistence file) on drop.
pub struct Broker {
    pub dir: TempDir,
    pub port: u16,
    binary: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// None (with a visible note) when mosquitto is not installed, unless CI is set: there
    /// it must be (`.ci/run` installs it) and the test fails.
    pub fn start(test: &str) -> Option<Self> {
        Self::start_with(test, "", &|_| String::new())
    }

    /// With extra config: `head` first (global options such as per_listener_settings), then
    /// the plain loopback listener, then `tail(dir)` (more listeners; files in `dir`).
    pub fn start_with(
        test: &str,
        head: &str,
        tail: &dyn Fn(&std::path::Path) -> String,
    ) -> Option<Self> {
        let Some(binary) = mosquitto_binary() else {
            if std::env::var_os("CI").is_some() {
                panic!("{test}: mosquitto is required in CI (apt-get install mosquitto)");
            }
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "{test} skipped: mosquitto not installed (apt-get install mosquitto)"
            );
            return None;
        };
        let dir = TempDir::new("mosquitto");
        let port = free_port();
        let mut b = Self {
            dir,
            port,
            binary,
            child: None,
        };
        let tail = tail(&b.dir.0);
        b.write_config(head, &tail);
        b.start_again();
        Some(b)
    }

    fn write_config(&self, head: &str, tail: &str) {
        let d = &self.dir.0;
        // Running as root, mosquitto switches to user `mosquitto`, which could not write our
        // temp dir: stay as whoever we are.
        let probe = d.join("owner-probe");
        std::fs::write(&probe, b"").expect("probe");
        let root =
            std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&probe).expect("meta")) == 0;
        let config = format!(
            "{head}listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             set_tcp_nodelay true\n\
             persistence true\n\
             persistence_location {dir}/\n\
             autosave_interval 1\n\
             log_dest file {dir}/mosquitto.log\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
             max_queued_messages 10000\n\
             {user}{tail}",
            port = self.port,
            dir = d.display(),
            user = if root { "user root\n" } else { "" },
        );
        std::fs::write(d.join("mosquitto.conf"), config).expect("write mosquitto.conf");
    }

    /// (Re)starts mosquitto on the same port with the same persistence directory.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.dir.0.join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < until,
                "mosquitto did not listen on {}: {}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops mosquitto cleanly (it writes its persistence file on the way out).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let until = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > until {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("mosquitto.log")).unwrap_or_default()
    }

    /// `[mqtt]` lines for the service: this broker, fast reconnects, a unique client id.
    pub fn service_lines(&self, extra: &[&str]) -> Vec<String> {
        let defaults = [
            format!("url = {:?}", self.url()),
            "reconnect_initial_ms = 100".to_string(),
            "reconnect_max_ms = 500".to_string(),
            "token_interval_ms = 50".to_string(),
        ];
        let key = |line: &str| line.split('=').next().unwrap_or("").trim().to_string();
        let mut v: Vec<String> = defaults
            .into_iter()
            .filter(|d| !extra.iter().any(|e| key(e) == key(d)))
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- mosquitto log (last 40 lines) ---\n{}",
                super::tail(&self.log(), 40)
            );
        }
    }
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("addr").port()
}

/// Which MQTT version a test client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V5,
    V311,
}

enum Handle {
    V5(rumqttc::v5::Client),
    V4(rumqttc::Client),
}

/// A test client: a thread polls the connection (reconnecting on errors, as an application
/// would) and feeds received publishes into an `Inbox`.
pub struct Client {
    handle: Handle,
    pub inbox: Inbox,
    stop: Arc<AtomicBool>,
    connacks: mpsc::Receiver<()>,
    subacks: mpsc::Receiver<()>,
}

impl Client {
    /// Connects and waits for the ConnAck. `persistent`: clean_start/clean_session false with
    /// a session that outlives a broker restart.
    pub fn connect(port: u16, version: Version, id: &str, persistent: bool) -> Self {
        Self::connect_with(port, version, id, persistent, None)
    }

    /// An MQTT 5 client that logs in as `user`.
    pub fn connect_as(port: u16, id: &str, user: &str, password: &str) -> Self {
        Self::connect_with(port, Version::V5, id, false, Some((user, password)))
    }

    fn connect_with(
        port: u16,
        version: Version,
        id: &str,
        persistent: bool,
        login: Option<(&str, &str)>,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let (ctx, connacks) = mpsc::channel();
        let (stx, subacks) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let handle = match version {
            Version::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
                if let Some((user, password)) = login {
                    o.set_credentials(user, password);
                }
                o.set_clean_start(!persistent);
                if persistent {
                    o.set_session_expiry_interval(Some(3600));
                }
                o.set_max_packet_size(Some(16 * 1024 * 1024));
                o.set_keep_alive(Duration::from_secs(5));
                let (client, mut connection) = rumqttc::v5::Client::new(o, 256);
                std::thread::spawn(move || {
                    use rumqttc::v5::mqttbytes::v5::Packet;
                    use rumqttc::v5::Event;
                    while !stop2.load(Ordering::Relaxed) {
                        match connection.recv_timeout(Duration::from_millis(200)) {
                            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                                let m = Msg {
                                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                    payload: p.payload.to_vec(),
                                    correlation: p
                                        .properties
                                        .and_then(|x| x.correlation_data)
                                        .map(|b| b.to_vec()),
                                };
                                let _ = tx.send(m);
                            }
                            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                                let _ = ctx.send(());
                            }
                            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                                let _ = stx.send(());
                            }
                            Ok(Ok(_)) => {}
                            Ok(Err(_)) => std::thread::sleep(Duration::from_millis(100)),
                            Err(rumqttc::v5::RecvTimeoutError::Timeout) => {}
                            Err(_) => return,
                        }
                    }
                });
                Handle::V5(client)
            }
            Version::V311 => {
                let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
                o.set_clean_session(!persistent);
                o.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
                o.set_keep_alive(Duration::from_secs(5));
                let (client, mut connection) = rumqttc::Client::new(o, 256);
                std::thread::spawn(move || {
                    use rumqttc::{Event, Packet};
                    while !stop2.load(Ordering::Relaxed) {
                        match connection.recv_timeout(Duration::from_millis(200)) {
                            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                                let m = Msg {
                                    topic: p.topic.clone(),
                                    payload: p.payload.to_vec(),
                                    correlation: None,
                                };
                                let _ = tx.send(m);
                            }
                            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                                let _ = ctx.send(());
                            }
                            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                                let _ = stx.send(());
                            }
                            Ok(Ok(_)) => {}
                            Ok(Err(_)) => std::thread::sleep(Duration::from_millis(100)),
                            Err(rumqttc::RecvTimeoutError::Timeout) => {}
                            Err(_) => return,
                        }
                    }
                });
                Handle::V4(client)
            }
        };
        let c = Self {
            handle,
            inbox: Inbox::new(rx),
            stop,
            connacks,
            subacks,
        };
        c.connacks
            .recv_timeout(Duration::from_secs(10))
            .expect("test client: no ConnAck");
        c
    }

    /// Subscribes (QoS 1) and waits for the SubAck.
    pub fn subscribe(&self, topic: &str) {
        match &self.handle {
            Handle::V5(c) => c
                .subscribe(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .expect("subscribe"),
            Handle::V4(c) => c
                .subscribe(topic, rumqttc::QoS::AtLeastOnce)
                .expect("subscribe"),
        }
        self.subacks
            .recv_timeout(Duration::from_secs(10))
            .expect("test client: no SubAck");
    }

    /// Waits for the next ConnAck (after a broker restart).
    pub fn wait_reconnected(&self, timeout: Duration) -> bool {
        self.connacks.recv_timeout(timeout).is_ok()
    }

    /// Publishes with QoS 1; for v5 with an optional response topic and correlation data.
    pub fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        response_topic: Option<&str>,
        correlation: Option<&[u8]>,
    ) {
        match &self.handle {
            Handle::V5(c) => {
                use rumqttc::v5::mqttbytes::v5::PublishProperties;
                let props = PublishProperties {
                    response_topic: response_topic.map(str::to_string),
                    correlation_data: correlation.map(|c| c.to_vec().into()),
                    ..PublishProperties::default()
                };
                c.publish_with_properties(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload,
                    props,
                )
                .expect("publish");
            }
            Handle::V4(c) => c
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .expect("publish"),
        }
    }

    /// A request to `<prefix>/request`, replies to `reply` (MQTT 5 response topic for v5,
    /// the `reply_to` field for v3.1.1, which the caller puts in the JSON).
    pub fn request(&self, prefix: &str, request: &Json, reply: &str) {
        let corr = request["id"].as_str().unwrap_or("").as_bytes().to_vec();
        match self.handle {
            Handle::V5(_) => self.publish(
                &format!("{prefix}/request"),
                request.to_string().into_bytes(),
                Some(reply),
                Some(&corr),
            ),
            Handle::V4(_) => self.publish(
                &format!("{prefix}/request"),
                request.to_string().into_bytes(),
                None,
                None,
            ),
        }
    }

    pub fn disconnect(&self) {
        match &self.handle {
            Handle::V5(c) => {
                let _ = c.disconnect();
            }
            Handle::V4(c) => {
                let _ = c.disconnect();
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.disconnect();
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A v5 client with a unique id (`<tag>-<nanos>`), subscribed to a reply topic of its own.
pub fn v5_client(port: u16, tag: &str) -> (Client, String) {
    let id = format!("{tag}-{}", super::now_nanos());
    let c = Client::connect(port, Version::V5, &id, false);
    let reply = format!("test/{id}/reply");
    c.subscribe(&reply);
    (c, reply)
}

/// The retained status message currently on `topic` (a fresh client reads it).
pub fn retained_status(port: u16, topic: &str) -> Option<String> {
    let c = Client::connect(
        port,
        Version::V5,
        &format!("status-reader-{}", super::now_nanos()),
        false,
    );
    let mut c = c;
    c.subscribe(topic);
    let m = c
        .inbox
        .wait_for(Duration::from_secs(3), |m| m.topic == topic)?;
    Some(String::from_utf8_lossy(&m.payload).into_owned())
}
