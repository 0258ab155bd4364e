//! The running side of the scheduler: one engine thread advances every running request
//! together. Each step it admits queued requests into free slots (a slot is a session whose KV
//! cache was allocated at start-up), runs one forward through `Backend::step_batch` for a
//! prompt slice of the oldest request still prefilling and one decode token of each of the
//! others (on the native backend: one pass over the weights for the whole step), streams their
//! text, and retires the finished ones, which leave their slot to the next request. A panic in
//! the model or tokenizer is caught per step: the requests in flight get their terminal event
//! and their slots fresh sessions.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Logits, Session, StepInput};
use crate::draft::{DraftModel, Drafter};
use crate::generate::{
    common_prefix, reuse_prefix, Decoding, FinishReason, Generation, Speculation,
};
use crate::guide::tools::ToolChoice;
use crate::service::metrics::{Metrics, Tally, Transport};
use crate::service::protocol::{ErrorCode, Event, Finish, Timings, Usage};
use crate::tokenizer::Tokenizer;

use super::masks::LentGuides;
use super::queue::{Queued, Running};
use super::{lock, CancelReason, Inner};

/// Prompt tokens prefilled per step: a request joins without stalling the others' decoding for
/// longer than this many prompt tokens take (about 0.5 s for the 0.5B int8 model on two Zen 3
/// cores). The same slices alone or not, so a request's results do not depend on the others.
pub(super) const PREFILL_SLICE: usize = 64;

/// Rows a step verifies at most with a draft model's drafts among them: with its token, each
/// decoding request gets an equal share of the rows one pass over the weights takes (4, the
/// native decode-batch products' `BATCH_ROWS`), so with three or more decoding at once none
/// draft. A draft model runs its passes for each request in turn and every row past those
/// costs its share of arithmetic: on a 2-core Zen 2, four clients drafting with the 0.5B for
/// the 1.5B int8 decoded at 0.72x their plain rate (README). Prompt lookup's drafts that go
/// unchecked (`Drafter`) cost no draft pass and are not held to it, as lookup alone is not,
/// but a step that leaves the draft model no rows drafts nothing.
const DRAFT_MODEL_STEP_ROWS: usize = 4;

/// Drafts a draft model may propose for each of `decoding` requests this step.
fn draft_model_share(decoding: usize) -> usize {
    DRAFT_MODEL_STEP_ROWS.saturating_sub(decoding) / decoding.max(1)
}

/// A constrained request whose guide did not come back from the mask thread (it panicked)
/// ends rather than go on unconstrained.
const LOST_GUIDE: &str = "internal error: the output constraint was lost";

/// A session and the tokens its KV cache holds (kept between requests: a request that starts
/// like the slot's last one reuses that part).
pub(super) struct Slot {
    pub session: Box<dyn Session>,
    pub cached: Vec<u32>,
    /// The draft model's session for this slot (`[[model]] draft`), which proposes drafts (after
    /// prompt lookup's, where that is on too: `Drafter`).
    pub draft: Option<DraftModel>,
}

/// A request in the engine.
struct Active<'t> {
    job: Queued,
    slot: Slot,
    decoding: Decoding<'t>,
    /// Prompt positions in the cache (all of them once prefilled).
    prefilled: usize,
    /// Of those, how many were reused rather than computed.
    reused: usize,
    progress: Progress,
    started: Instant,
    /// When its last token was sampled (the inter-token latency histogram).
    last_token: Option<Instant>,
    /// Its drafts for the next decode step (none when drafting is off or it is constrained).
    drafter: Drafter,
}

/// Where a request stands after a step.
#[derive(Default)]
struct Progress {
    /// The token the next decode step runs; None before the prompt is done and once over.
    next: Option<u32>,
    over: bool,
    /// Why it failed, if it did (ends with an `internal` error).
    error: Option<String>,
}

impl Progress {
    /// Takes what sampling a step's logits gave: the next token, the end, or a failure.
    fn settle(&mut self, sampled: anyhow::Result<Option<u32>>) {
        match sampled {
            Ok(Some(t)) => self.next = Some(t),
            Ok(None) => self.end(),
            Err(e) => self.fail(format!("{e:#}")),
        }
    }

