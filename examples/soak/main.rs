//! Soak driver for a running `qwen2-edge serve` (loopback only): mixed traffic over the Unix
//! socket and MQTT for a fixed time — plain requests, cancels mid-stream, deadlines that expire,
//! malformed and unknown-field requests, long prompts and prompts over the limit — while it
//! samples the daemon's resident memory, open descriptors and threads (/proc/PID) and the
//! latency of the plain requests. Every request must end in exactly the terminal event its kind
//! allows (a plain request `done`, a bad one `bad_request`, ...): one that never ends is lost, one
//! that ends otherwise is wrong. scripts/soak.sh starts the daemon and mosquitto and runs it.
//!
//! ```text
//! soak --socket S.sock --mqtt 127.0.0.1:1883 --pid PID --seconds 3600 --sample-s 30 --csv out.csv
//! ```
//!
//! Output: the CSV (one row per sample: seconds, RSS KiB, descriptors, threads, requests ended
//! in the window, p50/p99 latency of its plain requests), then a JSON summary on stdout. Exit
//! status 1 when a request was lost or wrong, or the daemon died.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

/// How long a request may take before it counts as lost (the daemon's own deadline is shorter).
const LOST_AFTER: Duration = Duration::from_secs(120);

/// The kinds of request in the mix, one in ten of each except plain (four in ten).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Plain,
    Cancel,
    Deadline,
    Malformed,
    UnknownField,
    Long,
    TooLong,
}

const MIX: [Kind; 10] = [
    Kind::Plain,
    Kind::Cancel,
    Kind::Plain,
    Kind::Deadline,
    Kind::Plain,
    Kind::Malformed,
    Kind::Long,
    Kind::Plain,
    Kind::UnknownField,
    Kind::TooLong,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::Cancel => "cancel",
            Kind::Deadline => "deadline",
            Kind::Malformed => "malformed",
            Kind::UnknownField => "unknown_field",
            Kind::Long => "long",
            Kind::TooLong => "too_long",
        }
    }

    /// Whether this terminal event is one the kind may end with.
    fn accepts(self, e: &Json) -> bool {
        let event = e["event"].as_str().unwrap_or("");
        let code = e["code"].as_str().unwrap_or("");
        let finish = e["finish_reason"].as_str().unwrap_or("");
        match self {
            Kind::Plain | Kind::Long => event == "done" && matches!(finish, "stop" | "length"),
            // A short answer may end before the cancel arrives.
            Kind::Cancel => event == "done" && matches!(finish, "cancelled" | "stop" | "length"),
            Kind::Deadline => {
                (event == "done" && matches!(finish, "timeout" | "stop" | "length"))
                    || (event == "error" && code == "timeout")
            }
            Kind::Malformed | Kind::UnknownField => event == "error" && code == "bad_request",
            Kind::TooLong => event == "error" && code == "too_long",
        }
    }
}

/// What one request came to.
struct Outcome {
    kind: Kind,
    transport: &'static str,
    latency: Duration,
    /// None: it ended as its kind allows; else what went wrong.
    problem: Option<String>,
    lost: bool,
}

/// The request line (or MQTT payload) for a request of this kind.
fn request(kind: Kind, id: &str, n: u64) -> String {
    let question = format!("Question {n}: what is {} plus {}?", n % 97, n % 13);
    let generate = |prompt: String, extra: Json| {
        let mut r = json!({"op": "generate", "id": id, "prompt": prompt,
            "max_tokens": 16, "temperature": 0});
        if let (Some(r), Some(extra)) = (r.as_object_mut(), extra.as_object()) {
            r.extend(extra.clone());
        }
        r.to_string()
    };
    match kind {
        Kind::Plain => generate(question, json!({})),
        Kind::Cancel => generate(question, json!({"stream": true, "max_tokens": 64})),
        Kind::Deadline => generate(question, json!({"max_tokens": 64, "timeout_s": 0.05})),
        Kind::Malformed => format!("{{\"op\": \"generate\", \"id\": \"{id}\", \"prompt\": "),
        Kind::UnknownField => generate(question, json!({"temprature": 0.5})),
        // Varied, so that the prefix cache does not answer them for free.
        Kind::Long => generate(long_text(n, 30), json!({"max_tokens": 8})),
        Kind::TooLong => generate(long_text(n, 400), json!({})),
    }
}

