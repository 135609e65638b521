//! `auditflow produce`: writes generated audit traffic to the topic.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use serde::Serialize;
use tokio::time::Instant;

use crate::config::Config;
use crate::ingest::decode::embedded_schema;
use crate::ingest::decode::registry::SchemaRegistry;
use crate::kafka;
use crate::tools::generate::{EventGenerator, GeneratorConfig};

/// What to produce.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    /// Distinct valid events.
    pub count: u64,
    /// Producer-retry duplicates, relative to valid events.
    pub duplicate_ratio: f64,
    /// Invalid records, relative to valid events.
    pub invalid_ratio: f64,
    /// Records per second; `None` is as fast as the broker takes them.
    pub rate: Option<f64>,
    /// Random seed.
    pub seed: u64,
}

/// The JSON line `produce` ends with.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProduceSummary {
    /// Distinct valid events written.
    pub distinct_valid: u64,
    /// Exact re-sends of earlier valid events.
    pub duplicates: u64,
    /// Records that must end in the dead-letter topic.
    pub invalid: u64,
    /// All records written.
    pub total: u64,
    /// The topic.
    pub topic: String,
    /// The seed, to reproduce the stream.
    pub seed: u64,
    /// Wall time.
    pub elapsed_s: f64,
    /// With `--schema-registry`: the id the registry gave each schema version, as written.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub schema_ids: BTreeMap<u32, u32>,
}

/// Deliveries awaited at most at once; bounds memory while keeping the producer busy.
const MAX_IN_FLIGHT: usize = 20_000;

/// Writes the generated stream and waits until every record is acknowledged. Confluent headers
/// carry the schema file versions (1, 2), as `schemas/` maps them without a registry.
pub async fn produce(
    brokers: &str,
    config: &Config,
    options: &ProduceOptions,
) -> anyhow::Result<ProduceSummary> {
    produce_with_ids(brokers, config, options, BTreeMap::new()).await
}

/// Registers the writer schemas (v1, v2) under `<topic>-value` (TopicNameStrategy) and writes
/// the stream with the ids the registry gave them, as Confluent's serializers do.
pub async fn produce_registered(
    brokers: &str,
    config: &Config,
    options: &ProduceOptions,
    registry: &SchemaRegistry,
) -> anyhow::Result<ProduceSummary> {
    let subject = format!("{}-value", config.kafka.kafka_topic);
    let mut ids = BTreeMap::new();
    for version in [1, 2] {
        let schema = embedded_schema(version)
            .with_context(|| format!("schema v{version} is not embedded"))?;
        let id = registry
            .register(&subject, schema)
            .await
            .with_context(|| format!("registering schema v{version} under {subject}"))?;
        tracing::info!(subject, version, schema_id = id, "writer schema registered");
        ids.insert(version, id);
    }
    produce_with_ids(brokers, config, options, ids).await
}

async fn produce_with_ids(
    brokers: &str,
    config: &Config,
    options: &ProduceOptions,
    schema_ids: BTreeMap<u32, u32>,
) -> anyhow::Result<ProduceSummary> {
    for (name, ratio) in [
        ("--duplicate-ratio", options.duplicate_ratio),
        ("--invalid-ratio", options.invalid_ratio),
    ] {
        anyhow::ensure!(
            (0.0..=1.0).contains(&ratio),
            "{name} must be between 0 and 1, got {ratio}"
        );
    }
    if let Some(rate) = options.rate {
        anyhow::ensure!(rate > 0.0, "--rate must be positive, got {rate}");
    }
    let producer = kafka::producer(
        kafka::durable_producer_config(brokers, &config.kafka)
            .set("linger.ms", "20")
            .set("batch.num.messages", "10000")
            .set("compression.type", "lz4"),
        &config.kafka,
        "producer",
    )?;
    let topic = config.kafka.kafka_topic.as_str();
    let mut generator = EventGenerator::new(GeneratorConfig {
        count: options.count,
        duplicate_ratio: options.duplicate_ratio,
        invalid_ratio: options.invalid_ratio,
        seed: options.seed,
        now: Utc::now(),
    })
    .with_schema_ids(schema_ids.clone());
    let started = Instant::now();
    let interval = options.rate.map(|rate| Duration::from_secs_f64(1.0 / rate));
    let mut in_flight: VecDeque<DeliveryFuture> = VecDeque::new();
    let mut total: u64 = 0;
    for record in generator.by_ref() {
        if let Some(interval) = interval {
            tokio::time::sleep_until(started + interval.mul_f64(total as f64)).await;
        }
        let mut pending = FutureRecord::to(topic)
            .key(&record.key[..])
            .payload(&record.payload[..]);
        loop {
            match producer.send_result(pending) {
                Ok(delivery) => {
                    in_flight.push_back(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    pending = returned;
                    match in_flight.pop_front() {
                        Some(delivery) => await_delivery(delivery).await?,
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((err, _)) => return Err(err).context("producing"),
            }
        }
        total += 1;
        if in_flight.len() >= MAX_IN_FLIGHT {
            if let Some(delivery) = in_flight.pop_front() {
                await_delivery(delivery).await?;
            }
        }
    }
    for delivery in in_flight {
        await_delivery(delivery).await?;
    }
    let stats = generator.stats();
    Ok(ProduceSummary {
        distinct_valid: stats.valid,
        duplicates: stats.duplicates,
        invalid: stats.invalid,
        total,
        topic: topic.to_owned(),
        seed: options.seed,
        elapsed_s: started.elapsed().as_secs_f64(),
        schema_ids,
    })
}

async fn await_delivery(delivery: DeliveryFuture) -> anyhow::Result<()> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((err, _))) => Err(err).context("record not acknowledged"),
        Err(_) => anyhow::bail!("producer dropped a delivery"),
    }
}
