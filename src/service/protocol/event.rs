//! What the service sends: one [`Event`] per line (socket) or message (MQTT). The types here
//! are the wire format — serde writes them as they are declared, in field order
//! (`serde_json`'s `preserve_order`), so reading them is reading the protocol.
//!
//! Every event is `{"id": …, "event": "<kind>", <fields of the kind>}`. The tag comes second,
//! after the id, which is why `Event` is a struct with the id and a flattened tagged body
//! rather than a tagged enum (serde would write the tag first).

use serde::{Deserialize, Serialize, Serializer};

use crate::signature::SignatureStatus;

pub use crate::guide::tools::ToolCall;

/// Error codes of the wire protocol (`code` of an `error` event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Invalid JSON or field, unknown field or op, an id already in flight, chat template
    /// failure, no prompt tokens; MQTT: no reply topic, a generate on the cancel topic.
    BadRequest,
    /// Request over `limits.max_request_bytes`; prompt over the prompt limit.
    TooLong,
    /// The service is full (running + queued) or shutting down.
    Busy,
    /// The deadline passed while the request was still queued.
    Timeout,
    /// Generation failed or panicked.
    Internal,
    /// Not allowed: a `reload` over the socket while `unix_socket.allow_reload` is off or from
    /// a peer that is neither root nor the service's user, or over MQTT.
    Forbidden,
}

impl ErrorCode {
    /// The wire name (for messages).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::TooLong => "too_long",
            Self::Busy => "busy",
            Self::Timeout => "timeout",
            Self::Internal => "internal",
            Self::Forbidden => "forbidden",
        }
    }
}

/// Why a generation ended (`finish_reason` of a `done` event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// An eos id or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// `cancel`, client disconnect, or shutdown after the grace period.
    Cancelled,
    /// The deadline passed while generating.
    Timeout,
    /// The reply is one or more tool calls (`tool_calls` of the `done` event).
    ToolCalls,
}

impl Finish {
    /// The wire name (for logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
            Self::Timeout => "timeout",
            Self::ToolCalls => "tool_calls",
        }
    }
}

/// Token counts of a finished request (`usage` of a `done` event).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Sampled tokens, a final eos included.
    pub completion_tokens: usize,
}

/// Timings of a finished request (`timings` of a `done` event), rounded to 3 decimals on the
/// wire (a non-finite value is sent as 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// From acceptance to the first token (queueing included: what the client waited).
    #[serde(serialize_with = "round3")]
    pub ttft_ms: f64,
    /// From acceptance to the start of generation.
    #[serde(serialize_with = "round3")]
    pub queue_ms: f64,
    #[serde(serialize_with = "round3")]
    pub decode_tokens_per_s: f64,
    /// From acceptance to the `done` event.
    #[serde(serialize_with = "round3")]
    pub total_ms: f64,
}

/// The answer to `health`: the service's status, the default (first) model's fields as
/// before several models could be served, and every model in `models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: HealthStatus,
    /// The default model's source name (the bundle's, else its path).
    pub model: String,
    /// `native`, `ort` or `tract`.
    pub backend: String,
    /// The bundle directory loaded (links resolved), its name (in a model store: the version)
    /// and its variant.
    #[serde(default)]
    pub bundle: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub variant: String,
    /// Whether and by whom the bundle is signed.
    #[serde(default)]
    pub signature: SignatureStatus,
    /// How the last reload (SIGHUP, a reload request) went, over all models.
    #[serde(default)]
    pub reload: ReloadStatus,
    /// Requests being generated, all models.
    pub active: usize,
    /// Requests waiting for a slot, all models.
    pub queue_depth: usize,
    /// Since the default model was loaded.
    pub uptime_s: u64,
    /// Every model, in the config's order.
    #[serde(default)]
    pub models: Vec<ModelHealth>,
}

/// One model's part of `health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelHealth {
    /// What requests call it (`"model"`).
    pub name: String,
    pub status: ModelStatus,
    /// The bundle's source name, else its path.
    pub model: String,
    pub backend: String,
    /// The bundle directory loaded (links resolved), its name (in a model store: the version)
    /// and its variant.
    pub bundle: String,
    pub version: String,
    pub variant: String,
    pub signature: SignatureStatus,
    /// How this model's last reload went.
    pub reload: ReloadStatus,
    pub active: usize,
    pub queue_depth: usize,
    /// Since this model was loaded.
    pub uptime_s: u64,
}

/// A model's state (`models[].status` of `health`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelStatus {
    Ok,
    /// Its engine thread died.
    Degraded,
    /// Shutting down.
    Stopping,
    /// Unloaded by a `swap` reload until the new version has loaded: its requests get `busy`.
    /// The other fields describe the version that was unloaded.
    Unloaded,
}