/// About 6 tokens a sentence.
fn long_text(n: u64, sentences: u64) -> String {
    (0..sentences)
        .map(|i| format!("Line {} of note {n} is here. ", i * 7 + n % 11))
        .collect()
}

/// Reads events until the terminal one of request `id` (or, for a line the service could not
/// read, the error without an id); None when the connection ended or `LOST_AFTER` passed.
fn wait_terminal(
    next: &mut dyn FnMut(Duration) -> Option<Json>,
    id: &str,
    kind: Kind,
    mut on_token: impl FnMut(),
) -> Option<Json> {
    let until = Instant::now() + LOST_AFTER;
    loop {
        let left = until.checked_duration_since(Instant::now())?;
        let e = next(left)?;
        let ours = e["id"] == id || (kind == Kind::Malformed && e["id"].is_null());
        if !ours {
            continue;
        }
        match e["event"].as_str() {
            Some("done") | Some("error") => return Some(e),
            Some("token") => on_token(),
            _ => {}
        }
    }
}

fn judge(
    kind: Kind,
    transport: &'static str,
    start: Instant,
    end: Option<Json>,
    duplicate: bool,
) -> Outcome {
    let latency = start.elapsed();
    let (problem, lost) = match end {
        None => (Some("no terminal event".to_string()), true),
        Some(_) if duplicate => (Some("a second terminal event".to_string()), false),
        Some(e) if kind.accepts(&e) => (None, false),
        Some(e) => (Some(format!("ended with {e}")), false),
    };
    Outcome {
        kind,
        transport,
        latency,
        problem,
        lost,
    }
}

/// A socket client: one connection, one request at a time.
fn socket_worker(path: String, w: usize, stop: Arc<AtomicBool>, out: mpsc::Sender<Outcome>) {
    let connect = || -> std::io::Result<(UnixStream, BufReader<UnixStream>)> {
        let s = UnixStream::connect(&path)?;
        let r = BufReader::new(s.try_clone()?);
        Ok((s, r))
    };
    let Ok((mut writer, mut reader)) = connect() else {
        eprintln!("soak: cannot connect to {path}");
        return;
    };
    let mut n = w as u64 * 1_000_000;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let kind = MIX[(n % MIX.len() as u64) as usize];
        let id = format!("s{w}-{n}");
        let start = Instant::now();
        if writeln!(writer, "{}", request(kind, &id, n)).is_err() {
            let _ = out.send(judge(kind, "unix", start, None, false));
            return;
        }
        let mut next = |left: Duration| -> Option<Json> {
            reader.get_ref().set_read_timeout(Some(left)).ok()?;
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => None,
                Ok(_) => serde_json::from_str(&line).ok(),
            }
        };
        let mut cancelled = false;
        let cancel_line = format!("{}", json!({"op": "cancel", "id": id}));
        let mut cancel_writer = writer.try_clone().ok();
        let end = wait_terminal(&mut next, &id, kind, || {
            if kind == Kind::Cancel && !cancelled {
                cancelled = true;
                if let Some(w) = cancel_writer.as_mut() {
                    let _ = writeln!(w, "{cancel_line}");
                }
            }
        });
        let failed = end.is_none();
        let _ = out.send(judge(kind, "unix", start, end, false));
        if failed {
            // A lost answer leaves the connection in an unknown state: start a new one.
            match connect() {
                Ok((wr, rd)) => (writer, reader) = (wr, rd),
                Err(_) => return,
            }
        }
    }
}

