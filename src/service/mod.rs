//! The daemon (`qwen2-edge serve`): a scheduler that owns the model, front ends that only pass
//! messages (Unix socket, MQTT, HTTP), and the lifecycle around them (systemd notify, signals,
//! graceful shutdown). `ask` is the matching client.
//!
//! Start-up order: config (already validated) → MQTT options (certificate files read), HTTP
//! key file read → socket and HTTP listeners bound (a second server fails here, before loading
//! anything) → HTTP answers, `/health` 503 → model loaded → sessions allocated → front ends
//! started, `/health` 200 → `READY=1`. Shutdown (SIGTERM / SIGINT): `STOPPING=1`, intake
//! stops (`/health` 503), accepted requests get `lifecycle.grace_period_s` to finish, the
//! rest are ended with explicit events, replies are flushed, exit 0.

pub mod client;
mod http;
mod lines;
pub mod metrics;
mod mqtt;
mod prometheus;
pub mod protocol;
pub mod scheduler;
mod systemd;
mod uds;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::signal::unix::{Signal, SignalKind};
use tokio::sync::watch;

use crate::bundle::{Bundle, Verify};
use crate::config::{LogFormat, LogSection, ServiceConfig};
use crate::engine::{Engine, EngineOptions};

use protocol::RequestLimits;
use scheduler::{Scheduler, SchedulerConfig};

/// What every front end needs: the scheduler and the request limits.
#[derive(Clone)]
pub struct Context {
    pub scheduler: Scheduler,
    pub limits: RequestLimits,
    pub max_request_bytes: usize,
}

/// The service's lifecycle as the front ends see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// A stop signal came: take no new work, finish what was accepted.
    Draining,
    /// Every request has ended: flush what is left and close.
    Closed,
}

/// Logging for the daemon: plain lines without timestamps or colours (journald stamps each
/// line itself) or JSON; `RUST_LOG` overrides `log.level`.
pub fn init_logging(log: &LogSection) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_ansi(false);
    let result = match log.format {
        LogFormat::Plain => builder.without_time().with_target(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    // Already set (a test harness): keep the existing subscriber.
    let _ = result;
}

/// Everything checked before anything is bound or loaded: a failure here is a usage error.
pub struct Prepared {
    config: ServiceConfig,
    mqtt: Option<mqtt::Prepared>,
    http: Option<http::Prepared>,
}

/// Reads the files the config names (certificates, password file) and checks that the bundle
/// and its variant exist (sizes only: hashing is for start-up proper).
pub fn prepare(config: ServiceConfig) -> Result<Prepared> {
    config.backend()?;
    let trusted = config.model.trusted_keys()?;
    let bundle = Bundle::open(&config.model.bundle, Verify::SizesOnly)
        .with_context(|| format!("model.bundle {}", config.model.bundle.display()))?;
    // The signature now (bundle.json only: cheap); the files' hashes when the model loads.
    let manifest = std::fs::read(bundle.dir.join("bundle.json"))
        .with_context(|| format!("model.bundle {}", bundle.dir.display()))?;
    crate::signature::check(&bundle.dir, &manifest, &trusted)?;
    bundle
        .variant(&config.model.variant)
        .context("model.variant")?;
    let mqtt = config
        .mqtt_enabled()
        .map(|m| mqtt::prepare(m, config.limits.max_request_bytes))
        .transpose()?;
    let http = config
        .http_enabled()
        .map(|h| http::prepare(h, config.limits.max_request_bytes))
        .transpose()?;
    Ok(Prepared { config, mqtt, http })
}

/// Runs the daemon until SIGTERM or SIGINT; returns after a clean shutdown.
pub fn run(prepared: Prepared) -> Result<()> {
    let Prepared { config, mqtt, http } = prepared;
    let notifier = systemd::Notifier::from_env();
    let activated = systemd::activated_sockets()?;
    let socket = uds::Listening::open(&config.unix_socket, activated.unix)?;
    let http = match http {
        Some(h) => Some(http::bind(h, activated.tcp)?),
        None if !activated.tcp.is_empty() => {
            tracing::warn!("systemd passed TCP sockets but [http] is off: they stay unused");
            None
        }
        None => None,
    };
    let result = run_bound(&config, mqtt, socket, http, &notifier);
    if let Err(e) = &result {
        notifier.notify(&format!("STATUS=failed: {e:#}"));
    }
    result
}

fn run_bound(
    config: &ServiceConfig,
    mqtt: Option<mqtt::Prepared>,
    socket: Option<uds::Listening>,
    http: Option<http::Bound>,
    notifier: &systemd::Notifier,
) -> Result<()> {
    // Whatever happens below, a socket file we bound does not outlive us.
    struct Cleanup(Option<uds::SocketFile>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(f) = &self.0 {
                f.remove();
            }
        }
    }
    let _cleanup = Cleanup(socket.as_ref().and_then(|s| s.file.clone()));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let grace = Duration::from_secs(config.lifecycle.grace_period_s);
    runtime.block_on(async {
        let (phase_tx, phase_rx) = watch::channel(Phase::Running);
        let mut tasks = tokio::task::JoinSet::new();
        // HTTP answers from now on: 503 until the model has loaded.
        let ready = http.map(|bound| {
            let (ready, run) = http::start(bound, phase_rx.clone());
            tasks.spawn(run);
            ready
        });
        notifier.notify("STATUS=loading the model");
        let loading = config.clone();
        let ctx = tokio::task::spawn_blocking(move || start_scheduler(&loading))
            .await
            .context("loading the model panicked")??;
        if let Some(ready) = ready {
            ready.set(ctx.clone());
        }
        let front = Fronts {
            socket,
            mqtt,
            tasks,
            phase_tx,
            phase_rx,
        };
        serve(ctx, front, notifier, grace).await
    })
}

