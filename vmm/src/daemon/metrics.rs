//! Per-partition telemetry: counters, latency histograms (Prometheus) and
//! windows of recent values (percentiles for `/stats`), written by the
//! partition's worker and read by the API.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use aivmm_api::types::{PartitionCounters, PartitionState, Percentiles};

use crate::stats::{token_gaps, LatencyStats};

/// Upper bounds (seconds) of the time-to-first-token histogram.
const TTFT_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upper bounds (seconds) of the per-token latency histogram.
const TOKEN_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Values kept for percentiles.
const WINDOW: usize = 4096;

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), plus one for +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum += value;
        self.count += 1;
    }
}

#[derive(Debug, Clone, Default)]
struct Window(VecDeque<f64>);

impl Window {
    fn push(&mut self, value: f64) {
        if self.0.len() == WINDOW {
            self.0.pop_front();
        }
        self.0.push_back(value);
    }

    fn percentiles(&self) -> Percentiles {
        let stats = LatencyStats::from_samples(self.0.iter().copied());
        Percentiles {
            count: stats.count,
            p50: stats.p50_ms,
            p90: stats.p90_ms,
            p99: stats.p99_ms,
            max: stats.max_ms,
        }
    }
}

#[derive(Debug, Clone)]
struct Recorded {
    counters: PartitionCounters,
    tokens_per_sec: f64,
    ttft: Histogram,
    token_latency: Histogram,
    recent_ttft_ms: Window,
    recent_token_ms: Window,
}

/// How one completion went, for the telemetry.
pub struct CompletionRecord<'a> {
    pub outcome: Outcome,
    pub prompt_tokens: u64,
    pub tokens: u64,
    pub tokens_per_sec: f64,
    /// None when no token came.
    pub ttft_ms: Option<f64>,
    /// Milliseconds after the start at which each token was sampled.
    pub token_ms: &'a [f64],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Cancelled,
    Failed,
}

pub struct PartitionMetrics {
    recorded: Mutex<Recorded>,
    pub queue_depth: AtomicU64,
    pub vcpu_exits: AtomicU64,
    pub guest_memory_bytes: AtomicU64,
}

impl Default for PartitionMetrics {
    fn default() -> Self {
        PartitionMetrics {
            recorded: Mutex::new(Recorded {
                counters: PartitionCounters::default(),
                tokens_per_sec: 0.0,
                ttft: Histogram::new(TTFT_BOUNDS),
                token_latency: Histogram::new(TOKEN_BOUNDS),
                recent_ttft_ms: Window::default(),
                recent_token_ms: Window::default(),
            }),
            queue_depth: AtomicU64::new(0),
            vcpu_exits: AtomicU64::new(0),
            guest_memory_bytes: AtomicU64::new(0),
        }
    }
}

/// What `/stats` shows of a partition's telemetry.
pub struct Snapshot {
    pub counters: PartitionCounters,
    pub tokens_per_sec: f64,
    pub ttft_ms: Percentiles,
    pub token_latency_ms: Percentiles,
}

impl PartitionMetrics {
    fn recorded(&self) -> std::sync::MutexGuard<'_, Recorded> {
        // The data stays consistent under a panic elsewhere (plain numbers).
        self.recorded
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    pub fn record_boot(&self) {
        self.recorded().counters.boots += 1;
    }

