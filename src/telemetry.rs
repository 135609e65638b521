//! Logs and metrics set-up for the binary.
//!
//! Metrics are exposed by [`crate::observe`], which serves `/metrics` next to the health and
//! status endpoints on `AUDITFLOW_METRICS_ADDR`; [`prometheus_builder`] holds the bucket layout
//! both exposition paths share.

use std::io::IsTerminal as _;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{reload, EnvFilter, Layer as _, Registry};

/// Buckets of every `*_seconds` histogram (flush duration, end-to-end latency): 1 ms to 30 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets of every `*_events` histogram (batch size): up to twice the default batch limit.
pub const EVENTS_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0];

/// Changes the log filter of the running process (live reload of `AUDITFLOW_LOG_LEVEL`).
#[derive(Clone)]
pub struct LogFilterHandle(reload::Handle<EnvFilter, Registry>);

impl LogFilterHandle {
    /// Replaces the filter with `directives` (`info`, `auditflow=debug,rdkafka=warn`, ...).
    pub fn set(&self, directives: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(directives).map_err(|err| err.to_string())?;
        self.0.reload(filter).map_err(|err| err.to_string())
    }
}

/// Installs the global tracing subscriber with `directives` as the filter: text on a terminal,
/// JSON lines when `json`. Logs go to stderr; stdout is reserved for the commands' JSON result
/// lines. Colours only when stderr is a terminal, so text logs redirected to a file or a
/// collector stay plain. Returns the handle that changes the filter live.
pub fn init_logging(json: bool, directives: &str) -> Option<LogFilterHandle> {
    let filter = EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let output = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let output = if json {
        output.json().flatten_event(true).boxed()
    } else {
        output.with_ansi(std::io::stderr().is_terminal()).boxed()
    };
    match tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
    {
        Ok(()) => Some(LogFilterHandle(handle)),
        Err(err) => {
            eprintln!("logging already initialised: {err}");
            None
        }
    }
}

/// A Prometheus recorder builder with auditflow's histogram buckets; without them the exporter
/// would render summaries, which Prometheus cannot aggregate across replicas.
pub fn prometheus_builder() -> anyhow::Result<PrometheusBuilder> {
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_events".into()), EVENTS_BUCKETS)?)
}

/// How often a repeating condition is logged by default: once every ten seconds.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Logs a repeating condition (a broker that stays down, a refusal that repeats) at most once per
/// interval, with the number of occurrences since the line before, so an outage is one line per
/// interval instead of dozens per second.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// A throttle that lets one line through per `interval`.
    pub fn new(interval: Duration) -> Self {
        Throttle {
            interval,
            state: Mutex::new(ThrottleState::default()),
        }
    }

    /// Counts one occurrence and calls `log` with the occurrences suppressed since the last line,
    /// unless a line was written less than the interval ago.
    pub fn record(&self, log: impl FnOnce(u64)) {
        let now = Instant::now();
        let suppressed = {
            let mut state = self.state.lock();
            if state
                .last_logged
                .is_some_and(|last| now.duration_since(last) < self.interval)
            {
                state.suppressed += 1;
                return;
            }
            state.last_logged = Some(now);
            std::mem::take(&mut state.suppressed)
        };
        log(suppressed);
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(LOG_EVERY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_repeating_condition_is_one_line_per_interval_with_its_count() {
        let throttle = Throttle::new(Duration::from_secs(10));
        let mut lines = Vec::new();
        // 45 errors a second for 25 seconds.
        for _ in 0..25 {
            for _ in 0..45 {
                throttle.record(|suppressed| lines.push(suppressed));
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(lines, vec![0, 449, 449], "lines at 0 s, 10 s and 20 s");
    }
}