/// How the last reload went (health's `reload`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ReloadStatus {
    /// No reload since start-up.
    #[default]
    None,
    InProgress,
    /// The model serving now was loaded by a reload (`at`: Unix seconds).
    Done {
        at: u64,
    },
    /// The last reload failed; the model before it keeps serving.
    Failed {
        at: u64,
        error: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Taking requests, every worker alive.
    Ok,
    /// Taking requests, but a worker thread died.
    Degraded,
    /// Shutting down: new requests are refused.
    Stopping,
}

/// The answer to `stats`: the scheduler's state, its counters, then latency percentiles over
/// the most recent requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub queue_depth: usize,
    pub active: usize,
    pub max_concurrent: usize,
    pub max_queue: usize,
    pub uptime_s: u64,
    #[serde(flatten)]
    pub counts: Counts,
    /// The same outcomes by the front end the requests came through.
    pub requests: ByTransport,
    /// Time to first token of requests that produced one.
    pub ttft_ms: Summary,
    /// Decode speed of requests that produced at least two tokens.
    pub decode_tokens_per_s: Summary,
    /// Since start, as histograms (the Prometheus metrics are these): time to first token,
    /// and the time between two tokens of one request.
    pub ttft_seconds: Histogram,
    pub inter_token_seconds: Histogram,
    /// Batched decoding: steps run, tokens they produced (tokens / steps = the mean batch)
    /// and the largest batch.
    pub decode_steps: u64,
    pub decode_step_tokens: u64,
    pub max_batch: usize,
    /// The prefix cache; absent when it is off or the backend has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_cache: Option<PrefixCacheStats>,
    /// The service's answer: every model's own stats (the fields above are the default
    /// model's). Empty inside each of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelStats>,
}

/// One model's `stats`, under its name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStats {
    pub name: String,
    #[serde(flatten)]
    pub stats: Stats,
}

/// The prefix cache's counters, since start (the native backend's own type).
pub use crate::backend::native::prefix::PrefixStats as PrefixCacheStats;

/// What the scheduler counts, since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    #[serde(flatten)]
    pub outcomes: Outcomes,
    pub prompt_tokens: u64,
    pub tokens_generated: u64,
    /// Prompt lookup (`[[model]] prompt_lookup`): tokens drafted, and of those accepted.
    #[serde(default)]
    pub draft_tokens: u64,
    #[serde(default)]
    pub accepted_draft_tokens: u64,
}

/// How requests ended, since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcomes {
    /// Taken into the queue.
    pub accepted: u64,
    /// Ended in `done` with finish_reason stop, length or tool_calls.
    pub served: u64,
    /// Refused: busy, malformed, over a limit.
    pub rejected: u64,
    pub cancelled: u64,
    pub timed_out: u64,
    /// Internal errors.
    pub failed: u64,
}

/// `Outcomes` per front end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByTransport {
    pub unix_socket: Outcomes,
    pub mqtt: Outcomes,
    pub http: Outcomes,
}

/// A cumulative histogram since start: `count` of the observations at most `le`, the last
/// bucket `le: null` (+Inf, every observation).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub buckets: Vec<Bucket>,
    pub sum: f64,
    pub count: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// None: +Inf.
    pub le: Option<f64>,
    pub count: u64,
}

/// Nearest-rank percentiles of one measurement: `{"samples": 0}` while there is none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub samples: usize,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub percentiles: Option<Percentiles>,
}

/// Rounded to 2 decimals on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    #[serde(serialize_with = "round2")]
    pub p50: f64,
    #[serde(serialize_with = "round2")]
    pub p90: f64,
    #[serde(serialize_with = "round2")]
    pub p99: f64,
}

/// One message from the service to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The request's id. Null in an `error` about a request whose id could not be read, and in
    /// a `health` / `stats` answer to a request that gave none; always set otherwise.
    pub id: Option<String>,
    #[serde(flatten)]
    pub body: EventBody,
}

/// The `event` tag and the fields that follow it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventBody {
    /// Text as it is generated (with `stream`): whole UTF-8, never part of a stop string.
    /// Over MQTT one event may carry several pieces.
    Token {
        text: String,
    },
    /// The end of a generation; `text` is always the whole answer (less its tool calls).
    Done {
        text: String,
        finish_reason: Finish,
        /// The calls the reply makes (requests with `tools`); absent when none.
        /// Boxed slice, not Vec: every event is moved around, and most have no calls.
        #[serde(default, skip_serializing_if = "<[_]>::is_empty")]
        tool_calls: Box<[ToolCall]>,
        /// Constrained requests only: whether `text` is a complete match of the schema or
        /// grammar (false when `max_tokens` cut it: the text is then not valid output).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grammar_complete: Option<bool>,
        usage: Usage,
        timings: Timings,
    },
    /// The end of a request that was refused or failed.
    Error {
        code: ErrorCode,
        message: String,
    },
    Health(Box<Health>),
    /// Boxed: the largest body by far, and the rarest.
    Stats(Box<Stats>),
}