/// An MQTT client (MQTT 5, its own reply topic): one request at a time.
fn mqtt_worker(
    host: String,
    port: u16,
    w: usize,
    stop: Arc<AtomicBool>,
    out: mpsc::Sender<Outcome>,
) {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::Event;
    let client_id = format!("soak-{}-{w}", std::process::id());
    let mut o = rumqttc::v5::MqttOptions::new(client_id.clone(), host, port);
    o.set_max_packet_size(Some(4 * 1024 * 1024));
    let (client, mut connection) = rumqttc::v5::Client::new(o, 64);
    let (tx, rx) = mpsc::channel::<Json>();
    let (ready_tx, ready_rx) = mpsc::channel();
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
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    });
    let reply = format!("soak/{client_id}");
    if client.subscribe(reply.clone(), QoS::AtLeastOnce).is_err()
        || ready_rx.recv_timeout(Duration::from_secs(10)).is_err()
    {
        eprintln!("soak: no MQTT subscription for worker {w}");
        return;
    }
    let props = PublishProperties {
        response_topic: Some(reply.clone()),
        ..PublishProperties::default()
    };
    let mut n = w as u64 * 1_000_000;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let kind = MIX[(n % MIX.len() as u64) as usize];
        let id = format!("m{w}-{n}");
        let start = Instant::now();
        let publish = |topic: &str, payload: String| {
            client
                .publish_with_properties(
                    format!("qwen2-edge/{topic}"),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                    props.clone(),
                )
                .is_ok()
        };
        if !publish("request", request(kind, &id, n)) {
            let _ = out.send(judge(kind, "mqtt", start, None, false));
            return;
        }
        let mut next = |left: Duration| rx.recv_timeout(left).ok();
        let mut cancelled = false;
        let end = wait_terminal(&mut next, &id, kind, || {
            if kind == Kind::Cancel && !cancelled {
                cancelled = true;
                let _ = publish("cancel", json!({"op": "cancel", "id": id}).to_string());
            }
        });
        // A second terminal event for the same id would arrive right after the first.
        let duplicate = end.is_some()
            && std::iter::from_fn(|| rx.recv_timeout(Duration::from_millis(5)).ok()).any(|e| {
                (e["id"] == id.as_str() || (kind == Kind::Malformed && e["id"].is_null()))
                    && matches!(e["event"].as_str(), Some("done" | "error"))
            });
        let _ = out.send(judge(kind, "mqtt", start, end, duplicate));
    }
}

/// The daemon's resident KiB, threads and open descriptors; None once it is gone.
fn sample_process(pid: u32) -> Option<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((field("VmRSS:")?, field("Threads:")?, fds))
}

