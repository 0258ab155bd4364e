//! Load test for a running `qwen2-edge serve`, or for an OpenAI-compatible server such as
//! llama.cpp's llama-server as the peer: N concurrent clients (loopback only), each sending
//! requests back to back; per level of concurrency it reports requests/s, generated tokens/s
//! and percentiles of the time to first token and of the total latency, all measured by the
//! client. Bounded in count (`--requests` per level) and time (`--max-seconds` per level: no
//! request starts after it).
//!
//! ```text
//! cargo run --release --example service_load -- --socket /tmp/q.sock --clients 1,4,16 --requests 64
//! cargo run --release --example service_load -- --mqtt 127.0.0.1:1883 --clients 1,4,16 --requests 64
//! cargo run --release --example service_load -- --http 127.0.0.1:8080 --workload shared-system --json
//! ```
//!
//! * `--workload plain` (default): a short user prompt per request. `shared-system`: a ~400-token
//!   system prompt shared by every request and a short question that varies (workload.rs);
//!   greedy with the repetition penalty off, the same on both servers.
//! * Cold vs cached (shared-system): when the first level has one client, its first request is
//!   the first time the server sees the system prompt (on a server started for the run); its
//!   TTFT is reported apart, beside the p50 TTFT of the level's other requests.
//! * Tokens: `usage.completion_tokens` of the final event (our `done`, the peer's last chunk with
//!   `stream_options.include_usage`), else the count of streamed pieces.
//! * `--json`: one JSON object per level (`"kind": "level"`), then one `"kind": "system_prompt"`
//!   with the prompt tokens of the system prompt sent alone (a probe after every level).
//!
//! scripts/service-load.sh starts a service (and mosquitto, and llama-server) and runs them.

mod http;
mod workload;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use workload::Workload;

struct Options {
    socket: Option<String>,
    mqtt: Option<(String, u16)>,
    http: Option<(String, u16)>,
    prefix: String,
    clients: Vec<usize>,
    requests: usize,
    max_tokens: usize,
    prompt: String,
    max_seconds: u64,
    workload: Workload,
    json: bool,
    label: Option<String>,
}

impl Options {
    fn transport(&self) -> &'static str {
        match (&self.socket, &self.mqtt) {
            (Some(_), _) => "unix",
            (None, Some(_)) => "mqtt",
            _ => "http",
        }
    }

    fn label(&self) -> String {
        self.label
            .clone()
            .unwrap_or_else(|| match self.transport() {
                "http" => "http".into(),
                _ => "qwen2-edge".into(),
            })
    }
}