    fn end(&mut self) {
        self.next = None;
        self.over = true;
    }

    fn fail(&mut self, error: String) {
        self.error.get_or_insert(error);
        self.end();
    }
}

/// A request's part in a step's forward, for the logits callback.
struct Member<'a, 't> {
    k: usize,
    job: &'a Queued,
    decoding: &'a mut Decoding<'t>,
    progress: &'a mut Progress,
    cached: &'a mut Vec<u32>,
    last_token: &'a mut Option<Instant>,
    drafter: &'a mut Drafter,
    role: Role<'a>,
}

enum Role<'a> {
    /// One token, after which the session holds `filled` positions, and `drafts` drafted
    /// tokens after it to verify (their rows' logits come too).
    Decode { filled: usize, drafts: usize },
    /// A slice of the prompt, which starts at `prefilled` (advanced once it ran); the first
    /// token is sampled after the last slice.
    Prompt {
        prefilled: &'a mut usize,
        reused: usize,
    },
}

impl Active<'_> {
    fn is_prefilling(&self) -> bool {
        !self.progress.over && self.prefilled < self.job.prompt.len()
    }

    /// The next decode token followed by what prompt lookup or the draft model drafts after it
    /// (within the request's draft limits, its token limit and its cache, and `share` where the
    /// draft model runs); empty when nothing is drafted.
    fn with_drafts(&mut self, share: usize) -> Vec<u32> {
        let Some(token) = self.progress.next.filter(|_| self.drafter.drafts()) else {
            return Vec::new();
        };
        let session = &self.slot.session;
        let room = session.capacity().saturating_sub(session.len() + 1);
        let limit = room.min(self.decoding.remaining().saturating_sub(1));
        // The context is the cached tokens and this one: pushed for the lookup, then taken back
        // (the step's callback appends what actually ran).
        let cached = &mut self.slot.cached;
        cached.push(token);
        let drafts = match &mut self.slot.draft {
            // Far behind (a new request's prompt) and given rows this step: a slice of it, no
            // drafts yet.
            Some(model) if share > 0 && model.behind(cached) > PREFILL_SLICE => {
                model.catch_up(cached, PREFILL_SLICE).map(|()| Vec::new())
            }
            model => self.drafter.propose(cached, model.as_mut(), limit, share),
        }
        .unwrap_or_else(|e| {
            // The request goes on without drafts (its output is the same either way).
            tracing::warn!("the draft model failed: {e:#}");
            Vec::new()
        });
        let input = if drafts.is_empty() {
            Vec::new()
        } else {
            [&[token], &drafts[..]].concat()
        };
        cached.pop();
        input
    }

    /// A request prefilling its prompt: its draft model (if it drafts) reads this step's slice
    /// too, so the prompt is part of the prefill for both models (as in `generate`), not of
    /// the first decode steps.
    fn draft_model_reads_prompt_slice(&mut self) {
        let Some(model) = self.slot.draft.as_mut().filter(|_| self.drafter.drafts()) else {
            return;
        };
        let end = (self.prefilled + PREFILL_SLICE).min(self.job.prompt.len());
        if let Err(e) = model.catch_up(&self.job.prompt[..end], PREFILL_SLICE) {
            // Its next proposal tries again; the request's output is the same either way.
            tracing::warn!("the draft model failed: {e:#}");
        }
    }

    /// Streams a piece of text as a `token` event, where the client asked for them.
    fn on_text(job: &Queued) -> impl FnMut(&str) + '_ {
        move |piece: &str| {
            if job.request.stream {
                job.sink.send(Event::token(&job.request.id, piece));
            }
        }
    }
}

/// What a finished request adds to the metrics.
enum Outcome {
    Done {
        finish: Finish,
        usage: Usage,
        timings: Timings,
        speculation: Speculation,
    },
    /// Refused after acceptance (prompt too long, template failure).
    Refused,
    Failed,
}

