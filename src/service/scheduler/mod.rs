//! The scheduler: one loaded model, an engine thread that decodes up to `max_concurrent`
//! requests together, a bounded FIFO queue, deadlines, cancellation and the counters behind
//! `stats`.
//!
//! Threads, no async: the engine thread (`batcher.rs`) owns `max_concurrent` slots (sessions
//! whose KV caches are allocated once at start-up) and advances every running request one
//! step at a time, all decoding requests in one batch. A timer thread enforces deadlines.
//! Front ends talk to it only through `submit` / `cancel` / `query` and get events back
//! through their `EventSink`; they never touch the engine. `submit` builds the prompt's
//! tokens on the caller's thread, so a request that cannot fit is refused at once.
//!
//! Invariant: every accepted request produces exactly one terminal event (`done` or `error`).
//! A request is owned by exactly one place at a time — the queue (the canceller or the timer
//! that removes it sends the terminal event; `queue.rs`) or the engine (which sends it when
//! the generation ends; `batcher.rs`) — and ownership only moves under the state lock.

mod batcher;
mod masks;
mod queue;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

use crate::config::LimitsSection;
use crate::draft::DraftModel;
use crate::engine::Engine;
use crate::generate::GenerateOptions;
use crate::guide::tools::Tools;
use crate::guide::Guide;

use super::lock;
use super::metrics::{Metrics, Tally, Transport};
use super::protocol::{
    ErrorCode, Event, GenerateRequest, ModelHealth, ModelStatus, PromptInput, ReloadStatus, Stats,
};
use batcher::Slot;
use queue::{Control, Queued, Running};

/// Where a request's events go. Implemented by each front end; must not block (the caller
/// is a model worker between two tokens).
pub trait EventSink: Send + Sync {
    fn send(&self, event: Event);
}

/// Why a request was cancelled; the first reason set wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CancelReason {
    /// `{"op":"cancel"}`.
    Client = 1,
    /// The client went away; nobody reads the events any more.
    Disconnect = 2,
    Deadline = 3,
    Shutdown = 4,
}

impl CancelReason {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Client),
            2 => Some(Self::Disconnect),
            3 => Some(Self::Deadline),
            4 => Some(Self::Shutdown),
            _ => None,
        }
    }
}

/// A handle on an accepted request, for `cancel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(u64);

/// Tickets are unique across the schedulers of one process (a reload starts a new scheduler while
/// the old one finishes its requests): a ticket is cancelled by offering it to each.
static NEXT_TICKET: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// The model's name in the config (what requests call it).
    pub name: String,
    pub max_concurrent: usize,
    pub max_queue: usize,
    pub max_prompt_tokens: usize,
    pub max_new_tokens: usize,
    pub request_timeout: Duration,
    pub min_token_interval: Duration,
    /// Prompt-lookup drafts per decode step, at most (`[[model]] prompt_lookup`; 0 = off).
    pub prompt_lookup: usize,
    /// A draft model and its drafts per step at most (`[[model]] draft`, `draft_tokens`).
    pub draft: Option<DraftEngine>,
}

/// The draft model's engine, shared with the scheduler that serves it.
#[derive(Clone)]
pub struct DraftEngine {
    pub engine: Arc<Engine>,
    pub max_tokens: usize,
    /// Token ids it drafts from (`DraftModel::new`; 0: every token).
    pub vocabulary: usize,
}

impl std::fmt::Debug for DraftEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DraftEngine({}, {} tokens)",
            self.engine.bundle.dir.display(),
            self.max_tokens
        )
    }
}

impl SchedulerConfig {
    pub fn new(name: &str, l: &LimitsSection) -> Self {
        Self {
            name: name.to_string(),
            max_concurrent: l.max_concurrent,
            max_queue: l.max_queue,
            max_prompt_tokens: l.max_prompt_tokens,
            max_new_tokens: l.max_new_tokens,
            request_timeout: Duration::from_secs(l.request_timeout_s),
            min_token_interval: Duration::from_millis(l.min_token_interval_ms),
            prompt_lookup: 0,
            draft: None,
        }
    }
}

#[derive(Default)]
struct State {
    accepting: bool,
    /// Workers leave once the queue is empty; the timer leaves when all workers have.
    stopping: bool,
    queue: VecDeque<Queued>,
    running: HashMap<u64, Running>,
    engine_alive: bool,
    metrics: Metrics,
}

