//! The MQTT front end (rumqttc, MQTT 5).
//!
//! Requests arrive on `<prefix>/request` (optionally as a shared subscription so several boxes
//! split the load) and cancels also on `<prefix>/cancel`, which is never shared so a cancel
//! reaches the box running the request. Replies go to the MQTT 5 response topic with the
//! request's correlation data, or to the request's `reply_to` (MQTT 3.1.1 clients). Requests
//! that name neither get their error on `<prefix>/error`.
//!
//! Nothing is lost across restarts: the session is persistent (clean_start = false with a
//! session expiry) and a request is acknowledged only after the scheduler has accepted or
//! answered it, so the broker redelivers anything not yet taken. With `journal_dir`, an
//! accepted request is also written to the journal before its acknowledgement and run again
//! at the next start if the daemon died before the broker acknowledged its terminal event
//! (journal.rs). During shutdown new requests are left unacknowledged for the next start.
//! Replies are queued in an `Outbox` while the broker is away and sent after reconnecting
//! (rumqttc resends what was in flight).
//!
//! One task owns the state; a second one polls rumqttc's event loop (reconnecting with
//! backoff) and forwards what happens. rumqttc types stay in this module.

pub mod client;
mod connect;
mod journal;
mod outbox;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event as MqttEvent, EventLoop, MqttOptions};
use rumqttc::Outgoing;
use tokio::sync::{mpsc, watch};

use crate::config::MqttSection;

use super::metrics::Transport;
use super::protocol::{parse_request, valid_reply_topic, ErrorCode, Event, GenerateRequest, Op};
use super::scheduler::{CancelReason, EventSink, Ticket};
use super::{Context, Phase};
use journal::{Entry, Journal};
use outbox::{Out, Outbox, Route};

/// Requests remembered after they were taken, to recognise the broker's redeliveries.
const RECENT: usize = 4096;
/// Messages queued for rumqttc before token text starts to coalesce instead.
const HIGH_WATER: usize = 256;
/// How long shutdown waits for the last replies to be acknowledged by the broker.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

pub use connect::base_options;

/// The MQTT front end, its connection options already checked (files read) at start-up.
pub struct Prepared {
    options: MqttOptions,
    section: MqttSection,
    /// The journal (`journal_dir`) and what the last run left in it.
    journal: Option<(Journal, Vec<(u64, Entry)>)>,
}

pub fn prepare(section: &MqttSection, max_request_bytes: usize) -> Result<Prepared> {
    let journal = if section.journal_dir.as_os_str().is_empty() {
        None
    } else {
        Some(Journal::open(&section.journal_dir)?)
    };
    Ok(Prepared {
        options: connect::service_options(section, max_request_bytes)?,
        section: section.clone(),
        journal,
    })
}

/// The topics requests come on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topic {
    Request,
    Cancel,
    Reload,
}

/// What the polling task reports.
enum Net {
    Connected { session_present: bool },
    Lost,
    Publish(Box<Publish>),
    PubAck,
}

struct Sink {
    route: Route,
    tx: mpsc::UnboundedSender<(Route, Event)>,
}

impl EventSink for Sink {
    fn send(&self, event: Event) {
        let _ = self.tx.send((self.route.clone(), event));
    }
}

struct Front {
    client: AsyncClient,
    ctx: Context,
    section: MqttSection,
    request_topic: String,
    cancel_topic: String,
    /// `<prefix>/reload`, subscribed only with `allow_reload`.
    reload_topic: String,
    error_topic: String,
    status_topic: String,
    stats_topic: String,
    health_topic: String,
    connected: bool,
    /// Stop taking requests (shutdown): they stay with the broker for the next start.
    draining: bool,
    outbox: Outbox<Publish>,
    /// (reply topic, id) → ticket.
    inflight: HashMap<(String, String), Ticket>,
    recent: VecDeque<(String, String)>,
    recent_set: HashSet<(String, String)>,
    events: mpsc::UnboundedSender<(Route, Event)>,
    /// QoS 1 publishes handed to rumqttc, and broker acknowledgements seen.
    handed: u64,
    acked: u64,
    journal: Option<Journal>,
    /// (reply topic, id) → journal entry, for requests taken and not yet ended.
    journaled: HashMap<(String, String), u64>,
    /// Journal entries whose terminal event went out as the `handed`-th publish: released
    /// once the broker has acknowledged that many (it acknowledges in order).
    releases: VecDeque<(u64, u64)>,
}