impl Outcome {
    fn record(&self, m: &mut Metrics, transport: Transport) {
        let tally = match self {
            Outcome::Done {
                finish,
                usage,
                timings,
                speculation,
            } => {
                m.counts.prompt_tokens += usage.prompt_tokens as u64;
                m.counts.tokens_generated += usage.completion_tokens as u64;
                m.counts.draft_tokens += speculation.drafted as u64;
                m.counts.accepted_draft_tokens += speculation.accepted as u64;
                if usage.completion_tokens > 0 {
                    m.first_token(timings.ttft_ms);
                }
                if usage.completion_tokens > 1 {
                    m.decode_tokens_per_s.push(timings.decode_tokens_per_s);
                }
                match finish {
                    Finish::Stop | Finish::Length | Finish::ToolCalls => Tally::Served,
                    Finish::Cancelled => Tally::Cancelled,
                    Finish::Timeout => Tally::TimedOut,
                }
            }
            Outcome::Refused => Tally::Rejected,
            Outcome::Failed => Tally::Failed,
        };
        m.tally(transport, tally);
    }
}

impl Inner {
    /// The engine thread: runs until the scheduler stops and nothing is left.
    pub(super) fn engine(self: Arc<Self>, mut free: Vec<Slot>) {
        let _alive = EngineAlive(&self);
        let engine = Arc::clone(&self.engine);
        let tokenizer = &engine.tokenizer;
        let mut active: Vec<Active> = Vec::new();
        let mut last_decode: Option<Instant> = None;
        while self.admit(&mut free, &mut active, tokenizer) {
            let step = catch_unwind(AssertUnwindSafe(|| {
                self.step(&mut active, &mut last_decode)
            }));
            if step.is_err() {
                tracing::error!("a step panicked; its requests end and their sessions are reset");
                for a in active.iter_mut() {
                    a.progress.fail("internal error".into());
                    match self.engine.backend.new_session(a.slot.session.capacity()) {
                        Ok(s) => a.slot.session = s,
                        Err(e) => tracing::error!("cannot reset a session: {e:#}"),
                    }
                    a.slot.cached.clear();
                }
            }
            let mut i = 0;
            while i < active.len() {
                if active[i].progress.over {
                    let a = active.swap_remove(i);
                    free.push(self.retire(a));
                } else {
                    i += 1;
                }
            }
        }
    }