struct Inner {
    engine: Arc<Engine>,
    config: SchedulerConfig,
    /// Prompt tokens a request may have: the config's limit, within the session's capacity.
    prompt_limit: usize,
    /// Positions each session holds: a prompt plus its `max_tokens` must fit.
    capacity: usize,
    defaults: GenerateOptions,
    state: Mutex<State>,
    /// The engine waits here for work.
    work: Condvar,
    /// The timer waits here for the next deadline (or a change to the set of deadlines).
    timer: Condvar,
    /// Signalled whenever a request leaves the system (shutdown waits for it to empty).
    idle: Condvar,
    started: Instant,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Cheap to clone: all clones drive the same workers.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl Scheduler {
    /// Allocates every slot's session up front (a config that does not fit in memory fails
    /// here, at start-up) and starts the engine and timer threads.
    pub fn start(engine: Arc<Engine>, config: SchedulerConfig) -> Result<Self> {
        let context = engine.max_context();
        let capacity = context.min(
            config
                .max_prompt_tokens
                .saturating_add(config.max_new_tokens),
        );
        if capacity < 2 {
            return Err(anyhow!(
                "the model's context ({context}) is too small to serve"
            ));
        }
        let prompt_limit = config.max_prompt_tokens.min(capacity - 1);
        if prompt_limit < config.max_prompt_tokens {
            tracing::info!(
                "prompts limited to {prompt_limit} tokens by the model's context of {context} positions"
            );
        }
        let mut slots = Vec::with_capacity(config.max_concurrent);
        for _ in 0..config.max_concurrent {
            let draft = config
                .draft
                .as_ref()
                .map(|d| DraftModel::new(&d.engine, &engine, capacity, d.max_tokens, d.vocabulary))
                .transpose()?;
            slots.push(Slot {
                session: engine.backend.new_session(capacity)?,
                cached: Vec::new(),
                draft,
            });
        }
        let defaults = engine.default_options();
        let inner = Arc::new(Inner {
            engine,
            config,
            prompt_limit,
            capacity,
            defaults,
            state: Mutex::new(State {
                accepting: true,
                engine_alive: true,
                ..State::default()
            }),
            work: Condvar::new(),
            timer: Condvar::new(),
            idle: Condvar::new(),
            started: Instant::now(),
            threads: Mutex::new(Vec::new()),
        });
        let mut threads = Vec::new();
        {
            let inner = Arc::clone(&inner);
            threads.push(
                std::thread::Builder::new()
                    .name("engine".into())
                    .spawn(move || inner.engine(slots))?,
            );
        }
        {
            let inner = Arc::clone(&inner);
            threads.push(
                std::thread::Builder::new()
                    .name("deadlines".into())
                    .spawn(move || inner.timer())?,
            );
        }
        *lock(&inner.threads) = threads;
        Ok(Self { inner })
    }

    /// Accepts a request into the queue, or refuses it at once (`busy`) when the service is
    /// full or stopping. After `Ok`, exactly one terminal event will reach `sink`.
    pub fn submit(
        &self,
        request: GenerateRequest,
        transport: Transport,
        sink: Arc<dyn EventSink>,
    ) -> Result<Ticket, Event> {
        let inner = &self.inner;
        let (prompt, options, guide) = match inner.prepare(&request) {
            Ok(p) => p,
            Err(event) => {
                self.record_rejected(transport);
                return Err(event);
            }
        };
        let mut state = lock(&inner.state);
        let id = request.id.as_str();
        if !state.accepting {
            state.metrics.tally(transport, Tally::Rejected);
            return Err(Event::error(
                Some(id),
                ErrorCode::Busy,
                "the service is shutting down; retry later",
            ));
        }
        let c = &inner.config;
        if state.queue.len() + state.running.len() >= c.max_concurrent + c.max_queue {
            state.metrics.tally(transport, Tally::Rejected);
            return Err(Event::error(
                Some(id),
                ErrorCode::Busy,
                format!(
                    "busy: {} requests running and {} queued (the most this service holds); retry later",
                    state.running.len(),
                    state.queue.len()
                ),
            ));
        }
        let now = Instant::now();
        let timeout = request.timeout.unwrap_or(c.request_timeout);
        let ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
        state.metrics.tally(transport, Tally::Accepted);
        state.queue.push_back(Queued {
            ticket,
            request,
            transport,
            prompt,
            options,
            guide,
            sink,
            accepted_at: now,
            deadline: now + timeout,
            control: Arc::new(Control::default()),
        });
        drop(state);
        inner.work.notify_one();
        inner.timer.notify_one();
        Ok(Ticket(ticket))
    }

    /// Cancels an accepted request: a queued one ends at once, a running one before its next
    /// token. Returns false when the request has already ended.
    pub fn cancel(&self, ticket: Ticket, reason: CancelReason) -> bool {
        let inner = &self.inner;
        let mut state = lock(&inner.state);
        if let Some(pos) = state.queue.iter().position(|q| q.ticket == ticket.0) {
            let Some(q) = state.queue.remove(pos) else {
                return false;
            };
            let (event, sink) = inner.end_queued(&mut state, q, reason);
            drop(state);
            inner.idle.notify_all();
            sink.send(event);
            return true;
        }
        match state.running.get(&ticket.0) {
            Some(r) => {
                r.control.cancel(reason);
                true
            }
            None => false,
        }
    }

    /// Counts a request a front end refused before it got here (malformed, over a limit).
    pub fn record_rejected(&self, transport: Transport) {
        lock(&self.inner.state)
            .metrics
            .tally(transport, Tally::Rejected);
    }

    /// False once shutdown has begun (new requests are refused).
    pub fn is_accepting(&self) -> bool {
        lock(&self.inner.state).accepting
    }

    /// What is loaded, for `/v1/models` and the metrics' labels.
    pub fn model_info(&self) -> ModelInfo {
        let inner = &self.inner;
        let backend = &inner.engine.backend;
        ModelInfo {
            name: inner.config.name.clone(),
            source: inner.model_name(),
            backend: backend.name().to_string(),
            variant: inner.engine.variant.clone(),
            kernels: backend.kernels(),
        }
    }

    /// The prompt limit in tokens, after the model's context.
    pub fn prompt_limit(&self) -> usize {
        self.inner.prompt_limit
    }

    /// The bundle directory the model was loaded from (links resolved).
    pub fn bundle_dir(&self) -> &std::path::Path {
        &self.inner.engine.bundle.dir
    }

    /// This model's part of `health` (its reload status is known to `Serving`).
    pub fn health(&self) -> ModelHealth {
        let inner = &self.inner;
        let state = lock(&inner.state);
        let status = if !state.accepting {
            ModelStatus::Stopping
        } else if state.engine_alive {
            ModelStatus::Ok
        } else {
            ModelStatus::Degraded
        };
        ModelHealth {
            name: inner.config.name.clone(),
            status,
            model: inner.model_name(),
            backend: inner.engine.backend.name().to_string(),
            bundle: inner.engine.bundle.dir.display().to_string(),
            version: inner
                .engine
                .bundle
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            variant: inner.engine.variant.clone(),
            signature: inner.engine.bundle.signature.clone(),
            // Known to `Serving`, which fills it in (`ModelServing::health`).
            reload: ReloadStatus::None,
            active: state.running.len(),
            queue_depth: state.queue.len(),
            uptime_s: inner.started.elapsed().as_secs(),
        }
    }

    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let state = lock(&inner.state);
        let m = &state.metrics;
        Stats {
            queue_depth: state.queue.len(),
            active: state.running.len(),
            max_concurrent: inner.config.max_concurrent,
            max_queue: inner.config.max_queue,
            uptime_s: inner.started.elapsed().as_secs(),
            counts: m.counts,
            requests: m.requests,
            ttft_ms: m.ttft_ms.summary(),
            decode_tokens_per_s: m.decode_tokens_per_s.summary(),
            ttft_seconds: m.ttft_seconds.snapshot(),
            inter_token_seconds: m.inter_token_seconds.snapshot(),
            decode_steps: m.decode_steps,
            decode_step_tokens: m.decode_step_tokens,
            max_batch: m.max_batch,
            prefix_cache: inner.engine.backend.prefix_cache(),
            models: Vec::new(),
        }
    }

