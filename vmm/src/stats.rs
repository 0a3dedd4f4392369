//! Per-token latency statistics: percentiles and jitter (p99 - p50) of the
//! time between consecutive generated tokens, from the guest's TSC
//! timestamps. The one place `aivmm run --stats`, the daemon's `/stats` and
//! `/metrics` and the benchmarks compute them.

use serde::Serialize;

/// Percentiles of a set of latencies in milliseconds (nearest rank on the
/// sorted values: index round((n - 1) * q)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencyStats {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// p99 - p50.
    pub jitter_ms: f64,
}

impl LatencyStats {
    /// Over `samples` (any order); all zero when there are none.
    pub fn from_samples(samples: impl IntoIterator<Item = f64>) -> LatencyStats {
        let mut sorted: Vec<f64> = samples.into_iter().collect();
        if sorted.is_empty() {
            return LatencyStats::default();
        }
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        let (p50, p99) = (at(0.50), at(0.99));
        LatencyStats {
            count: sorted.len() as u64,
            p50_ms: p50,
            p90_ms: at(0.90),
            p99_ms: p99,
            max_ms: sorted[sorted.len() - 1],
            mean_ms: sorted.iter().sum::<f64>() / sorted.len() as f64,
            jitter_ms: p99 - p50,
        }
    }

    /// Of the gaps between consecutive token timestamps (`token_ms`: the
    /// time each token was sampled, in order). The first token's latency is
    /// the time to first token, reported separately.
    pub fn of_token_times(token_ms: &[f64]) -> LatencyStats {
        Self::from_samples(token_gaps(token_ms))
    }

    /// Jitter as a fraction of p50 (0 without samples).
    pub fn jitter_ratio(&self) -> f64 {
        if self.p50_ms > 0.0 {
            self.jitter_ms / self.p50_ms
        } else {
            0.0
        }
    }
}

/// Time between consecutive tokens (never negative).
pub fn token_gaps(token_ms: &[f64]) -> impl Iterator<Item = f64> + '_ {
    token_ms.windows(2).map(|pair| (pair[1] - pair[0]).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_jitter() {
        assert_eq!(LatencyStats::from_samples([]), LatencyStats::default());
        let stats = LatencyStats::from_samples((1..=100).map(f64::from));
        assert_eq!(stats.count, 100);
        assert_eq!(stats.p50_ms, 51.0); // index round(99 * 0.5) = 50
        assert_eq!(stats.p90_ms, 90.0);
        assert_eq!(stats.p99_ms, 99.0);
        assert_eq!(stats.max_ms, 100.0);
        assert_eq!(stats.mean_ms, 50.5);
        assert_eq!(stats.jitter_ms, 48.0);
        let one = LatencyStats::from_samples([7.0]);
        assert_eq!((one.p50_ms, one.p99_ms, one.jitter_ms), (7.0, 7.0, 0.0));
    }

    #[test]
    fn token_gaps_from_timestamps() {
        let stats = LatencyStats::of_token_times(&[20.0, 30.0, 40.0, 60.0]);
        assert_eq!(stats.count, 3);
        assert_eq!((stats.p50_ms, stats.max_ms), (10.0, 20.0));
        assert_eq!(stats.jitter_ms, 10.0);
        assert!((stats.jitter_ratio() - 1.0).abs() < 1e-12);
        assert_eq!(LatencyStats::of_token_times(&[5.0]).count, 0);
    }
}
