//! The Unix socket front end: newline-delimited JSON both ways, many clients, several
//! requests in flight per connection (matched by their `id`).
//!
//! A connection's requests are cancelled when the client disconnects. A client that only
//! half-closes (shuts down its write side, as `socat` does at the end of its input) still
//! gets its answers: the connection ends when its last request has. Each connection is one
//! task; events reach it from the model workers through an unbounded channel, bounded in
//! practice by the scheduler's limits (requests × tokens) and by the connection's reading: a
//! connection whose answers cannot be written reads no more requests, and is dropped (its
//! requests cancelled) once a write has waited `unix_socket.write_timeout_s`. At most
//! `unix_socket.max_connections` are served at once; one more gets a `busy` line and is closed.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::config::UnixSocketSection;

use super::lines::{LineSplitter, Piece};
use super::metrics::Transport;
use super::protocol::{parse_request, ErrorCode, Event, Op};
use super::scheduler::{CancelReason, EventSink, Ticket};
use super::{lock, Context, Phase};

/// The bound socket file; removed on shutdown if it is still ours.
#[derive(Debug, Clone)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file unless another server has replaced it meanwhile.
    pub fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!("cannot remove {}: {e}", self.path.display());
                }
            }
            _ => {}
        }
    }
}

/// The listening socket and, when we bound it ourselves, its file (removed on shutdown). A
/// socket systemd passed (socket activation) has no file of ours: the `.socket` unit owns it
/// and keeps it, so requests that arrive while the service restarts wait in its backlog.
pub struct Listening {
    pub listener: std::os::unix::net::UnixListener,
    pub file: Option<SocketFile>,
    /// `unix_socket.write_timeout_s`: a client whose answers cannot be written for this long
    /// is dropped.
    pub write_timeout: Duration,
    /// `unix_socket.max_connections`.
    pub max_connections: usize,
}

impl Listening {
    /// The socket systemd passed (`activated`), else the one `[unix_socket]` names (None when
    /// disabled).
    pub fn open(
        section: &UnixSocketSection,
        activated: Option<std::os::unix::net::UnixListener>,
    ) -> Result<Option<Listening>> {
        if let Some(listener) = activated {
            let name = listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                .unwrap_or_else(|| "an unnamed socket".into());
            tracing::info!(
                "socket activation: listening on {name} from systemd (unix_socket.path, mode and group are the socket unit's)"
            );
            return Ok(Some(Listening {
                listener,
                file: None,
                write_timeout: Duration::from_secs(section.write_timeout_s),
                max_connections: section.max_connections,
            }));
        }
        if !section.enabled() {
            return Ok(None);
        }
        let (listener, file) = bind(section)?;
        tracing::info!("listening on {}", file.path().display());
        Ok(Some(Listening {
            listener,
            file: Some(file),
            write_timeout: Duration::from_secs(section.write_timeout_s),
            max_connections: section.max_connections,
        }))
    }
}

/// Binds the socket (before the model loads, so a second server fails fast). A socket file
/// left by a crash is replaced; one that a live server answers on is not, and neither is
/// anything that is not a socket.
pub fn bind(section: &UnixSocketSection) -> Result<(std::os::unix::net::UnixListener, SocketFile)> {
    let path = &section.path;
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                bail!(
                    "{} exists and is not a socket; refusing to replace it (unix_socket.path)",
                    path.display()
                );
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => bail!(
                    "{} is in use by a running server (unix_socket.path)",
                    path.display()
                ),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::warn!(
                        "replacing stale socket {} (left by a crash?)",
                        path.display()
                    );
                    std::fs::remove_file(path).with_context(|| {
                        format!("cannot remove stale socket {}", path.display())
                    })?;
                }
                Err(e) => bail!("cannot check existing socket {}: {e}", path.display()),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("cannot check {}: {e}", path.display()),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("cannot bind {} (unix_socket.path)", path.display()))?;
    listener.set_nonblocking(true)?;
    let meta = std::fs::symlink_metadata(path)?;
    let file = SocketFile {
        path: path.clone(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let result = (|| -> Result<()> {
        if !section.group.is_empty() {
            let gid = resolve_group(&section.group)?;
            std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| {
                format!(
                    "cannot give {} to group {} (unix_socket.group)",
                    path.display(),
                    section.group
                )
            })?;
        }
        let mode = section.mode_bits()?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot chmod {}", path.display()))?;
        Ok(())
    })();
    if let Err(e) = result {
        file.remove();
        return Err(e);
    }
    Ok((listener, file))
}

/// A group name (looked up in /etc/group) or number.
fn resolve_group(group: &str) -> Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string("/etc/group").context("cannot read /etc/group")?;
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse::<u32>().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .with_context(|| format!("unix_socket.group: no group named {group:?} in /etc/group"))
}