    /// Moves queued requests into free slots; waits while there is nothing to do. False once
    /// the scheduler stops and nothing is left.
    fn admit<'t>(
        &self,
        free: &mut Vec<Slot>,
        active: &mut Vec<Active<'t>>,
        tokenizer: &'t Tokenizer,
    ) -> bool {
        let mut jobs = Vec::new();
        {
            let mut state = lock(&self.state);
            loop {
                while jobs.len() < free.len() {
                    let Some(q) = state.queue.pop_front() else {
                        break;
                    };
                    state.running.insert(
                        q.ticket,
                        Running {
                            control: Arc::clone(&q.control),
                            deadline: q.deadline,
                        },
                    );
                    jobs.push(q);
                }
                if !jobs.is_empty() || !active.is_empty() {
                    break;
                }
                if state.stopping {
                    state.engine_alive = false;
                    drop(state);
                    self.timer.notify_all();
                    return false;
                }
                state = self.work.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        }
        for mut job in jobs {
            let mut slot = take_best_slot(free, &job.prompt);
            let started = Instant::now();
            let capacity = slot.session.capacity();
            match Decoding::new(tokenizer, &job.prompt, &job.options, capacity) {
                Ok(decoding) => {
                    // Masks are computed a token at a time: no drafts for a constrained request.
                    let drafter = match &self.config.draft {
                        _ if job.guide.is_some() => Drafter::new(0, 0),
                        Some(d) => Drafter::new(self.config.prompt_lookup, d.max_tokens),
                        None => Drafter::new(self.config.prompt_lookup, 0),
                    };
                    let mut decoding = decoding.with_guide(job.guide.take());
                    let reused = reuse_prefix(slot.session.as_mut(), &mut slot.cached, &job.prompt);
                    let mut progress = Progress::default();
                    if job.control.cancel.is_cancelled() {
                        decoding.cancel();
                        progress.end();
                    }
                    active.push(Active {
                        job,
                        slot,
                        decoding,
                        prefilled: reused,
                        reused,
                        progress,
                        started,
                        last_token: None,
                        drafter,
                    });
                }
                Err(e) => {
                    // The submission checks make this unlikely; it still ends the request.
                    free.push(slot);
                    let event = Event::error(
                        Some(&job.request.id),
                        ErrorCode::BadRequest,
                        format!("{e:#}"),
                    );
                    self.end(&job, event, Outcome::Refused);
                }
            }
        }
        true
    }

    /// One step: cancellations, one prefill slice, one decode step for the rest; the masks
    /// of constrained requests are computed meanwhile on a helper thread.
    fn step(&self, active: &mut [Active], last_decode: &mut Option<Instant>) {
        for a in active.iter_mut() {
            if !a.progress.over && a.job.control.cancel.is_cancelled() {
                a.decoding.cancel();
                a.progress.end();
            }
        }
        std::thread::scope(|scope| {
            let running = active
                .iter_mut()
                .enumerate()
                .filter(|(_, a)| !a.progress.over);
            let mut lent = LentGuides::lend(scope, running.map(|(k, a)| (k, &mut a.decoding)));
            self.run_step(active, last_decode, &mut lent);
            for k in lent.outstanding() {
                if !lent.give_back(k, &mut active[k].decoding) {
                    active[k].progress.fail(LOST_GUIDE.into());
                }
            }
        });
    }

    fn run_step(
        &self,
        active: &mut [Active],
        last_decode: &mut Option<Instant>,
        lent: &mut LentGuides,
    ) {
        let prefill = active.iter().position(|a| a.is_prefilling());
        let decoding = active.iter().any(|a| a.progress.next.is_some());
        if decoding {
            // The thermal brake (`min_token_interval_ms`): a pause between decode steps.
            let interval = self.config.min_token_interval;
            if let Some(last) = *last_decode {
                let due = last + interval;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            *last_decode = Some(Instant::now());
        } else if prefill.is_none() {
            return;
        }
        self.forward_step(active, prefill, lent);
    }

    /// One forward for the step through `Backend::step_batch`: the next slice of request
    /// `prefill`'s prompt, if any, and one token for every request that has one to run, with
    /// the tokens prompt lookup drafts after it where that is on (verified as
    /// `Generator::generate` does: each row sampled in order, drafts kept while they equal
    /// the sample, the cache cut after the first that does not).
    fn forward_step(&self, active: &mut [Active], prefill: Option<usize>, lent: &mut LentGuides) {
        let tokens: Vec<Option<u32>> = active.iter().map(|a| a.progress.next).collect();
        // Prompt lookup's drafts cost nothing to make: the share bounds the draft model's.
        let decoding = tokens.iter().filter(|t| t.is_some()).count();
        let share = draft_model_share(decoding);
        // The draft model reads a prompt only while it would get rows once that is done.
        if let Some(a) = prefill.and_then(|k| active.get_mut(k)) {
            if draft_model_share(decoding + 1) > 0 {
                a.draft_model_reads_prompt_slice();
            }
        }
        let drafted: Vec<Vec<u32>> = active.iter_mut().map(|a| a.with_drafts(share)).collect();
        let mut inputs: Vec<StepInput> = Vec::with_capacity(active.len());
        let mut sessions: Vec<&mut dyn Session> = Vec::with_capacity(active.len());
        let mut members = Vec::with_capacity(active.len());
        for (k, a) in active.iter_mut().enumerate() {
            let Active {
                job,
                slot: Slot {
                    session, cached, ..
                },
                decoding,
                prefilled,
                reused,
                progress,
                last_token,
                drafter,
                ..
            } = a;
            let job = &*job;
            let (input, role) = match (prefill == Some(k), &tokens[k]) {
                (true, _) => {
                    let start = *prefilled;
                    let end = (start + PREFILL_SLICE).min(job.prompt.len());
                    let role = Role::Prompt {
                        prefilled,
                        reused: *reused,
                    };
                    (StepInput::last(&job.prompt[start..end]), role)
                }
                (false, Some(token)) => {
                    let filled = session.len() + 1;
                    match drafted[k].len() {
                        0 => (
                            StepInput::last(std::slice::from_ref(token)),
                            Role::Decode { filled, drafts: 0 },
                        ),
                        n => (
                            StepInput {
                                tokens: &drafted[k],
                                logits: Logits::Each,
                            },
                            Role::Decode {
                                filled,
                                drafts: n - 1,
                            },
                        ),
                    }
                }
                (false, None) => continue,
            };
            // Checked here too, so that a request that cannot run ends alone (the batch
            // checks every input before it runs any).
            if let Err(e) = session.check(input.tokens) {
                progress.fail(format!("{e:#}"));
                continue;
            }
            inputs.push(input);
            sessions.push(session.as_mut());
            members.push(Member {
                k,
                job,
                decoding,
                progress,
                cached,
                last_token,
                drafter,
                role,
            });
        }
        let mut ran = vec![false; members.len()];
        let mut gaps = Vec::new();
        let mut prompt_done = None;
        // Sessions to cut back after the step: the drafts after the first one rejected.
        let mut cuts = Vec::new();
        let backend = &self.engine.backend;
        let result = backend.step_batch(&mut sessions, &inputs, &mut |i, logits| {
            ran[i] = true;
            let m = &mut members[i];
            m.cached.extend_from_slice(inputs[i].tokens);
            let filled = match &mut m.role {
                Role::Decode { filled, .. } => *filled,
                Role::Prompt { prefilled, reused } => {
                    **prefilled += inputs[i].tokens.len();
                    if **prefilled < m.job.prompt.len() {
                        return;
                    }
                    m.decoding.prefilled(*reused);
                    prompt_done = Some(m.k);
                    **prefilled
                }
            };
            if !lent.give_back(m.k, m.decoding) {
                return m.progress.fail(LOST_GUIDE.into());
            }
            let mut on_text = Active::on_text(m.job);
            match m.role {
                Role::Decode { drafts, .. } if drafts > 0 => {
                    let input = inputs[i].tokens;
                    let vocab = logits.len() / input.len();
                    // Input tokens whose keys and values stay cached.
                    let mut kept = input.len();
                    for (j, row) in logits.chunks_mut(vocab).enumerate() {
                        match m.decoding.next(row, filled + j, &mut on_text) {
                            Ok(Some(t)) if input.get(j + 1) == Some(&t) => {}
                            sampled => {
                                kept = j + 1;
                                m.progress.settle(sampled);
                                break;
                            }
                        }
                    }
                    let accepted = kept - 1;
                    let from_lookup = m.drafter.from_lookup();
                    let lookup_accepted = m.drafter.settle(accepted);
                    m.decoding.record_speculation(drafts, accepted);
                    m.decoding.record_lookup(from_lookup, lookup_accepted);
                    let held = filled - 1 + kept;
                    m.cached.truncate(held);
                    cuts.push((m.k, held));
                }
                Role::Decode { .. } => {
                    m.drafter.settle(0);
                    let sampled = m.decoding.next(logits, filled, &mut on_text);
                    m.progress.settle(sampled);
                }
                Role::Prompt { .. } => {
                    let sampled = m.decoding.next(logits, filled, &mut on_text);
                    m.progress.settle(sampled);
                }
            }
            let now = Instant::now();
            if let (Some(last), Role::Decode { .. }) = (m.last_token.replace(now), &m.role) {
                gaps.push((now - last).as_secs_f64());
            }
        });
        drop(sessions);
        let decoded: Vec<bool> = members
            .iter()
            .map(|m| matches!(m.role, Role::Decode { .. }))
            .collect();
        let members: Vec<usize> = members.iter().map(|m| m.k).collect();
        for (k, held) in cuts {
            active[k].slot.session.truncate(held);
        }
        if decoded.contains(&true) {
            let m = &mut lock(&self.state).metrics;
            for gap in gaps {
                m.inter_token_seconds.observe(gap);
            }
            m.decode_steps += 1;
            let tokens = decoded.iter().zip(&ran).filter(|(&d, &r)| d && r).count();
            m.decode_step_tokens += tokens as u64;
            m.max_batch = m.max_batch.max(decoded.iter().filter(|&&d| d).count());
        }
        if let Err(e) = result {
            // Nothing ran (the checks come first), or the batch stopped part way: the
            // requests whose input did not run end.
            let e = format!("{e:#}");
            for (i, &k) in members.iter().enumerate() {
                if !ran[i] {
                    active[k].progress.fail(e.clone());
                }
            }
        }
        if let Some(k) = prompt_done {
            // Shared at once: requests arriving meanwhile with the same system prompt reuse it.
            let Slot {
                session, cached, ..
            } = &mut active[k].slot;
            session.save_prefix(cached);
        }
    }

    /// A finished request: its terminal event, its metrics, and its slot back (its tokens
    /// offered to the prefix cache first, for the next turn of a conversation).
    fn retire(&self, a: Active) -> Slot {
        let Active {
            job,
            mut slot,
            decoding,
            progress,
            started,
            ..
        } = a;
        let id = job.request.id.as_str();
        // Caught here too: the request has left `active`, and must still get its event.
        let finish = || decoding.finish(&mut Active::on_text(&job));
        let result = match progress.error {
            Some(e) => Err(e),
            None => match catch_unwind(AssertUnwindSafe(finish)) {
                Ok(r) => r.map_err(|e| format!("{e:#}")),
                Err(_) => Err("internal error".into()),
            },
        };
        let (event, outcome) = match result {
            Ok(g) => finished(&job, g, started, started),
            Err(e) => {
                tracing::error!(id, "generation failed: {e}");
                (
                    Event::error(Some(id), ErrorCode::Internal, e),
                    Outcome::Failed,
                )
            }
        };
        if !matches!(outcome, Outcome::Failed) {
            let cached = std::mem::take(&mut slot.cached);
            slot.session.save_prefix(&cached);
            slot.cached = cached;
        }
        self.end(&job, event, outcome);
        slot
    }

    /// Sends a request's terminal event and counts it out.
    fn end(&self, job: &Queued, event: Event, outcome: Outcome) {
        {
            let mut state = lock(&self.state);
            state.running.remove(&job.ticket);
            outcome.record(&mut state.metrics, job.transport);
        }
        job.sink.send(event);
        self.idle.notify_all();
        self.timer.notify_one();
    }
}

/// Marks the engine dead if its thread unwinds (health `degraded`, the watchdog stops).
struct EngineAlive<'a>(&'a Inner);

