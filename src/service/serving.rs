//! Which scheduler serves: the current one takes new requests; the ones a reload replaced stay
//! here until their accepted requests have finished. Front ends go through `Context`, which asks
//! this holder every time, so a reload needs nothing from them.

use std::sync::{Mutex, OnceLock, RwLock};
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};

use super::lock;
use super::protocol::ReloadStatus;
use super::scheduler::{CancelReason, Scheduler, Ticket};

pub struct Serving {
    current: RwLock<Scheduler>,
    retiring: Mutex<Vec<Scheduler>>,
    /// Watched by the MQTT front end, which publishes the health it changes (retained).
    reload: watch::Sender<ReloadStatus>,
    /// Reloads asked for by a front end (already begun), handed to the service's main loop.
    reload_requests: OnceLock<mpsc::UnboundedSender<()>>,
}

impl Serving {
    pub fn new(scheduler: Scheduler) -> Self {
        Self {
            current: RwLock::new(scheduler),
            retiring: Mutex::new(Vec::new()),
            reload: watch::Sender::new(ReloadStatus::None),
            reload_requests: OnceLock::new(),
        }
    }

    /// The scheduler taking new requests.
    pub fn current(&self) -> Scheduler {
        match self.current.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Every scheduler with work: the current one and those finishing.
    pub fn all(&self) -> Vec<Scheduler> {
        let mut all = vec![self.current()];
        all.extend(lock(&self.retiring).iter().cloned());
        all
    }

    /// Cancels the request wherever it runs.
    pub fn cancel(&self, ticket: Ticket, reason: CancelReason) -> bool {
        self.all().iter().any(|s| s.cancel(ticket, reason))
    }

    /// Makes `next` current; returns the one it replaced, which finishes its requests.
    pub fn replace(&self, next: Scheduler) -> Scheduler {
        let mut current = match self.current.write() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        let old = std::mem::replace(&mut *current, next);
        lock(&self.retiring).push(old.clone());
        old
    }

    /// `old` has finished everything it accepted (and its threads have ended).
    pub fn retired(&self, old: &Scheduler) {
        lock(&self.retiring).retain(|s| !s.same_as(old));
    }

    pub fn reload_status(&self) -> ReloadStatus {
        self.reload.borrow().clone()
    }

    /// Changes of the reload status, as they happen.
    pub fn watch_reload(&self) -> watch::Receiver<ReloadStatus> {
        self.reload.subscribe()
    }

    /// Where the main loop takes reload requests from (once).
    pub fn reload_requests(&self) -> mpsc::UnboundedReceiver<()> {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.reload_requests.set(tx);
        rx
    }

    /// A front end asks for a reload: begun here (health says `in_progress` at once), run by
    /// the main loop.
    pub fn request_reload(&self) -> Result<(), &'static str> {
        let Some(tx) = self.reload_requests.get() else {
            return Err("the service is not ready to reload yet");
        };
        if !self.begin_reload() {
            return Err("a reload is already under way");
        }
        if tx.send(()).is_err() {
            self.end_reload(Err("the service is stopping".into()));
            return Err("the service is stopping");
        }
        Ok(())
    }

    /// Marks a reload as started; false when one is under way already.
    pub fn begin_reload(&self) -> bool {
        self.reload.send_if_modified(|status| {
            if *status == ReloadStatus::InProgress {
                return false;
            }
            *status = ReloadStatus::InProgress;
            true
        })
    }

    pub fn end_reload(&self, result: Result<(), String>) {
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.reload.send_replace(match result {
            Ok(()) => ReloadStatus::Done { at },
            Err(error) => ReloadStatus::Failed { at, error },
        });
    }
}
