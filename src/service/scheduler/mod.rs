//! The scheduler: one loaded model, `max_concurrent` session workers, a bounded FIFO queue,
//! deadlines, cancellation and the counters behind `stats`.
//!
//! Threads, no async: each worker owns one `Generator` (its own KV cache, allocated once at
//! start-up) and runs one request at a time through `Generator::generate`; the weights are
//! shared through the engine's backend. A timer thread enforces deadlines. Front ends talk to
//! it only through `submit` / `cancel` and get events back through their `EventSink`; they
//! never touch the engine.
//!
//! Invariant: every accepted request produces exactly one terminal event (`done` or `error`).
//! A request is owned by exactly one place at a time — the queue (the canceller or the timer
//! that removes it sends the terminal event) or a worker (which sends it when generation
//! returns) — and ownership only moves under the state lock.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use serde_json::{json, Map, Value as Json};

use crate::backend::{Logits, Session};
use crate::config::LimitsSection;
use crate::engine::Engine;
use crate::generate::{CancelHandle, FinishReason, GenerateOptions, Generator};

use super::metrics::Metrics;
use super::protocol::{DoneStats, ErrorCode, Event, Finish, GenerateRequest, PromptInput};

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

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_concurrent: usize,
    pub max_queue: usize,
    pub max_prompt_tokens: usize,
    pub max_new_tokens: usize,
    pub request_timeout: Duration,
    pub min_token_interval: Duration,
}

impl From<&LimitsSection> for SchedulerConfig {
    fn from(l: &LimitsSection) -> Self {
        Self {
            max_concurrent: l.max_concurrent,
            max_queue: l.max_queue,
            max_prompt_tokens: l.max_prompt_tokens,
            max_new_tokens: l.max_new_tokens,
            request_timeout: Duration::from_secs(l.request_timeout_s),
            min_token_interval: Duration::from_millis(l.min_token_interval_ms),
        }
    }
}

/// Cancellation state shared by the scheduler and the worker running the request.
#[derive(Debug, Default)]
struct Control {
    cancel: CancelHandle,
    reason: AtomicU8,
}

impl Control {
    fn cancel(&self, reason: CancelReason) {
        let _ = self
            .reason
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire);
        self.cancel.cancel();
    }

    fn reason(&self) -> Option<CancelReason> {
        CancelReason::from_u8(self.reason.load(Ordering::Acquire))
    }
}

struct Queued {
    ticket: u64,
    request: GenerateRequest,
    sink: Arc<dyn EventSink>,
    accepted_at: Instant,
    deadline: Instant,
    control: Arc<Control>,
}

struct Running {
    control: Arc<Control>,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    accepting: bool,
    /// Workers leave once the queue is empty; the timer leaves when all workers have.
    stopping: bool,
    next_ticket: u64,
    queue: VecDeque<Queued>,
    running: HashMap<u64, Running>,
    workers_alive: usize,
    metrics: Metrics,
}