impl Drop for EngineAlive<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            lock(&self.0.state).engine_alive = false;
            self.0.timer.notify_all();
            self.0.idle.notify_all();
        }
    }
}

/// The free slot whose cache holds the longest part of `prompt` (any when none does).
fn take_best_slot(free: &mut Vec<Slot>, prompt: &[u32]) -> Slot {
    let best = free
        .iter()
        .enumerate()
        .max_by_key(|(_, s)| common_prefix(&s.cached, prompt))
        .map_or(0, |(i, _)| i);
    free.swap_remove(best)
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
    // Tool calls come out of the text; a reply that made some ends with `tool_calls`.
    let mut text = g.text;
    let mut tool_calls = Vec::new();
    if let Some(tools) = job.request.tools.as_ref() {
        if tools.choice != ToolChoice::None {
            (text, tool_calls) = tools.calls_in(&text, id);
        }
    }
    let finish = match finish {
        Finish::Stop if !tool_calls.is_empty() => Finish::ToolCalls,
        other => other,
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
        speculation: g.speculation,
    };
    let event = Event::done(id, text, finish, usage, timings)
        .with_structure(tool_calls, g.constraint.map(|c| c.complete));
    (event, outcome)
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::draft_model_share;

    #[test]
    fn a_draft_model_drafts_only_into_a_steps_spare_rows() {
        // One request: three drafts and its token fill the four rows; two: one each.
        assert_eq!(draft_model_share(1), 3);
        assert_eq!(draft_model_share(2), 1);
        for busy in [3, 4, 16] {
            assert_eq!(draft_model_share(busy), 0, "{busy} decoding");
        }
    }
}