    /// For the systemd watchdog: true while the engine thread is alive and the state lock
    /// can be taken (a wedged scheduler stops the pings and systemd restarts the service).
    pub fn is_alive(&self) -> bool {
        let inner = &self.inner;
        match inner.state.try_lock() {
            Ok(state) => state.engine_alive || state.stopping,
            // Held right now by someone making progress; poisoned locks are recovered.
            Err(std::sync::TryLockError::WouldBlock) => true,
            Err(std::sync::TryLockError::Poisoned(_)) => false,
        }
    }

    /// How many handles on this scheduler exist (the last one dropped frees the model).
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// Whether `other` drives the same workers.
    pub fn same_as(&self, other: &Scheduler) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Refuses new requests from now on (`busy`); what was accepted keeps running.
    pub fn stop_intake(&self) {
        lock(&self.inner.state).accepting = false;
    }

    /// Stops intake, lets accepted requests finish for up to `grace`, then ends the rest
    /// (running: `done` with finish_reason cancelled; queued: `busy` error) and joins the
    /// threads. Blocks: call it off the async runtime.
    /// The model this scheduler runs (a draft model for another's).
    pub fn engine(&self) -> Arc<Engine> {
        Arc::clone(&self.inner.engine)
    }

    pub fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        let until = Instant::now() + grace;
        let mut state = lock(&inner.state);
        state.accepting = false;
        while !(state.queue.is_empty() && state.running.is_empty()) {
            let now = Instant::now();
            if now >= until {
                break;
            }
            state = wait_timeout(&inner.idle, state, until - now);
        }
        let left = state.queue.len() + state.running.len();
        if left > 0 {
            tracing::warn!(
                "shutdown grace period over: cancelling {} running and {} queued requests",
                state.running.len(),
                state.queue.len()
            );
        }
        let mut ended = Vec::new();
        while let Some(q) = state.queue.pop_front() {
            state.metrics.tally(q.transport, Tally::Rejected);
            let event = Event::error(
                Some(&q.request.id),
                ErrorCode::Busy,
                "the service is shutting down before this request started; retry later",
            );
            ended.push((event, q.sink));
        }
        for r in state.running.values() {
            r.control.cancel(CancelReason::Shutdown);
        }
        state.stopping = true;
        drop(state);
        for (event, sink) in ended {
            sink.send(event);
        }
        inner.work.notify_all();
        inner.timer.notify_all();
        let threads = std::mem::take(&mut *lock(&inner.threads));
        for t in threads {
            let _ = t.join();
        }
        // The engine is idle now: keep its prefix cache for the next start (`[cache] dir`).
        let started = Instant::now();
        match inner.engine.backend.save_prefix_cache() {
            Ok(Some(blocks)) => tracing::info!(
                model = %inner.config.name,
                blocks,
                "prefix cache saved in {:.2} s",
                started.elapsed().as_secs_f64()
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!(model = %inner.config.name, "prefix cache not saved: {e:#}"),
        }
    }
}

