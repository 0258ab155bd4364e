//! The OpenAI-compatible HTTP front end (`[http]`), on hyper's HTTP/1.1 server and the
//! service's tokio runtime, beside the Unix socket and MQTT and on the same scheduler.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (`openai.rs`), `GET
//! /v1/models`, `GET /health` (200 only once the model is loaded and the scheduler answers;
//! 503 while loading and while draining) and `GET /metrics` (Prometheus, `prometheus.rs`).
//! The listeners are bound before the model loads, so readiness can be asked from the start
//! and a second server fails fast. With `api_key_file`, every endpoint but `/health` needs
//! `Authorization: Bearer <key>`.

mod openai;
mod stream;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value as Json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::config::{HttpListen, HttpSection, UnixSocketSection};

use super::metrics::Transport;
use super::protocol::{EventBody, HealthStatus};
use super::serving::Serving;
use super::{prometheus, uds, Context, Phase};
use openai::{ApiError, ChunkWriter, Endpoint, Reply};
use stream::{EventStream, Pending};

type Body = BoxBody<Bytes, Infallible>;

/// The section's settings with its files read, before anything is bound.
pub struct Prepared {
    section: HttpSection,
    api_key: Option<String>,
    max_body: usize,
}

/// Reads the API key file (a usage error when it is missing or empty).
pub fn prepare(section: &HttpSection, max_request_bytes: usize) -> Result<Prepared> {
    let api_key = if section.api_key_file.as_os_str().is_empty() {
        None
    } else {
        let path = &section.api_key_file;
        let key = super::first_line_of("http.api_key_file", path)?
            .trim()
            .to_string();
        if key.is_empty() {
            bail!(
                "http.api_key_file: {} holds no key on its first line",
                path.display()
            );
        }
        Some(key)
    };
    let max_body = match section.max_body_bytes {
        0 => max_request_bytes,
        n => n,
    };
    Ok(Prepared {
        section: section.clone(),
        api_key,
        max_body,
    })
}

/// A bound listener, before the runtime takes it.
enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// A listener on the runtime.
enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// The listeners, bound; Unix socket files are removed when this is dropped.
pub struct Bound {
    prepared: Prepared,
    /// Each with its name for the logs.
    listeners: Vec<(String, StdListener)>,
    files: Vec<uds::SocketFile>,
}

impl Drop for Bound {
    fn drop(&mut self) {
        for f in &self.files {
            f.remove();
        }
    }
}

/// Binds every `listen` address (before the model loads), or, under socket activation,
/// takes the TCP sockets systemd passed instead (`listen` is then the socket unit's).
pub fn bind(prepared: Prepared, activated: Vec<std::net::TcpListener>) -> Result<Bound> {
    let mut bound = Bound {
        listeners: Vec::new(),
        files: Vec::new(),
        prepared,
    };
    if !activated.is_empty() {
        for l in activated {
            let name = l
                .local_addr()
                .map_or_else(|_| "a TCP socket".into(), |a| a.to_string());
            tracing::info!(
                "http: socket activation: {name} from systemd (http.listen is the socket unit's)"
            );
            bound.listeners.push((name, StdListener::Tcp(l)));
        }
        return Ok(bound);
    }
    let section = &bound.prepared.section;
    for listen in section.listeners()? {
        match listen {
            HttpListen::Tcp(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("http.listen: cannot bind {addr}"))?;
                l.set_nonblocking(true)?;
                let name = l.local_addr().map_or(addr, |a| a).to_string();
                if !addr.ip().is_loopback() && bound.prepared.api_key.is_none() {
                    tracing::warn!(
                        "http: listening on {name} beyond this host without http.api_key_file"
                    );
                }
                bound.listeners.push((name, StdListener::Tcp(l)));
            }
            HttpListen::Unix(path) => {
                let (l, file) = uds::bind(&UnixSocketSection {
                    path: path.clone(),
                    mode: section.socket_mode.clone(),
                    group: section.socket_group.clone(),
                    ..UnixSocketSection::default()
                })
                .context("http.listen")?;
                bound.files.push(file);
                bound
                    .listeners
                    .push((path.display().to_string(), StdListener::Unix(l)));
            }
        }
    }
    Ok(bound)
}

