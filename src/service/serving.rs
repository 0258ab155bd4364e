//! Which schedulers serve: one slot per configured model (the first is the default), each with
//! the scheduler taking its new requests and those a reload replaced, still finishing theirs.
//! Front ends reach it through `Context::serving` and ask it every time, so a reload needs
//! nothing from them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};

use super::lock;
use super::metrics::Transport;
use super::protocol::{
    ErrorCode, Event, EventBody, GenerateRequest, Health, HealthStatus, ModelHealth, ModelStats,
    ModelStatus, Query, ReloadStatus, Stats,
};
use super::reload::ModelSpec;
use super::scheduler::{CancelReason, EventSink, ModelInfo, Scheduler, Ticket};

pub struct Serving {
    /// Fixed at start-up, in the config's order.
    models: Vec<ModelServing>,
    /// Shutdown has begun: intake is closed everywhere.
    stopping: AtomicBool,
    /// The reload status over all models; watched by the MQTT front end, which publishes the
    /// health it changes (retained).
    reload: watch::Sender<ReloadStatus>,
    /// Reloads asked for by a front end (already begun), handed to the service's main loop.
    reload_requests: OnceLock<mpsc::UnboundedSender<()>>,
}

/// One model: its scheduler (None while a `swap` reload has unloaded it), the schedulers it
/// replaced that still finish requests, and what it was loaded from.
pub struct ModelServing {
    pub name: String,
    current: RwLock<Option<Scheduler>>,
    retiring: Mutex<Vec<Scheduler>>,
    /// The config it was loaded from, for a reload to compare with.
    spec: Mutex<ModelSpec>,
    /// Its health when it was last loaded: what `health` shows while it is unloaded.
    last_health: Mutex<ModelHealth>,
    reload: Mutex<ReloadStatus>,
}

impl ModelServing {
    pub fn new(spec: ModelSpec, scheduler: Scheduler) -> Self {
        Self {
            name: spec.name(),
            last_health: Mutex::new(scheduler.health()),
            current: RwLock::new(Some(scheduler)),
            retiring: Mutex::new(Vec::new()),
            spec: Mutex::new(spec),
            reload: Mutex::new(ReloadStatus::None),
        }
    }

    /// The scheduler taking this model's new requests; None while it is unloaded.
    pub fn current(&self) -> Option<Scheduler> {
        match self.current.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set_current(&self, next: Option<Scheduler>) -> Option<Scheduler> {
        let mut current = match self.current.write() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        std::mem::replace(&mut *current, next)
    }

    /// Every scheduler with work: the current one and those finishing.
    fn all(&self) -> Vec<Scheduler> {
        let mut all: Vec<Scheduler> = self.current().into_iter().collect();
        all.extend(lock(&self.retiring).iter().cloned());
        all
    }

    /// What it was loaded from.
    pub fn spec(&self) -> ModelSpec {
        lock(&self.spec).clone()
    }

    /// Makes `next` (loaded from `spec`) current; the scheduler it replaced (if any) is
    /// returned to finish its requests and stays reachable for cancels until `retired`.
    pub fn replace(&self, spec: ModelSpec, next: Scheduler) -> Option<Scheduler> {
        *lock(&self.last_health) = next.health();
        *lock(&self.spec) = spec;
        let old = self.set_current(Some(next));
        if let Some(old) = &old {
            lock(&self.retiring).push(old.clone());
        }
        old
    }

    /// Unloads the model (a `swap` reload): new requests get `busy` until `replace`.
    pub fn take(&self) -> Option<Scheduler> {
        let old = self.set_current(None);
        if let Some(old) = &old {
            old.stop_intake();
            lock(&self.retiring).push(old.clone());
        }
        old
    }

    /// `old` has finished everything it accepted (and its threads have ended).
    pub fn retired(&self, old: &Scheduler) {
        lock(&self.retiring).retain(|s| !s.same_as(old));
    }

    pub fn set_reload(&self, status: ReloadStatus) {
        *lock(&self.reload) = status;
    }

    fn health(&self) -> ModelHealth {
        let mut h = match self.current() {
            Some(s) => s.health(),
            None => ModelHealth {
                status: ModelStatus::Unloaded,
                active: 0,
                queue_depth: 0,
                uptime_s: 0,
                ..lock(&self.last_health).clone()
            },
        };
        h.reload = lock(&self.reload).clone();
        h
    }
}

impl Serving {
    pub fn new(models: Vec<ModelServing>) -> Self {
        assert!(!models.is_empty(), "a service serves at least one model");
        Self {
            models,
            stopping: AtomicBool::new(false),
            reload: watch::Sender::new(ReloadStatus::None),
            reload_requests: OnceLock::new(),
        }
    }

    pub fn models(&self) -> &[ModelServing] {
        &self.models
    }

    /// The model a request names (None: the default), or why there is none.
    pub fn route(&self, name: Option<&str>) -> Result<&ModelServing, String> {
        match name {
            None => Ok(&self.models[0]),
            Some(name) => self.models.iter().find(|m| m.name == name).ok_or_else(|| {
                let names: Vec<String> = self
                    .models
                    .iter()
                    .map(|m| format!("{:?}", m.name))
                    .collect();
                format!("no model {name:?}; this service has {}", names.join(", "))
            }),
        }
    }