pub async fn run(prepared: Prepared, ctx: Context, mut phase: watch::Receiver<Phase>) {
    let Prepared {
        options,
        section,
        journal,
    } = prepared;
    let (client, eventloop) = AsyncClient::new(options, HIGH_WATER);
    let (net_tx, mut net_rx) = mpsc::unbounded_channel();
    let poller = tokio::spawn(poll(
        eventloop,
        net_tx,
        Duration::from_millis(section.reconnect_initial_ms),
        Duration::from_millis(section.reconnect_max_ms),
    ));
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let tick_every = Duration::from_millis(section.token_interval_ms.max(20));
    let mut f = Front::new(client, ctx, section, events_tx);
    if let Some((journal, left)) = journal {
        f.journal = Some(journal);
        f.run_again(left);
    }
    let mut reload = f.ctx.serving.watch_reload();
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stats_every = f.section.stats_interval_s;
    // Off (0): a period that never comes.
    let mut stats_tick = tokio::time::interval(Duration::from_secs(if stats_every == 0 {
        u32::MAX.into()
    } else {
        stats_every
    }));
    stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            Some(n) = net_rx.recv() => f.on_net(n),
            Some((route, event)) = events_rx.recv() => f.on_event(route, event),
            _ = tick.tick() => f.outbox.flush_tokens(),
            _ = stats_tick.tick(), if stats_every > 0 => f.publish_stats(),
            Ok(()) = reload.changed() => f.publish_health(),
            changed = phase.changed() => {
                let now = if changed.is_err() { Phase::Closed } else { *phase.borrow() };
                match now {
                    Phase::Running => {}
                    Phase::Draining => f.draining = true,
                    Phase::Closed => break,
                }
            }
        }
        f.pump();
    }
    // Every request has ended: send what is left, then say goodbye.
    f.flush(&mut events_rx, &mut net_rx).await;
    if f.connected {
        f.publish_health(); // status "stopping": the retained health does not claim "ok" after us
        let _ = f
            .client
            .try_publish(f.status_topic.clone(), QoS::AtLeastOnce, true, "offline");
        let _ = f.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), poller).await;
    } else {
        poller.abort();
    }
}

/// Drives rumqttc's event loop: reconnects with exponential backoff (and jitter, so a fleet
/// does not reconnect in lockstep after a broker restart).
async fn poll(
    mut eventloop: EventLoop,
    tx: mpsc::UnboundedSender<Net>,
    initial: Duration,
    max: Duration,
) {
    let mut backoff = initial;
    let mut failures = 0u32;
    loop {
        match eventloop.poll().await {
            Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                backoff = initial;
                failures = 0;
                let _ = tx.send(Net::Connected {
                    session_present: ack.session_present,
                });
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                let _ = tx.send(Net::Publish(Box::new(p)));
            }
            Ok(MqttEvent::Incoming(Packet::PubAck(_))) => {
                let _ = tx.send(Net::PubAck);
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(ack))) => {
                use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as R;
                for code in &ack.return_codes {
                    if !matches!(code, R::Success(_)) {
                        tracing::error!("mqtt: the broker refused a subscription: {code:?}");
                    }
                }
            }
            Ok(MqttEvent::Incoming(Packet::Disconnect(d))) => {
                tracing::warn!("mqtt: the broker disconnected us: {:?}", d.reason_code);
            }
            Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                failures += 1;
                // The first failure of an outage is worth a warning, the retries are not.
                if failures == 1 {
                    tracing::warn!("mqtt: connection lost or refused: {e}; reconnecting");
                } else {
                    tracing::debug!("mqtt: reconnect attempt {failures} failed: {e}");
                }
                let _ = tx.send(Net::Lost);
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(max);
            }
        }
    }
}

/// 75–100 % of `d`, from the clock's low bits (no need for a random number generator).
fn jitter(d: Duration) -> Duration {
    let nanos = super::client::clock_nanos() % 1000;
    d.mul_f64(0.75 + 0.25 * nanos as f64 / 1000.0)
}

