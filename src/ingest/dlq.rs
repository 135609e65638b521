//! The dead-letter topic: records that cannot be stored, with the reason.
//!
//! A dead-lettered record keeps the source message's key, value and headers byte for byte and adds
//! `auditflow.*` headers saying why and where it came from (the contract is in the README). The
//! source offset counts as done only once the dead-letter producer has acknowledged the record
//! (`acks=all`, idempotent); until then the record is retried, never dropped.
//!
//! Errors are classified ([`DlqError::retry`]): the broker being away or slow is retried; a dead
//! letter the topic can never take (larger than its `max.message.bytes` once the headers are
//! added, an invalid record) is replaced by a small one without the key, payload and original
//! headers ([`DeadLetter::without_payload`]) that keeps the source coordinates and the reason, so
//! the source offset moves on and the record can still be read from the source topic. A refusal
//! of the topic itself (authorization) is a configuration fault: retried with backoff, logged at
//! error level once per interval, never dropped.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use crate::breaker::{Breaker, BreakerError};
use crate::kafka;
use crate::telemetry::Throttle;

/// Header names of the dead-letter contract.
pub mod header {
    /// Why: `decode`, `schema`, `validation`, `out_of_window`, `constraint`, ...
    pub const ERROR_CLASS: &str = "auditflow.error.class";
    /// The error in words.
    pub const ERROR_MESSAGE: &str = "auditflow.error.message";
    /// The PostgreSQL SQLSTATE, when the database refused the record.
    pub const ERROR_SQLSTATE: &str = "auditflow.error.sqlstate";
    /// Source topic.
    pub const SOURCE_TOPIC: &str = "auditflow.source.topic";
    /// Source partition.
    pub const SOURCE_PARTITION: &str = "auditflow.source.partition";
    /// Source offset.
    pub const SOURCE_OFFSET: &str = "auditflow.source.offset";
    /// Source message timestamp, milliseconds since the epoch.
    pub const SOURCE_TIMESTAMP: &str = "auditflow.source.timestamp";
    /// When it failed, RFC 3339 UTC.
    pub const FAILED_AT: &str = "auditflow.failed_at";
    /// How many times this record has been dead-lettered (replay increments it).
    pub const ATTEMPT: &str = "auditflow.attempt";
    /// The instance id of the replica that dead-lettered it.
    pub const CONSUMER: &str = "auditflow.consumer";
    /// The auditflow version that dead-lettered it.
    pub const VERSION: &str = "auditflow.version";
    /// Set on a dead letter that could not carry its record (too large for the topic): the
    /// record's size in bytes (key, value and headers) and why it was left out. Key, value and
    /// the source's headers are absent; read the record from the source coordinates.
    pub const PAYLOAD_OMITTED: &str = "auditflow.payload.omitted";
    /// The prefix of every header auditflow adds.
    pub const PREFIX: &str = "auditflow.";
}

/// A source message as received, kept whole so it can be dead-lettered unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRecord {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Message timestamp in milliseconds, if the broker gave one.
    pub timestamp_ms: Option<i64>,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Value bytes.
    pub payload: Option<Vec<u8>>,
    /// Headers in their original order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl SourceRecord {
    /// The value of the last header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| value.as_deref())
    }

    /// The `auditflow.attempt` the record arrived with (set by replay), or 0.
    pub fn attempt(&self) -> u32 {
        self.header(header::ATTEMPT)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// Why a record could not be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The error class header value.
    pub class: String,
    /// The error in words.
    pub message: String,
    /// SQLSTATE, for database refusals.
    pub sqlstate: Option<String>,
}

/// A record on its way to the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The source message.
    pub source: SourceRecord,
    /// Why.
    pub failure: Failure,
    /// When.
    pub failed_at: DateTime<Utc>,
    /// Set when the record itself is left out: its size and why (see
    /// [`header::PAYLOAD_OMITTED`]).
    pub omitted: Option<String>,
}

