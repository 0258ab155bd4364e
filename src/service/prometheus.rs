//! `/metrics`: the `stats` answer (one source for both) in Prometheus' text exposition format
//! (version 0.0.4), with what is loaded as the labels of an info metric.

use std::fmt::Write as _;

use super::protocol::{Histogram, Outcomes, Stats};
use super::scheduler::ModelInfo;

/// The content type Prometheus expects for this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn render(stats: &Stats, model: &ModelInfo) -> String {
    let mut out = String::with_capacity(4096);
    let o = &mut out;
    header(
        o,
        "qwen2_edge_model_info",
        "gauge",
        "The model being served (always 1; its facts are the labels).",
    );
    let kernels = model.kernels.as_deref().unwrap_or("");
    let _ = writeln!(
        o,
        "qwen2_edge_model_info{{model=\"{}\",backend=\"{}\",variant=\"{}\",kernels=\"{}\",version=\"{}\"}} 1",
        escape(&model.name),
        escape(&model.backend),
        escape(&model.variant),
        escape(kernels),
        env!("CARGO_PKG_VERSION"),
    );
    header(
        o,
        "qwen2_edge_requests_total",
        "counter",
        "Requests by front end and outcome (accepted counts every request taken into the queue; the others how they ended).",
    );
    let r = &stats.requests;
    for (transport, outcomes) in [
        ("unix_socket", &r.unix_socket),
        ("mqtt", &r.mqtt),
        ("http", &r.http),
    ] {
        for (outcome, n) in outcome_counts(outcomes) {
            let _ = writeln!(
                o,
                "qwen2_edge_requests_total{{transport=\"{transport}\",outcome=\"{outcome}\"}} {n}"
            );
        }
    }
    let c = &stats.counts;
    counter(
        o,
        "qwen2_edge_prompt_tokens_total",
        "Prompt tokens of finished requests.",
        c.prompt_tokens,
    );
    counter(
        o,
        "qwen2_edge_generated_tokens_total",
        "Tokens generated for finished requests.",
        c.tokens_generated,
    );
    histogram(
        o,
        "qwen2_edge_time_to_first_token_seconds",
        "From acceptance to the first token (queueing included).",
        &stats.ttft_seconds,
    );
    histogram(
        o,
        "qwen2_edge_inter_token_latency_seconds",
        "Time between two tokens of one request.",
        &stats.inter_token_seconds,
    );
    gauge(
        o,
        "qwen2_edge_queue_depth",
        "Requests waiting for a slot.",
        stats.queue_depth as f64,
    );
    gauge(
        o,
        "qwen2_edge_active_sequences",
        "Requests being generated (decoded together).",
        stats.active as f64,
    );
    gauge(
        o,
        "qwen2_edge_max_concurrent_sequences",
        "limits.max_concurrent: sequences decoded together at most.",
        stats.max_concurrent as f64,
    );
    gauge(
        o,
        "qwen2_edge_max_queue",
        "limits.max_queue: requests that may wait.",
        stats.max_queue as f64,
    );
    counter(
        o,
        "qwen2_edge_decode_steps_total",
        "Batched decode steps run.",
        stats.decode_steps,
    );
    counter(
        o,
        "qwen2_edge_decode_step_tokens_total",
        "Tokens those steps produced (divided by the steps: the mean batch).",
        stats.decode_step_tokens,
    );
    if let Some(p) = &stats.prefix_cache {
        counter(
            o,
            "qwen2_edge_prefix_cache_hits_total",
            "Prompts that reused a cached prefix.",
            p.hits,
        );
        counter(
            o,
            "qwen2_edge_prefix_cache_misses_total",
            "Prompts that found no cached prefix.",
            p.misses,
        );
        counter(
            o,
            "qwen2_edge_prefix_cache_tokens_saved_total",
            "Prompt positions reused instead of computed.",
            p.tokens_saved,
        );
        gauge(
            o,
            "qwen2_edge_prefix_cache_bytes",
            "Memory the prefix cache holds.",
            p.bytes as f64,
        );
        gauge(
            o,
            "qwen2_edge_prefix_cache_budget_bytes",
            "cache.size_mib in bytes.",
            p.budget_bytes as f64,
        );
    }
    gauge(
        o,
        "qwen2_edge_uptime_seconds",
        "Since the model was loaded.",
        stats.uptime_s as f64,
    );
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

fn counter(o: &mut String, name: &str, help: &str, value: u64) {
    header(o, name, "counter", help);
    let _ = writeln!(o, "{name} {value}");
}

fn gauge(o: &mut String, name: &str, help: &str, value: f64) {
    header(o, name, "gauge", help);
    let _ = writeln!(o, "{name} {}", number(value));
}

fn histogram(o: &mut String, name: &str, help: &str, h: &Histogram) {
    header(o, name, "histogram", help);
    for b in &h.buckets {
        let le = b.le.map_or_else(|| "+Inf".to_string(), number);
        let _ = writeln!(o, "{name}_bucket{{le=\"{le}\"}} {}", b.count);
    }
    let _ = writeln!(o, "{name}_sum {}", number(h.sum));
    let _ = writeln!(o, "{name}_count {}", h.count);
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
        };
        let model = ModelInfo {
            name: "a \"b\"\nc".into(),
            backend: "native".into(),
            variant: "int8".into(),
            kernels: Some("avx2-fma".into()),
        };
        let text = render(&stats, &model);
        for line in [
            r#"qwen2_edge_model_info{model="a \"b\"\nc",backend="native",variant="int8",kernels="avx2-fma","#,
            r#"qwen2_edge_requests_total{transport="http",outcome="accepted"} 3"#,
            r#"qwen2_edge_time_to_first_token_seconds_bucket{le="0.5"} 1"#,
            r#"qwen2_edge_time_to_first_token_seconds_bucket{le="+Inf"} 2"#,
            "qwen2_edge_time_to_first_token_seconds_sum 1.25",
            "qwen2_edge_queue_depth 1",
            "# TYPE qwen2_edge_active_sequences gauge",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
