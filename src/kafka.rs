//! Kafka client settings shared by the consumer, the dead-letter producer and the load generator.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientConfig, ClientContext};

use crate::config::KafkaConfig;
use crate::telemetry::Throttle;

/// A client configuration for `brokers` carrying the operator's pass-through properties
/// (`AUDITFLOW_KAFKA_OPT_*`). Never `Debug`-print the result: it may hold `sasl.password`.
pub fn client_config(brokers: &str, kafka: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("client.id", "auditflow")
        .set_log_level(RDKafkaLogLevel::Warning);
    for (name, value) in &kafka.properties {
        config.set(name, value.expose());
    }
    config
}

/// Settings for a producer whose acknowledgement means the record is durable.
pub fn durable_producer_config(brokers: &str, kafka: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000");
    // The operator's properties win over our defaults, except what durability depends on;
    // consumer-only properties are left out so librdkafka does not warn about them.
    for (name, value) in client_config(brokers, kafka).config_map() {
        if name != "enable.idempotence" && name != "acks" && !is_consumer_only(name) {
            config.set(name, value);
        }
    }
    config.set_log_level(RDKafkaLogLevel::Warning);
    config
}

/// Consumer properties librdkafka warns about when given to a producer.
fn is_consumer_only(name: &str) -> bool {
    const CONSUMER_ONLY: &[&str] = &[
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "max.poll.interval.ms",
        "auto.offset.reset",
        "partition.assignment.strategy",
        "isolation.level",
        "group.instance.id",
        "group.protocol",
        "group.remote.assignor",
        "enable.partition.eof",
        "check.crcs",
    ];
    CONSUMER_ONLY.contains(&name)
        || name.starts_with("fetch.")
        || name.starts_with("queued.")
        || name.starts_with("auto.commit")
        || name.starts_with("coordinator.")
}

/// librdkafka's own log lines and global errors, rate limited per kind (a broker that stays down
/// is one line per [`LOG_EVERY`](crate::telemetry::LOG_EVERY), with the number of repeats) and
/// with the operator's property values redacted, since librdkafka may quote them.
#[derive(Debug)]
pub struct ClientLog {
    secrets: Vec<String>,
    throttles: Mutex<HashMap<String, Arc<Throttle>>>,
}

impl ClientLog {
    /// A log for clients configured from `kafka`.
    pub fn new(kafka: &KafkaConfig) -> Self {
        ClientLog {
            secrets: kafka
                .properties
                .values()
                .map(|value| value.expose().to_owned())
                .filter(|value| value.len() >= 4)
                .collect(),
            throttles: Mutex::new(HashMap::new()),
        }
    }

    /// `text` with every property value replaced by `[redacted]`.
    pub fn redact(&self, text: &str) -> String {
        self.secrets.iter().fold(text.to_owned(), |text, secret| {
            text.replace(secret.as_str(), "[redacted]")
        })
    }

    fn throttle(&self, kind: &str) -> Arc<Throttle> {
        Arc::clone(self.throttles.lock().entry(kind.to_owned()).or_default())
    }

    /// Logs one librdkafka log line.
    pub fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.throttle(fac).record(|repeated| {
            let message = self.redact(message);
            match level {
                RDKafkaLogLevel::Emerg
                | RDKafkaLogLevel::Alert
                | RDKafkaLogLevel::Critical
                | RDKafkaLogLevel::Error => {
                    tracing::error!(target: "librdkafka", fac, repeated, "{message}")
                }
                RDKafkaLogLevel::Warning => {
                    tracing::warn!(target: "librdkafka", fac, repeated, "{message}")
                }
                RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                    tracing::info!(target: "librdkafka", fac, repeated, "{message}")
                }
                RDKafkaLogLevel::Debug => {
                    tracing::debug!(target: "librdkafka", fac, repeated, "{message}")
                }
            }
        });
    }

    /// Logs one librdkafka global error (brokers down, authentication failed, ...).
    pub fn error(&self, error: &KafkaError, reason: &str) {
        let kind = error
            .rdkafka_error_code()
            .map_or_else(|| "other".to_owned(), |code| format!("{code:?}"));
        self.throttle(&kind).record(|repeated| {
            tracing::error!(
                target: "librdkafka",
                error = %self.redact(&error.to_string()),
                reason = %self.redact(reason),
                repeated,
                "kafka client error"
            )
        });
    }

    /// A client creation failure, redacted, with `what` the client was for.
    pub fn creation_error(&self, err: KafkaError, what: &str) -> anyhow::Error {
        anyhow::anyhow!("creating the {what}: {}", self.redact(&err.to_string()))
    }
}

/// The context of auditflow's producers and of consumers without rebalance hooks: librdkafka's
/// logs go through a [`ClientLog`].
#[derive(Debug)]
pub struct QuietContext {
    log: ClientLog,
}

impl QuietContext {
    /// A context for clients configured from `kafka`.
    pub fn new(kafka: &KafkaConfig) -> Self {
        QuietContext {
            log: ClientLog::new(kafka),
        }
    }
}

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.log.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(&error, reason);
    }
}

impl ConsumerContext for QuietContext {}

/// A producer whose acknowledgement means durable, logging through a [`ClientLog`].
pub type Producer = FutureProducer<QuietContext>;

/// Creates a [`Producer`] from `config` (built by [`durable_producer_config`]); a failure is
/// reported without any property value.
pub fn producer(
    config: &ClientConfig,
    kafka: &KafkaConfig,
    what: &str,
) -> anyhow::Result<Producer> {
    let context = QuietContext::new(kafka);
    let log = ClientLog::new(kafka);
    config
        .create_with_context(context)
        .map_err(|err| log.creation_error(err, what))
}

/// Creates a consumer with a [`QuietContext`] from `config`; a failure is reported without any
/// property value.
pub fn consumer<T>(config: &ClientConfig, kafka: &KafkaConfig, what: &str) -> anyhow::Result<T>
where
    T: FromClientConfigAndContext<QuietContext>,
{
    let log = ClientLog::new(kafka);
    config
        .create_with_context(QuietContext::new(kafka))
        .map_err(|err| log.creation_error(err, what))
}