/// The model loaded and the scheduler started (blocking: seconds).
fn start_scheduler(config: &ServiceConfig) -> Result<Context> {
    let engine = load_engine(config)?;
    let limits = &config.limits;
    let scheduler = Scheduler::start(Arc::new(engine), SchedulerConfig::from(limits))?;
    Ok(Context {
        scheduler,
        limits: RequestLimits {
            max_new_tokens: limits.max_new_tokens,
            max_timeout: Duration::from_secs(limits.request_timeout_s),
        },
        max_request_bytes: limits.max_request_bytes,
    })
}

fn load_engine(config: &ServiceConfig) -> Result<Engine> {
    let m = &config.model;
    let started = std::time::Instant::now();
    let engine = Engine::load(&EngineOptions {
        bundle: m.bundle.clone(),
        verify: if m.verify {
            Verify::Full
        } else {
            Verify::SizesOnly
        },
        backend: config.backend()?,
        variant: m.variant.clone(),
        threads: m.threads,
        kernels: m.kernels.clone(),
        kv_cache: m.kv_cache,
        prefix_cache_mib: config.cache.size_mib,
        ort: config.ort.clone(),
        trusted_keys: m.trusted_keys()?,
    })?;
    tracing::info!(
        "loaded {} ({} backend, variant {}) in {:.1} s; bundle {}",
        engine.bundle.dir.display(),
        engine.backend.name(),
        m.variant,
        started.elapsed().as_secs_f64(),
        engine.bundle.signature
    );
    Ok(engine)
}

/// The front ends, before the model has loaded (HTTP already runs in `tasks`).
struct Fronts {
    socket: Option<uds::Listening>,
    mqtt: Option<mqtt::Prepared>,
    tasks: tokio::task::JoinSet<()>,
    phase_tx: watch::Sender<Phase>,
    phase_rx: watch::Receiver<Phase>,
}

/// Runs the front ends until SIGTERM or SIGINT, then drains: intake stops, accepted requests
/// get `grace` to finish, the front ends flush what is left.
async fn serve(
    ctx: Context,
    front: Fronts,
    notifier: &systemd::Notifier,
    grace: Duration,
) -> Result<()> {
    let Fronts {
        socket,
        mqtt,
        mut tasks,
        phase_tx,
        phase_rx,
    } = front;
    let scheduler = ctx.scheduler.clone();
    if let Some(socket) = socket {
        tasks.spawn(uds::run(socket, ctx.clone(), phase_rx.clone()));
    }
    if let Some(prepared) = mqtt {
        tasks.spawn(mqtt::run(prepared, ctx, phase_rx));
    }
    let mut term = signal(SignalKind::terminate(), "SIGTERM")?;
    let mut int = signal(SignalKind::interrupt(), "SIGINT")?;
    let watchdog = notifier.watchdog_interval();
    if let Some(every) = watchdog {
        tasks.spawn(ping_watchdog(scheduler.clone(), every));
    }
    notifier.notify("READY=1\nSTATUS=serving");
    tracing::info!("ready");
    let signal = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(
        "{signal}: stopping intake; in-flight requests have {} s to finish",
        grace.as_secs()
    );
    // Close intake before telling anyone we are stopping, so no request slips in after.
    scheduler.stop_intake();
    notifier.notify("STOPPING=1\nSTATUS=draining");
    let _ = phase_tx.send(Phase::Draining);
    let drained = tokio::task::spawn_blocking(move || scheduler.shutdown(grace));
    tokio::pin!(drained);
    loop {
        tokio::select! {
            _ = &mut drained => break,
            _ = term.recv() => tracing::info!("already stopping"),
            _ = int.recv() => tracing::info!("already stopping"),
        }
    }
    let _ = phase_tx.send(Phase::Closed);
    // Front ends flush their last events; the watchdog task is the only one that never
    // ends, so stop waiting once the others have.
    let never_ends = usize::from(watchdog.is_some());
    let flush = async {
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                if e.is_panic() {
                    tracing::error!("a front end panicked: {e}");
                }
            }
            if tasks.len() <= never_ends {
                break;
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), flush)
        .await
        .is_err()
    {
        tracing::warn!("front ends did not finish flushing in 10 s");
    }
    tasks.abort_all();
    tracing::info!("stopped");
    Ok(())
}

fn signal(kind: SignalKind, name: &str) -> Result<Signal> {
    tokio::signal::unix::signal(kind).with_context(|| format!("cannot install the {name} handler"))
}

/// Pings the systemd watchdog every `every` while the scheduler answers.
async fn ping_watchdog(scheduler: Scheduler, every: Duration) {
    let notifier = systemd::Notifier::from_env();
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if scheduler.is_alive() {
            notifier.notify("WATCHDOG=1");
        } else {
            tracing::error!("scheduler unresponsive: withholding the watchdog ping");
        }
    }
}

/// The first line of a file holding a secret (`mqtt.password_file`, `http.api_key_file`);
/// the error names the key.
pub(crate) fn first_line_of(key: &str, path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{key}: cannot read {}", path.display()))?;
    Ok(text.lines().next().unwrap_or("").to_string())
}

/// A state lock; a panic elsewhere never makes the service unusable (the state it guards stays
/// consistent: every update is a few field writes).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