impl Event {
    pub fn token(id: &str, text: impl Into<String>) -> Self {
        Self {
            id: Some(id.to_string()),
            body: EventBody::Token { text: text.into() },
        }
    }

    pub fn done(
        id: &str,
        text: String,
        finish_reason: Finish,
        usage: Usage,
        timings: Timings,
    ) -> Self {
        Self {
            id: Some(id.to_string()),
            body: EventBody::Done {
                text,
                finish_reason,
                tool_calls: Box::default(),
                grammar_complete: None,
                usage,
                timings,
            },
        }
    }

    /// A `done` event with the reply's tool calls and, for a constrained request, whether
    /// its text is a complete match (other events are returned as they are).
    pub fn with_structure(mut self, calls: Vec<ToolCall>, complete: Option<bool>) -> Self {
        if let EventBody::Done {
            tool_calls,
            grammar_complete,
            ..
        } = &mut self.body
        {
            *tool_calls = calls.into_boxed_slice();
            *grammar_complete = complete;
        }
        self
    }

    pub fn error(id: Option<&str>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            id: id.map(str::to_string),
            body: EventBody::Error {
                code,
                message: message.into(),
            },
        }
    }

    /// `done` or `error`: the last event of a request.
    pub fn is_terminal(&self) -> bool {
        matches!(self.body, EventBody::Done { .. } | EventBody::Error { .. })
    }

    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// One line of JSON (no newline inside: serde_json escapes control characters).
    pub fn to_line(&self) -> String {
        // Cannot fail: every map key is a string and every number is written (serde_json
        // writes a non-finite float as null).
        serde_json::to_string(self).unwrap_or_default()
    }
}

fn round3<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
    let rounded = if x.is_finite() {
        (x * 1000.0).round() / 1000.0
    } else {
        0.0
    };
    s.serialize_f64(rounded)
}

