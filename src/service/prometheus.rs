//! `/metrics`: the `stats` answer (one source for both) in Prometheus' text exposition format
//! (version 0.0.4), with what is loaded as the labels of an info metric.

use std::fmt::Write as _;

use super::protocol::{Histogram, Outcomes, Stats};
use super::scheduler::ModelInfo;

/// The content type Prometheus expects for this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

type Pick<T> = fn(&Stats) -> T;

type PickHistogram = for<'a> fn(&'a Stats) -> &'a Histogram;

const HISTOGRAMS: [(&str, &str, PickHistogram); 2] = [
    (
        "qwen2_edge_time_to_first_token_seconds",
        "From acceptance to the first token (queueing included).",
        |s| &s.ttft_seconds,
    ),
    (
        "qwen2_edge_inter_token_latency_seconds",
        "Time between two tokens of one request.",
        |s| &s.inter_token_seconds,
    ),
];

/// One value per model: (name, type, help, the value; None: no series for that model).
const SCALARS: [(&str, &str, &str, Pick<Option<f64>>); 16] = [
    (
        "qwen2_edge_prompt_tokens_total",
        "counter",
        "Prompt tokens of finished requests.",
        |s| Some(s.counts.prompt_tokens as f64),
    ),
    (
        "qwen2_edge_generated_tokens_total",
        "counter",
        "Tokens generated for finished requests.",
        |s| Some(s.counts.tokens_generated as f64),
    ),
    (
        "qwen2_edge_draft_tokens_total",
        "counter",
        "Tokens drafted by prompt lookup for finished requests.",
        |s| Some(s.counts.draft_tokens as f64),
    ),
    (
        "qwen2_edge_accepted_draft_tokens_total",
        "counter",
        "Drafted tokens the model confirmed, for finished requests.",
        |s| Some(s.counts.accepted_draft_tokens as f64),
    ),
    (
        "qwen2_edge_queue_depth",
        "gauge",
        "Requests waiting for a slot.",
        |s| Some(s.queue_depth as f64),
    ),
    (
        "qwen2_edge_active_sequences",
        "gauge",
        "Requests being generated (decoded together).",
        |s| Some(s.active as f64),
    ),
    (
        "qwen2_edge_max_concurrent_sequences",
        "gauge",
        "limits.max_concurrent: sequences decoded together at most.",
        |s| Some(s.max_concurrent as f64),
    ),
    (
        "qwen2_edge_max_queue",
        "gauge",
        "limits.max_queue: requests that may wait.",
        |s| Some(s.max_queue as f64),
    ),
    (
        "qwen2_edge_decode_steps_total",
        "counter",
        "Batched decode steps run.",
        |s| Some(s.decode_steps as f64),
    ),
    (
        "qwen2_edge_decode_step_tokens_total",
        "counter",
        "Tokens those steps produced (divided by the steps: the mean batch).",
        |s| Some(s.decode_step_tokens as f64),
    ),
    (
        "qwen2_edge_prefix_cache_hits_total",
        "counter",
        "Prompts that reused a cached prefix.",
        |s| s.prefix_cache.as_ref().map(|p| p.hits as f64),
    ),
    (
        "qwen2_edge_prefix_cache_misses_total",
        "counter",
        "Prompts that found no cached prefix.",
        |s| s.prefix_cache.as_ref().map(|p| p.misses as f64),
    ),
    (
        "qwen2_edge_prefix_cache_tokens_saved_total",
        "counter",
        "Prompt positions reused instead of computed.",
        |s| s.prefix_cache.as_ref().map(|p| p.tokens_saved as f64),
    ),
    (
        "qwen2_edge_prefix_cache_bytes",
        "gauge",
        "Memory the prefix cache holds.",
        |s| s.prefix_cache.as_ref().map(|p| p.bytes as f64),
    ),
    (
        "qwen2_edge_prefix_cache_budget_bytes",
        "gauge",
        "cache.size_mib in bytes.",
        |s| s.prefix_cache.as_ref().map(|p| p.budget_bytes as f64),
    ),
    (
        "qwen2_edge_uptime_seconds",
        "gauge",
        "Since the model was loaded.",
        |s| Some(s.uptime_s as f64),
    ),
];

