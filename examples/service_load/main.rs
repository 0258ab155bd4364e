//! Load test for a running `qwen2-edge serve`: N concurrent clients (loopback only), each
//! sending requests back to back; prints requests/s and latency percentiles per level.
//! Bounded in count (`--requests` per level) and time (`--max-seconds` per level).
//!
//! ```text
//! cargo run --release --example service_load -- --socket /tmp/q.sock --clients 1,4,16 --requests 64
//! cargo run --release --example service_load -- --mqtt 127.0.0.1:1883 --clients 1,4,16 --requests 64
//! ```
//! scripts/service-load.sh starts a service (and mosquitto) and runs both transports.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

struct Options {
    socket: Option<String>,
    mqtt: Option<(String, u16)>,
    prefix: String,
    clients: Vec<usize>,
    requests: usize,
    max_tokens: usize,
    prompt: String,
    max_seconds: u64,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        socket: None,
        mqtt: None,
        prefix: "qwen2-edge".into(),
        clients: vec![1, 4, 16],
        requests: 64,
        max_tokens: 32,
        prompt: "Write one sentence about the sea.".into(),
        max_seconds: 120,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--socket" => o.socket = Some(value()?),
            "--mqtt" => {
                let v = value()?;
                let v = v.trim_start_matches("mqtt://").to_string();
                let (h, p) = v.rsplit_once(':').ok_or("--mqtt HOST:PORT")?;
                let port = p.parse().map_err(|_| "--mqtt HOST:PORT")?;
                if h != "127.0.0.1" && h != "localhost" && h != "::1" {
                    return Err("the load test only talks to loopback".into());
                }
                o.mqtt = Some((h.to_string(), port));
            }
            "--topic-prefix" => o.prefix = value()?,
            "--clients" => {
                o.clients = value()?
                    .split(',')
                    .map(|c| c.parse().map_err(|_| "--clients 1,4,16".to_string()))
                    .collect::<Result<_, _>>()?
            }
            "--requests" => o.requests = value()?.parse().map_err(|_| "--requests N")?,
            "--max-tokens" => o.max_tokens = value()?.parse().map_err(|_| "--max-tokens N")?,
            "--prompt" => o.prompt = value()?,
            "--max-seconds" => o.max_seconds = value()?.parse().map_err(|_| "--max-seconds S")?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.socket.is_none() == o.mqtt.is_none() {
        return Err("give exactly one of --socket PATH or --mqtt HOST:PORT".into());
    }
    if o.requests == 0 || o.requests > 100_000 || o.clients.iter().any(|&c| c == 0 || c > 256) {
        return Err("requests in 1..=100000, clients in 1..=256".into());
    }
    Ok(o)
}

/// One finished request: latency, time to first token, outcome.
struct Sample {
    latency: Duration,
    ttft: Option<Duration>,
    ok: bool,
}

/// A connection that sends one request at a time and waits for its terminal event.
trait Conn {
    fn roundtrip(&mut self, request: &Json, id: &str) -> Result<Sample, String>;
}