impl Front {
    fn new(
        client: AsyncClient,
        ctx: Context,
        section: MqttSection,
        events: mpsc::UnboundedSender<(Route, Event)>,
    ) -> Self {
        Self {
            client,
            ctx,
            request_topic: section.request_topic(),
            cancel_topic: section.cancel_topic(),
            reload_topic: section.reload_topic(),
            error_topic: section.error_topic(),
            status_topic: section.status_topic(),
            stats_topic: section.stats_topic(),
            health_topic: section.health_topic(),
            section,
            connected: false,
            draining: false,
            outbox: Outbox::new(HIGH_WATER),
            inflight: HashMap::new(),
            recent: VecDeque::new(),
            recent_set: HashSet::new(),
            events,
            handed: 0,
            acked: 0,
            journal: None,
            journaled: HashMap::new(),
            releases: VecDeque::new(),
        }
    }

    /// Runs again the requests a previous run took but did not see to the end (journal).
    fn run_again(&mut self, left: Vec<(u64, Entry)>) {
        if left.is_empty() {
            return;
        }
        tracing::warn!(
            "mqtt journal: running again {} request(s) taken before the last stop",
            left.len()
        );
        for (seq, entry) in left {
            let route = Route {
                topic: entry.reply_topic,
                correlation: entry.correlation,
            };
            match parse_request(entry.request.as_bytes(), &self.ctx.limits) {
                Ok(request) => match request.op {
                    Op::Generate(g) => {
                        let key = (route.topic.clone(), g.id.clone());
                        if self.generate(*g, Some(route), false) {
                            self.journaled.insert(key, seq);
                            continue;
                        }
                    }
                    _ => tracing::warn!("mqtt journal: entry {seq} is not a generate request"),
                },
                // The limits may have changed since: the refusal is the terminal event.
                Err(rejection) => self.reply(Some(route), *rejection.event),
            }
            // Refused: its error is queued; the entry goes once that is delivered.
            self.outbox.push_mark(seq);
        }
    }

    /// Writes an accepted request to the journal (before its acknowledgement is queued).
    fn journal_accepted(&mut self, key: (String, String), route: &Route, payload: &[u8]) {
        let Some(journal) = self.journal.as_mut() else {
            return;
        };
        let entry = Entry {
            reply_topic: route.topic.clone(),
            correlation: route.correlation.clone(),
            request: String::from_utf8_lossy(payload).into_owned(),
        };
        match journal.record(&entry) {
            Ok(seq) => {
                self.journaled.insert(key, seq);
            }
            Err(e) => tracing::error!("{e:#}: request {} runs unjournaled", key.1),
        }
    }

    /// Forgets the journal entries whose terminal events the broker has acknowledged.
    fn release_acknowledged(&mut self) {
        while let Some(&(at, seq)) = self.releases.front() {
            if at > self.acked {
                break;
            }
            self.releases.pop_front();
            if let Some(j) = self.journal.as_mut() {
                j.release(seq);
            }
        }
    }

    /// The `stats` answer as retained JSON, for dashboards that only speak MQTT (QoS 0: the
    /// next period brings a fresh one anyway).
    fn publish_stats(&mut self) {
        if !self.connected {
            return;
        }
        let stats = self.ctx.serving.stats();
        let payload = serde_json::to_string(&stats).unwrap_or_default();
        if let Err(e) =
            self.client
                .try_publish(self.stats_topic.clone(), QoS::AtMostOnce, true, payload)
        {
            tracing::debug!("mqtt: cannot publish stats: {e}");
        }
    }

    /// The `health` answer as retained JSON (QoS 1): what is served, signed by whom, and how the
    /// last reload went, for a fleet dashboard that only speaks MQTT.
    fn publish_health(&mut self) {
        if !self.connected {
            return;
        }
        let payload = serde_json::to_string(&self.ctx.serving.health()).unwrap_or_default();
        match self
            .client
            .try_publish(self.health_topic.clone(), QoS::AtLeastOnce, true, payload)
        {
            Ok(()) => self.handed += 1,
            Err(e) => tracing::warn!("mqtt: cannot publish health: {e}"),
        }
    }