fn round2<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((x * 100.0).round() / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_and_error_lines() {
        let token = Event::token("r1", "Hel\nlo");
        assert_eq!(
            token.to_line(),
            r#"{"id":"r1","event":"token","text":"Hel\nlo"}"#
        );
        assert!(!token.is_terminal());
        let e = Event::error(None, ErrorCode::Busy, "queue full");
        assert_eq!(
            e.to_line(),
            r#"{"id":null,"event":"error","code":"busy","message":"queue full"}"#
        );
        assert!(e.is_terminal());
        let e = Event::error(Some("a"), ErrorCode::BadRequest, "x");
        assert_eq!(
            e.to_line(),
            r#"{"id":"a","event":"error","code":"bad_request","message":"x"}"#
        );
    }

    #[test]
    fn done_line_rounds_timings() {
        let done = Event::done(
            "r1",
            "Hello".into(),
            Finish::Length,
            Usage {
                prompt_tokens: 9,
                completion_tokens: 31,
            },
            Timings {
                ttft_ms: 171.08649,
                queue_ms: 0.0,
                decode_tokens_per_s: f64::NAN,
                total_ms: 364.5456,
            },
        );
        assert_eq!(
            done.to_line(),
            r#"{"id":"r1","event":"done","text":"Hello","finish_reason":"length","usage":{"prompt_tokens":9,"completion_tokens":31},"timings":{"ttft_ms":171.086,"queue_ms":0.0,"decode_tokens_per_s":0.0,"total_ms":364.546}}"#
        );
        assert!(done.is_terminal());
    }

    #[test]
    fn health_and_stats_lines() {
        let health = Event {
            id: None,
            body: EventBody::Health(Box::new(Health {
                status: HealthStatus::Ok,
                model: "m".into(),
                backend: "native".into(),
                bundle: "/s/m/v1".into(),
                version: "v1".into(),
                variant: "int8".into(),
                signature: SignatureStatus::Verified {
                    key_id: "0123456789abcdef".into(),
                    signer: "release".into(),
                },
                reload: ReloadStatus::None,
                active: 1,
                queue_depth: 2,
                uptime_s: 3,
                models: vec![ModelHealth {
                    name: "small".into(),
                    status: ModelStatus::Unloaded,
                    model: "m".into(),
                    backend: "native".into(),
                    bundle: "/s/m/v1".into(),
                    version: "v1".into(),
                    variant: "int8".into(),
                    signature: SignatureStatus::Unsigned,
                    reload: ReloadStatus::InProgress,
                    active: 0,
                    queue_depth: 0,
                    uptime_s: 0,
                }],
            })),
        };
        assert_eq!(
            health.to_line(),
            r#"{"id":null,"event":"health","status":"ok","model":"m","backend":"native","bundle":"/s/m/v1","version":"v1","variant":"int8","signature":{"state":"verified","key_id":"0123456789abcdef","signer":"release"},"reload":{"state":"none"},"active":1,"queue_depth":2,"uptime_s":3,"models":[{"name":"small","status":"unloaded","model":"m","backend":"native","bundle":"/s/m/v1","version":"v1","variant":"int8","signature":{"state":"unsigned"},"reload":{"state":"in_progress"},"active":0,"queue_depth":0,"uptime_s":0}]}"#
        );
        assert!(!health.is_terminal());
        let stats = Event {
            id: Some("s".into()),
            body: EventBody::Stats(Box::new(Stats {
                queue_depth: 0,
                active: 1,
                max_concurrent: 2,
                max_queue: 16,
                uptime_s: 5,
                counts: Counts {
                    outcomes: Outcomes {
                        accepted: 4,
                        served: 3,
                        rejected: 2,
                        cancelled: 1,
                        ..Outcomes::default()
                    },
                    tokens_generated: 40,
                    ..Counts::default()
                },
                requests: ByTransport::default(),
                ttft_ms: Summary {
                    samples: 3,
                    percentiles: Some(Percentiles {
                        p50: 12.346,
                        p90: 20.0,
                        p99: 20.001,
                    }),
                },
                decode_tokens_per_s: Summary::default(),
                ttft_seconds: Histogram {
                    buckets: vec![
                        Bucket {
                            le: Some(0.1),
                            count: 2,
                        },
                        Bucket { le: None, count: 3 },
                    ],
                    sum: 0.5,
                    count: 3,
                },
                inter_token_seconds: Histogram::default(),
                decode_steps: 10,
                decode_step_tokens: 25,
                max_batch: 4,
                prefix_cache: Some(PrefixCacheStats {
                    hits: 2,
                    tokens_saved: 768,
                    ..PrefixCacheStats::default()
                }),
                models: Vec::new(),
            })),
        };
        assert_eq!(
            stats.to_line(),
            concat!(
                r#"{"id":"s","event":"stats","queue_depth":0,"active":1,"max_concurrent":2,"#,
                r#""max_queue":16,"uptime_s":5,"accepted":4,"served":3,"rejected":2,"#,
                r#""cancelled":1,"timed_out":0,"failed":0,"prompt_tokens":0,"#,
                r#""tokens_generated":40,"draft_tokens":0,"accepted_draft_tokens":0,"#,
                r#""requests":{"unix_socket":{"accepted":0,"served":0,"#,
                r#""rejected":0,"cancelled":0,"timed_out":0,"failed":0},"mqtt":{"accepted":0,"#,
                r#""served":0,"rejected":0,"cancelled":0,"timed_out":0,"failed":0},"http":{"#,
                r#""accepted":0,"served":0,"rejected":0,"cancelled":0,"timed_out":0,"failed":0}},"#,
                r#""ttft_ms":{"samples":3,"p50":12.35,"p90":20.0,"#,
                r#""p99":20.0},"decode_tokens_per_s":{"samples":0},"ttft_seconds":{"buckets":"#,
                r#"[{"le":0.1,"count":2},{"le":null,"count":3}],"sum":0.5,"count":3},"#,
                r#""inter_token_seconds":{"buckets":[],"sum":0.0,"count":0},"decode_steps":10,"#,
                r#""decode_step_tokens":25,"max_batch":4,"prefix_cache":{"hits":2,"misses":0,"#,
                r#""tokens_saved":768,"blocks":0,"bytes":0,"budget_bytes":0}}"#
            )
        );
    }

    #[test]
    fn names_are_the_wire_names() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::TooLong,
            ErrorCode::Busy,
            ErrorCode::Timeout,
            ErrorCode::Internal,
        ] {
            assert_eq!(serde_json::to_value(code).ok(), Some(code.as_str().into()));
        }
        for finish in [
            Finish::Stop,
            Finish::Length,
            Finish::Cancelled,
            Finish::Timeout,
        ] {
            assert_eq!(
                serde_json::to_value(finish).ok(),
                Some(finish.as_str().into())
            );
        }
    }

    #[test]
    fn events_read_back() {
        for line in [
            r#"{"id":"r1","event":"token","text":"x"}"#,
            r#"{"id":null,"event":"error","code":"too_long","message":"m"}"#,
            r#"{"id":"r1","event":"done","text":"Hello","finish_reason":"stop","usage":{"prompt_tokens":9,"completion_tokens":31},"timings":{"ttft_ms":171.086,"queue_ms":0.054,"decode_tokens_per_s":36.184,"total_ms":364.546}}"#,
        ] {
            let event: Event = serde_json::from_str(line).expect(line);
            assert_eq!(event.to_line(), line);
        }
    }
}
