//! systemd's notify protocol (sd_notify(3)) without libsystemd: datagrams such as `READY=1`
//! sent to the socket named in `$NOTIFY_SOCKET`, and the watchdog interval from
//! `$WATCHDOG_USEC`. Outside systemd (no `$NOTIFY_SOCKET`) every call is a no-op.
//! Also socket activation (sd_listen_fds(3)): the listening socket a `.socket` unit passes.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    pub fn from_env() -> Self {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let addr = socket_addr(&path.to_string_lossy())?;
            let socket = UnixDatagram::unbound().ok()?;
            Some((socket, addr))
        });
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&usec| usec > 0)
            .filter(|_| {
                // WATCHDOG_PID, when set, names the process systemd expects pings from.
                std::env::var("WATCHDOG_PID")
                    .ok()
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_none_or(|pid| pid == std::process::id())
            })
            .map(Duration::from_micros);
        Self { target, watchdog }
    }

    /// Sends one state line (`READY=1`, `STOPPING=1`, `STATUS=…`); failures are logged once
    /// per call and otherwise ignored: the service runs fine without its supervisor.
    pub fn notify(&self, state: &str) {
        if let Some((socket, addr)) = &self.target {
            if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
                tracing::debug!("sd_notify {state:?}: {e}");
            }
        }
    }

    /// How often to send `WATCHDOG=1`: half the interval systemd waits, as sd_watchdog_enabled
    /// advises.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }
}

/// The listening sockets systemd passed on socket activation (`$LISTEN_PID` = this process,
/// `$LISTEN_FDS` ≥ 1, from fd 3): the Unix stream socket of the protocol and the TCP sockets of
/// the HTTP front end. The `listenfd` crate reads the variables, checks each descriptor's type
/// and takes ownership of it, so no raw descriptor is handled here.
#[derive(Default)]
pub struct Activated {
    pub unix: Option<std::os::unix::net::UnixListener>,
    pub tcp: Vec<std::net::TcpListener>,
}

pub fn activated_sockets() -> Result<Activated> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Activated::default();
    for i in 0..fds.len() {
        // A descriptor of the wrong type is left in place for the next try.
        if let Ok(Some(listener)) = fds.take_tcp_listener(i) {
            listener
                .set_nonblocking(true)
                .context("cannot make a socket systemd passed non-blocking")?;
            out.tcp.push(listener);
            continue;
        }
        match fds.take_unix_listener(i) {
            Ok(Some(listener)) if out.unix.is_none() => {
                listener
                    .set_nonblocking(true)
                    .context("cannot make the socket systemd passed non-blocking")?;
                out.unix = Some(listener);
            }
            Ok(Some(_)) => tracing::warn!(
                "systemd passed more than one Unix socket; the one at fd {} stays unused",
                i + 3
            ),
            Ok(None) => {}
            Err(e) => bail!(
                "socket {} that systemd passed (LISTEN_FDS) is neither a listening Unix stream socket nor a TCP one: {e} \
                 (qwen2-edge.socket needs ListenStream=/path, and ListenStream=ADDRESS:PORT for HTTP)",
                i + 3
            ),
        }
    }
    Ok(out)
}

/// A filesystem path, or `@name` for the Linux abstract namespace.
fn socket_addr(path: &str) -> Option<SocketAddr> {
    if let Some(name) = path.strip_prefix('@') {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            #[cfg(target_os = "android")]
            use std::os::android::net::SocketAddrExt;
            #[cfg(target_os = "linux")]
            use std::os::linux::net::SocketAddrExt;
            return SocketAddr::from_abstract_name(name.as_bytes()).ok();
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let _ = name;
            return None;
        }
    }
    if path.is_empty() {
        return None;
    }
    SocketAddr::from_pathname(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("qwen2-edge-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier {
            target: Some((
                UnixDatagram::unbound().expect("socket"),
                socket_addr(&path.to_string_lossy()).expect("addr"),
            )),
            watchdog: Some(Duration::from_secs(10)),
        };
        n.notify("READY=1");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"READY=1");
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(5)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn abstract_and_empty_addresses() {
        assert!(socket_addr("").is_none());
        #[cfg(target_os = "linux")]
        assert!(socket_addr("@qwen2-edge-test").is_some());
    }
}