    pub fn record(&self, completion: &CompletionRecord<'_>) {
        let mut r = self.recorded();
        r.counters.requests += 1;
        match completion.outcome {
            Outcome::Completed => {}
            Outcome::Cancelled => r.counters.requests_cancelled += 1,
            Outcome::Failed => r.counters.requests_failed += 1,
        }
        r.counters.prompt_tokens += completion.prompt_tokens;
        r.counters.tokens_generated += completion.tokens;
        if completion.tokens > 1 {
            r.tokens_per_sec = completion.tokens_per_sec;
        }
        if let Some(ttft) = completion.ttft_ms {
            r.ttft.observe(ttft / 1e3);
            r.recent_ttft_ms.push(ttft);
        }
        for gap in token_gaps(completion.token_ms) {
            r.token_latency.observe(gap / 1e3);
            r.recent_token_ms.push(gap);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let r = self.recorded();
        let mut counters = r.counters.clone();
        counters.queue_depth = self.queue_depth.load(Ordering::Relaxed);
        counters.vcpu_exits = self.vcpu_exits.load(Ordering::Relaxed);
        Snapshot {
            counters,
            tokens_per_sec: r.tokens_per_sec,
            ttft_ms: r.recent_ttft_ms.percentiles(),
            token_latency_ms: r.recent_token_ms.percentiles(),
        }
    }
}

/// A partition as `/metrics` shows it.
pub struct MetricsRow<'a> {
    pub id: &'a str,
    pub model: &'a str,
    pub state: PartitionState,
    pub metrics: &'a PartitionMetrics,
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition (format 0.0.4) of the daemon.
pub fn render(uptime_secs: f64, rows: &[MetricsRow<'_>]) -> String {
    let mut out = String::new();
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };
    family(
        &mut out,
        "aivmm_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
    );
    let _ = writeln!(out, "aivmm_uptime_seconds {uptime_secs}");
    family(
        &mut out,
        "aivmm_partitions",
        "gauge",
        "Partitions known to the daemon.",
    );
    let _ = writeln!(out, "aivmm_partitions {}", rows.len());

    let recorded: Vec<Recorded> = rows
        .iter()
        .map(|row| row.metrics.recorded().clone())
        .collect();
    let labels: Vec<String> = rows
        .iter()
        .map(|row| format!("partition=\"{}\"", escape(row.id)))
        .collect();

    family(
        &mut out,
        "aivmm_partition_info",
        "gauge",
        "The model a partition serves (always 1).",
    );
    for (row, l) in rows.iter().zip(&labels) {
        let _ = writeln!(
            out,
            "aivmm_partition_info{{{l},model=\"{}\"}} 1",
            escape(row.model)
        );
    }
    family(
        &mut out,
        "aivmm_partition_state",
        "gauge",
        "1 for the state the partition is in.",
    );
    for (row, l) in rows.iter().zip(&labels) {
        for state in PartitionState::ALL {
            let on = u8::from(row.state == state);
            let _ = writeln!(
                out,
                "aivmm_partition_state{{{l},state=\"{}\"}} {on}",
                state.as_str()
            );
        }
    }
    family(
        &mut out,
        "aivmm_requests_total",
        "counter",
        "Completions finished, by outcome.",
    );
    for (r, l) in recorded.iter().zip(&labels) {
        let c = &r.counters;
        let completed = c.requests - c.requests_cancelled - c.requests_failed;
        let _ = writeln!(
            out,
            "aivmm_requests_total{{{l},outcome=\"completed\"}} {completed}"
        );
        let _ = writeln!(
            out,
            "aivmm_requests_total{{{l},outcome=\"cancelled\"}} {}",
            c.requests_cancelled
        );
        let _ = writeln!(
            out,
            "aivmm_requests_total{{{l},outcome=\"failed\"}} {}",
            c.requests_failed
        );
    }
    let counters: [(&str, &str, fn(&PartitionCounters) -> u64); 3] = [
        (
            "aivmm_prompt_tokens_total",
            "Prompt tokens of finished completions.",
            |c| c.prompt_tokens,
        ),
        ("aivmm_tokens_generated_total", "Tokens generated.", |c| {
            c.tokens_generated
        }),
        (
            "aivmm_partition_boots_total",
            "Times the partition booted.",
            |c| c.boots,
        ),
    ];
    for (name, help, value) in counters {
        family(&mut out, name, "counter", help);
        for (r, l) in recorded.iter().zip(&labels) {
            let _ = writeln!(out, "{name}{{{l}}} {}", value(&r.counters));
        }
    }
    let live: [(&str, &str, &str, fn(&PartitionMetrics) -> &AtomicU64); 3] = [
        (
            "aivmm_vcpu_exits_total",
            "counter",
            "VM exits of the partition's guest (MMIO exits and notifications).",
            |m| &m.vcpu_exits,
        ),
        (
            "aivmm_queue_depth",
            "gauge",
            "Completions waiting or running.",
            |m| &m.queue_depth,
        ),
        (
            "aivmm_guest_memory_bytes",
            "gauge",
            "Guest RAM of the running partition.",
            |m| &m.guest_memory_bytes,
        ),
    ];
    for (name, kind, help, value) in live {
        family(&mut out, name, kind, help);
        for (row, l) in rows.iter().zip(&labels) {
            let _ = writeln!(
                out,
                "{name}{{{l}}} {}",
                value(row.metrics).load(Ordering::Relaxed)
            );
        }
    }
    family(
        &mut out,
        "aivmm_tokens_per_second",
        "gauge",
        "Generation rate of the last completion.",
    );
    for (r, l) in recorded.iter().zip(&labels) {
        let _ = writeln!(out, "aivmm_tokens_per_second{{{l}}} {}", r.tokens_per_sec);
    }
    family(
        &mut out,
        "aivmm_token_latency_jitter_seconds",
        "gauge",
        "p99 - p50 of the recent per-token latency.",
    );
    for (r, l) in recorded.iter().zip(&labels) {
        let p = LatencyStats::from_samples(r.recent_token_ms.0.iter().copied());
        let _ = writeln!(
            out,
            "aivmm_token_latency_jitter_seconds{{{l}}} {}",
            p.jitter_ms / 1e3
        );
    }
    let histograms: [(&str, &str, fn(&Recorded) -> &Histogram); 2] = [
        (
            "aivmm_time_to_first_token_seconds",
            "Time to first token, from the guest's clock.",
            |r| &r.ttft,
        ),
        (
            "aivmm_token_latency_seconds",
            "Time between consecutive tokens, from the guest's clock.",
            |r| &r.token_latency,
        ),
    ];
    for (name, help, histogram) in histograms {
        family(&mut out, name, "histogram", help);
        for (r, l) in recorded.iter().zip(&labels) {
            let h = histogram(r);
            let mut cumulative = 0;
            for (bound, count) in h.bounds.iter().zip(&h.counts) {
                cumulative += count;
                let _ = writeln!(out, "{name}_bucket{{{l},le=\"{bound}\"}} {cumulative}");
            }
            let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "{name}_sum{{{l}}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{{l}}} {}", h.count);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_percentiles_come_from_the_window() {
        let metrics = PartitionMetrics::default();
        metrics.record(&CompletionRecord {
            outcome: Outcome::Completed,
            prompt_tokens: 5,
            tokens: 4,
            tokens_per_sec: 100.0,
            ttft_ms: Some(20.0),
            token_ms: &[20.0, 30.0, 40.0, 60.0],
        });
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.counters.tokens_generated, 4);
        assert_eq!(snapshot.token_latency_ms.count, 3);
        assert_eq!(snapshot.token_latency_ms.p50, 10.0);
        assert_eq!(snapshot.token_latency_ms.max, 20.0);
        let text = render(
            1.0,
            &[MetricsRow {
                id: "a\"b",
                model: "m",
                state: PartitionState::Running,
                metrics: &metrics,
            }],
        );
        assert!(
            text.contains("aivmm_token_latency_seconds_bucket{partition=\"a\\\"b\",le=\"0.01\"} 2")
        );
        assert!(
            text.contains("aivmm_token_latency_seconds_bucket{partition=\"a\\\"b\",le=\"+Inf\"} 3")
        );
        assert!(text.contains("aivmm_time_to_first_token_seconds_count{partition=\"a\\\"b\"} 1"));
        assert!(text.contains("aivmm_partition_state{partition=\"a\\\"b\",state=\"running\"} 1"));
    }
}