struct Inner {
    engine: Arc<Engine>,
    config: SchedulerConfig,
    /// Prompt tokens a request may have: the config's limit, within the session's capacity.
    prompt_limit: usize,
    defaults: GenerateOptions,
    state: Mutex<State>,
    /// Workers wait here for work.
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
    /// Allocates every worker's session up front (a config that does not fit in memory fails
    /// here, at start-up) and starts the worker and timer threads.
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
        let mut generators = Vec::with_capacity(config.max_concurrent);
        for _ in 0..config.max_concurrent {
            let session = engine.backend.new_session(capacity)?;
            generators.push(Generator::new(Box::new(Paced::new(
                session,
                config.min_token_interval,
            ))));
        }
        let defaults = engine.default_options();
        let inner = Arc::new(Inner {
            engine,
            config,
            prompt_limit,
            defaults,
            state: Mutex::new(State {
                accepting: true,
                workers_alive: generators.len(),
                ..State::default()
            }),
            work: Condvar::new(),
            timer: Condvar::new(),
            idle: Condvar::new(),
            started: Instant::now(),
            threads: Mutex::new(Vec::new()),
        });
        let mut threads = Vec::new();
        for (n, generator) in generators.into_iter().enumerate() {
            let inner = Arc::clone(&inner);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("session-{n}"))
                    .spawn(move || inner.worker(generator))?,
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
        sink: Arc<dyn EventSink>,
    ) -> Result<Ticket, Event> {
        let inner = &self.inner;
        let mut state = lock(&inner.state);
        let id = request.id.as_str();
        if !state.accepting {
            state.metrics.rejected += 1;
            return Err(Event::error(
                Some(id),
                ErrorCode::Busy,
                "the service is shutting down; retry later",
            ));
        }
        let c = &inner.config;
        if state.queue.len() + state.running.len() >= c.max_concurrent + c.max_queue {
            state.metrics.rejected += 1;
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
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.metrics.accepted += 1;
        state.queue.push_back(Queued {
            ticket,
            request,
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
    pub fn record_rejected(&self) {
        lock(&self.inner.state).metrics.rejected += 1;
    }

    /// The prompt limit in tokens, after the model's context.
    pub fn prompt_limit(&self) -> usize {
        self.inner.prompt_limit
    }

    pub fn health(&self) -> Map<String, Json> {
        let inner = &self.inner;
        let state = lock(&inner.state);
        let mut m = Map::new();
        let ok = state.accepting && state.workers_alive == inner.config.max_concurrent;
        m.insert(
            "status".into(),
            json!(if ok {
                "ok"
            } else if state.accepting {
                "degraded"
            } else {
                "stopping"
            }),
        );
        m.insert("model".into(), json!(inner.model_name()));
        m.insert("backend".into(), json!(inner.engine.backend.name()));
        m.insert("active".into(), json!(state.running.len()));
        m.insert("queue_depth".into(), json!(state.queue.len()));
        m.insert("uptime_s".into(), json!(inner.started.elapsed().as_secs()));
        m
    }

    pub fn stats(&self) -> Map<String, Json> {
        let inner = &self.inner;
        let state = lock(&inner.state);
        let mut m = Map::new();
        m.insert("queue_depth".into(), json!(state.queue.len()));
        m.insert("active".into(), json!(state.running.len()));
        m.insert("max_concurrent".into(), json!(inner.config.max_concurrent));
        m.insert("max_queue".into(), json!(inner.config.max_queue));
        m.insert("uptime_s".into(), json!(inner.started.elapsed().as_secs()));
        m.extend(state.metrics.to_json());
        m
    }

    /// For the systemd watchdog: true while every worker thread is alive and the state lock
    /// can be taken (a wedged scheduler stops the pings and systemd restarts the service).
    pub fn is_alive(&self) -> bool {
        let inner = &self.inner;
        match inner.state.try_lock() {
            Ok(state) => state.workers_alive == inner.config.max_concurrent || state.stopping,
            // Held right now by someone making progress; poisoned locks are recovered.
            Err(std::sync::TryLockError::WouldBlock) => true,
            Err(std::sync::TryLockError::Poisoned(_)) => false,
        }
    }

    /// Refuses new requests from now on (`busy`); what was accepted keeps running.
    pub fn stop_intake(&self) {
        lock(&self.inner.state).accepting = false;
    }

    /// Stops intake, lets accepted requests finish for up to `grace`, then ends the rest
    /// (running: `done` with finish_reason cancelled; queued: `busy` error) and joins the
    /// threads. Blocks: call it off the async runtime.
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
            state.metrics.rejected += 1;
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
    }
}

impl Inner {
    fn model_name(&self) -> String {
        self.engine
            .bundle
            .manifest
            .source
            .as_ref()
            .and_then(|s| s.name.clone())
            .unwrap_or_else(|| self.engine.bundle.dir.display().to_string())
    }

    /// The terminal event of a request that leaves the queue without running.
    fn end_queued(
        &self,
        state: &mut State,
        q: Queued,
        reason: CancelReason,
    ) -> (Event, Arc<dyn EventSink>) {
        let event = match reason {
            CancelReason::Deadline => {
                state.metrics.timed_out += 1;
                Event::error(
                    Some(&q.request.id),
                    ErrorCode::Timeout,
                    "the deadline passed while the request was queued",
                )
            }
            _ => {
                state.metrics.cancelled += 1;
                let queue_ms = ms(q.accepted_at.elapsed());
                Event::Done {
                    id: q.request.id.clone(),
                    text: String::new(),
                    finish: Finish::Cancelled,
                    stats: DoneStats {
                        queue_ms,
                        total_ms: queue_ms,
                        ..DoneStats::default()
                    },
                }
            }
        };
        (event, q.sink)
    }

    fn worker(self: Arc<Self>, mut generator: Generator) {
        loop {
            let job = {
                let mut state = lock(&self.state);
                loop {
                    if let Some(q) = state.queue.pop_front() {
                        state.running.insert(
                            q.ticket,
                            Running {
                                control: Arc::clone(&q.control),
                                deadline: q.deadline,
                            },
                        );
                        break q;
                    }
                    if state.stopping {
                        state.workers_alive -= 1;
                        drop(state);
                        self.timer.notify_all();
                        return;
                    }
                    state = self.work.wait(state).unwrap_or_else(|e| e.into_inner());
                }
            };
            let ticket = job.ticket;
            let sink = Arc::clone(&job.sink);
            let id = job.request.id.clone();
            // A panic in the model or tokenizer must not take the service down nor leave the
            // request without its terminal event; the generator may be half-updated, so it is
            // replaced.
            let outcome = catch_unwind(AssertUnwindSafe(|| self.run(&mut generator, job)));
            let (event, outcome) = match outcome {
                Ok(r) => r,
                Err(_) => {
                    tracing::error!(id = %id, "request panicked; the session is reset");
                    (
                        Event::error(Some(&id), ErrorCode::Internal, "internal error"),
                        Outcome::Failed,
                    )
                }
            };
            if matches!(outcome, Outcome::Failed) {
                match self.fresh_generator(&generator) {
                    Ok(g) => generator = g,
                    Err(e) => tracing::error!("cannot reset a session: {e:#}"),
                }
            }
            {
                let mut state = lock(&self.state);
                state.running.remove(&ticket);
                let m = &mut state.metrics;
                match outcome {
                    Outcome::Done {
                        finish,
                        prompt_tokens,
                        completion_tokens,
                        ttft_ms,
                        decode_tokens_per_s,
                    } => {
                        m.prompt_tokens += prompt_tokens as u64;
                        m.tokens_generated += completion_tokens as u64;
                        if completion_tokens > 0 {
                            m.ttft_ms.push(ttft_ms);
                        }
                        if completion_tokens > 1 {
                            m.decode_tokens_per_s.push(decode_tokens_per_s);
                        }
                        match finish {
                            Finish::Stop | Finish::Length => m.served += 1,
                            Finish::Cancelled => m.cancelled += 1,
                            Finish::Timeout => m.timed_out += 1,
                        }
                    }
                    Outcome::Refused => m.rejected += 1,
                    Outcome::Failed => m.failed += 1,
                }
            }
            sink.send(event);
            self.idle.notify_all();
            self.timer.notify_one();
        }
    }

    fn fresh_generator(&self, old: &Generator) -> Result<Generator> {
        let session = self.engine.backend.new_session(old.context_len())?;
        Ok(Generator::new(Box::new(Paced::new(
            session,
            self.config.min_token_interval,
        ))))
    }

    /// Runs one request; returns its terminal event.
    fn run(&self, generator: &mut Generator, job: Queued) -> (Event, Outcome) {
        let started = Instant::now();
        let r = &job.request;
        let id = r.id.as_str();
        let engine = &self.engine;
        let prompt = match &r.input {
            PromptInput::Messages(m) => engine
                .chat_prompt(m)
                .map_err(|e| Event::error(Some(id), ErrorCode::BadRequest, format!("{e:#}"))),
            PromptInput::Raw(text) => engine
                .raw_prompt(text)
                .map_err(|e| Event::error(Some(id), ErrorCode::Internal, format!("{e:#}"))),
        };
        let prompt = match prompt {
            Ok(p) if p.is_empty() => {
                return (
                    Event::error(Some(id), ErrorCode::BadRequest, "the prompt has no tokens"),
                    Outcome::Refused,
                )
            }
            Ok(p) => p,
            Err(e) => return (e, Outcome::Refused),
        };
        if prompt.len() > self.prompt_limit {
            return (
                Event::error(
                    Some(id),
                    ErrorCode::TooLong,
                    format!(
                        "the prompt is {} tokens; this service takes at most {}",
                        prompt.len(),
                        self.prompt_limit
                    ),
                ),
                Outcome::Refused,
            );
        }
        let mut options = self.defaults.clone();
        r.sampling.apply(&mut options.sampling);
        options.max_new_tokens = r
            .max_tokens
            .unwrap_or_else(|| options.max_new_tokens.min(self.config.max_new_tokens));
        options.stop = r.stop.clone();

        let sink = &job.sink;
        let stream = r.stream;
        let mut on_text = |piece: &str| {
            if stream {
                sink.send(Event::Token {
                    id: id.to_string(),
                    text: piece.to_string(),
                });
            }
        };
        let generation_start = Instant::now();
        let result = generator.generate(
            &engine.tokenizer,
            &prompt,
            &options,
            &job.control.cancel,
            &mut on_text,
        );
        let g = match result {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(id, "generation failed: {e:#}");
                return (
                    Event::error(Some(id), ErrorCode::Internal, format!("{e:#}")),
                    Outcome::Failed,
                );
            }
        };
        let finish = match g.finish_reason {
            FinishReason::Stop => Finish::Stop,
            FinishReason::Length => Finish::Length,
            FinishReason::Cancelled => match job.control.reason() {
                Some(CancelReason::Deadline) => Finish::Timeout,
                _ => Finish::Cancelled,
            },
        };
        let queue_ms = ms(started - job.accepted_at);
        let stats = DoneStats {
            prompt_tokens: g.usage.prompt_tokens,
            completion_tokens: g.usage.completion_tokens,
            ttft_ms: ms(generation_start - job.accepted_at) + ms(g.timings.ttft),
            queue_ms,
            decode_tokens_per_s: g.timings.decode_tokens_per_s,
            total_ms: ms(job.accepted_at.elapsed()),
        };
        tracing::info!(
            id,
            finish = finish.as_str(),
            prompt_tokens = stats.prompt_tokens,
            completion_tokens = stats.completion_tokens,
            ttft_ms = stats.ttft_ms.round(),
            total_ms = stats.total_ms.round(),
            "request done"
        );
        let outcome = Outcome::Done {
            finish,
            prompt_tokens: stats.prompt_tokens,
            completion_tokens: stats.completion_tokens,
            ttft_ms: stats.ttft_ms,
            decode_tokens_per_s: stats.decode_tokens_per_s,
        };
        (
            Event::Done {
                id: id.to_string(),
                text: g.text,
                finish,
                stats,
            },
            outcome,
        )
    }

    /// Ends queued requests whose deadline has passed and cancels running ones; sleeps until
    /// the next deadline or until the set of requests changes.
    fn timer(self: Arc<Self>) {
        let mut state = lock(&self.state);
        loop {
            if state.stopping && state.workers_alive == 0 {
                return;
            }
            let now = Instant::now();
            let mut expired = Vec::new();
            let mut i = 0;
            while i < state.queue.len() {
                if state.queue[i].deadline <= now {
                    if let Some(q) = state.queue.remove(i) {
                        expired.push(q);
                    }
                } else {
                    i += 1;
                }
            }
            let mut next: Option<Instant> = None;
            for r in state.running.values() {
                if r.deadline <= now {
                    r.control.cancel(CancelReason::Deadline);
                } else {
                    next = Some(next.map_or(r.deadline, |n| n.min(r.deadline)));
                }
            }
            for q in &state.queue {
                next = Some(next.map_or(q.deadline, |n| n.min(q.deadline)));
            }
            if !expired.is_empty() {
                let events: Vec<_> = expired
                    .into_iter()
                    .map(|q| self.end_queued(&mut state, q, CancelReason::Deadline))
                    .collect();
                drop(state);
                self.idle.notify_all();
                for (event, sink) in events {
                    sink.send(event);
                }
                state = lock(&self.state);
                continue;
            }
            state = match next {
                // Running requests already cancelled keep their (past) deadline until the
                // worker removes them; the worker's notify wakes us then.
                Some(t) => wait_timeout(&self.timer, state, t.saturating_duration_since(now)),
                None => self.timer.wait(state).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

/// What a finished request adds to the metrics.
enum Outcome {
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
        ttft_ms: f64,
        decode_tokens_per_s: f64,
    },
    /// Refused after acceptance (prompt too long, template failure).
    Refused,
    Failed,
}

/// A session that keeps at least `interval` between two forward calls of one generation
/// (`limits.min_token_interval_ms`): a thermal brake for fanless boxes, and what lets tests
/// keep a request in flight on a tiny model. `truncate`, called at the start of every
/// generation, resets the clock so a prompt is never delayed.
struct Paced {
    inner: Box<dyn Session>,
    interval: Duration,
    last: Option<Instant>,
}

impl Paced {
    fn new(inner: Box<dyn Session>, interval: Duration) -> Self {
        Self {
            inner,
            interval,
            last: None,
        }
    }
}

impl Session for Paced {
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    fn len(&self) -> usize {
        self.inner.len()
    }

    fn truncate(&mut self, len: usize) {
        self.last = None;
        self.inner.truncate(len);
    }

    fn forward(&mut self, tokens: &[u32], which: Logits) -> Result<&[f32]> {
        if !self.interval.is_zero() {
            if let Some(last) = self.last {
                let due = last + self.interval;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            self.last = Some(Instant::now());
        }
        self.inner.forward(tokens, which)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The state lock; a panic elsewhere never makes the service unusable (the state stays
/// consistent: every update is a few field writes).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait_timeout<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>, d: Duration) -> MutexGuard<'a, T> {
    match cv.wait_timeout(guard, d) {
        Ok((g, _)) => g,
        Err(e) => e.into_inner().0,
    }
}