impl DeadLetter {
    /// A dead letter for `source`, failed now for `failure`.
    pub fn new(source: SourceRecord, failure: Failure) -> Self {
        DeadLetter {
            source,
            failure,
            failed_at: Utc::now(),
            omitted: None,
        }
    }

    /// The same dead letter without the record's key, value and headers, for a topic that cannot
    /// take the whole of it: the source coordinates, the reason and the record's size remain.
    pub fn without_payload(&self, why: &str) -> Self {
        let size = self.source.key.as_ref().map_or(0, Vec::len)
            + self.source.payload.as_ref().map_or(0, Vec::len)
            + self
                .source
                .headers
                .iter()
                .map(|(key, value)| key.len() + value.as_ref().map_or(0, Vec::len))
                .sum::<usize>();
        DeadLetter {
            source: SourceRecord {
                key: None,
                payload: None,
                headers: Vec::new(),
                ..self.source.clone()
            },
            failure: self.failure.clone(),
            failed_at: self.failed_at,
            omitted: Some(format!("{size} bytes: {why}")),
        }
    }

    /// The headers of the dead-letter record: the source's own ones (auditflow's headers from an
    /// earlier round are replaced, everything else is kept byte for byte) followed by the
    /// contract headers.
    pub fn headers(&self, consumer: &str) -> Vec<(String, Option<Vec<u8>>)> {
        let mut headers: Vec<(String, Option<Vec<u8>>)> = self
            .source
            .headers
            .iter()
            .filter(|(key, _)| !key.starts_with(header::PREFIX))
            .cloned()
            .collect();
        let mut add =
            |key: &str, value: String| headers.push((key.to_owned(), Some(value.into_bytes())));
        add(header::ERROR_CLASS, self.failure.class.clone());
        add(header::ERROR_MESSAGE, self.failure.message.clone());
        if let Some(sqlstate) = &self.failure.sqlstate {
            add(header::ERROR_SQLSTATE, sqlstate.clone());
        }
        add(header::SOURCE_TOPIC, self.source.topic.clone());
        add(header::SOURCE_PARTITION, self.source.partition.to_string());
        add(header::SOURCE_OFFSET, self.source.offset.to_string());
        if let Some(ts) = self.source.timestamp_ms {
            add(header::SOURCE_TIMESTAMP, ts.to_string());
        }
        add(
            header::FAILED_AT,
            self.failed_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        );
        add(header::ATTEMPT, self.source.attempt().max(1).to_string());
        add(header::CONSUMER, consumer.to_owned());
        add(header::VERSION, env!("CARGO_PKG_VERSION").to_owned());
        if let Some(omitted) = &self.omitted {
            add(header::PAYLOAD_OMITTED, omitted.clone());
        }
        headers
    }
}

/// Errors from the dead-letter producer.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The broker did not acknowledge the record before shutdown.
    #[error("dead-letter produce failed: {0}")]
    Produce(#[from] rdkafka::error::KafkaError),
    /// The dead-letter breaker is open; the record was not sent.
    #[error("dead-letter topic unavailable: {0}")]
    Unavailable(String),
    /// Shutdown interrupted the retries; the source offset stays uncommitted.
    #[error("dead-letter produce interrupted by shutdown")]
    Interrupted,
}

/// Publishes dead letters and waits for their acknowledgement.
#[derive(Clone)]
pub struct DlqProducer {
    producer: kafka::Producer,
    topic: String,
    consumer_id: String,
    breaker: Arc<Breaker>,
    transient_fault: Arc<Throttle>,
    configuration_fault: Arc<Throttle>,
}

/// What a dead-letter failure says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The broker is away, slow or busy: send the same record again later.
    Transient,
    /// This record can never be taken by the topic (too large, invalid): send a smaller one.
    Permanent,
    /// The topic or cluster refuses this producer (authorization): an operator must act.
    /// Retried like a transient failure, reported loudly.
    Configuration,
}