/// What every connection shares: the service once loaded, and the settings.
pub struct Shared {
    ctx: OnceLock<Context>,
    phase: watch::Receiver<Phase>,
    api_key: Option<String>,
    max_body: usize,
    builder: http1::Builder,
    /// Request ids: `chatcmpl-<start>-<n>`.
    id_prefix: String,
    next_id: AtomicU64,
}

impl Shared {
    /// The service once the model has loaded, else 503.
    fn loaded(&self) -> Result<&Context, ApiError> {
        self.ctx
            .get()
            .ok_or_else(|| openai::unavailable("the model is still loading; retry shortly"))
    }

    /// The service, or 503 while the model loads or once the service stops.
    fn service(&self) -> Result<&Context, ApiError> {
        let ctx = self.loaded()?;
        if *self.phase.borrow() != Phase::Running || !ctx.serving.is_accepting() {
            return Err(openai::unavailable(
                "the service is shutting down; retry later",
            ));
        }
        Ok(ctx)
    }

    fn request_id(&self, endpoint: Endpoint) -> String {
        let kind = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{kind}-{}-{n}", self.id_prefix)
    }
}

/// A handle to tell the front end the model has loaded.
#[derive(Clone)]
pub struct Ready(Arc<Shared>);

impl Ready {
    pub fn set(&self, ctx: Context) {
        let _ = self.0.ctx.set(ctx);
    }
}

/// Starts serving (readiness 503 until `Ready::set`); returns the handle and the task that
/// runs until the service has closed and the connections have finished.
pub fn start(
    mut bound: Bound,
    phase: watch::Receiver<Phase>,
) -> (Ready, impl std::future::Future<Output = ()>) {
    let section = &bound.prepared.section;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(section.header_timeout_s))
        .max_header_size(section.max_header_bytes)
        .max_headers(section.max_headers)
        .keep_alive(true);
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let shared = Arc::new(Shared {
        ctx: OnceLock::new(),
        phase: phase.clone(),
        api_key: bound.prepared.api_key.take(),
        max_body: bound.prepared.max_body,
        builder,
        id_prefix: format!("{started:x}"),
        next_id: AtomicU64::new(1),
    });
    let connections = Arc::new(Semaphore::new(section.max_connections));
    let max_connections = section.max_connections as u32;
    let listeners = std::mem::take(&mut bound.listeners);
    let ready = Ready(Arc::clone(&shared));
    let run = async move {
        let mut loops = tokio::task::JoinSet::new();
        for (name, listener) in listeners {
            let listener = match listener {
                StdListener::Tcp(l) => tokio::net::TcpListener::from_std(l).map(Listener::Tcp),
                StdListener::Unix(l) => tokio::net::UnixListener::from_std(l).map(Listener::Unix),
            };
            match listener {
                Ok(l) => {
                    tracing::info!("http: listening on {name}");
                    loops.spawn(accept(
                        l,
                        Arc::clone(&shared),
                        Arc::clone(&connections),
                        phase.clone(),
                    ));
                }
                Err(e) => tracing::error!("http: {name}: {e}"),
            }
        }
        while loops.join_next().await.is_some() {}
        // The socket files go now, the connections get a moment to finish their replies.
        drop(bound);
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            connections.acquire_many(max_connections),
        )
        .await;
    };
    (ready, run)
}

/// Resolves once the service has closed (every request ended).
async fn closed(phase: &mut watch::Receiver<Phase>) {
    loop {
        if *phase.borrow_and_update() == Phase::Closed {
            return;
        }
        if phase.changed().await.is_err() {
            return;
        }
    }
}

/// Accepts connections (at most `http.max_connections` open; the rest wait in the backlog)
/// until the service has closed.
async fn accept(
    listener: Listener,
    shared: Arc<Shared>,
    connections: Arc<Semaphore>,
    mut phase: watch::Receiver<Phase>,
) {
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&connections).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = closed(&mut phase) => return,
        };
        let accepted = tokio::select! {
            a = accept_one(&listener) => a,
            _ = closed(&mut phase) => return,
        };
        match accepted {
            Ok(Accepted::Tcp(stream)) => {
                // Token chunks are small writes: without this, Nagle's algorithm holds them
                // back until the previous one is acknowledged.
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(
                    stream,
                    Arc::clone(&shared),
                    phase.clone(),
                    permit,
                ));
            }
            Ok(Accepted::Unix(stream)) => {
                tokio::spawn(connection(
                    stream,
                    Arc::clone(&shared),
                    phase.clone(),
                    permit,
                ));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("http accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept_one(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tcp(l) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
        Listener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

/// Serves one connection; once the service has closed, lets the reply in progress finish.
async fn connection<T>(
    io: T,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
    _permit: OwnedSemaphorePermit,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let shared = Arc::clone(&shared);
        service_fn(move |req| {
            let shared = Arc::clone(&shared);
            async move { Ok::<_, Infallible>(route(req, &shared).await) }
        })
    };
    let conn = shared.builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!("http connection: {e}");
            }
            return;
        }
        _ = closed(&mut phase) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
}

