//! Where one dead letter goes: back to its source (attempts left), to the parking topic (out of
//! attempts), or nowhere (filtered out); and the headers it is republished with.

use chrono::{DateTime, Utc};

use crate::ingest::dlq::{header, SourceRecord};

use super::ReplayOptions;

/// The `auditflow.*` headers of a dead-letter record, read leniently: a missing or unreadable
/// header is `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterHeaders {
    /// `auditflow.error.class`.
    pub error_class: Option<String>,
    /// `auditflow.error.message`.
    pub error_message: Option<String>,
    /// `auditflow.failed_at`.
    pub failed_at: Option<DateTime<Utc>>,
    /// `auditflow.source.topic`.
    pub source_topic: Option<String>,
    /// `auditflow.source.partition`.
    pub source_partition: Option<i32>,
    /// `auditflow.source.offset`.
    pub source_offset: Option<i64>,
    /// `auditflow.attempt`.
    pub attempt: Option<u32>,
    /// `auditflow.payload.omitted`: the letter does not carry its record.
    pub payload_omitted: Option<String>,
}

impl DeadLetterHeaders {
    /// Reads the contract headers of a dead-letter record (the last value of each wins).
    pub fn from_record(record: &SourceRecord) -> Self {
        let text = |name: &str| {
            record
                .header(name)
                .and_then(|value| std::str::from_utf8(value).ok())
                .map(str::trim)
        };
        DeadLetterHeaders {
            error_class: text(header::ERROR_CLASS).map(str::to_owned),
            error_message: text(header::ERROR_MESSAGE).map(str::to_owned),
            failed_at: text(header::FAILED_AT)
                .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
                .map(|at| at.with_timezone(&Utc)),
            source_topic: text(header::SOURCE_TOPIC)
                .filter(|topic| !topic.is_empty())
                .map(str::to_owned),
            source_partition: text(header::SOURCE_PARTITION).and_then(|p| p.parse().ok()),
            source_offset: text(header::SOURCE_OFFSET).and_then(|o| o.parse().ok()),
            attempt: text(header::ATTEMPT).and_then(|a| a.parse().ok()),
            payload_omitted: text(header::PAYLOAD_OMITTED).map(str::to_owned),
        }
    }

    /// The attempt this dead letter records; a record without a readable one counts as a first
    /// failure (attempt 1).
    pub fn attempt_or_first(&self) -> u32 {
        self.attempt.unwrap_or(1).max(1)
    }
}

/// True when a dead letter at `attempt` has used up its replays: attempt 1 is the first failure
/// (never replayed), so it has been replayed `attempt - 1` times.
pub fn out_of_attempts(attempt: u32, max_attempts: u32) -> bool {
    attempt.saturating_sub(1) >= max_attempts
}

/// Why a matching record goes to the parking topic rather than back to its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkReason {
    /// It has been replayed `--max-attempts` times and failed every time.
    OutOfAttempts,
    /// It names no source topic and no `--to-topic` was given.
    NoSourceTopic,
    /// It does not carry its record (too large for the dead-letter topic): there is nothing to
    /// republish; the record is in the source topic at the letter's coordinates.
    PayloadOmitted,
}

/// What the replay does with one dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// It does not match the filters: its offset is committed, nothing is written.
    Skip,
    /// Re-publish to `topic` with `auditflow.attempt` = `attempt`.
    Republish {
        /// The source topic or `--to-topic`.
        topic: String,
        /// The dead letter's attempt + 1.
        attempt: u32,
    },
    /// Copy it unchanged to the parking topic.
    Park(ParkReason),
}

/// Decides what happens to a dead letter under `options` (dry runs route too; they just do not
/// write).
pub fn route(letter: &DeadLetterHeaders, options: &ReplayOptions) -> Route {
    if !options.filter.matches(letter) {
        return Route::Skip;
    }
    if letter.payload_omitted.is_some() {
        return Route::Park(ParkReason::PayloadOmitted);
    }
    let attempt = letter.attempt_or_first();
    if out_of_attempts(attempt, options.max_attempts) {
        return Route::Park(ParkReason::OutOfAttempts);
    }
    match options.to_topic.as_ref().or(letter.source_topic.as_ref()) {
        Some(topic) => Route::Republish {
            topic: topic.clone(),
            attempt: attempt.saturating_add(1),
        },
        None => Route::Park(ParkReason::NoSourceTopic),
    }
}

/// The headers of a re-published record: the original producer's headers in their order (every
/// header not starting with `auditflow.`), then `auditflow.attempt`.
pub fn republish_headers(
    headers: &[(String, Option<Vec<u8>>)],
    attempt: u32,
) -> Vec<(String, Option<Vec<u8>>)> {
    headers
        .iter()
        .filter(|(key, _)| !key.starts_with(header::PREFIX))
        .cloned()
        .chain(std::iter::once((
            header::ATTEMPT.to_owned(),
            Some(attempt.to_string().into_bytes()),
        )))
        .collect()
}