impl DlqError {
    /// Classifies the failure from the broker's or librdkafka's error code, never its text.
    pub fn retry(&self) -> Retry {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode as Code};
        let code = match self {
            DlqError::Produce(KafkaError::MessageProduction(code)) => *code,
            DlqError::Produce(_) | DlqError::Unavailable(_) | DlqError::Interrupted => {
                return Retry::Transient
            }
        };
        match code {
            Code::MessageSizeTooLarge
            | Code::InvalidRecord
            | Code::InvalidMessage
            | Code::InvalidMessageSize
            | Code::MessageBatchTooLarge => Retry::Permanent,
            Code::TopicAuthorizationFailed
            | Code::ClusterAuthorizationFailed
            | Code::SaslAuthenticationFailed
            | Code::Authentication
            | Code::InvalidTopic => Retry::Configuration,
            _ => Retry::Transient,
        }
    }
}

impl DlqProducer {
    /// Wraps a producer created with [`crate::kafka::durable_producer_config`].
    pub fn new(
        producer: kafka::Producer,
        topic: impl Into<String>,
        consumer_id: impl Into<String>,
        breaker: Arc<Breaker>,
    ) -> Self {
        DlqProducer {
            producer,
            topic: topic.into(),
            consumer_id: consumer_id.into(),
            breaker,
            transient_fault: Arc::default(),
            configuration_fault: Arc::default(),
        }
    }