async fn route(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if path == "/health" {
        return match method {
            Method::GET | Method::HEAD => health(shared),
            _ => not_allowed("GET"),
        };
    }
    if let Some(expected) = &shared.api_key {
        if !authorized(&req, expected) {
            let e = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "missing or wrong API key: send \"Authorization: Bearer <key>\"",
            )
            .with_code("invalid_api_key");
            let mut r = error_response(&e);
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    let result = match (path.as_str(), method) {
        ("/v1/chat/completions", Method::POST) => complete(req, shared, Endpoint::Chat).await,
        ("/v1/completions", Method::POST) => complete(req, shared, Endpoint::Completion).await,
        ("/v1/models", Method::GET) => models(shared, None),
        ("/metrics", Method::GET) => metrics(shared),
        ("/v1/chat/completions" | "/v1/completions", _) => return not_allowed("POST"),
        ("/v1/models" | "/metrics", _) => return not_allowed("GET"),
        (p, Method::GET) if p.starts_with("/v1/models/") => {
            models(shared, Some(&p["/v1/models/".len()..]))
        }
        (p, _) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no endpoint {p}"),
        )
        .with_code("unknown_url")),
    };
    result.unwrap_or_else(|e| error_response(&e))
}

/// `Authorization: Bearer <key>`, compared in time independent of where it differs.
fn authorized(req: &Request<Incoming>, expected: &str) -> bool {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return false;
    };
    let Some(given) = value.as_bytes().strip_prefix(b"Bearer ") else {
        return false;
    };
    let expected = expected.as_bytes();
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// 200 `{"status":"ok",…}` once the model is loaded, the service takes requests and its
/// engine thread lives; 503 otherwise (`loading`, `draining`, `degraded`).
fn health(shared: &Shared) -> Response<Body> {
    let Some(ctx) = shared.ctx.get() else {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "loading"}),
        );
    };
    let health = ctx.serving.health();
    let draining = *shared.phase.borrow() != Phase::Running;
    let (status, word) = match health.status {
        HealthStatus::Ok if !draining && ctx.serving.is_alive() => (StatusCode::OK, "ok"),
        HealthStatus::Ok | HealthStatus::Stopping => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        HealthStatus::Degraded => (StatusCode::SERVICE_UNAVAILABLE, "degraded"),
    };
    let mut body = serde_json::to_value(&health).unwrap_or_else(|_| json!({}));
    body["status"] = word.into();
    json_response(status, &body)
}

fn metrics(shared: &Shared) -> Result<Response<Body>, ApiError> {
    let ctx = shared.loaded()?;
    let text = prometheus::render(&ctx.serving.model_infos());
    let mut r = Response::new(full(text));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(prometheus::CONTENT_TYPE),
    );
    Ok(r)
}

/// `GET /v1/models` (every model, by the config's names) or `/v1/models/<id>`.
fn models(shared: &Shared, id: Option<&str>) -> Result<Response<Body>, ApiError> {
    let ctx = shared.loaded()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let health = ctx.serving.health();
    let listed: Vec<Json> = health
        .models
        .iter()
        .map(|m| {
            json!({
                "id": m.name,
                "object": "model",
                "created": now.saturating_sub(m.uptime_s),
                "owned_by": "qwen2-edge",
            })
        })
        .collect();
    match id {
        None => Ok(json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": listed}),
        )),
        Some(id) => match listed.iter().find(|m| m["id"] == id) {
            Some(model) => Ok(json_response(StatusCode::OK, model)),
            None => Err(model_not_found(id, &ctx.serving)),
        },
    }
}