impl Inner {
    /// The prompt's tokens and the request's options, or the error that refuses it: a
    /// template failure, no tokens, over the prompt limit, or a prompt and `max_tokens` that
    /// do not fit in the context together (never truncated; without `max_tokens` the reply
    /// may use what the context has left, up to the configured default).
    fn prepare(&self, r: &GenerateRequest) -> Result<Prepared, Event> {
        let id = Some(r.id.as_str());
        let tools = r.tools.as_ref();
        let prompt = match &r.input {
            PromptInput::Messages(m) => self
                .engine
                .chat_prompt_with_tools(m, tools.and_then(Tools::for_template).as_ref())
                .map_err(|e| Event::error(id, ErrorCode::BadRequest, format!("{e:#}")))?,
            PromptInput::Raw(text) => self
                .engine
                .raw_prompt(text)
                .map_err(|e| Event::error(id, ErrorCode::Internal, format!("{e:#}")))?,
        };
        if prompt.is_empty() {
            return Err(Event::error(
                id,
                ErrorCode::BadRequest,
                "the prompt has no tokens",
            ));
        }
        if prompt.len() > self.prompt_limit {
            return Err(Event::error(
                id,
                ErrorCode::TooLong,
                format!(
                    "the prompt is {} tokens; this service takes at most {}",
                    prompt.len(),
                    self.prompt_limit
                ),
            ));
        }
        let mut options = self.defaults.clone();
        r.sampling.apply(&mut options.sampling);
        options.stop = r.stop.clone();
        let room = self.capacity - prompt.len();
        options.max_new_tokens = match r.max_tokens {
            Some(n) if n > room => {
                return Err(Event::error(
                    id,
                    ErrorCode::TooLong,
                    format!(
                        "the prompt is {} tokens and max_tokens is {n}: {} positions, but the context holds {} (at most {room} new tokens after this prompt)",
                        prompt.len(),
                        prompt.len() + n,
                        self.capacity
                    ),
                ));
            }
            Some(n) => n,
            None => options
                .max_new_tokens
                .min(self.config.max_new_tokens)
                .min(room),
        };
        let constraint = r
            .constraint
            .clone()
            .or_else(|| tools.and_then(Tools::constraint));
        let guide = constraint
            .map(|c| self.engine.guides()?.compile(&c))
            .transpose()
            .map_err(|e| Event::error(id, ErrorCode::BadRequest, format!("{e:#}")))?;
        Ok((prompt, options, guide))
    }

    fn model_name(&self) -> String {
        self.engine
            .bundle
            .manifest
            .source
            .as_ref()
            .and_then(|s| s.name.clone())
            .unwrap_or_else(|| self.engine.bundle.dir.display().to_string())
    }
}

/// What is loaded.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The config's name for it.
    pub name: String,
    /// The bundle's source name, else its path.
    pub source: String,
    pub backend: String,
    pub variant: String,
    /// The native backend's kernel tier.
    pub kernels: Option<String>,
}

/// A request made ready to queue: its prompt's tokens, its options, its compiled constraint.
type Prepared = (Vec<u32>, GenerateOptions, Option<Guide>);

fn wait_timeout<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>, d: Duration) -> MutexGuard<'a, T> {
    match cv.wait_timeout(guard, d) {
        Ok((g, _)) => g,
        Err(e) => e.into_inner().0,
    }
}