/// Accepts connections until the service starts draining, then lets open connections finish.
pub async fn run(socket: Listening, ctx: Context, mut phase: watch::Receiver<Phase>) {
    let listener = match UnixListener::from_std(socket.listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("unix socket: {e}");
            return;
        }
    };
    let mut connections = JoinSet::new();
    // Refusing connections since the last one taken (warned about once per such run).
    let mut refusing = false;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) if connections.len() >= socket.max_connections => {
                    refuse_connection(&stream, socket.max_connections, &mut refusing);
                }
                Ok((stream, _)) => {
                    refusing = false;
                    let write_timeout = socket.write_timeout;
                    connections.spawn(connection(stream, ctx.clone(), phase.clone(), write_timeout));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("unix socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() != Phase::Running {
                    break;
                }
            }
        }
    }
    // Intake stops: no new connections, the socket file (if ours) goes away.
    drop(listener);
    if let Some(file) = &socket.file {
        file.remove();
    }
    while connections.join_next().await.is_some() {}
}

/// Requests of one connection in flight: id → ticket (None for the moment between the
/// scheduler accepting a request and the ticket being recorded).
type Inflight = Arc<Mutex<HashMap<String, Option<Ticket>>>>;

struct Sink {
    tx: mpsc::UnboundedSender<Event>,
    inflight: Inflight,
}

impl EventSink for Sink {
    fn send(&self, event: Event) {
        if event.is_terminal() {
            if let Some(id) = event.id() {
                lock(&self.inflight).remove(id);
            }
        }
        // Fails only once the connection is gone, when nobody wants the event.
        let _ = self.tx.send(event);
    }
}

impl Sink {
    /// An event of the front end's own (a rejection, a health answer): it must not touch the
    /// in-flight table, even when it carries the id of a request that is in flight.
    fn reply(&self, event: Event) {
        let _ = self.tx.send(event);
    }
}

async fn connection(
    stream: UnixStream,
    ctx: Context,
    mut phase: watch::Receiver<Phase>,
    write_timeout: Duration,
) {
    let peer_uid = stream.peer_cred().ok().map(|c| c.uid());
    let (mut reader, mut writer) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let inflight: Inflight = Arc::default();
    let sink = Arc::new(Sink {
        tx,
        inflight: Arc::clone(&inflight),
    });
    let mut splitter = LineSplitter::new(ctx.max_request_bytes);
    let mut buf = vec![0u8; 64 * 1024];
    let mut pieces = Vec::new();
    let mut reading = true;
    let mut check = tokio::time::interval(Duration::from_millis(100));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::new();
    loop {
        tokio::select! {
            biased;
            event = rx.recv() => {
                let Some(event) = event else { break };
                out.clear();
                push_line(&mut out, &event);
                // Whatever else is ready goes out in the same write.
                while out.len() < 64 * 1024 {
                    match rx.try_recv() {
                        Ok(e) => push_line(&mut out, &e),
                        Err(_) => break,
                    }
                }
                // A client that stops reading would hold its answers (and this task) forever.
                let written = tokio::time::timeout(write_timeout, writer.write_all(&out)).await;
                if !matches!(written, Ok(Ok(()))) {
                    if written.is_err() {
                        tracing::warn!(
                            "a client read none of its answers for {} s: dropping it",
                            write_timeout.as_secs()
                        );
                    }
                    disconnect(&ctx, &inflight);
                    return;
                }
            }
            read = reader.read(&mut buf), if reading => match read {
                Ok(n) if n > 0 => {
                    splitter.push(&buf[..n], &mut pieces);
                    for piece in pieces.drain(..) {
                        handle(piece, &ctx, &sink, peer_uid);
                    }
                }
                _ => {
                    reading = false;
                    if peer_gone(&writer).await {
                        disconnect(&ctx, &inflight);
                        return;
                    }
                }
            },
            _ = check.tick(), if !reading => {
                if lock(&inflight).is_empty() && rx.is_empty() {
                    break;
                }
                if peer_gone(&writer).await {
                    disconnect(&ctx, &inflight);
                    return;
                }
            }
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() == Phase::Closed {
                    // The scheduler has ended every request: send what is left, then close.
                    out.clear();
                    while let Ok(e) = rx.try_recv() {
                        push_line(&mut out, &e);
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(2), writer.write_all(&out)).await;
                    break;
                }
            }
        }
    }
    let _ = writer.shutdown().await;
}

