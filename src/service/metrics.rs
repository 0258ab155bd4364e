//! Counters, latency percentiles and histograms: what the `stats` op answers and `/metrics`
//! exposes (one source for both).
//!
//! Percentiles come from a window of the most recent requests (a fixed-size ring), so memory
//! stays constant however long the service runs and the numbers describe its current state.
//! Histograms count since start, as Prometheus expects.

use super::protocol::{Bucket, ByTransport, Counts, Histogram, Outcomes, Percentiles, Summary};

/// The front end a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    UnixSocket,
    Mqtt,
    Http,
}

/// How a request ended (or that it was accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tally {
    Accepted,
    Served,
    Rejected,
    Cancelled,
    TimedOut,
    Failed,
}

impl Outcomes {
    fn add(&mut self, what: Tally) {
        let field = match what {
            Tally::Accepted => &mut self.accepted,
            Tally::Served => &mut self.served,
            Tally::Rejected => &mut self.rejected,
            Tally::Cancelled => &mut self.cancelled,
            Tally::TimedOut => &mut self.timed_out,
            Tally::Failed => &mut self.failed,
        };
        *field += 1;
    }
}

impl ByTransport {
    fn of(&mut self, t: Transport) -> &mut Outcomes {
        match t {
            Transport::UnixSocket => &mut self.unix_socket,
            Transport::Mqtt => &mut self.mqtt,
            Transport::Http => &mut self.http,
        }
    }
}

/// Bucket bounds, seconds. Time to first token: from a cached prompt on a fast box (tens of
/// ms) to a long cold prompt queued behind others on a Raspberry Pi (tens of s).
pub const TTFT_BOUNDS: [f64; 12] = [
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
];
/// Between two tokens: 100+ tokens/s down to a heavily loaded small board.
pub const INTER_TOKEN_BOUNDS: [f64; 12] = [
    0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
];

/// A histogram being filled: counts per bucket (not cumulative), their sum.
#[derive(Debug, Clone)]
pub struct HistogramCounter {
    bounds: &'static [f64],
    /// One per bound, plus the +Inf bucket.
    counts: Vec<u64>,
    sum: f64,
}

impl HistogramCounter {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        if !value.is_finite() {
            return;
        }
        let i = self.bounds.partition_point(|&b| b < value);
        self.counts[i] += 1;
        self.sum += value;
    }

    /// Cumulative buckets, as the wire and Prometheus have them.
    pub fn snapshot(&self) -> Histogram {
        let mut total = 0;
        let buckets = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                total += n;
                Bucket {
                    le: self.bounds.get(i).copied(),
                    count: total,
                }
            })
            .collect();
        Histogram {
            buckets,
            sum: self.sum,
            count: total,
        }
    }
}

/// Nearest-rank percentiles of `values` (`ps` in [0, 100]); None when empty. The one
/// definition for `stats` and for the command line's and benchmark's reports.
pub fn percentiles(values: &[f64], ps: &[f64]) -> Option<Vec<f64>> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(
        ps.iter()
            .map(|p| {
                let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
                sorted[rank.clamp(1, sorted.len()) - 1]
            })
            .collect(),
    )
}

/// Samples kept per series.
const WINDOW: usize = 1024;

/// The last `WINDOW` values of one measurement.
#[derive(Debug, Clone, Default)]
pub struct Window {
    values: Vec<f64>,
    next: usize,
}

impl Window {
    pub fn push(&mut self, value: f64) {
        if !value.is_finite() {
            return;
        }
        if self.values.len() < WINDOW {
            self.values.push(value);
        } else {
            self.values[self.next] = value;
        }
        self.next = (self.next + 1) % WINDOW;
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Nearest-rank percentiles (`ps` in [0, 100]); None when empty.
    pub fn percentiles(&self, ps: &[f64]) -> Option<Vec<f64>> {
        percentiles(&self.values, ps)
    }

    /// p50, p90 and p99 (the wire rounds them).
    pub fn summary(&self) -> Summary {
        Summary {
            samples: self.len(),
            percentiles: self.percentiles(&[50.0, 90.0, 99.0]).map(|p| Percentiles {
                p50: p[0],
                p90: p[1],
                p99: p[2],
            }),
        }
    }
}

/// Everything the scheduler counts; kept under the scheduler's lock.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub counts: Counts,
    pub requests: ByTransport,
    pub ttft_ms: Window,
    pub decode_tokens_per_s: Window,
    pub ttft_seconds: HistogramCounter,
    pub inter_token_seconds: HistogramCounter,
    pub decode_steps: u64,
    pub decode_step_tokens: u64,
    pub max_batch: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            counts: Counts::default(),
            requests: ByTransport::default(),
            ttft_ms: Window::default(),
            decode_tokens_per_s: Window::default(),
            ttft_seconds: HistogramCounter::new(&TTFT_BOUNDS),
            inter_token_seconds: HistogramCounter::new(&INTER_TOKEN_BOUNDS),
            decode_steps: 0,
            decode_step_tokens: 0,
            max_batch: 0,
        }
    }
}

impl Metrics {
    /// Counts a request's outcome, in the total and for its front end.
    pub fn tally(&mut self, transport: Transport, what: Tally) {
        self.counts.outcomes.add(what);
        self.requests.of(transport).add(what);
    }

    /// A first token `ms` after the request was accepted.
    pub fn first_token(&mut self, ms: f64) {
        self.ttft_ms.push(ms);
        self.ttft_seconds.observe(ms / 1000.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut w = Window::default();
        assert_eq!(w.percentiles(&[50.0]), None);
        for v in 1..=100 {
            w.push(v as f64);
        }
        assert_eq!(
            w.percentiles(&[0.0, 50.0, 99.0, 100.0]),
            Some(vec![1.0, 50.0, 99.0, 100.0])
        );
        w.push(f64::NAN);
        assert_eq!(w.len(), 100);
    }

    #[test]
    fn window_keeps_the_most_recent() {
        let mut w = Window::default();
        for _ in 0..WINDOW {
            w.push(1000.0);
        }
        for _ in 0..WINDOW {
            w.push(1.0);
        }
        assert_eq!(w.len(), WINDOW);
        assert_eq!(w.percentiles(&[100.0]), Some(vec![1.0]));
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_le_inclusive() {
        let mut h = HistogramCounter::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 3.0, f64::NAN] {
            h.observe(v);
        }
        let s = h.snapshot();
        let counts: Vec<(Option<f64>, u64)> = s.buckets.iter().map(|b| (b.le, b.count)).collect();
        assert_eq!(counts, [(Some(0.1), 2), (Some(1.0), 3), (None, 4)]);
        assert_eq!(s.count, 4);
        assert!((s.sum - 3.65).abs() < 1e-12);
    }

    #[test]
    fn tallies_count_in_total_and_per_transport() {
        let mut m = Metrics::default();
        m.tally(Transport::Http, Tally::Accepted);
        m.tally(Transport::Mqtt, Tally::Rejected);
        assert_eq!(m.counts.outcomes.accepted, 1);
        assert_eq!(m.counts.outcomes.rejected, 1);
        assert_eq!(m.requests.http.accepted, 1);
        assert_eq!(m.requests.mqtt.rejected, 1);
        assert_eq!(m.requests.unix_socket, Outcomes::default());
    }

    #[test]
    fn summary_fields() {
        let mut m = Metrics::default();
        m.ttft_ms.push(12.5);
        let s = m.ttft_ms.summary();
        assert_eq!(s.samples, 1);
        assert_eq!(s.percentiles.map(|p| p.p50), Some(12.5));
        assert_eq!(m.decode_tokens_per_s.summary(), Summary::default());
    }
}
