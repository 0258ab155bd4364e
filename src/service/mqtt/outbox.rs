//! What the MQTT front end still has to send, in order: a pure queue (no MQTT types) so its
//! rules are unit-tested.
//!
//! - Token text for one request is collected and sent as one `token` event per flush
//!   (`mqtt.token_interval_ms`), so a slow link gets a few messages a second, not one per token.
//! - While the queue is long (the broker is away or slow), token text keeps collecting
//!   instead of queueing more messages: memory stays bounded by the requests in flight and
//!   their text, and nothing is dropped.
//! - A request's collected text always goes out before its `done` / `error`.

use std::collections::{HashMap, VecDeque};

use crate::service::protocol::{Event, EventBody};

/// Where a reply goes: the MQTT 5 response topic (with its correlation data) or a 3.1.1
/// client's `reply_to`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub topic: String,
    pub correlation: Option<Vec<u8>>,
}

/// One thing to hand to the MQTT client. `A` is the client's acknowledgement token.
#[derive(Debug, Clone, PartialEq)]
pub enum Out<A> {
    Publish {
        route: Route,
        payload: String,
    },
    Ack(A),
    /// Nothing to send: tells the front end that everything queued before it has been handed
    /// on (a journal entry to release once the broker acknowledges it).
    Mark(u64),
}

/// Token text waiting for the next flush.
#[derive(Debug)]
struct Pending {
    route: Route,
    id: String,
    text: String,
}

#[derive(Debug)]
pub struct Outbox<A> {
    queue: VecDeque<Out<A>>,
    /// (route, id) → index in `pending`.
    index: HashMap<(Route, String), usize>,
    pending: Vec<Pending>,
    /// Flushes stop adding token messages once the queue is this long.
    high_water: usize,
}

