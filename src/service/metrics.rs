//! Counters and latency percentiles for the `stats` op.
//!
//! Percentiles come from a window of the most recent requests (a fixed-size ring), so memory
//! stays constant however long the service runs and the numbers describe its current state.

use super::protocol::{Counts, Percentiles, Summary};

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
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub counts: Counts,
    pub ttft_ms: Window,
    pub decode_tokens_per_s: Window,
    pub decode_steps: u64,
    pub decode_step_tokens: u64,
    pub max_batch: usize,
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
    fn summary_fields() {
        let mut m = Metrics::default();
        m.ttft_ms.push(12.5);
        let s = m.ttft_ms.summary();
        assert_eq!(s.samples, 1);
        assert_eq!(s.percentiles.map(|p| p.p50), Some(12.5));
        assert_eq!(m.decode_tokens_per_s.summary(), Summary::default());
    }
}