    /// Hands a request to its model's scheduler; the refusal is the event to answer with.
    pub fn submit(
        &self,
        request: GenerateRequest,
        transport: Transport,
        sink: Arc<dyn EventSink>,
    ) -> Result<Ticket, Event> {
        let model = match self.route(request.model.as_deref()) {
            Ok(m) => m,
            Err(message) => {
                self.record_rejected(transport);
                return Err(Event::error(
                    Some(&request.id),
                    ErrorCode::BadRequest,
                    message,
                ));
            }
        };
        match model.current() {
            Some(s) => s.submit(request, transport, sink),
            None => {
                self.record_rejected(transport);
                Err(Event::error(
                    Some(&request.id),
                    ErrorCode::Busy,
                    format!(
                        "model {:?} is being reloaded (reload_strategy = \"swap\"); retry in a few seconds",
                        model.name
                    ),
                ))
            }
        }
    }

    /// Counts a request refused before it reached a model (on the default model's counters).
    pub fn record_rejected(&self, transport: Transport) {
        if let Some(s) = self.models.iter().find_map(ModelServing::current) {
            s.record_rejected(transport);
        }
    }

    /// Cancels the request wherever it runs.
    pub fn cancel(&self, ticket: Ticket, reason: CancelReason) -> bool {
        self.all().iter().any(|s| s.cancel(ticket, reason))
    }

    /// Every scheduler with work, of every model.
    pub fn all(&self) -> Vec<Scheduler> {
        self.models.iter().flat_map(ModelServing::all).collect()
    }

    /// Closes intake everywhere (shutdown); returns every scheduler to drain.
    pub fn stop_intake(&self) -> Vec<Scheduler> {
        self.stopping.store(true, Ordering::SeqCst);
        let all = self.all();
        for s in &all {
            s.stop_intake();
        }
        all
    }

    /// False once shutdown has begun.
    pub fn is_accepting(&self) -> bool {
        !self.stopping.load(Ordering::SeqCst)
    }

    /// For the watchdog: every loaded model's engine answers.
    pub fn is_alive(&self) -> bool {
        self.models
            .iter()
            .filter_map(ModelServing::current)
            .all(|s| s.is_alive())
    }

    /// What each loaded model is, for `/v1/models` and the metrics.
    pub fn model_infos(&self) -> Vec<(ModelInfo, Stats)> {
        self.models
            .iter()
            .filter_map(ModelServing::current)
            .map(|s| (s.model_info(), s.stats()))
            .collect()
    }

    /// The answer to `health` or `stats` (`id`: the request's, echoed).
    pub fn query(&self, query: Query, id: Option<String>) -> Event {
        let body = match query {
            Query::Health => EventBody::Health(Box::new(self.health())),
            Query::Stats => EventBody::Stats(Box::new(self.stats())),
        };
        Event { id, body }
    }

    pub fn health(&self) -> Health {
        let models: Vec<ModelHealth> = self.models.iter().map(ModelServing::health).collect();
        let first = &models[0];
        let status = if !self.is_accepting() {
            HealthStatus::Stopping
        } else if models.iter().any(|m| m.status == ModelStatus::Degraded) {
            HealthStatus::Degraded
        } else {
            HealthStatus::Ok
        };
        Health {
            status,
            model: first.model.clone(),
            backend: first.backend.clone(),
            bundle: first.bundle.clone(),
            version: first.version.clone(),
            variant: first.variant.clone(),
            signature: first.signature.clone(),
            reload: self.reload_status(),
            active: models.iter().map(|m| m.active).sum(),
            queue_depth: models.iter().map(|m| m.queue_depth).sum(),
            uptime_s: first.uptime_s,
            models,
        }
    }

    /// The default model's stats (zeros while it is unloaded), with every loaded model's in
    /// `models` (an unloaded one's counters went with it).
    pub fn stats(&self) -> Stats {
        let models: Vec<ModelStats> = self
            .models
            .iter()
            .filter_map(|m| {
                m.current().map(|s| ModelStats {
                    name: m.name.clone(),
                    stats: s.stats(),
                })
            })
            .collect();
        let mut top = models
            .first()
            .filter(|m| m.name == self.models[0].name)
            .map(|m| m.stats.clone())
            .unwrap_or_default();
        top.models = models;
        top
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
    fn request_reload(&self) -> Result<(), &'static str> {
        let Some(tx) = self.reload_requests.get() else {
            return Err("the service is not ready to reload yet");
        };
        if !self.is_accepting() {
            return Err("the service is stopping");
        }
        if !self.begin_reload() {
            return Err("a reload is already under way");
        }
        if tx.send(()).is_err() {
            self.end_reload(Err("the service is stopping".into()));
            return Err("the service is stopping");
        }
        Ok(())
    }

    /// A reload a front end was allowed to ask for: begun, and answered with `health` (its
    /// `reload` saying `in_progress`), or with `busy` saying why not.
    pub fn reload_request(&self, id: Option<String>) -> Event {
        match self.request_reload() {
            Ok(()) => self.query(Query::Health, id),
            Err(why) => Event::error(id.as_deref(), ErrorCode::Busy, why),
        }
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
        self.reload.send_replace(finished(result));
    }
}

/// The status a finished reload leaves.
pub fn finished(result: Result<(), String>) -> ReloadStatus {
    let at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match result {
        Ok(()) => ReloadStatus::Done { at },
        Err(error) => ReloadStatus::Failed { at, error },
    }
}
