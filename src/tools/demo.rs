//! `auditflow demo`: the whole flow on one machine, with nothing but Postgres and Redis running.
//!
//! Without `AUDITFLOW_KAFKA_BROKERS`, librdkafka's own mock cluster (a Kafka-protocol broker
//! in-process, on loopback) stands in for Kafka. The demo migrates, produces a sample stream with
//! producer-retry duplicates and a few bad records, runs the sink until it has drained, and
//! reports what happened.

use std::fmt;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::mocking::MockCluster;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Secret};
use crate::ingest::{RunSummary, Sink};
use crate::tools::produce::{self, ProduceOptions, ProduceSummary};

/// Default database for the demo when `AUDITFLOW_DATABASE_URL` is unset.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// How long the sink must see nothing new before the demo calls it drained.
const IDLE: Duration = Duration::from_secs(2);

/// What the demo did.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Which broker was used.
    pub broker: String,
    /// The producer's side.
    pub produced: ProduceSummary,
    /// The sink's side.
    pub sink: RunSummary,
    /// Sink throughput, from the first message received to the last batch committed.
    pub events_per_s: f64,
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "auditflow demo ({})", self.broker)?;
        writeln!(
            f,
            "  events in:           {:>9}  ({} distinct valid, {} producer-retry duplicates, {} invalid)",
            self.produced.total, self.produced.distinct_valid, self.produced.duplicates, self.produced.invalid
        )?;
        writeln!(f, "  rows stored:         {:>9}", self.sink.stored)?;
        writeln!(f, "  duplicates skipped:  {:>9}", self.sink.duplicates)?;
        writeln!(f, "  dead-lettered:       {:>9}", self.sink.dead_lettered)?;
        write!(
            f,
            "  sink throughput:     {:>9.0} events/s",
            self.events_per_s
        )
    }
}

/// Runs the demo with `count` distinct valid events.
pub async fn run(
    mut config: Config,
    count: u64,
    shutdown: CancellationToken,
) -> anyhow::Result<DemoReport> {
    // Keeps the mock cluster alive for the whole demo.
    let mut _mock = None;
    let broker = match config.kafka.kafka_brokers.clone() {
        Some(brokers) => brokers,
        None => {
            let cluster =
                MockCluster::new(1).context("starting the in-process mock Kafka cluster")?;
            cluster
                .create_topic(&config.kafka.kafka_topic, 4, 1)
                .context("creating the demo topic")?;
            cluster
                .create_topic(&config.kafka.dlq_topic, 1, 1)
                .context("creating the dead-letter topic")?;
            let brokers = cluster.bootstrap_servers();
            _mock = Some(cluster);
            config.kafka.kafka_brokers = Some(brokers.clone());
            brokers
        }
    };
    if config.database.database_url.is_none() {
        config.database.database_url = Some(Secret::new(DEFAULT_DATABASE_URL));
    }
    config.sink.metrics_addr = crate::config::METRICS_OFF.to_owned();
    let broker_label = if _mock.is_some() {
        format!("in-process mock Kafka cluster at {broker}")
    } else {
        format!("Kafka at {broker}")
    };

    let produced = produce::produce(
        &broker,
        &config,
        &ProduceOptions {
            count,
            duplicate_ratio: 0.05,
            invalid_ratio: 0.005,
            rate: None,
            seed: rand::random(),
        },
    )
    .await?;
    let sink = Sink::build(config).await?;
    let summary = sink.run_until_stopped(shutdown, Some(IDLE)).await?;
    let busy = summary.active_s.max(0.001);
    Ok(DemoReport {
        broker: broker_label,
        events_per_s: summary.consumed as f64 / busy,
        produced,
        sink: summary,
    })
}
