//! The waiting side of the scheduler: what a queued and a running request carry, how a request
//! leaves the queue without running (cancelled, or its deadline passed), and the timer thread
//! that enforces deadlines for queued and running requests alike.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::generate::{CancelHandle, GenerateOptions};
use crate::guide::Guide;

use super::batcher::ms;
use super::{lock, wait_timeout, CancelReason, EventSink, Inner, State};
use crate::service::metrics::{Tally, Transport};
use crate::service::protocol::{ErrorCode, Event, Finish, GenerateRequest, Timings, Usage};

/// Cancellation state shared by the scheduler and the engine running the request.
#[derive(Debug, Default)]
pub(super) struct Control {
    pub cancel: CancelHandle,
    reason: AtomicU8,
}

impl Control {
    /// Cancels the request; the first reason set wins.
    pub fn cancel(&self, reason: CancelReason) {
        let _ = self
            .reason
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire);
        self.cancel.cancel();
    }

    pub fn reason(&self) -> Option<CancelReason> {
        CancelReason::from_u8(self.reason.load(Ordering::Acquire))
    }
}

/// An accepted request waiting for a slot.
pub(super) struct Queued {
    pub ticket: u64,
    pub request: GenerateRequest,
    pub transport: Transport,
    /// The prompt's tokens and the options to generate with, from `Inner::prepare`.
    pub prompt: Vec<u32>,
    pub options: GenerateOptions,
    /// The compiled constraint on the output, if the request has one.
    pub guide: Option<Guide>,
    pub sink: Arc<dyn EventSink>,
    pub accepted_at: Instant,
    pub deadline: Instant,
    pub control: Arc<Control>,
}

/// What the scheduler keeps of a request the engine runs: enough to cancel it.
pub(super) struct Running {
    pub control: Arc<Control>,
    pub deadline: Instant,
}

impl Inner {
    /// The terminal event of a request that leaves the queue without running.
    pub(super) fn end_queued(
        &self,
        state: &mut State,
        q: Queued,
        reason: CancelReason,
    ) -> (Event, Arc<dyn EventSink>) {
        let event = match reason {
            CancelReason::Deadline => {
                state.metrics.tally(q.transport, Tally::TimedOut);
                Event::error(
                    Some(&q.request.id),
                    ErrorCode::Timeout,
                    "the deadline passed while the request was queued",
                )
            }
            _ => {
                state.metrics.tally(q.transport, Tally::Cancelled);
                let queue_ms = ms(q.accepted_at.elapsed());
                Event::done(
                    &q.request.id,
                    String::new(),
                    Finish::Cancelled,
                    Usage::default(),
                    Timings {
                        queue_ms,
                        total_ms: queue_ms,
                        ..Timings::default()
                    },
                )
            }
        };
        (event, q.sink)
    }

    /// Ends queued requests whose deadline has passed and cancels running ones; sleeps until
    /// the next deadline or until the set of requests changes.
    pub(super) fn timer(self: Arc<Self>) {
        let mut state = lock(&self.state);
        loop {
            if state.stopping && !state.engine_alive {
                return;
            }
            let now = Instant::now();
            let expired = expire(&mut state, now);
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
            state = match next_deadline(&state, now) {
                // Running requests already cancelled keep their (past) deadline until the
                // worker removes them; the worker's notify wakes us then.
                Some(t) => wait_timeout(&self.timer, state, t.saturating_duration_since(now)),
                None => self.timer.wait(state).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

/// Takes the queued requests whose deadline has passed out of the queue and cancels the
/// running ones.
fn expire(state: &mut State, now: Instant) -> Vec<Queued> {
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
    for r in state.running.values() {
        if r.deadline <= now {
            r.control.cancel(CancelReason::Deadline);
        }
    }
    expired
}

/// The earliest deadline after `now` (running requests past theirs were just cancelled).
fn next_deadline(state: &State, now: Instant) -> Option<Instant> {
    let running = state.running.values().map(|r| r.deadline);
    let queued = state.queue.iter().map(|q| q.deadline);
    running.filter(|d| *d > now).chain(queued).min()
}