    /// The dead-letter producer's circuit breaker.
    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }

    /// The dead-letter topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Sends one dead letter and waits for the acknowledgement.
    pub async fn send_once(&self, letter: &DeadLetter) -> Result<(), DlqError> {
        let mut headers = OwnedHeaders::new();
        for (key, value) in letter.headers(&self.consumer_id) {
            headers = headers.insert(Header {
                key: &key,
                value: value.as_deref(),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = &letter.source.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = &letter.source.payload {
            record = record.payload(payload.as_slice());
        }
        self.producer
            .send(record, Timeout::After(Duration::from_secs(5)))
            .await
            .map(|_| ())
            .map_err(|(err, _)| DlqError::Produce(err))
    }

    /// Sends one dead letter and waits until it is acknowledged, or `cancel` fires. Never drops
    /// the record: on cancellation the caller must not store the source offset. Transient and
    /// configuration failures are retried with jittered backoff; a letter the topic can never take
    /// is replaced by [`DeadLetter::without_payload`], which is retried until acknowledged.
    pub async fn deliver(
        &self,
        letter: &DeadLetter,
        cancel: &CancellationToken,
    ) -> Result<(), DlqError> {
        match self.deliver_retrying(letter, cancel).await {
            Err(err) if err.retry() == Retry::Permanent => {
                tracing::warn!(
                    error = %err, topic = %self.topic, partition = letter.source.partition,
                    offset = letter.source.offset,
                    "the dead-letter topic cannot take this record; dead-lettering it without its payload"
                );
                metrics::counter!("auditflow_dlq_payload_omitted_total").increment(1);
                let small = letter.without_payload(&err.to_string());
                self.deliver_retrying(&small, cancel).await
            }
            other => other,
        }
    }

    /// Sends `letter` until it is acknowledged; returns early only on cancellation or, for a
    /// letter that still carries its record, a permanent failure.
    async fn deliver_retrying(
        &self,
        letter: &DeadLetter,
        cancel: &CancellationToken,
    ) -> Result<(), DlqError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .without_max_times();
        // Only failures that are the broker's count against the breaker.
        let is_failure = |err: &DlqError| err.retry() != Retry::Permanent;
        let attempt = || async {
            self.breaker
                .call(self.send_once(letter), is_failure)
                .await
                .map_err(|err| match err {
                    BreakerError::Inner(err) => err,
                    other => DlqError::Unavailable(other.to_string()),
                })
        };
        // The small letter has nothing left to shed: whatever it meets is retried.
        let can_shrink = letter.omitted.is_none();
        tokio::select! {
            result = attempt
                .retry(backoff)
                .when(|err: &DlqError| !(can_shrink && err.retry() == Retry::Permanent))
                .notify(|err, wait| {
                    metrics::counter!("auditflow_dlq_produce_retries_total").increment(1);
                    if err.retry() == Retry::Configuration {
                        self.configuration_fault.record(|repeated| tracing::error!(
                            error = %err, topic = %self.topic, repeated,
                            "the dead-letter topic refuses this producer; fix its permissions (retrying, nothing is dropped)"
                        ));
                    } else {
                        self.transient_fault.record(|repeated| tracing::warn!(
                            error = %err, retry_in = ?wait, topic = %self.topic, repeated,
                            "dead-letter produce failed; retrying"
                        ));
                    }
                }) => result,
            _ = cancel.cancelled() => Err(DlqError::Interrupted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> SourceRecord {
        SourceRecord {
            topic: "audit-events".into(),
            partition: 3,
            offset: 42,
            timestamp_ms: Some(1_700_000_000_000),
            key: Some(b"tenant-1".to_vec()),
            payload: Some(vec![0, 1, 2]),
            headers: vec![
                ("traceparent".into(), Some(b"00-abc".to_vec())),
                ("empty".into(), None),
                (header::ATTEMPT.into(), Some(b"2".to_vec())),
                (header::ERROR_CLASS.into(), Some(b"old".to_vec())),
            ],
        }
    }

    #[test]
    fn headers_keep_the_originals_and_say_why() {
        let letter = DeadLetter {
            source: source(),
            failure: Failure {
                class: "constraint".into(),
                message: "value too long".into(),
                sqlstate: Some("22001".into()),
            },
            failed_at: DateTime::from_timestamp(1_700_000_001, 0).unwrap(),
            omitted: None,
        };
        let headers = letter.headers("replica-1");
        let get = |name: &str| {
            headers
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.clone().map(|v| String::from_utf8(v).unwrap()))
                .collect::<Vec<_>>()
        };
        assert_eq!(headers[0], ("traceparent".into(), Some(b"00-abc".to_vec())));
        assert_eq!(headers[1], ("empty".into(), None));
        assert_eq!(
            get(header::ERROR_CLASS),
            vec![Some("constraint".into())],
            "old class replaced"
        );
        assert_eq!(get(header::ERROR_SQLSTATE), vec![Some("22001".into())]);
        assert_eq!(get(header::SOURCE_TOPIC), vec![Some("audit-events".into())]);
        assert_eq!(get(header::SOURCE_PARTITION), vec![Some("3".into())]);
        assert_eq!(get(header::SOURCE_OFFSET), vec![Some("42".into())]);
        assert_eq!(
            get(header::SOURCE_TIMESTAMP),
            vec![Some("1700000000000".into())]
        );
        assert_eq!(
            get(header::FAILED_AT),
            vec![Some("2023-11-14T22:13:21.000Z".into())]
        );
        assert_eq!(
            get(header::ATTEMPT),
            vec![Some("2".into())],
            "replayed attempt carried"
        );
        assert_eq!(get(header::CONSUMER), vec![Some("replica-1".into())]);
    }

    #[test]
    fn a_first_failure_is_attempt_one() {
        let mut record = source();
        record.headers.clear();
        assert_eq!(record.attempt(), 0);
        let letter = DeadLetter {
            source: record,
            failure: Failure {
                class: "decode".into(),
                message: "bad magic byte".into(),
                sqlstate: None,
            },
            failed_at: Utc::now(),
            omitted: None,
        };
        let headers = letter.headers("r");
        assert!(headers.contains(&(header::ATTEMPT.into(), Some(b"1".to_vec()))));
        assert!(!headers.iter().any(|(k, _)| k == header::ERROR_SQLSTATE));
    }
}