impl<A> Outbox<A> {
    pub fn new(high_water: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            index: HashMap::new(),
            pending: Vec::new(),
            high_water,
        }
    }

    /// Adds an event for `route`. With `batch` false, token text is queued at once.
    pub fn push_event(&mut self, route: Route, event: Event, batch: bool) {
        match event {
            Event {
                id: Some(id),
                body: EventBody::Token { text },
            } => {
                if !batch && self.queue.len() < self.high_water && !self.has_pending(&route, &id) {
                    let payload = Event::token(&id, text).to_line();
                    self.queue.push_back(Out::Publish { route, payload });
                    return;
                }
                let key = (route, id);
                match self.index.get(&key) {
                    Some(&i) => self.pending[i].text.push_str(&text),
                    None => {
                        self.index.insert(key.clone(), self.pending.len());
                        self.pending.push(Pending {
                            route: key.0,
                            id: key.1,
                            text,
                        });
                    }
                }
            }
            other => {
                if other.is_terminal() {
                    if let Some(id) = other.id() {
                        self.flush_one(&route, id);
                    }
                }
                let payload = other.to_line();
                self.queue.push_back(Out::Publish { route, payload });
            }
        }
    }

    fn has_pending(&self, route: &Route, id: &str) -> bool {
        self.index.contains_key(&(route.clone(), id.to_string()))
    }

    /// Queues one request's collected text (before its terminal event).
    fn flush_one(&mut self, route: &Route, id: &str) {
        if let Some(i) = self.index.remove(&(route.clone(), id.to_string())) {
            let p = self.pending.remove(i);
            for v in self.index.values_mut() {
                if *v > i {
                    *v -= 1;
                }
            }
            self.queue_token(p);
        }
    }

    fn queue_token(&mut self, p: Pending) {
        let payload = Event::token(&p.id, p.text).to_line();
        self.queue.push_back(Out::Publish {
            route: p.route,
            payload,
        });
    }

    /// Queues collected token text, oldest request first, while the queue is short.
    pub fn flush_tokens(&mut self) {
        if self.queue.len() >= self.high_water || self.pending.is_empty() {
            return;
        }
        let room = self.high_water - self.queue.len();
        let take = room.min(self.pending.len());
        let rest = self.pending.split_off(take);
        let flushed = std::mem::replace(&mut self.pending, rest);
        self.index.clear();
        for (i, p) in self.pending.iter().enumerate() {
            self.index.insert((p.route.clone(), p.id.clone()), i);
        }
        for p in flushed {
            self.queue_token(p);
        }
    }

    /// Marks the end of what is queued now (see `Out::Mark`).
    pub fn push_mark(&mut self, mark: u64) {
        self.queue.push_back(Out::Mark(mark));
    }

    pub fn push_ack(&mut self, ack: A) {
        self.queue.push_back(Out::Ack(ack));
    }

    /// Acks queued for a connection that is gone are meaningless: the broker redelivers
    /// those messages on the next connection.
    pub fn drop_acks(&mut self) {
        self.queue.retain(|o| !matches!(o, Out::Ack(_)));
    }

    pub fn front(&self) -> Option<&Out<A>> {
        self.queue.front()
    }

    pub fn pop_front(&mut self) -> Option<Out<A>> {
        self.queue.pop_front()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.pending.is_empty()
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::protocol::{Finish, Timings, Usage};

    fn route(t: &str) -> Route {
        Route {
            topic: t.into(),
            correlation: None,
        }
    }

    fn token(id: &str, text: &str) -> Event {
        Event::token(id, text)
    }

    fn done(id: &str) -> Event {
        Event::done(
            id,
            "all".into(),
            Finish::Stop,
            Usage::default(),
            Timings::default(),
        )
    }

    fn drain(o: &mut Outbox<u16>) -> Vec<String> {
        let mut v = Vec::new();
        while let Some(x) = o.pop_front() {
            match x {
                Out::Publish { route, payload } => v.push(format!("{} {payload}", route.topic)),
                Out::Ack(a) => v.push(format!("ack {a}")),
                Out::Mark(m) => v.push(format!("mark {m}")),
            }
        }
        v
    }

    #[test]
    fn tokens_batch_until_flush_and_precede_done() {
        let mut o = Outbox::<u16>::new(100);
        o.push_event(route("a"), token("1", "He"), true);
        o.push_event(route("b"), token("2", "x"), true);
        o.push_event(route("a"), token("1", "llo"), true);
        assert_eq!(o.queued(), 0);
        o.push_event(route("a"), done("1"), true);
        o.flush_tokens();
        let out = drain(&mut o);
        assert_eq!(out.len(), 3);
        assert!(out[0].starts_with("a ") && out[0].contains(r#""text":"Hello""#));
        assert!(out[1].contains(r#""event":"done""#));
        assert!(out[2].starts_with("b ") && out[2].contains(r#""text":"x""#));
        assert!(o.is_empty());
    }

    #[test]
    fn unbatched_tokens_go_straight_out() {
        let mut o = Outbox::<u16>::new(100);
        o.push_event(route("a"), token("1", "a"), false);
        o.push_event(route("a"), token("1", "b"), false);
        assert_eq!(o.queued(), 2);
    }

    #[test]
    fn a_long_queue_makes_tokens_coalesce() {
        let mut o = Outbox::<u16>::new(2);
        o.push_ack(1);
        o.push_ack(2);
        for piece in ["a", "b", "c"] {
            o.push_event(route("r"), token("1", piece), false);
        }
        o.flush_tokens();
        assert_eq!(o.queued(), 2);
        o.drop_acks();
        o.flush_tokens();
        let out = drain(&mut o);
        assert_eq!(out.len(), 1);
        assert!(out[0].contains(r#""text":"abc""#));
    }

    #[test]
    fn a_mark_follows_what_was_queued_before_it_and_outlives_a_lost_connection() {
        let mut o = Outbox::<u16>::new(100);
        o.push_event(route("a"), token("1", "x"), true);
        o.push_event(route("a"), done("1"), true);
        o.push_mark(7);
        o.push_ack(3);
        o.drop_acks();
        let out = drain(&mut o);
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(out[1].contains("done"));
        assert_eq!(out[2], "mark 7");
    }

    #[test]
    fn partial_flush_keeps_the_rest_indexed() {
        let mut o = Outbox::<u16>::new(1);
        o.push_event(route("a"), token("1", "x"), true);
        o.push_event(route("b"), token("2", "y"), true);
        o.flush_tokens();
        assert_eq!(o.queued(), 1);
        o.push_event(route("b"), token("2", "z"), true);
        o.push_event(route("b"), done("2"), true);
        let out = drain(&mut o);
        assert!(out[1].contains(r#""text":"yz""#), "{out:?}");
        assert!(out[2].contains("done"));
    }
}
