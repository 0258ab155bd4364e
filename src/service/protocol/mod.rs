//! The JSON messages every front end speaks (docs/architecture.md, "Wire protocol"): requests
//! parsed and validated into plain types (`request`; the fields of `generate` in `generate`),
//! events written from serde types (`event`). This module knows nothing about sockets, MQTT or
//! the model.
//!
//! Everything a client sends is untrusted: parsing never panics, and every rejection is an
//! `error` event that carries the request's id whenever the id could be read.

mod event;
mod generate;
mod request;

pub use event::{
    Bucket, ByTransport, Counts, ErrorCode, Event, EventBody, Finish, Health, HealthStatus,
    Histogram, ModelHealth, ModelStats, ModelStatus, Outcomes, Percentiles, PrefixCacheStats,
    ReloadStatus, Stats, Summary, Timings, Usage,
};
pub use generate::parse_generate;
pub use request::{
    parse_request, valid_reply_topic, GenerateRequest, Op, PromptInput, Query, Rejection, Request,
    RequestLimits,
};

/// Per-request sampling settings; None = the bundle's default.
pub use crate::sampling::SamplingOverrides;