/// One sample of the daemon and of the plain requests that ended since the last one.
struct Sample {
    seconds: f64,
    rss_kib: u64,
    fds: u64,
    threads: u64,
    p50_ms: f64,
    p99_ms: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Args {
    socket: String,
    mqtt: Option<(String, u16)>,
    pid: u32,
    seconds: u64,
    sample_s: u64,
    socket_clients: usize,
    mqtt_clients: usize,
    csv: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        socket: String::new(),
        mqtt: None,
        pid: 0,
        seconds: 60,
        sample_s: 10,
        socket_clients: 2,
        mqtt_clients: 1,
        csv: "soak.csv".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number"))
        };
        match flag.as_str() {
            "--socket" => a.socket = value()?,
            "--mqtt" => {
                let v = value()?;
                let (host, port) = v.rsplit_once(':').ok_or("--mqtt HOST:PORT")?;
                let port = port.parse().map_err(|_| "--mqtt HOST:PORT")?;
                a.mqtt = Some((host.to_string(), port));
            }
            "--pid" => a.pid = number(value()?)? as u32,
            "--seconds" => a.seconds = number(value()?)?,
            "--sample-s" => a.sample_s = number(value()?)?.max(1),
            "--socket-clients" => a.socket_clients = number(value()?)? as usize,
            "--mqtt-clients" => a.mqtt_clients = number(value()?)? as usize,
            "--csv" => a.csv = value()?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.socket.is_empty() || a.pid == 0 {
        return Err("--socket PATH and --pid PID are required".into());
    }
    Ok(a)
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(2);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let mut workers = Vec::new();
    for w in 0..a.socket_clients {
        let (path, stop, tx) = (a.socket.clone(), stop.clone(), tx.clone());
        workers.push(std::thread::spawn(move || socket_worker(path, w, stop, tx)));
    }
    if let Some((host, port)) = &a.mqtt {
        for w in 0..a.mqtt_clients {
            let (host, port, stop, tx) = (host.clone(), *port, stop.clone(), tx.clone());
            workers.push(std::thread::spawn(move || {
                mqtt_worker(host, port, w, stop, tx)
            }));
        }
    }
    drop(tx);

    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let collector = {
        let outcomes = outcomes.clone();
        std::thread::spawn(move || {
            for o in rx {
                if let Some(p) = &o.problem {
                    eprintln!("soak: {} {} request: {p}", o.transport, o.kind.name());
                }
                if let Ok(mut v) = outcomes.lock() {
                    v.push(o);
                }
            }
        })
    };

    let mut csv = String::from("seconds,rss_kib,fds,threads,requests,p50_ms,p99_ms\n");
    let mut samples: Vec<Sample> = Vec::new();
    let begin = Instant::now();
    let mut seen = 0;
    let mut died = false;
    while begin.elapsed() < Duration::from_secs(a.seconds) {
        let left = Duration::from_secs(a.seconds).saturating_sub(begin.elapsed());
        std::thread::sleep(left.min(Duration::from_secs(a.sample_s)));
        let Some((rss, threads, fds)) = sample_process(a.pid) else {
            eprintln!("soak: the daemon (pid {}) is gone", a.pid);
            died = true;
            break;
        };
        let (count, mut plain) = match outcomes.lock() {
            Ok(v) => {
                let window = &v[seen..];
                seen = v.len();
                let plain: Vec<f64> = window
                    .iter()
                    .filter(|o| o.kind == Kind::Plain && o.problem.is_none())
                    .map(|o| o.latency.as_secs_f64() * 1e3)
                    .collect();
                (window.len(), plain)
            }
            Err(_) => (0, Vec::new()),
        };
        plain.sort_by(f64::total_cmp);
        let (p50, p99) = (percentile(&plain, 0.5), percentile(&plain, 0.99));
        let t = begin.elapsed().as_secs_f64();
        csv.push_str(&format!(
            "{t:.0},{rss},{fds},{threads},{count},{p50:.1},{p99:.1}\n"
        ));
        samples.push(Sample {
            seconds: t,
            rss_kib: rss,
            fds,
            threads,
            p50_ms: p50,
            p99_ms: p99,
        });
        let _ = std::fs::write(&a.csv, &csv);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let _ = collector.join();

    let v = outcomes
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    let lost = v.iter().filter(|o| o.lost).count();
    let wrong = v.iter().filter(|o| o.problem.is_some() && !o.lost).count();
    let mut by_kind = serde_json::Map::new();
    for kind in MIX {
        let n = v.iter().filter(|o| o.kind == kind).count();
        by_kind.insert(kind.name().into(), json!(n));
    }
    // Drift is measured from the first sample after a warm-up (a tenth of the run, the caches
    // and allocator arenas filling) to the last.
    let warm = samples
        .iter()
        .find(|s| s.seconds >= a.seconds as f64 / 10.0)
        .or(samples.first());
    let last = samples.last();
    let range = |f: fn(&Sample) -> u64| {
        let it = samples.iter().map(f);
        json!([it.clone().min(), it.max()])
    };
    let summary = json!({
        "seconds": begin.elapsed().as_secs(),
        "requests": v.len(),
        "by_kind": by_kind,
        "mqtt_requests": v.iter().filter(|o| o.transport == "mqtt").count(),
        "lost": lost,
        "wrong": wrong,
        "daemon_died": died,
        "rss_kib_after_warmup": warm.map(|s| s.rss_kib),
        "rss_kib_last": last.map(|s| s.rss_kib),
        "rss_kib_max": samples.iter().map(|s| s.rss_kib).max(),
        "fds_min_max": range(|s| s.fds),
        "threads_min_max": range(|s| s.threads),
        "p50_ms_after_warmup": warm.map(|s| s.p50_ms),
        "p50_ms_last": last.map(|s| s.p50_ms),
        "p99_ms_after_warmup": warm.map(|s| s.p99_ms),
        "p99_ms_last": last.map(|s| s.p99_ms),
        "csv": a.csv,
    });
    println!("{summary:#}");
    if lost > 0 || wrong > 0 || died || v.is_empty() {
        std::process::exit(1);
    }
}