struct Socket {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Socket {
    fn connect(path: &str) -> Result<Self, String> {
        let s = UnixStream::connect(path).map_err(|e| format!("{path}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(300)))
            .map_err(|e| e.to_string())?;
        let reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        Ok(Self { writer: s, reader })
    }
}

impl Conn for Socket {
    fn roundtrip(&mut self, request: &Json, id: &str) -> Result<Sample, String> {
        let start = Instant::now();
        let mut ttft = None;
        writeln!(self.writer, "{request}").map_err(|e| e.to_string())?;
        let mut line = String::new();
        loop {
            line.clear();
            if self
                .reader
                .read_line(&mut line)
                .map_err(|e| e.to_string())?
                == 0
            {
                return Err("connection closed".into());
            }
            let e: Json = serde_json::from_str(&line).map_err(|e| e.to_string())?;
            if e["id"] != id {
                continue;
            }
            match e["event"].as_str() {
                Some("token") => {
                    ttft.get_or_insert_with(|| start.elapsed());
                }
                Some("done") => {
                    return Ok(Sample {
                        latency: start.elapsed(),
                        ttft,
                        ok: true,
                    })
                }
                Some("error") => {
                    return Ok(Sample {
                        latency: start.elapsed(),
                        ttft,
                        ok: false,
                    })
                }
                _ => {}
            }
        }
    }
}

struct Mqtt {
    client: rumqttc::v5::Client,
    rx: std::sync::mpsc::Receiver<Json>,
    reply: String,
    prefix: String,
}

impl Mqtt {
    fn connect(host: &str, port: u16, prefix: &str, n: usize) -> Result<Self, String> {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::Event;
        let id = format!("load-{}-{n}", std::process::id());
        let mut o = rumqttc::v5::MqttOptions::new(id.clone(), host, port);
        o.set_max_packet_size(Some(16 * 1024 * 1024));
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        o.set_network_options(network);
        let (client, mut connection) = rumqttc::v5::Client::new(o, 64);
        let (tx, rx) = std::sync::mpsc::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(j) = serde_json::from_slice::<Json>(&p.payload) {
                            if tx.send(j).is_err() {
                                return;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        let reply = format!("{prefix}/load/{id}");
        client
            .subscribe(reply.clone(), QoS::AtLeastOnce)
            .map_err(|e| e.to_string())?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "no SubAck from the broker".to_string())?;
        Ok(Self {
            client,
            rx,
            reply,
            prefix: prefix.to_string(),
        })
    }
}

impl Conn for Mqtt {
    fn roundtrip(&mut self, request: &Json, id: &str) -> Result<Sample, String> {
        use rumqttc::v5::mqttbytes::v5::PublishProperties;
        use rumqttc::v5::mqttbytes::QoS;
        let start = Instant::now();
        let mut ttft = None;
        let props = PublishProperties {
            response_topic: Some(self.reply.clone()),
            ..PublishProperties::default()
        };
        self.client
            .publish_with_properties(
                format!("{}/request", self.prefix),
                QoS::AtLeastOnce,
                false,
                request.to_string(),
                props,
            )
            .map_err(|e| e.to_string())?;
        loop {
            let e = self
                .rx
                .recv_timeout(Duration::from_secs(300))
                .map_err(|_| "no answer".to_string())?;
            if e["id"] != id {
                continue;
            }
            match e["event"].as_str() {
                Some("token") => {
                    ttft.get_or_insert_with(|| start.elapsed());
                }
                Some("done") | Some("error") => {
                    return Ok(Sample {
                        latency: start.elapsed(),
                        ttft,
                        ok: e["event"] == "done",
                    })
                }
                _ => {}
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn run_level(o: &Options, clients: usize) -> Result<(), String> {
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(o.max_seconds);
    let start = Instant::now();
    let mut handles = Vec::new();
    for n in 0..clients {
        let next = Arc::clone(&next);
        let mut conn: Box<dyn Conn + Send> = match (&o.socket, &o.mqtt) {
            (Some(path), _) => Box::new(Socket::connect(path)?),
            (None, Some((host, port))) => Box::new(Mqtt::connect(host, *port, &o.prefix, n)?),
            _ => return Err("no target".into()),
        };
        let total = o.requests;
        let max_tokens = o.max_tokens;
        let prompt = o.prompt.clone();
        handles.push(std::thread::spawn(move || {
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || Instant::now() > deadline {
                    return Ok::<_, String>(samples);
                }
                let id = format!("load-{clients}-{i}");
                // Each prompt differs after the chat template's shared system prompt, so the
                // sessions' prefix reuse helps as it would in real use, not more.
                let content = format!("{prompt} (request {i})");
                let request = json!({"op": "generate", "id": id, "temperature": 0,
                    "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]});
                samples.push(conn.roundtrip(&request, &id)?);
            }
        }));
    }
    let mut samples = Vec::new();
    for h in handles {
        samples.extend(h.join().map_err(|_| "client thread panicked")??);
    }
    let wall = start.elapsed().as_secs_f64();
    let ok = samples.iter().filter(|s| s.ok).count();
    let mut lat: Vec<f64> = samples
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.latency.as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    let mut ttft: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.ttft)
        .map(|t| t.as_secs_f64() * 1000.0)
        .collect();
    ttft.sort_by(f64::total_cmp);
    println!(
        "{:>7} {:>8} {:>6} {:>6} {:>9.2} {:>10.1} {:>10.1} {:>11.1}",
        clients,
        samples.len(),
        ok,
        samples.len() - ok,
        ok as f64 / wall,
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        percentile(&ttft, 50.0),
    );
    Ok(())
}

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "transport {}, {} requests per level, max_tokens {}",
        if o.socket.is_some() {
            "unix socket"
        } else {
            "mqtt"
        },
        o.requests,
        o.max_tokens
    );
    println!(
        "{:>7} {:>8} {:>6} {:>6} {:>9} {:>10} {:>10} {:>11}",
        "clients", "requests", "ok", "errors", "req/s", "p50 ms", "p99 ms", "ttft p50 ms"
    );
    for &c in &o.clients {
        if let Err(e) = run_level(&o, c) {
            eprintln!("error at {c} clients: {e}");
            std::process::exit(1);
        }
    }
}