    fn on_net(&mut self, n: Net) {
        match n {
            Net::Connected { session_present } => {
                self.connected = true;
                tracing::info!(
                    "mqtt: connected to {} (session {})",
                    self.section.url,
                    if session_present { "resumed" } else { "new" }
                );
                // rumqttc does not restore subscriptions when the broker kept no session:
                // subscribe on every connection (harmless when it did keep one).
                let mut topics = vec![self.section.subscription(), self.cancel_topic.clone()];
                if self.section.allow_reload {
                    topics.push(self.reload_topic.clone());
                }
                for topic in topics {
                    if let Err(e) = self.client.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                        tracing::error!("mqtt: cannot subscribe to {topic}: {e}");
                    }
                }
                match self.client.try_publish(
                    self.status_topic.clone(),
                    QoS::AtLeastOnce,
                    true,
                    "online",
                ) {
                    Ok(()) => self.handed += 1,
                    Err(e) => tracing::warn!("mqtt: cannot publish status: {e}"),
                }
                self.publish_health();
                if self.section.stats_interval_s > 0 {
                    self.publish_stats();
                }
            }
            Net::Lost => {
                if self.connected {
                    self.connected = false;
                    self.outbox.drop_acks();
                }
            }
            Net::PubAck => {
                self.acked += 1;
                self.release_acknowledged();
            }
            Net::Publish(p) => self.on_publish(*p),
        }
    }

    /// At shutdown: sends the last events and waits (up to `FLUSH_TIMEOUT`) until the broker
    /// has acknowledged every reply.
    async fn flush(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<(Route, Event)>,
        net: &mut mpsc::UnboundedReceiver<Net>,
    ) {
        self.draining = true;
        let until = tokio::time::Instant::now() + FLUSH_TIMEOUT;
        loop {
            while let Ok((route, event)) = events.try_recv() {
                self.on_event(route, event);
            }
            self.outbox.flush_tokens();
            self.pump();
            if self.outbox.is_empty() && self.handed <= self.acked {
                return;
            }
            tokio::select! {
                Some(n) = net.recv() => self.on_net(n),
                _ = tokio::time::sleep_until(until) => {
                    tracing::warn!(
                        "mqtt: {} replies not confirmed by the broker at shutdown",
                        self.outbox.queued() as u64 + self.handed.saturating_sub(self.acked)
                    );
                    return;
                }
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    fn on_event(&mut self, route: Route, event: Event) {
        let mut journaled = None;
        if event.is_terminal() {
            if let Some(id) = event.id() {
                let key = (route.topic.clone(), id.to_string());
                self.inflight.remove(&key);
                journaled = self.journaled.remove(&key);
            }
        }
        self.outbox
            .push_event(route, event, self.section.token_interval_ms > 0);
        if let Some(seq) = journaled {
            self.outbox.push_mark(seq);
        }
    }

    /// Hands queued messages to rumqttc while it has room and the broker is there.
    fn pump(&mut self) {
        if !self.connected {
            return;
        }
        while let Some(front) = self.outbox.front() {
            let sent = match front {
                Out::Publish { route, payload } => {
                    let props = PublishProperties {
                        correlation_data: route.correlation.clone().map(Into::into),
                        content_type: Some("application/json".into()),
                        payload_format_indicator: Some(1),
                        ..PublishProperties::default()
                    };
                    let ok = self
                        .client
                        .try_publish_with_properties(
                            route.topic.clone(),
                            QoS::AtLeastOnce,
                            false,
                            payload.clone(),
                            props,
                        )
                        .is_ok();
                    if ok {
                        self.handed += 1;
                    }
                    ok
                }
                Out::Ack(p) => self.client.try_ack(p).is_ok(),
                Out::Mark(seq) => {
                    self.releases.push_back((self.handed, *seq));
                    true
                }
            };
            if !sent {
                break;
            }
            self.outbox.pop_front();
        }
        self.release_acknowledged();
    }

    fn reply(&mut self, route: Option<Route>, event: Event) {
        let route = route.unwrap_or_else(|| Route {
            topic: self.error_topic.clone(),
            correlation: None,
        });
        // Front-end replies bypass `on_event`: an error about a duplicate id must not end
        // the request that legitimately holds that id.
        self.outbox.push_event(route, event, false);
    }

    fn remember(&mut self, key: (String, String)) {
        if self.recent_set.insert(key.clone()) {
            self.recent.push_back(key);
            if self.recent.len() > RECENT {
                if let Some(old) = self.recent.pop_front() {
                    self.recent_set.remove(&old);
                }
            }
        }
    }

    fn on_publish(&mut self, p: Publish) {
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let on = if topic == self.request_topic {
            Topic::Request
        } else if topic == self.cancel_topic {
            Topic::Cancel
        } else if topic == self.reload_topic && self.section.allow_reload {
            Topic::Reload
        } else {
            tracing::debug!("mqtt: ignoring a message on {topic}");
            self.outbox.push_ack(p);
            return;
        };
        if self.draining && on == Topic::Request {
            // Left unacknowledged: the broker hands it to the next session.
            return;
        }
        self.take(&p, on);
        // Acknowledged only now that the scheduler has accepted or answered it.
        self.outbox.push_ack(p);
    }

    /// Reads a request and hands it on: every refusal is answered (on the response topic, else
    /// `reply_to`, else the error topic).
    fn take(&mut self, p: &Publish, on: Topic) {
        let props = p.properties.as_ref();
        let correlation = props
            .and_then(|x| x.correlation_data.as_ref())
            .map(|b| b.to_vec());
        let route_to = |topic: String| Route {
            topic,
            correlation: correlation.clone(),
        };
        let response_route = props
            .and_then(|x| x.response_topic.clone())
            .filter(|t| valid_reply_topic(t) && *t != self.request_topic)
            .map(route_to);
        let max = self.ctx.max_request_bytes;
        if p.payload.len() > max {
            self.ctx.serving.record_rejected(Transport::Mqtt);
            let e = Event::error(
                None,
                ErrorCode::TooLong,
                format!(
                    "request of {} bytes is over this service's limit of {max} (limits.max_request_bytes)",
                    p.payload.len()
                ),
            );
            self.reply(response_route, e);
            return;
        }
        let request = match parse_request(&p.payload, &self.ctx.limits) {
            Ok(r) => r,
            Err(rejection) => {
                self.ctx.serving.record_rejected(Transport::Mqtt);
                let route = response_route.or_else(|| rejection.reply_to.map(route_to));
                self.reply(route, *rejection.event);
                return;
            }
        };
        let route = response_route.or_else(|| {
            request
                .reply_to
                .filter(|t| *t != self.request_topic)
                .map(route_to)
        });
        match request.op {
            Op::Reload { id } if on == Topic::Reload => {
                let answer = self.ctx.serving.reload_request(id);
                tracing::info!("mqtt: reload requested on {}", self.reload_topic);
                // Without a reply topic the retained health tells how it went.
                if route.is_some() {
                    self.reply(route, answer);
                }
            }
            _ if on == Topic::Reload => {
                self.ctx.serving.record_rejected(Transport::Mqtt);
                let e = Event::error(
                    None,
                    ErrorCode::BadRequest,
                    format!("only reload requests go to {}", self.reload_topic),
                );
                self.reply(route, e);
            }
            Op::Generate(_) if on == Topic::Cancel => {
                self.ctx.serving.record_rejected(Transport::Mqtt);
                let e = Event::error(
                    None,
                    ErrorCode::BadRequest,
                    format!("only cancel requests go to {}", self.cancel_topic),
                );
                self.reply(route, e);
            }
            Op::Generate(g) => {
                let key = route.as_ref().map(|r| (r.topic.clone(), g.id.clone()));
                if self.generate(*g, route.clone(), p.dup) {
                    if let (Some(key), Some(route)) = (key, route) {
                        self.journal_accepted(key, &route, &p.payload);
                    }
                }
            }
            Op::Cancel { id } => self.cancel(&id, route.as_ref()),
            // Without a reply topic the answer would go to the error topic: not an error.
            Op::Query { query, id } => {
                if route.is_some() {
                    let answer = self.ctx.serving.query(query, id);
                    self.reply(route, answer);
                }
            }
            // Every device publishes on the request topic: reloads go to their own topic,
            // which the broker's ACL can keep to the operator.
            Op::Reload { id } => {
                self.ctx.serving.record_rejected(Transport::Mqtt);
                let e = Event::error(
                    id.as_deref(),
                    ErrorCode::Forbidden,
                    format!(
                        "reload is not taken on the request topic: publish it to {} (mqtt.allow_reload), or use SIGHUP",
                        self.reload_topic
                    ),
                );
                self.reply(route, e);
            }
        }
    }

    /// Cancels the request with this id and reply topic; without a reply topic, the only
    /// request in flight with this id.
    fn cancel(&mut self, id: &str, route: Option<&Route>) {
        let ticket = match route {
            Some(r) => self
                .inflight
                .get(&(r.topic.clone(), id.to_string()))
                .copied(),
            None => {
                let mut matching = self.inflight.iter().filter(|((_, i), _)| *i == id);
                match (matching.next(), matching.next()) {
                    (Some((_, t)), None) => Some(*t),
                    _ => None,
                }
            }
        };
        match ticket {
            Some(t) => {
                self.ctx.serving.cancel(t, CancelReason::Client);
            }
            None => tracing::debug!(id, "mqtt: cancel for a request not in flight here"),
        }
    }

    /// Hands a generate request to the scheduler; true when it was accepted (it now runs).
    fn generate(&mut self, g: GenerateRequest, route: Option<Route>, redelivered: bool) -> bool {
        let Some(route) = route else {
            self.ctx.serving.record_rejected(Transport::Mqtt);
            let e = Event::error(
                Some(&g.id),
                ErrorCode::BadRequest,
                "no reply topic: set the MQTT 5 response topic or the \"reply_to\" field",
            );
            self.reply(None, e);
            return false;
        };
        let key = (route.topic.clone(), g.id.clone());
        if redelivered && (self.inflight.contains_key(&key) || self.recent_set.contains(&key)) {
            // The broker resends a request whose acknowledgement it missed (a reconnect):
            // it was taken already.
            tracing::debug!(id = g.id, "mqtt: redelivered request ignored");
            return false;
        }
        if self.inflight.contains_key(&key) {
            self.ctx.serving.record_rejected(Transport::Mqtt);
            let e = Event::error(
                Some(&g.id),
                ErrorCode::BadRequest,
                "a request with this id and reply topic is already in flight",
            );
            self.reply(Some(route), e);
            return false;
        }
        let sink: Arc<dyn EventSink> = Arc::new(Sink {
            route: route.clone(),
            tx: self.events.clone(),
        });
        match self.ctx.serving.submit(g, Transport::Mqtt, sink) {
            Ok(ticket) => {
                self.inflight.insert(key.clone(), ticket);
                self.remember(key);
                true
            }
            Err(event) => {
                self.reply(Some(route), event);
                false
            }
        }
    }
}

/// The publish handling of a front end whose client never connects (its replies are dropped),
/// for the fuzz target `mqtt_publish`: topic, properties and payload as a broker would deliver
/// them, through the same code as a connected front end.
#[cfg(feature = "fuzzing")]
pub struct FuzzFront {
    front: Front,
    events: mpsc::UnboundedReceiver<(Route, Event)>,
    /// Kept so the client's requests channel stays open.
    _eventloop: EventLoop,
}

#[cfg(feature = "fuzzing")]
impl FuzzFront {
    pub fn new(ctx: Context, section: &MqttSection, max_request_bytes: usize) -> Result<Self> {
        let options = connect::service_options(section, max_request_bytes)?;
        let (client, eventloop) = AsyncClient::new(options, HIGH_WATER);
        let (tx, events) = mpsc::unbounded_channel();
        Ok(Self {
            front: Front::new(client, ctx, section.clone(), tx),
            events,
            _eventloop: eventloop,
        })
    }

    /// Handles one incoming publish, cancels what it started and forgets the replies (so that
    /// memory stays flat over millions of runs).
    pub fn publish(&mut self, publish: Publish) {
        let f = &mut self.front;
        f.on_publish(publish);
        for ticket in f.inflight.values() {
            f.ctx.serving.cancel(*ticket, CancelReason::Client);
        }
        while let Ok((route, event)) = self.events.try_recv() {
            f.on_event(route, event);
        }
        while f.outbox.pop_front().is_some() {}
    }
}