/// `HOST:PORT` (an optional `scheme://` and trailing `/` dropped) whose host is loopback.
fn loopback(flag: &str, value: &str) -> Result<(String, u16), String> {
    let v = value.split_once("://").map_or(value, |(_, rest)| rest);
    let v = v.trim_end_matches('/');
    let (h, p) = v.rsplit_once(':').ok_or(format!("{flag} HOST:PORT"))?;
    let port = p.parse().map_err(|_| format!("{flag} HOST:PORT"))?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    if h != "127.0.0.1" && h != "localhost" && h != "::1" {
        return Err("the load test only talks to loopback".into());
    }
    Ok((h.to_string(), port))
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        socket: None,
        mqtt: None,
        http: None,
        prefix: "qwen2-edge".into(),
        clients: vec![1, 4, 16],
        requests: 64,
        max_tokens: 32,
        prompt: "Write one sentence about the sea.".into(),
        max_seconds: 120,
        workload: Workload::Plain,
        json: false,
        label: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--socket" => o.socket = Some(value()?),
            "--mqtt" => o.mqtt = Some(loopback("--mqtt", &value()?)?),
            "--http" => o.http = Some(loopback("--http", &value()?)?),
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
            "--workload" => o.workload = Workload::parse(&value()?)?,
            "--json" => o.json = true,
            "--label" => o.label = Some(value()?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let targets = [o.socket.is_some(), o.mqtt.is_some(), o.http.is_some()];
    if targets.iter().filter(|&&t| t).count() != 1 {
        return Err(
            "give exactly one of --socket PATH, --mqtt HOST:PORT or --http HOST:PORT".into(),
        );
    }
    if o.requests == 0 || o.requests > 100_000 || o.clients.iter().any(|&c| c == 0 || c > 256) {
        return Err("requests in 1..=100000, clients in 1..=256".into());
    }
    if o.max_tokens == 0 {
        return Err("--max-tokens must be at least 1".into());
    }
    Ok(o)
}

/// One request to send: its number in the level, chat messages and budget.
pub struct Work {
    index: usize,
    id: String,
    messages: Json,
    max_tokens: usize,
    /// Send the repetition penalty as 1 (off), so both servers decode plain greedy.
    no_repetition_penalty: bool,
}

/// One finished request, as the client saw it.
pub struct Sample {
    index: usize,
    latency: Duration,
    ttft: Option<Duration>,
    /// Streamed pieces with text (token events; SSE chunks with content).
    chunks: u64,
    prompt_tokens: Option<u64>,
    /// Prompt tokens the server took from its cache, where it says (OpenAI's
    /// `usage.prompt_tokens_details.cached_tokens`; llama-server sends it, we do not).
    cached_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    error: Option<String>,
}

impl Sample {
    fn new(index: usize) -> Self {
        Self {
            index,
            latency: Duration::ZERO,
            ttft: None,
            chunks: 0,
            prompt_tokens: None,
            cached_tokens: None,
            completion_tokens: None,
            error: None,
        }
    }

    fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// Generated tokens: the server's count, else the streamed pieces.
    fn generated(&self) -> u64 {
        self.completion_tokens.unwrap_or(self.chunks)
    }
}

/// A connection that sends one request at a time and waits for its end.
pub trait Conn {
    fn roundtrip(&mut self, work: &Work) -> Result<Sample, String>;
}

/// Our protocol's generate request (the same on the socket and over MQTT).
fn generate_request(work: &Work) -> Json {
    let mut r = json!({"op": "generate", "id": work.id, "temperature": 0,
        "max_tokens": work.max_tokens, "messages": work.messages});
    if work.no_repetition_penalty {
        r["repetition_penalty"] = json!(1.0);
    }
    r
}

/// Folds one event of our protocol into the sample; true once the request has ended.
fn on_event(e: &Json, sample: &mut Sample, start: Instant) -> bool {
    match e["event"].as_str() {
        Some("token") => {
            if !e["text"].as_str().unwrap_or("").is_empty() {
                sample.ttft.get_or_insert_with(|| start.elapsed());
                sample.chunks += 1;
            }
            false
        }
        Some("done") => {
            sample.latency = start.elapsed();
            sample.prompt_tokens = e["usage"]["prompt_tokens"].as_u64();
            sample.completion_tokens = e["usage"]["completion_tokens"].as_u64();
            true
        }
        Some("error") => {
            sample.latency = start.elapsed();
            let text = |k: &str| e[k].as_str().unwrap_or("?").to_string();
            sample.error = Some(format!("{}: {}", text("code"), text("message")));
            true
        }
        _ => false,
    }
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
    fn roundtrip(&mut self, work: &Work) -> Result<Sample, String> {
        let start = Instant::now();
        let mut sample = Sample::new(work.index);
        writeln!(self.writer, "{}", generate_request(work)).map_err(|e| e.to_string())?;
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
            if e["id"] == work.id.as_str() && on_event(&e, &mut sample, start) {
                return Ok(sample);
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
    fn roundtrip(&mut self, work: &Work) -> Result<Sample, String> {
        use rumqttc::v5::mqttbytes::v5::PublishProperties;
        use rumqttc::v5::mqttbytes::QoS;
        let start = Instant::now();
        let mut sample = Sample::new(work.index);
        let props = PublishProperties {
            response_topic: Some(self.reply.clone()),
            ..PublishProperties::default()
        };
        self.client
            .publish_with_properties(
                format!("{}/request", self.prefix),
                QoS::AtLeastOnce,
                false,
                generate_request(work).to_string(),
                props,
            )
            .map_err(|e| e.to_string())?;
        loop {
            let e = self
                .rx
                .recv_timeout(Duration::from_secs(300))
                .map_err(|_| "no answer".to_string())?;
            if e["id"] == work.id.as_str() && on_event(&e, &mut sample, start) {
                return Ok(sample);
            }
        }
    }
}

fn connect(o: &Options, n: usize) -> Result<Box<dyn Conn + Send>, String> {
    Ok(match (&o.socket, &o.mqtt, &o.http) {
        (Some(path), _, _) => Box::new(Socket::connect(path)?),
        (None, Some((host, port)), _) => Box::new(Mqtt::connect(host, *port, &o.prefix, n)?),
        (None, None, Some((host, port))) => Box::new(http::Http::connect(host, *port)?),
        _ => return Err("no target".into()),
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted_ms(values: impl Iterator<Item = Duration>) -> Vec<f64> {
    let mut v: Vec<f64> = values.map(|d| d.as_secs_f64() * 1000.0).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Runs `clients` clients until `--requests` requests were sent or `--max-seconds` passed.
fn run_level(o: &Options, clients: usize) -> Result<(Vec<Sample>, f64), String> {
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(o.max_seconds);
    let mut conns = Vec::new();
    for n in 0..clients {
        conns.push(connect(o, n)?);
    }
    let start = Instant::now();
    let mut handles = Vec::new();
    for mut conn in conns {
        let next = Arc::clone(&next);
        let (total, max_tokens, prompt, workload) =
            (o.requests, o.max_tokens, o.prompt.clone(), o.workload);
        handles.push(std::thread::spawn(move || {
            let mut samples = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= total || Instant::now() > deadline {
                    return Ok::<_, String>(samples);
                }
                let work = Work {
                    index,
                    id: format!("load-{clients}-{index}"),
                    messages: workload::messages(workload, &prompt, index),
                    max_tokens,
                    no_repetition_penalty: workload == Workload::SharedSystem,
                };
                samples.push(conn.roundtrip(&work)?);
            }
        }));
    }
    let mut samples = Vec::new();
    for h in handles {
        samples.extend(h.join().map_err(|_| "client thread panicked")??);
    }
    Ok((samples, start.elapsed().as_secs_f64()))
}

/// The numbers of one level. `cold`: the first level ran one client, so its request 0 was the
/// first the server saw; its TTFT, and the p50 TTFT of the level's other requests.
fn level_report(o: &Options, clients: usize, samples: &[Sample], wall: f64, cold: bool) -> Json {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok()).collect();
    let lat = sorted_ms(ok.iter().map(|s| s.latency));
    let ttft = sorted_ms(ok.iter().filter_map(|s| s.ttft));
    let generated: u64 = ok.iter().map(|s| s.generated()).sum();
    let mean = |v: Vec<u64>| (!v.is_empty()).then(|| v.iter().sum::<u64>() as f64 / v.len() as f64);
    let prompt_tokens = mean(ok.iter().filter_map(|s| s.prompt_tokens).collect());
    let cached_tokens = mean(ok.iter().filter_map(|s| s.cached_tokens).collect());
    let from_usage = ok.iter().all(|s| s.completion_tokens.is_some());
    let (cold_ttft, cached_p50) = if cold {
        let first = ok.iter().find(|s| s.index == 0).and_then(|s| s.ttft);
        let rest = sorted_ms(ok.iter().filter(|s| s.index != 0).filter_map(|s| s.ttft));
        (
            first.map(|d| d.as_secs_f64() * 1000.0),
            Some(percentile(&rest, 50.0)),
        )
    } else {
        (None, None)
    };
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({
        "kind": "level",
        "engine": o.label(),
        "transport": o.transport(),
        "workload": o.workload.name(),
        "clients": clients,
        "max_tokens": o.max_tokens,
        "requests": samples.len(),
        "ok": ok.len(),
        "errors": samples.len() - ok.len(),
        "wall_s": r3(wall),
        "req_per_s": r3(ok.len() as f64 / wall),
        "gen_tokens": generated,
        "gen_tok_per_s": r3(generated as f64 / wall),
        "tokens_from": if from_usage { "usage" } else { "chunks" },
        "completion_tokens_mean": mean(ok.iter().map(|s| s.generated()).collect()).map(r3),
        "prompt_tokens_mean": prompt_tokens.map(r3),
        "cached_prompt_tokens_mean": cached_tokens.map(r3),
        "ttft_p50_ms": r3(percentile(&ttft, 50.0)),
        "ttft_p99_ms": r3(percentile(&ttft, 99.0)),
        "total_p50_ms": r3(percentile(&lat, 50.0)),
        "total_p99_ms": r3(percentile(&lat, 99.0)),
        "cold_ttft_ms": cold_ttft.map(r3),
        "cached_ttft_p50_ms": cached_p50.map(r3),
    })
}

fn cell(v: &Json, key: &str, width: usize, decimals: usize) -> String {
    match v[key].as_f64() {
        Some(x) => format!("{x:>width$.decimals$}"),
        None => format!("{:>width$}", "-"),
    }
}

fn print_row(r: &Json) {
    println!(
        "{:>7} {:>8} {:>6} {} {} {} {} {} {} {}",
        r["clients"].to_string(),
        r["requests"].to_string(),
        r["errors"].to_string(),
        cell(r, "req_per_s", 7, 2),
        cell(r, "gen_tok_per_s", 9, 1),
        cell(r, "ttft_p50_ms", 9, 1),
        cell(r, "ttft_p99_ms", 9, 1),
        cell(r, "total_p50_ms", 9, 1),
        cell(r, "total_p99_ms", 9, 1),
        cell(r, "completion_tokens_mean", 8, 1),
    );
}

/// The prompt tokens of the system prompt sent alone (chat template included), one token
/// generated; after every level, so the levels' cold request stays cold.
fn probe_system_prompt(o: &Options) -> Result<Option<u64>, String> {
    let work = Work {
        index: 0,
        id: "load-system-prompt".into(),
        messages: workload::system_only(),
        max_tokens: 1,
        no_repetition_penalty: true,
    };
    let sample = connect(o, 0)?.roundtrip(&work)?;
    Ok(sample.prompt_tokens)
}

fn run(o: &Options) -> Result<(), String> {
    if !o.json {
        println!(
            "{} over {}, workload {}, {} requests per level (at most {} s), max_tokens {}",
            o.label(),
            o.transport(),
            o.workload.name(),
            o.requests,
            o.max_seconds,
            o.max_tokens
        );
        println!(
            "{:>7} {:>8} {:>6} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "clients",
            "requests",
            "errors",
            "req/s",
            "gen tok/s",
            "ttft p50",
            "ttft p99",
            "total p50",
            "total p99",
            "gen/req"
        );
    }
    for (n, &clients) in o.clients.iter().enumerate() {
        let (samples, wall) =
            run_level(o, clients).map_err(|e| format!("{clients} clients: {e}"))?;
        let cold = o.workload == Workload::SharedSystem && n == 0 && clients == 1;
        let report = level_report(o, clients, &samples, wall, cold);
        if let Some(e) = samples.iter().find_map(|s| s.error.as_ref()) {
            eprintln!(
                "{clients} clients: {} errors, the first: {e}",
                report["errors"]
            );
        }
        if o.json {
            println!("{report}");
            // Progress for whoever watches the run; the JSON line is the result.
            eprintln!(
                "{}: {clients} clients, {}/{} ok, {} req/s, {} generated tok/s, TTFT p50 {} ms",
                o.label(),
                report["ok"],
                report["requests"],
                report["req_per_s"],
                report["gen_tok_per_s"],
                report["ttft_p50_ms"]
            );
        } else {
            print_row(&report);
            if let (Some(c), Some(p)) = (
                report["cold_ttft_ms"].as_f64(),
                report["cached_ttft_p50_ms"].as_f64(),
            ) {
                println!(
                    "        the first request (system prompt never seen): TTFT {c:.1} ms; \
                     the level's other requests: p50 {p:.1} ms"
                );
            }
        }
    }
    if o.workload == Workload::SharedSystem {
        let tokens = probe_system_prompt(o).map_err(|e| format!("system prompt probe: {e}"))?;
        if o.json {
            println!(
                "{}",
                json!({"kind": "system_prompt", "engine": o.label(), "prompt_tokens": tokens})
            );
        } else if let Some(t) = tokens {
            println!("system prompt alone, chat template included: {t} prompt tokens");
        }
    }
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
    if let Err(e) = run(&o) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
