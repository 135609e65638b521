//! Kafka client settings shared by the consumer, the dead-letter producer and the load generator.

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::ClientConfig;

use crate::config::KafkaConfig;

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