/// Every model's series, labelled `model="<name>"` (the config's name), each family once.
pub fn render(models: &[(ModelInfo, Stats)]) -> String {
    let mut out = String::with_capacity(4096 * models.len().max(1));
    let o = &mut out;
    header(
        o,
        "qwen2_edge_model_info",
        "gauge",
        "A model being served (always 1; its facts are the labels).",
    );
    for (m, _) in models {
        let _ = writeln!(
            o,
            "qwen2_edge_model_info{{model=\"{}\",source=\"{}\",backend=\"{}\",variant=\"{}\",kernels=\"{}\",version=\"{}\"}} 1",
            escape(&m.name),
            escape(&m.source),
            escape(&m.backend),
            escape(&m.variant),
            escape(m.kernels.as_deref().unwrap_or("")),
            env!("CARGO_PKG_VERSION"),
        );
    }
    header(
        o,
        "qwen2_edge_requests_total",
        "counter",
        "Requests by front end and outcome (accepted counts every request taken into the queue; the others how they ended).",
    );
    for (m, stats) in models {
        let r = &stats.requests;
        for (transport, outcomes) in [
            ("unix_socket", &r.unix_socket),
            ("mqtt", &r.mqtt),
            ("http", &r.http),
        ] {
            for (outcome, n) in outcome_counts(outcomes) {
                let _ = writeln!(
                    o,
                    "qwen2_edge_requests_total{{model=\"{}\",transport=\"{transport}\",outcome=\"{outcome}\"}} {n}",
                    escape(&m.name)
                );
            }
        }
    }
    for (name, help, pick) in HISTOGRAMS {
        header(o, name, "histogram", help);
        for (m, stats) in models {
            histogram(o, name, &escape(&m.name), pick(stats));
        }
    }
    for (name, kind, help, value) in SCALARS {
        // The prefix cache's series only when some model has one.
        if models.iter().all(|(_, s)| value(s).is_none()) {
            continue;
        }
        header(o, name, kind, help);
        for (m, stats) in models {
            if let Some(v) = value(stats) {
                let _ = writeln!(o, "{name}{{model=\"{}\"}} {}", escape(&m.name), number(v));
            }
        }
    }
    out
}

fn outcome_counts(o: &Outcomes) -> [(&'static str, u64); 6] {
    [
        ("accepted", o.accepted),
        ("served", o.served),
        ("rejected", o.rejected),
        ("cancelled", o.cancelled),
        ("timed_out", o.timed_out),
        ("failed", o.failed),
    ]
}

fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
}

/// One model's buckets, sum and count (the family's header is written once by the caller).
fn histogram(o: &mut String, name: &str, model: &str, h: &Histogram) {
    for b in &h.buckets {
        let le = b.le.map_or_else(|| "+Inf".to_string(), number);
        let _ = writeln!(
            o,
            "{name}_bucket{{model=\"{model}\",le=\"{le}\"}} {}",
            b.count
        );
    }
    let _ = writeln!(o, "{name}_sum{{model=\"{model}\"}} {}", number(h.sum));
    let _ = writeln!(o, "{name}_count{{model=\"{model}\"}} {}", h.count);
}

/// Go's float formatting as Prometheus writes it: integers without a fraction are fine.
fn number(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else if x.is_nan() {
        "NaN".into()
    } else if x > 0.0 {
        "+Inf".into()
    } else {
        "-Inf".into()
    }
}

/// A label value: backslash, double quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::protocol::{Bucket, ByTransport, Counts, Summary};

    #[test]
    fn exposition_lines() {
        let stats = Stats {
            queue_depth: 1,
            active: 2,
            max_concurrent: 4,
            max_queue: 16,
            uptime_s: 9,
            counts: Counts::default(),
            requests: ByTransport {
                http: Outcomes {
                    accepted: 3,
                    ..Outcomes::default()
                },
                ..ByTransport::default()
            },
            ttft_ms: Summary::default(),
            decode_tokens_per_s: Summary::default(),
            ttft_seconds: Histogram {
                buckets: vec![
                    Bucket {
                        le: Some(0.5),
                        count: 1,
                    },
                    Bucket { le: None, count: 2 },
                ],
                sum: 1.25,
                count: 2,
            },
            inter_token_seconds: Histogram::default(),
            decode_steps: 0,
            decode_step_tokens: 0,
            max_batch: 0,
            prefix_cache: None,
            models: Vec::new(),
        };
        let model = ModelInfo {
            name: "small".into(),
            source: "a \"b\"\nc".into(),
            backend: "native".into(),
            variant: "int8".into(),
            kernels: Some("avx2-fma".into()),
        };
        let mut other = model.clone();
        other.name = "big".into();
        let text = render(&[(model, stats.clone()), (other, stats)]);
        for line in [
            r#"qwen2_edge_model_info{model="small",source="a \"b\"\nc",backend="native",variant="int8",kernels="avx2-fma","#,
            r#"qwen2_edge_requests_total{model="small",transport="http",outcome="accepted"} 3"#,
            r#"qwen2_edge_time_to_first_token_seconds_bucket{model="small",le="0.5"} 1"#,
            r#"qwen2_edge_time_to_first_token_seconds_bucket{model="big",le="+Inf"} 2"#,
            r#"qwen2_edge_time_to_first_token_seconds_sum{model="small"} 1.25"#,
            r#"qwen2_edge_queue_depth{model="big"} 1"#,
            "# TYPE qwen2_edge_active_sequences gauge",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        // Each family once, with both models' samples under it.
        assert_eq!(
            text.matches("# TYPE qwen2_edge_queue_depth gauge").count(),
            1
        );
        assert!(!text.contains("prefix_cache"), "{text}");
    }
}
