//! The running side of the scheduler: a worker thread takes the oldest queued request, builds
//! its prompt and options, generates (streaming `token` events), sends the terminal event and
//! records the outcome. A panic in the model or tokenizer is caught here: the request still
//! gets its terminal event and the worker a fresh session.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::backend::{Logits, Session};
use crate::generate::{FinishReason, GenerateOptions, Generation, Generator};
use crate::service::metrics::Metrics;
use crate::service::protocol::{
    ErrorCode, Event, Finish, GenerateRequest, PromptInput, Timings, Usage,
};

use super::queue::{Queued, Running};
use super::{lock, CancelReason, Inner};

/// What a finished request adds to the metrics.
enum Outcome {
    Done {
        finish: Finish,
        usage: Usage,
        timings: Timings,
    },
    /// Refused after acceptance (prompt too long, template failure).
    Refused,
    Failed,
}

impl Outcome {
    fn record(&self, m: &mut Metrics) {
        let c = &mut m.counts;
        match self {
            Outcome::Done {
                finish,
                usage,
                timings,
            } => {
                c.prompt_tokens += usage.prompt_tokens as u64;
                c.tokens_generated += usage.completion_tokens as u64;
                if usage.completion_tokens > 0 {
                    m.ttft_ms.push(timings.ttft_ms);
                }
                if usage.completion_tokens > 1 {
                    m.decode_tokens_per_s.push(timings.decode_tokens_per_s);
                }
                match finish {
                    Finish::Stop | Finish::Length => c.served += 1,
                    Finish::Cancelled => c.cancelled += 1,
                    Finish::Timeout => c.timed_out += 1,
                }
            }
            Outcome::Refused => c.rejected += 1,
            Outcome::Failed => c.failed += 1,
        }
    }
}

impl Inner {
    /// A worker thread: runs requests until the scheduler stops and the queue is empty.
    pub(super) fn worker(self: Arc<Self>, mut generator: Generator) {
        while let Some(job) = self.next_job() {
            let ticket = job.ticket;
            let sink = Arc::clone(&job.sink);
            let id = job.request.id.clone();
            // A panic in the model or tokenizer must not take the service down nor leave the
            // request without its terminal event; the generator may be half-updated, so it is
            // replaced.
            let outcome = catch_unwind(AssertUnwindSafe(|| self.run(&mut generator, job)));
            let (event, outcome) = outcome.unwrap_or_else(|_| {
                tracing::error!(id = %id, "request panicked; the session is reset");
                (
                    Event::error(Some(&id), ErrorCode::Internal, "internal error"),
                    Outcome::Failed,
                )
            });
            if matches!(outcome, Outcome::Failed) {
                match self.fresh_generator(&generator) {
                    Ok(g) => generator = g,
                    Err(e) => tracing::error!("cannot reset a session: {e:#}"),
                }
            }
            {
                let mut state = lock(&self.state);
                state.running.remove(&ticket);
                outcome.record(&mut state.metrics);
            }
            sink.send(event);
            self.idle.notify_all();
            self.timer.notify_one();
        }
    }

    /// Waits for the oldest queued request and marks it running; None once the scheduler
    /// stops (this worker is then counted out).
    fn next_job(&self) -> Option<Queued> {
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
                return Some(q);
            }
            if state.stopping {
                state.workers_alive -= 1;
                drop(state);
                self.timer.notify_all();
                return None;
            }
            state = self.work.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn fresh_generator(&self, old: &Generator) -> Result<Generator> {
        let session = self.engine.backend.new_session(old.context_len())?;
        Ok(paced_generator(session, self.config.min_token_interval))
    }

    /// Runs one request; returns its terminal event.
    fn run(&self, generator: &mut Generator, job: Queued) -> (Event, Outcome) {
        let started = Instant::now();
        let r = &job.request;
        let id = r.id.as_str();
        let prompt = match self.prompt(r) {
            Ok(p) => p,
            Err(e) => return (e, Outcome::Refused),
        };
        let options = self.options(r);
        let sink = &job.sink;
        let stream = r.stream;
        let mut on_text = |piece: &str| {
            if stream {
                sink.send(Event::token(id, piece));
            }
        };
        let generation_start = Instant::now();
        let result = generator.generate(
            &self.engine.tokenizer,
            &prompt,
            &options,
            &job.control.cancel,
            &mut on_text,
        );
        match result {
            Ok(g) => finished(&job, g, started, generation_start),
            Err(e) => {
                tracing::error!(id, "generation failed: {e:#}");
                (
                    Event::error(Some(id), ErrorCode::Internal, format!("{e:#}")),
                    Outcome::Failed,
                )
            }
        }
    }

    /// The prompt's tokens, or the error that refuses the request (a template failure, no
    /// tokens, over the prompt limit).
    fn prompt(&self, r: &GenerateRequest) -> Result<Vec<u32>, Event> {
        let id = Some(r.id.as_str());
        let prompt = match &r.input {
            PromptInput::Messages(m) => self
                .engine
                .chat_prompt(m)
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
        Ok(prompt)
    }

    /// The bundle's defaults with the request's settings over them.
    fn options(&self, r: &GenerateRequest) -> GenerateOptions {
        let mut options = self.defaults.clone();
        r.sampling.apply(&mut options.sampling);
        options.max_new_tokens = r
            .max_tokens
            .unwrap_or_else(|| options.max_new_tokens.min(self.config.max_new_tokens));
        options.stop = r.stop.clone();
        options
    }
}

/// The `done` event of a generation that returned (a deadline cancel is a `timeout`).
fn finished(
    job: &Queued,
    g: Generation,
    started: Instant,
    generation_start: Instant,
) -> (Event, Outcome) {
    let id = job.request.id.as_str();
    let finish = match g.finish_reason {
        FinishReason::Stop => Finish::Stop,
        FinishReason::Length => Finish::Length,
        FinishReason::Cancelled => match job.control.reason() {
            Some(CancelReason::Deadline) => Finish::Timeout,
            _ => Finish::Cancelled,
        },
    };
    let usage = Usage {
        prompt_tokens: g.usage.prompt_tokens,
        completion_tokens: g.usage.completion_tokens,
    };
    let timings = Timings {
        ttft_ms: ms(generation_start - job.accepted_at) + ms(g.timings.ttft),
        queue_ms: ms(started - job.accepted_at),
        decode_tokens_per_s: g.timings.decode_tokens_per_s,
        total_ms: ms(job.accepted_at.elapsed()),
    };
    tracing::info!(
        id,
        finish = finish.as_str(),
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        ttft_ms = timings.ttft_ms.round(),
        total_ms = timings.total_ms.round(),
        "request done"
    );
    let outcome = Outcome::Done {
        finish,
        usage,
        timings,
    };
    (Event::done(id, g.text, finish, usage, timings), outcome)
}

/// A worker's generator: `session` behind the thermal brake.
pub(super) fn paced_generator(session: Box<dyn Session>, interval: Duration) -> Generator {
    Generator::new(Box::new(Paced::new(session, interval)))
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

    fn vocab(&self) -> usize {
        self.inner.vocab()
    }

    fn run(&mut self, tokens: &[u32], which: Logits) -> Result<&mut [f32]> {
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

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