/// One connection more than `unix_socket.max_connections`: a `busy` line if the socket takes it
/// at once (a fresh socket's buffer is empty), then closed.
fn refuse_connection(stream: &UnixStream, max: usize, refusing: &mut bool) {
    if !std::mem::replace(refusing, true) {
        tracing::warn!(
            "unix socket: {max} connections open (unix_socket.max_connections): refusing more"
        );
    }
    let event = Event::error(
        None,
        ErrorCode::Busy,
        format!(
            "too many connections: this service serves {max} at once (unix_socket.max_connections); retry later"
        ),
    );
    let mut line = Vec::new();
    push_line(&mut line, &event);
    let _ = stream.try_write(&line);
}

fn push_line(out: &mut Vec<u8>, event: &Event) {
    out.extend_from_slice(event.to_line().as_bytes());
    out.push(b'\n');
}

/// True when the peer has closed its socket entirely (not just its write side).
async fn peer_gone(writer: &OwnedWriteHalf) -> bool {
    match tokio::time::timeout(Duration::from_millis(50), writer.ready(Interest::WRITABLE)).await {
        Ok(Ok(ready)) => ready.is_write_closed(),
        Ok(Err(_)) => true,
        // Not even writable (the client does not read): it is still there.
        Err(_) => false,
    }
}

fn disconnect(ctx: &Context, inflight: &Inflight) {
    let tickets: Vec<Ticket> = lock(inflight).drain().filter_map(|(_, t)| t).collect();
    if !tickets.is_empty() {
        tracing::info!(
            "client disconnected: cancelling its {} request(s)",
            tickets.len()
        );
    }
    for t in tickets {
        ctx.serving.cancel(t, CancelReason::Disconnect);
    }
}

fn handle(piece: Piece, ctx: &Context, sink: &Arc<Sink>, peer_uid: Option<u32>) {
    let line = match piece {
        Piece::Line(l) => l,
        Piece::TooLong => {
            ctx.serving.record_rejected(Transport::UnixSocket);
            sink.reply(Event::error(
                None,
                ErrorCode::TooLong,
                format!(
                    "request line longer than {} bytes (limits.max_request_bytes)",
                    ctx.max_request_bytes
                ),
            ));
            return;
        }
    };
    let request = match parse_request(&line, &ctx.limits) {
        Ok(r) => r,
        Err(rejection) => {
            ctx.serving.record_rejected(Transport::UnixSocket);
            sink.reply(*rejection.event);
            return;
        }
    };
    match request.op {
        Op::Generate(g) => {
            let id = g.id.clone();
            {
                let mut inflight = lock(&sink.inflight);
                if inflight.contains_key(&id) {
                    drop(inflight);
                    ctx.serving.record_rejected(Transport::UnixSocket);
                    sink.reply(Event::error(
                        Some(&id),
                        ErrorCode::BadRequest,
                        "a request with this id is already in flight on this connection",
                    ));
                    return;
                }
                inflight.insert(id.clone(), None);
            }
            let dyn_sink: Arc<dyn EventSink> = Arc::clone(sink) as Arc<dyn EventSink>;
            match ctx.serving.submit(*g, Transport::UnixSocket, dyn_sink) {
                Ok(ticket) => {
                    // The request may already have ended (its terminal event removed the
                    // entry); then there is nothing to record.
                    if let Some(slot) = lock(&sink.inflight).get_mut(&id) {
                        *slot = Some(ticket);
                    }
                }
                Err(event) => {
                    lock(&sink.inflight).remove(&id);
                    sink.reply(event);
                }
            }
        }
        Op::Cancel { id } => {
            let ticket = lock(&sink.inflight).get(&id).copied().flatten();
            match ticket {
                Some(t) => {
                    ctx.serving.cancel(t, CancelReason::Client);
                }
                // Already finished (its terminal event is on its way): nothing to do, and
                // no second terminal event for that id.
                None => tracing::debug!(id, "cancel for a request not in flight"),
            }
        }
        Op::Query { query, id } => sink.reply(ctx.serving.query(query, id)),
        Op::Reload { id } => sink.reply(reload(ctx, id, peer_uid)),
    }
}

/// `{"op":"reload"}`: allowed by `unix_socket.allow_reload`, to root and the service's own user
/// (the socket's peer credentials: its file mode lets a whole group connect). The answer is
/// `health`, its `reload` saying `in_progress`.
fn reload(ctx: &Context, id: Option<String>, peer_uid: Option<u32>) -> Event {
    use std::os::unix::fs::MetadataExt;
    let refuse = |message: &str| Event::error(id.as_deref(), ErrorCode::Forbidden, message);
    if !ctx.socket_reload {
        return refuse("reload over the socket is off (unix_socket.allow_reload); SIGHUP reloads");
    }
    // The owner of /proc/self is this process's effective user.
    let own = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if !peer_uid.is_some_and(|uid| uid == 0 || Some(uid) == own) {
        return refuse("only root or the service's own user may reload");
    }
    ctx.serving.reload_request(id)
}
