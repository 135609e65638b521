//! Logs and metrics set-up for the binary.

use std::net::SocketAddr;

use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber: text on a terminal, JSON lines when `json`.
/// Logs go to stderr; stdout is reserved for the commands' JSON result lines.
pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    if let Err(err) = result {
        eprintln!("logging already initialised: {err}");
    }
}

/// Starts the Prometheus exposition endpoint on `addr` (`off` disables it).
pub fn init_metrics(addr: &str) -> anyhow::Result<()> {
    if addr == crate::config::METRICS_OFF {
        return Ok(());
    }
    let addr: SocketAddr = addr.parse()?;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &[
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_events".into()),
            &[1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0],
        )?
        .install()?;
    crate::notify::describe_metrics();
    Ok(())
}
