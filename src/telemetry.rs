//! Logs and metrics set-up for the binary.
//!
//! Metrics are exposed by [`crate::observe`], which serves `/metrics` next to the health and
//! status endpoints on `AUDITFLOW_METRICS_ADDR`; [`prometheus_builder`] holds the bucket layout
//! both exposition paths share.

use std::io::IsTerminal as _;

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