fn model_not_found(id: &str, serving: &Serving) -> ApiError {
    let names: Vec<String> = serving
        .models()
        .iter()
        .map(|m| format!("{:?}", m.name))
        .collect();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no model {id:?}; this server has {}", names.join(", ")),
    )
    .with_code("model_not_found")
}

/// The OpenAI request body parser, for the fuzz target `openai_body`: `chat` picks
/// `/v1/chat/completions`, else `/v1/completions`.
#[cfg(feature = "fuzzing")]
pub fn fuzz_openai_body(chat: bool, body: &[u8], limits: &super::protocol::RequestLimits) {
    let endpoint = if chat {
        Endpoint::Chat
    } else {
        Endpoint::Completion
    };
    let _ = openai::parse(endpoint, body, "fuzz".into(), limits);
}

/// The completion endpoints: the body read and checked, the request submitted, then the
/// whole answer, or its events as server-sent events.
async fn complete(
    req: Request<Incoming>,
    shared: &Shared,
    endpoint: Endpoint,
) -> Result<Response<Body>, ApiError> {
    let ctx = shared.service()?;
    let serving = &ctx.serving;
    let body = read_body(req.into_body(), shared.max_body)
        .await
        .inspect_err(|_| {
            serving.record_rejected(Transport::Http);
        })?;
    let id = shared.request_id(endpoint);
    let mut call = openai::parse(endpoint, &body, id.clone(), &ctx.limits).inspect_err(|_| {
        serving.record_rejected(Transport::Http);
    })?;
    // OpenAI clients always send some model name: with one model, whatever they send is it
    // (as llama-server does); with several, it must be one of ours.
    let name = call.request.model.take();
    let model = match serving.route(name.as_deref()) {
        Ok(m) => m,
        Err(_) if serving.models().len() == 1 => &serving.models()[0],
        Err(_) => {
            serving.record_rejected(Transport::Http);
            return Err(model_not_found(name.as_deref().unwrap_or(""), serving));
        }
    };
    call.request.model = Some(model.name.clone());
    let reply = Reply {
        id,
        endpoint,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: model.name.clone(),
    };
    let writer = ChunkWriter::new(reply.clone(), &call);
    let streamed = call.stream;
    let (tx, rx) = mpsc::unbounded_channel();
    let ticket = serving
        .submit(call.request, Transport::Http, stream::sink(tx))
        .map_err(|event| match event.body {
            EventBody::Error { code, message } => {
                ApiError::from_event(code, message, serving.is_accepting())
            }
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "refused"),
        })?;
    let mut pending = Pending::new(Arc::clone(serving), ticket, rx);
    // Even a streamed reply waits for its first event, so that a request that fails before
    // its first token gets an error status rather than a 200 with an error inside.
    loop {
        let Some(event) = pending.next().await else {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the request ended without an answer",
            ));
        };
        match &event.body {
            EventBody::Error { code, message } => {
                return Err(ApiError::from_event(*code, message.clone(), true));
            }
            EventBody::Done { .. } if !streamed => {
                return Ok(json_response(StatusCode::OK, &reply.response(&event.body)));
            }
            EventBody::Token { .. } if !streamed => continue,
            _ => {
                let body = EventStream::new(pending, writer, event);
                let mut r = Response::new(BodyExt::boxed(body));
                let h = r.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                return Ok(r);
            }
        }
    }
}

/// Bodies over the limit are still read (and dropped, up to this much) before the 413, so the
/// client is not reset while it is still sending and can read the answer.
const DRAIN_BYTES: usize = 64 * 1024 * 1024;

/// The request body, at most `max` bytes (413 beyond).
async fn read_body(mut body: Incoming, max: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than {max} bytes (http.max_body_bytes)"),
        )
        .with_code("request_too_large")
    };
    let mut data = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(chunk.len());
        if seen > DRAIN_BYTES {
            return Err(too_large());
        }
        if seen <= max {
            data.extend_from_slice(&chunk);
        }
    }
    if seen > max {
        return Err(too_large());
    }
    Ok(Bytes::from(data))
}

fn full(data: impl Into<Bytes>) -> Body {
    BodyExt::boxed(Full::new(data.into()))
}

fn json_response(status: StatusCode, value: &Json) -> Response<Body> {
    let mut r = Response::new(full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.status, &e.body());
    if e.status == StatusCode::TOO_MANY_REQUESTS {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let e = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("use {allow}"),
    );
    let mut r = error_response(&e);
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}
