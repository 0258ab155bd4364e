//! The daemon (`qwen2-edge serve`): a scheduler per model that owns it, front ends that only pass
//! messages (Unix socket, MQTT, HTTP), and the lifecycle around them (systemd notify, signals,
//! graceful shutdown). `ask` is the matching client.
//!
//! Start-up order: config (already validated) → MQTT options (certificate files read), HTTP
//! key file read → socket and HTTP listeners bound (a second server fails here, before loading
//! anything) → HTTP answers, `/health` 503 → models loaded → sessions allocated → front ends
//! started, `/health` 200 → `READY=1`. Shutdown (SIGTERM / SIGINT): `STOPPING=1`, intake
//! stops (`/health` 503), accepted requests get `lifecycle.grace_period_s` to finish, the
//! rest are ended with explicit events, replies are flushed, exit 0.

pub mod client;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod http;
mod lines;
pub mod metrics;
mod mqtt;
mod prometheus;
pub mod protocol;
mod reload;
pub mod scheduler;
mod serving;
mod systemd;
mod uds;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::signal::unix::{Signal, SignalKind};
use tokio::sync::watch;

use crate::bundle::{Bundle, Verify};
use crate::config::{LogFormat, LogSection, ServiceConfig};

use protocol::RequestLimits;
use reload::{ModelSpec, Reloader};
use serving::{ModelServing, Serving};

/// What every front end needs: the models serving now (a reload may change a model's
/// scheduler between two requests) and the request limits.
#[derive(Clone)]
pub struct Context {
    pub serving: Arc<Serving>,
    pub limits: RequestLimits,
    pub max_request_bytes: usize,
    /// `unix_socket.allow_reload`.
    pub socket_reload: bool,
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
    /// Read again on SIGHUP (the model to reload).
    config_path: PathBuf,
    mqtt: Option<mqtt::Prepared>,
    http: Option<http::Prepared>,
}

/// Reads the files the config names (certificates, password file) and checks that the bundle
/// and its variant exist (sizes only: hashing is for start-up proper).
pub fn prepare(config: ServiceConfig, config_path: &Path) -> Result<Prepared> {
    for (i, m) in config.models.iter().enumerate() {
        let key = config.model_key(i);
        config.backend_of(i)?;
        // The signature now (bundle.json only: cheap); the files' hashes when the model loads.
        let trusted = config.trusted_keys_of(i)?;
        let bundle = Bundle::open_trusted(&m.bundle, Verify::SizesOnly, &trusted)
            .with_context(|| format!("{key}.bundle {}", m.bundle.display()))?;
        bundle
            .variant(&m.variant)
            .with_context(|| format!("{key}.variant"))?;
    }
    let mqtt = config
        .mqtt_enabled()
        .map(|m| mqtt::prepare(m, config.limits.max_request_bytes))
        .transpose()?;
    let http = config
        .http_enabled()
        .map(|h| http::prepare(h, config.limits.max_request_bytes))
        .transpose()?;
    Ok(Prepared {
        config,
        config_path: config_path.to_path_buf(),
        mqtt,
        http,
    })
}

/// Runs the daemon until SIGTERM or SIGINT; returns after a clean shutdown.
pub fn run(prepared: Prepared) -> Result<()> {
    let Prepared {
        config,
        config_path,
        mqtt,
        http,
    } = prepared;
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
    let result = run_bound(&config, &config_path, mqtt, socket, http, &notifier);
    if let Err(e) = &result {
        notifier.notify(&format!("STATUS=failed: {e:#}"));
    }
    result
}

fn run_bound(
    config: &ServiceConfig,
    config_path: &Path,
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
        let reloader = Reloader {
            path: config_path.to_path_buf(),
            running: config.clone(),
        };
        serve(ctx, front, notifier, grace, reloader).await
    })
}

/// Every model loaded and its scheduler started, in the config's order (blocking: seconds
/// each).
fn start_scheduler(config: &ServiceConfig) -> Result<Context> {
    let limits = &config.limits;
    let mut models = Vec::with_capacity(config.models.len());
    for i in 0..config.models.len() {
        let spec = ModelSpec::of(config, i)?;
        let scheduler = spec.load(limits, false, &models)?;
        models.push(ModelServing::new(spec, scheduler));
    }
    Ok(Context {
        serving: Arc::new(Serving::new(models)),
        limits: RequestLimits {
            max_new_tokens: limits.max_new_tokens,
            max_timeout: Duration::from_secs(limits.request_timeout_s),
        },
        max_request_bytes: limits.max_request_bytes,
        socket_reload: config.unix_socket.allow_reload,
    })
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
    reloader: Reloader,
) -> Result<()> {
    let Fronts {
        socket,
        mqtt,
        mut tasks,
        phase_tx,
        phase_rx,
    } = front;
    let serving = Arc::clone(&ctx.serving);
    if let Some(socket) = socket {
        tasks.spawn(uds::run(socket, ctx.clone(), phase_rx.clone()));
    }
    if let Some(prepared) = mqtt {
        tasks.spawn(mqtt::run(prepared, ctx.clone(), phase_rx));
    }
    let mut term = signal(SignalKind::terminate(), "SIGTERM")?;
    let mut int = signal(SignalKind::interrupt(), "SIGINT")?;
    let mut hup = signal(SignalKind::hangup(), "SIGHUP")?;
    let watchdog = notifier.watchdog_interval();
    if let Some(every) = watchdog {
        tasks.spawn(ping_watchdog(Arc::clone(&serving), every));
    }
    notifier.notify("READY=1\nSTATUS=serving");
    tracing::info!("ready");
    let reloader = Arc::new(reloader);
    let mut requested = serving.reload_requests();
    let signal = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                if serving.begin_reload() {
                    reload::start(&ctx, &reloader);
                } else {
                    tracing::warn!("SIGHUP: a reload is already under way");
                }
            }
            Some(()) = requested.recv() => reload::start(&ctx, &reloader),
        }
    };
    tracing::info!(
        "{signal}: stopping intake; in-flight requests have {} s to finish",
        grace.as_secs()
    );
    // Close intake before telling anyone we are stopping, so no request slips in after.
    let schedulers = serving.stop_intake();
    notifier.notify("STOPPING=1\nSTATUS=draining");
    let _ = phase_tx.send(Phase::Draining);
    let drained = tokio::task::spawn_blocking(move || {
        let until = std::time::Instant::now() + grace;
        for s in schedulers {
            s.shutdown(until.saturating_duration_since(std::time::Instant::now()));
        }
    });
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
async fn ping_watchdog(serving: Arc<Serving>, every: Duration) {
    let notifier = systemd::Notifier::from_env();
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if serving.is_alive() {
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
