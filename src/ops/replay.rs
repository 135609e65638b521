//! `auditflow replay`: redrives dead-lettered records once their cause is fixed.
//!
//! ```text
//!  dead-letter topic ──▶ filter ──▶ attempts left? ──yes──▶ source topic (or --to-topic)
//!  (own consumer group,    │              │                  key, value, original headers,
//!   manual assignment)     │              no                 auditflow.attempt = attempt + 1
//!                          │              └──────────────▶ parking topic (record unchanged)
//!                          └─ no match: skipped
//!  acknowledged by the producer ──▶ offsets committed (synchronously) ──▶ resumable
//! ```
//!
//! The replay reads the dead-letter topic as it was when the replay started: the high watermark
//! of every partition is taken at start ([`EndOfDlq`]), and a partition is finished once its
//! position reaches that watermark (or the broker reports the end of the partition, which can only
//! be at or past it). Dead letters that arrive during the replay are left for the next one.
//!
//! Progress is kept in a consumer group of the replay's own (see [`ReplayOptions::group_id`]):
//! by default the group name carries a hash of the selection (filters) and the destinations, so
//! re-running the same command resumes where the previous run stopped and a different selection
//! starts from the beginning of the topic. The consumer is assigned the partitions directly
//! (no group membership, no rebalances); the group only stores offsets. An offset is committed
//! only when the record it covers and every record before it in the replay's read order is
//! acknowledged by the target (`acks=all`, idempotent producer) or was skipped by the filters.
//! A crash therefore re-publishes at most the records that were in flight; the sink stores them
//! once (deduplication by event id and time).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io::IsTerminal as _;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::FutureExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::breaker::{Breaker, BreakerError};
use crate::config::Config;
use crate::ingest::dlq::{header, SourceRecord};
use crate::kafka;

/// How many times a record may be replayed before it is parked, unless `--max-attempts` says.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// The parking topic is the dead-letter topic with this suffix, unless `--parking-topic` says.
pub const PARKING_SUFFIX: &str = ".parking";

/// How many of the most common error messages a dry run reports.
pub const TOP_MESSAGES: usize = 10;

/// Records sent and not yet acknowledged, at most; bounds memory and the work a crash repeats.
const MAX_IN_FLIGHT: usize = 1_000;

/// How often acknowledged progress is committed.
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// How often a progress line is logged when stderr is not a terminal.
const PROGRESS_LINE_INTERVAL: Duration = Duration::from_secs(2);

/// Bound on each metadata, watermark and committed-offset request at start.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// What a dry run calls a record without an error class or message header.
const MISSING: &str = "(none)";

/// A command-line value or an option combination that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayArgError {
    /// `--source-offsets` is not `FROM..TO`.
    #[error("invalid offset range {0:?}: expected FROM..TO (inclusive, non-negative, FROM <= TO)")]
    OffsetRange(String),
    /// `--since` / `--until` is not an RFC 3339 time.
    #[error("invalid time {input:?}: expected RFC 3339, e.g. 2024-05-01T12:00:00Z ({reason})")]
    Time {
        /// What was given.
        input: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The options contradict each other or name an unusable value.
    #[error("{0}")]
    Options(String),
}

/// An inclusive range of source offsets, written `FROM..TO` (`FROM..` and `..TO` leave one end
/// open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OffsetRange {
    /// First offset selected.
    pub from: i64,
    /// Last offset selected.
    pub to: i64,
}

impl OffsetRange {
    /// True when `offset` lies in the range, ends included.
    pub fn contains(&self, offset: i64) -> bool {
        (self.from..=self.to).contains(&offset)
    }
}

impl FromStr for OffsetRange {
    type Err = ReplayArgError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let invalid = || ReplayArgError::OffsetRange(input.to_owned());
        let (from, to) = input.trim().split_once("..").ok_or_else(invalid)?;
        let bound = |text: &str, open: i64| -> Result<i64, ReplayArgError> {
            let text = text.trim();
            if text.is_empty() {
                return Ok(open);
            }
            match text.parse::<i64>() {
                Ok(value) if value >= 0 => Ok(value),
                _ => Err(invalid()),
            }
        };
        if from.trim().is_empty() && to.trim().is_empty() {
            return Err(invalid());
        }
        let range = OffsetRange {
            from: bound(from, 0)?,
            to: bound(to, i64::MAX)?,
        };
        if range.from > range.to {
            return Err(invalid());
        }
        Ok(range)
    }
}

/// Parses a `--since` / `--until` value: RFC 3339 with an offset, normalised to UTC.
pub fn parse_time(input: &str) -> Result<DateTime<Utc>, ReplayArgError> {
    DateTime::parse_from_rfc3339(input.trim())
        .map(|time| time.with_timezone(&Utc))
        .map_err(|err| ReplayArgError::Time {
            input: input.to_owned(),
            reason: err.to_string(),
        })
}

/// Which dead letters a replay selects; every set criterion must hold (AND). The defaults select
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayFilter {
    /// `--error-class`: any of these `auditflow.error.class` values; empty selects every class.
    pub error_classes: Vec<String>,
    /// `--since`: failed at or after this time (`auditflow.failed_at`).
    pub since: Option<DateTime<Utc>>,
    /// `--until`: failed before this time (exclusive).
    pub until: Option<DateTime<Utc>>,
    /// `--source-partition`: came from this partition of the source topic.
    pub source_partition: Option<i32>,
    /// `--source-offsets`: came from a source offset in this range.
    pub source_offsets: Option<OffsetRange>,
}

impl ReplayFilter {
    /// True when the dead letter satisfies every criterion. A record lacking a header that a
    /// criterion needs does not match it (a time filter never selects a record without a
    /// readable `auditflow.failed_at`).
    pub fn matches(&self, letter: &DeadLetterHeaders) -> bool {
        let class_ok = self.error_classes.is_empty()
            || letter
                .error_class
                .as_deref()
                .is_some_and(|class| self.error_classes.iter().any(|wanted| wanted == class));
        let since_ok = self
            .since
            .is_none_or(|since| letter.failed_at.is_some_and(|at| at >= since));
        let until_ok = self
            .until
            .is_none_or(|until| letter.failed_at.is_some_and(|at| at < until));
        let partition_ok = self
            .source_partition
            .is_none_or(|wanted| letter.source_partition == Some(wanted));
        let offsets_ok = self.source_offsets.is_none_or(|range| {
            letter
                .source_offset
                .is_some_and(|offset| range.contains(offset))
        });
        class_ok && since_ok && until_ok && partition_ok && offsets_ok
    }
}

/// Everything `auditflow replay` can be told.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayOptions {
    /// Which dead letters to handle; the others are skipped (and their offsets committed).
    pub filter: ReplayFilter,
    /// `--max`: stop after this many matching records.
    pub max: Option<u64>,
    /// `--dry-run`: read and report, write and commit nothing.
    pub dry_run: bool,
    /// `--to-topic`: re-publish here instead of each record's source topic.
    pub to_topic: Option<String>,
    /// `--rate`: at most this many records written per second.
    pub rate: Option<f64>,
    /// `--max-attempts`: a record already replayed this many times is parked instead.
    pub max_attempts: u32,
    /// `--parking-topic`: where records out of attempts go; default `<dlq topic>.parking`.
    pub parking_topic: Option<String>,
    /// `--group`: the consumer group that keeps the replay's progress; default
    /// [`ReplayOptions::default_group_id`].
    pub group: Option<String>,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            filter: ReplayFilter::default(),
            max: None,
            dry_run: false,
            to_topic: None,
            rate: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            parking_topic: None,
            group: None,
        }
    }
}

impl ReplayOptions {
    /// The parking topic for dead-letter topic `dlq_topic`.
    pub fn parking_topic(&self, dlq_topic: &str) -> String {
        self.parking_topic
            .clone()
            .unwrap_or_else(|| format!("{dlq_topic}{PARKING_SUFFIX}"))
    }

    /// The consumer group keeping this replay's progress: `--group`, or
    /// [`ReplayOptions::default_group_id`].
    pub fn group_id(&self, dlq_topic: &str) -> String {
        self.group
            .clone()
            .unwrap_or_else(|| self.default_group_id(dlq_topic))
    }

    /// `auditflow-replay-<dlq topic>-<hash8>`, where the hash covers the filters and the
    /// destinations (`--to-topic`, the parking topic), so the same selection resumes and a
    /// different one starts fresh. `--max`, `--rate`, `--max-attempts` and `--dry-run` are left
    /// out: they change how far or how fast a replay goes, not what it selects, so `--max 10`
    /// followed by the same command without `--max` continues, and a dry run reads from where
    /// the real run stands.
    pub fn default_group_id(&self, dlq_topic: &str) -> String {
        #[derive(Serialize)]
        struct Selection<'a> {
            dlq_topic: &'a str,
            error_classes: Vec<&'a str>,
            since: Option<String>,
            until: Option<String>,
            source_partition: Option<i32>,
            source_offsets: Option<OffsetRange>,
            to_topic: Option<&'a str>,
            parking_topic: String,
        }
        let mut error_classes: Vec<&str> = self
            .filter
            .error_classes
            .iter()
            .map(String::as_str)
            .collect();
        error_classes.sort_unstable();
        error_classes.dedup();
        let time = |at: &DateTime<Utc>| at.to_rfc3339_opts(SecondsFormat::AutoSi, true);
        let selection = Selection {
            dlq_topic,
            error_classes,
            since: self.filter.since.as_ref().map(time),
            until: self.filter.until.as_ref().map(time),
            source_partition: self.filter.source_partition,
            source_offsets: self.filter.source_offsets,
            to_topic: self.to_topic.as_deref(),
            parking_topic: self.parking_topic(dlq_topic),
        };
        // Field order is fixed by the struct, so the JSON text (and the hash) is stable across
        // runs and builds, unlike std's randomly seeded hasher.
        let canonical = serde_json::to_string(&selection).unwrap_or_default();
        let digest = Sha256::digest(canonical.as_bytes());
        let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        format!("auditflow-replay-{dlq_topic}-{hash}")
    }

    /// Checks what clap cannot: positive limits, a time range that is not empty, destinations
    /// that are not the dead-letter topic itself.
    pub fn validate(&self, dlq_topic: &str) -> Result<(), ReplayArgError> {
        let invalid = |message: String| Err(ReplayArgError::Options(message));
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return invalid(format!("--rate must be a positive number, got {rate}"));
            }
        }
        if self.max == Some(0) {
            return invalid("--max must be at least 1".into());
        }
        if let (Some(since), Some(until)) = (self.filter.since, self.filter.until) {
            if since >= until {
                return invalid(format!(
                    "--since ({since}) must be before --until ({until})"
                ));
            }
        }
        if self
            .filter
            .error_classes
            .iter()
            .any(|c| c.trim().is_empty())
        {
            return invalid("--error-class must not be empty".into());
        }
        for (option, topic) in [
            ("--to-topic", self.to_topic.as_deref()),
            ("--parking-topic", self.parking_topic.as_deref()),
            ("--group", self.group.as_deref()),
        ] {
            if topic.is_some_and(|t| t.trim().is_empty()) {
                return invalid(format!("{option} must not be empty"));
            }
        }
        if self.to_topic.as_deref() == Some(dlq_topic) {
            return invalid("--to-topic must differ from the dead-letter topic".into());
        }
        if self.parking_topic(dlq_topic) == dlq_topic {
            return invalid("--parking-topic must differ from the dead-letter topic".into());
        }
        Ok(())
    }
}

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

/// Where one dead-letter partition stood when the replay started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionSnapshot {
    /// The partition.
    pub partition: i32,
    /// The first offset to read: the group's committed offset, or the low watermark.
    pub start: i64,
    /// The high watermark at start: offsets from here on arrived during the replay.
    pub end: i64,
}

/// Whether a record read belongs to the replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// It was in the topic when the replay started: handle it.
    InSnapshot,
    /// It arrived later (or its partition is finished): leave it for the next replay.
    AfterSnapshot,
}

/// Tracks each dead-letter partition's position against the high watermark taken at start, and
/// says when the replay has read everything that was there.
#[derive(Debug, Clone)]
pub struct EndOfDlq {
    partitions: BTreeMap<i32, PartitionPosition>,
}

#[derive(Debug, Clone, Copy)]
struct PartitionPosition {
    start: i64,
    end: i64,
    position: i64,
    done: bool,
}

impl EndOfDlq {
    /// Starts from the snapshot; a partition with nothing left to read (empty, or committed up
    /// to its end) is finished from the start.
    pub fn new(snapshot: impl IntoIterator<Item = PartitionSnapshot>) -> Self {
        let partitions = snapshot
            .into_iter()
            .map(|s| {
                let position = PartitionPosition {
                    start: s.start,
                    end: s.end,
                    position: s.start,
                    done: s.start >= s.end,
                };
                (s.partition, position)
            })
            .collect();
        EndOfDlq { partitions }
    }

    /// Records that `offset` of `partition` was read and says whether it belongs to the replay.
    /// Reading the last offset before the snapshot's end, or anything at or past it, finishes
    /// the partition.
    pub fn admit(&mut self, partition: i32, offset: i64) -> Admission {
        let Some(state) = self.partitions.get_mut(&partition) else {
            // A partition added to the topic after the start holds only new dead letters.
            return Admission::AfterSnapshot;
        };
        if state.done || offset >= state.end {
            state.done = true;
            return Admission::AfterSnapshot;
        }
        state.position = state.position.max(offset + 1);
        if state.position >= state.end {
            state.done = true;
        }
        Admission::InSnapshot
    }

    /// The broker reported the end of `partition`. Its log end then was at or past the
    /// snapshot's (watermarks only grow), so everything the replay owes was read, even when
    /// the last offsets before the snapshot's end are gaps (compaction, transaction markers).
    pub fn reached_eof(&mut self, partition: i32) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.done = true;
        }
    }

    /// True when `partition` needs no more reading (unknown partitions never do).
    pub fn is_done(&self, partition: i32) -> bool {
        self.partitions.get(&partition).is_none_or(|s| s.done)
    }

    /// True when every partition has reached its snapshot end.
    pub fn all_done(&self) -> bool {
        self.partitions.values().all(|s| s.done)
    }

    /// The partitions still to read and where to start them.
    pub fn unfinished(&self) -> Vec<PartitionSnapshot> {
        self.partitions
            .iter()
            .filter(|(_, s)| !s.done)
            .map(|(&partition, s)| PartitionSnapshot {
                partition,
                start: s.start,
                end: s.end,
            })
            .collect()
    }

    /// Records between the start positions and the snapshot's end, over all partitions.
    pub fn total(&self) -> u64 {
        self.partitions
            .values()
            .map(|s| (s.end - s.start).max(0) as u64)
            .sum()
    }

    /// Records read so far (finished partitions count in full).
    pub fn read(&self) -> u64 {
        self.partitions
            .values()
            .map(|s| {
                let reached = if s.done { s.end } else { s.position };
                (reached.min(s.end) - s.start).max(0) as u64
            })
            .sum()
    }
}

/// Error classes and messages of the records a dry run matched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorHistogram {
    classes: BTreeMap<String, u64>,
    messages: HashMap<String, u64>,
}

impl ErrorHistogram {
    /// Counts one dead letter.
    pub fn add(&mut self, letter: &DeadLetterHeaders) {
        let class = letter.error_class.as_deref().unwrap_or(MISSING);
        *self.classes.entry(class.to_owned()).or_default() += 1;
        let message = letter.error_message.as_deref().unwrap_or(MISSING);
        *self.messages.entry(message.to_owned()).or_default() += 1;
    }

    /// Records per error class.
    pub fn classes(&self) -> &BTreeMap<String, u64> {
        &self.classes
    }

    /// The `n` most common messages with their counts, most common first (ties by message, so
    /// the order is stable).
    pub fn top_messages(&self, n: usize) -> Vec<(String, u64)> {
        let mut messages: Vec<(String, u64)> = self
            .messages
            .iter()
            .map(|(message, &count)| (message.clone(), count))
            .collect();
        messages.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        messages.truncate(n);
        messages
    }
}

/// What a replay did; printed as one JSON line by `auditflow replay`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReplaySummary {
    /// Matching records handled: re-published and parked (acknowledged), or counted by a dry run.
    pub matched: u64,
    /// Records re-published and acknowledged.
    pub replayed: u64,
    /// Records copied to the parking topic and acknowledged.
    pub parked: u64,
    /// Records that did not match the filters (their offsets are committed, except in a dry run).
    pub skipped: u64,
    /// Writes retried after the target did not acknowledge them.
    pub retries: u64,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Wall time.
    pub elapsed_s: f64,
    /// True when shutdown stopped the replay early; the same command resumes it.
    pub interrupted: bool,
    /// The consumer group holding the replay's progress.
    pub group: String,
    /// Dry run only: matching records per error class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classes: Option<BTreeMap<String, u64>>,
    /// Dry run only: the most common error messages and their counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_messages: Option<Vec<(String, u64)>>,
    /// The dead-letter topic read.
    #[serde(skip)]
    pub dlq_topic: String,
    /// The parking topic.
    #[serde(skip)]
    pub parking_topic: String,
}

impl fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = if self.dry_run { " (dry run)" } else { "" };
        writeln!(
            f,
            "auditflow replay of {}{mode}, group {}",
            self.dlq_topic, self.group
        )?;
        writeln!(f, "  matched:   {:>9}", self.matched)?;
        writeln!(f, "  replayed:  {:>9}", self.replayed)?;
        writeln!(
            f,
            "  parked:    {:>9}  (to {})",
            self.parked, self.parking_topic
        )?;
        writeln!(f, "  skipped:   {:>9}  (not matching)", self.skipped)?;
        write!(f, "  elapsed:   {:>9.1} s", self.elapsed_s)?;
        if self.interrupted {
            write!(f, "\n  interrupted: run the same command again to continue")?;
        }
        if let Some(classes) = &self.classes {
            write!(f, "\n  error classes:")?;
            for (class, count) in classes {
                write!(f, "\n    {count:>9}  {class}")?;
            }
        }
        if let Some(messages) = &self.top_messages {
            write!(f, "\n  most common messages:")?;
            for (message, count) in messages {
                write!(f, "\n    {count:>9}  {message}")?;
            }
        }
        Ok(())
    }
}

/// Redrives the dead-letter topic `config.kafka.dlq_topic` as selected by `options`, until the
/// end of the topic as it was at start, `--max` matching records, or `shutdown`. Offsets of
/// acknowledged and skipped records are committed to the replay's group as it goes and before
/// it returns, also on shutdown and on a produce failure (which then fails the replay).
pub async fn replay(
    config: &Config,
    options: &ReplayOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<ReplaySummary> {
    let (_rate_tx, rate_rx) = watch::channel(options.rate);
    replay_with_live_rate(config, options, rate_rx, shutdown).await
}

/// [`replay`], with the write rate following `rate` (records per second, `None` unlimited), so
/// a live reload can change it while the replay runs; `options.rate` is ignored.
pub async fn replay_with_live_rate(
    config: &Config,
    options: &ReplayOptions,
    rate: watch::Receiver<Option<f64>>,
    shutdown: CancellationToken,
) -> anyhow::Result<ReplaySummary> {
    let started = Instant::now();
    let dlq_topic = config.kafka.dlq_topic.clone();
    options.validate(&dlq_topic)?;
    let brokers = config.require_brokers()?;
    let group = options.group_id(&dlq_topic);
    let parking_topic = options.parking_topic(&dlq_topic);

    // Manual assignment: the group stores offsets but has no members, so nothing rebalances
    // under the replay. auto.offset.reset applies only when a committed offset has expired.
    let consumer: StreamConsumer = kafka::client_config(brokers, &config.kafka)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .create()
        .context("creating the dead-letter consumer")?;
    let consumer = Arc::new(consumer);
    let snapshot = {
        let consumer = Arc::clone(&consumer);
        let topic = dlq_topic.clone();
        tokio::task::spawn_blocking(move || snapshot_dlq(&consumer, &topic))
            .await
            .context("reading the dead-letter topic's extent")??
    };
    let end = EndOfDlq::new(snapshot.iter().copied());
    tracing::info!(
        dlq_topic = %dlq_topic, group = %group, dry_run = options.dry_run,
        to_read = end.total(), partitions = snapshot.len(),
        "replay starting"
    );
    let mut assignment = TopicPartitionList::new();
    for partition in end.unfinished() {
        assignment
            .add_partition_offset(
                &dlq_topic,
                partition.partition,
                Offset::Offset(partition.start),
            )
            .context("building the assignment")?;
    }
    if assignment.count() > 0 {
        consumer
            .assign(&assignment)
            .context("assigning the dead-letter partitions")?;
    }
    let producer: Option<FutureProducer> = if options.dry_run {
        None
    } else {
        Some(
            kafka::durable_producer_config(brokers, &config.kafka)
                .create()
                .context("creating the replay producer")?,
        )
    };

    let progress = Progress::new(end.total());
    let mut run = ReplayRun {
        options,
        dlq_topic: dlq_topic.clone(),
        parking_topic: parking_topic.clone(),
        consumer: Arc::clone(&consumer),
        producer,
        end,
        in_flight: VecDeque::new(),
        breaker: Breaker::new("replay_target", config.breakers.interactive()),
        commit_points: CommitPoints::default(),
        counts: Counts::default(),
        histogram: options.dry_run.then(ErrorHistogram::default),
        rate: RateLimit::new(rate),
        progress,
    };
    let outcome = run.run(&shutdown).await;
    // Whatever happened, make durable what is acknowledged; a produce failure stops the commit
    // point at the failed record.
    let settled = run.settle_all().await;
    let committed = run.commit().await;
    run.progress.finish();
    let interrupted = outcome?;
    settled?;
    committed?;

    let counts = run.counts;
    let summary = ReplaySummary {
        matched: counts.matched,
        replayed: counts.replayed,
        parked: counts.parked,
        skipped: counts.skipped,
        retries: counts.retries,
        dry_run: options.dry_run,
        elapsed_s: started.elapsed().as_secs_f64(),
        interrupted,
        group,
        classes: run.histogram.as_ref().map(|h| h.classes().clone()),
        top_messages: run.histogram.as_ref().map(|h| h.top_messages(TOP_MESSAGES)),
        dlq_topic,
        parking_topic,
    };
    tracing::info!(
        matched = summary.matched,
        replayed = summary.replayed,
        parked = summary.parked,
        skipped = summary.skipped,
        interrupted,
        "replay finished"
    );
    Ok(summary)
}

/// Reads partitions, watermarks and the group's committed offsets (blocking calls).
fn snapshot_dlq(consumer: &StreamConsumer, topic: &str) -> anyhow::Result<Vec<PartitionSnapshot>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .context("reading the dead-letter topic's metadata")?;
    let topic_metadata = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .with_context(|| format!("dead-letter topic {topic} not found"))?;
    if let Some(err) = topic_metadata.error() {
        anyhow::bail!(
            "dead-letter topic {topic} is not available: {}",
            RDKafkaErrorCode::from(err)
        );
    }
    let partitions: Vec<i32> = topic_metadata.partitions().iter().map(|p| p.id()).collect();
    anyhow::ensure!(
        !partitions.is_empty(),
        "dead-letter topic {topic} has no partitions"
    );
    let mut wanted = TopicPartitionList::new();
    for &partition in &partitions {
        wanted.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(wanted, METADATA_TIMEOUT)
        .context("reading the replay group's committed offsets")?;
    let mut snapshot = Vec::with_capacity(partitions.len());
    for partition in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, METADATA_TIMEOUT)
            .with_context(|| format!("reading the watermarks of {topic} partition {partition}"))?;
        let start = match committed
            .find_partition(topic, partition)
            .map(|e| e.offset())
        {
            // A committed offset below the low watermark was deleted by retention.
            Some(Offset::Offset(offset)) => offset.max(low),
            _ => low,
        };
        snapshot.push(PartitionSnapshot {
            partition,
            start,
            end: high,
        });
    }
    Ok(snapshot)
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    /// Matching records read, whether or not written yet; `--max` counts these.
    matched_read: u64,
    matched: u64,
    replayed: u64,
    parked: u64,
    skipped: u64,
    retries: u64,
}

/// The offsets a replay may commit: per partition, just past the last record settled in read
/// order. The first record that was not acknowledged freezes them, so nothing after it is
/// committed even if the broker acknowledged it (the next run re-publishes those; the sink
/// stores them once).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct CommitPoints {
    next: BTreeMap<i32, i64>,
    committed: BTreeMap<i32, i64>,
    failed: bool,
}

impl CommitPoints {
    /// Settles the record at `offset`; returns false (and freezes) when it or an earlier record
    /// failed.
    fn settle(&mut self, partition: i32, offset: i64, acknowledged: bool) -> bool {
        self.failed |= !acknowledged;
        if self.failed {
            return false;
        }
        self.next.insert(partition, offset + 1);
        true
    }

    /// Partitions whose commit point moved since the last commit, with the offset to commit.
    fn moved(&self) -> Vec<(i32, i64)> {
        self.next
            .iter()
            .filter(|(partition, offset)| self.committed.get(partition) != Some(offset))
            .map(|(&partition, &offset)| (partition, offset))
            .collect()
    }

    fn mark_committed(&mut self, offsets: &[(i32, i64)]) {
        self.committed.extend(offsets.iter().copied());
    }
}

/// A record read and not yet settled, in read order.
struct InFlight {
    partition: i32,
    offset: i64,
    action: Action,
    /// `None` for skipped records, which are settled as soon as everything before is, and for
    /// a written record whose first attempt already failed (see `first_failure`).
    delivery: Option<DeliveryFuture>,
    /// What to write again if the first attempt is not acknowledged; `None` for skipped records.
    resend: Option<Resend>,
    /// The first attempt's failure, seen without waiting; the retry happens in `settle_front`.
    first_failure: Option<anyhow::Error>,
}

/// A written record, kept until acknowledged so a failed write can be retried.
struct Resend {
    topic: String,
    record: SourceRecord,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Skipped,
    Replayed,
    Parked,
}

/// What a delivery future resolved to, as success or the reason it failed.
fn acknowledgement(result: <DeliveryFuture as std::future::Future>::Output) -> anyhow::Result<()> {
    match result {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((err, _))) => Err(err.into()),
        Err(_) => Err(anyhow::anyhow!("the producer dropped the delivery")),
    }
}

/// Spaces writes `1/rate` apart; a stall does not turn into a burst afterwards. The rate is
/// read at every write, so a live reload takes effect at once.
struct RateLimit {
    rate: watch::Receiver<Option<f64>>,
    next: Instant,
}

impl RateLimit {
    fn new(rate: watch::Receiver<Option<f64>>) -> Self {
        RateLimit {
            rate,
            next: Instant::now(),
        }
    }

    async fn wait(&mut self) {
        let Some(rate) = *self.rate.borrow() else {
            return;
        };
        tokio::time::sleep_until(self.next).await;
        self.next = self.next.max(Instant::now()) + Duration::from_secs_f64(1.0 / rate);
    }
}

/// A progress bar on a terminal, a log line every few seconds otherwise.
enum Progress {
    Bar(ProgressBar),
    Lines { next_at: Instant },
}

impl Progress {
    fn new(total: u64) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {per_sec} eta {eta} {msg}",
            ) {
                bar.set_style(style);
            }
            Progress::Bar(bar)
        } else {
            Progress::Lines {
                next_at: Instant::now() + PROGRESS_LINE_INTERVAL,
            }
        }
    }

    fn update(&mut self, end: &EndOfDlq, counts: &Counts) {
        match self {
            Progress::Bar(bar) => {
                bar.set_position(end.read());
                bar.set_message(format!(
                    "replayed {} parked {} skipped {}",
                    counts.replayed, counts.parked, counts.skipped
                ));
            }
            Progress::Lines { next_at } => {
                if Instant::now() >= *next_at {
                    *next_at = Instant::now() + PROGRESS_LINE_INTERVAL;
                    tracing::info!(
                        read = end.read(),
                        total = end.total(),
                        matched = counts.matched_read,
                        replayed = counts.replayed,
                        parked = counts.parked,
                        skipped = counts.skipped,
                        "replay progress"
                    );
                }
            }
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// The state of one replay between reading and committing.
struct ReplayRun<'a> {
    options: &'a ReplayOptions,
    dlq_topic: String,
    parking_topic: String,
    consumer: Arc<StreamConsumer>,
    /// `None` in a dry run: nothing can be written.
    producer: Option<FutureProducer>,
    end: EndOfDlq,
    in_flight: VecDeque<InFlight>,
    commit_points: CommitPoints,
    counts: Counts,
    histogram: Option<ErrorHistogram>,
    rate: RateLimit,
    progress: Progress,
    /// Guards retried writes with the interactive thresholds.
    breaker: Breaker,
}

/// Whether the read loop stopped because of shutdown.
type Interrupted = bool;

impl ReplayRun<'_> {
    fn finished(&self) -> bool {
        self.end.all_done()
            || self
                .options
                .max
                .is_some_and(|max| self.counts.matched_read >= max)
    }

    /// Reads and handles records until the snapshot's end, `--max`, or shutdown.
    async fn run(&mut self, shutdown: &CancellationToken) -> anyhow::Result<Interrupted> {
        let consumer = Arc::clone(&self.consumer);
        let mut commit_tick = tokio::time::interval(COMMIT_INTERVAL);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.finished() {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(true),
                _ = commit_tick.tick() => {
                    self.settle_ready()?;
                    // A failed periodic commit is retried on the next tick; only the final
                    // commit fails the replay.
                    if let Err(err) = self.commit().await {
                        tracing::warn!(error = format!("{err:#}"), "committing replay progress failed; retrying");
                    }
                    self.progress.update(&self.end, &self.counts);
                }
                message = consumer.recv() => match message {
                    Ok(message) => {
                        // Copied out so the consumer's buffer is not held while producing.
                        let record = SourceRecord::from_message(&message);
                        drop(message);
                        if self.handle(record, shutdown).await? {
                            return Ok(true);
                        }
                        self.progress.update(&self.end, &self.counts);
                    }
                    Err(KafkaError::PartitionEOF(partition)) => {
                        self.end.reached_eof(partition);
                        self.pause(partition);
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, dlq_topic = %self.dlq_topic, "dead-letter consumer error");
                    }
                }
            }
        }
        Ok(false)
    }

    /// Handles one record read from the dead-letter topic. Returns true when shutdown arrived
    /// while it waited for the rate limit (the record is then not written and not committed).
    async fn handle(
        &mut self,
        record: SourceRecord,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Interrupted> {
        let (partition, offset) = (record.partition, record.offset);
        let admission = self.end.admit(partition, offset);
        if self.end.is_done(partition) {
            // Do not fetch what arrived after the start.
            self.pause(partition);
        }
        if admission == Admission::AfterSnapshot {
            return Ok(false);
        }
        let letter = DeadLetterHeaders::from_record(&record);
        let route = route(&letter, self.options);
        if route == Route::Skip {
            if self.options.dry_run {
                self.counts.skipped += 1;
            } else {
                // Committed once everything read before it is settled.
                self.in_flight.push_back(InFlight {
                    partition,
                    offset,
                    action: Action::Skipped,
                    delivery: None,
                    resend: None,
                    first_failure: None,
                });
                if self.in_flight.len() >= MAX_IN_FLIGHT {
                    self.settle_front().await?;
                }
            }
            return Ok(false);
        }
        self.counts.matched_read += 1;
        if let Some(histogram) = &mut self.histogram {
            histogram.add(&letter);
            self.counts.matched += 1;
            return Ok(false);
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(true),
            _ = self.rate.wait() => {}
        }
        let (topic, headers, action) = match route {
            Route::Republish { topic, attempt } => (
                topic,
                republish_headers(&record.headers, attempt),
                Action::Replayed,
            ),
            Route::Park(reason) => {
                tracing::warn!(
                    ?reason, partition, offset, attempt = letter.attempt_or_first(),
                    error_class = letter.error_class.as_deref().unwrap_or(MISSING),
                    parking_topic = %self.parking_topic,
                    "parking dead letter"
                );
                (
                    self.parking_topic.clone(),
                    record.headers.clone(),
                    Action::Parked,
                )
            }
            Route::Skip => return Ok(false),
        };
        let delivery = self.send(&topic, &record, &headers).await?;
        self.in_flight.push_back(InFlight {
            partition,
            offset,
            action,
            delivery: Some(delivery),
            resend: Some(Resend {
                topic,
                record,
                headers,
            }),
            first_failure: None,
        });
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            self.settle_front().await?;
        }
        Ok(false)
    }

    /// Hands one record to the producer; waits while its queue is full.
    async fn send(
        &self,
        topic: &str,
        record: &SourceRecord,
        headers: &[(String, Option<Vec<u8>>)],
    ) -> anyhow::Result<DeliveryFuture> {
        let producer = self
            .producer
            .as_ref()
            .context("a dry run has no producer")?;
        loop {
            let mut owned_headers = OwnedHeaders::new_with_capacity(headers.len());
            for (key, value) in headers {
                owned_headers = owned_headers.insert(Header {
                    key,
                    value: value.as_deref(),
                });
            }
            let mut pending: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(topic).headers(owned_headers);
            if let Some(key) = &record.key {
                pending = pending.key(key.as_slice());
            }
            if let Some(payload) = &record.payload {
                pending = pending.payload(payload.as_slice());
            }
            match producer.send_result(pending) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((err, _)) => {
                    return Err(err).with_context(|| format!("producing to {topic}"));
                }
            }
        }
    }

    /// Settles the oldest record, waiting for its acknowledgement.
    async fn settle_front(&mut self) -> anyhow::Result<()> {
        let Some(mut entry) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let mut acknowledged = match (entry.delivery.as_mut(), entry.first_failure.take()) {
            (_, Some(failure)) => Err(failure),
            (Some(delivery), None) => acknowledgement(delivery.await),
            (None, None) => Ok(()),
        };
        if let (Err(err), Some(resend)) = (&acknowledged, &entry.resend) {
            tracing::warn!(
                error = %err, partition = entry.partition, offset = entry.offset,
                "write not acknowledged; retrying"
            );
            acknowledged = self.retry(resend).await;
        }
        self.settled(entry, acknowledged)
    }

    /// Writes a record again under the interactive breaker: retried while the breaker is closed,
    /// one probe after it opens; if the probe fails too, the replay gives up (and the next run
    /// resumes from the last acknowledged record).
    async fn retry(&mut self, resend: &Resend) -> anyhow::Result<()> {
        let give_up_at = self.breaker.num_opened() + 2;
        // Spaced retries give the producer time to refresh what it knows of the topic.
        let mut pause = Duration::from_millis(100);
        loop {
            self.counts.retries += 1;
            let attempt = async {
                let delivery = self
                    .send(&resend.topic, &resend.record, &resend.headers)
                    .await?;
                acknowledgement(delivery.await)
            };
            match self.breaker.call(attempt, |_| true).await {
                Ok(()) => return Ok(()),
                Err(BreakerError::Inner(err)) if self.breaker.num_opened() >= give_up_at => {
                    return Err(err)
                }
                Err(BreakerError::Inner(_)) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(BreakerError::ProbeTimeout { dependency }) => {
                    if self.breaker.num_opened() >= give_up_at {
                        anyhow::bail!("{dependency} probe timed out");
                    }
                }
                Err(BreakerError::Open { .. }) => {
                    tokio::time::sleep(self.breaker.retry_after()).await;
                }
            }
        }
    }

    /// Settles the records at the front whose acknowledgement has arrived, without waiting.
    fn settle_ready(&mut self) -> anyhow::Result<()> {
        while let Some(entry) = self.in_flight.front_mut() {
            if entry.first_failure.is_some() {
                // Retrying waits: leave it to `settle_front`.
                return Ok(());
            }
            let acknowledged = match entry.delivery.as_mut() {
                Some(delivery) => match delivery.now_or_never() {
                    Some(result) => acknowledgement(result),
                    None => return Ok(()),
                },
                None => Ok(()),
            };
            if let (Err(_), Some(_)) = (&acknowledged, &entry.resend) {
                entry.delivery = None;
                entry.first_failure = acknowledged.err();
                return Ok(());
            }
            if let Some(entry) = self.in_flight.pop_front() {
                self.settled(entry, acknowledged)?;
            }
        }
        Ok(())
    }

    /// Waits for every record in flight, in order; stops at the first failure (records after
    /// it are not committed and are re-published by the next run).
    async fn settle_all(&mut self) -> anyhow::Result<()> {
        while !self.in_flight.is_empty() {
            if let Err(err) = self.settle_front().await {
                let abandoned = self.in_flight.len();
                self.in_flight.clear();
                tracing::warn!(abandoned, "records after a failed produce stay uncommitted");
                return Err(err);
            }
        }
        Ok(())
    }

    /// Counts a settled record and moves its partition's commit point past it, unless its
    /// write failed.
    fn settled(&mut self, entry: InFlight, acknowledged: anyhow::Result<()>) -> anyhow::Result<()> {
        if !self
            .commit_points
            .settle(entry.partition, entry.offset, acknowledged.is_ok())
        {
            return Err(match acknowledged {
                Err(err) => err.context(format!(
                    "record {} of dead-letter partition {} not acknowledged by the target",
                    entry.offset, entry.partition
                )),
                Ok(()) => anyhow::anyhow!("an earlier record was not acknowledged"),
            });
        }
        match entry.action {
            Action::Skipped => self.counts.skipped += 1,
            Action::Replayed => {
                self.counts.matched += 1;
                self.counts.replayed += 1;
            }
            Action::Parked => {
                self.counts.matched += 1;
                self.counts.parked += 1;
            }
        }
        Ok(())
    }

    /// Commits, synchronously, the settled position of every partition that moved.
    async fn commit(&mut self) -> anyhow::Result<()> {
        if self.options.dry_run {
            return Ok(());
        }
        let moved = self.commit_points.moved();
        if moved.is_empty() {
            return Ok(());
        }
        let mut offsets = TopicPartitionList::new();
        for &(partition, offset) in &moved {
            offsets
                .add_partition_offset(&self.dlq_topic, partition, Offset::Offset(offset))
                .context("building the commit")?;
        }
        let consumer = Arc::clone(&self.consumer);
        tokio::task::spawn_blocking(move || consumer.commit(&offsets, CommitMode::Sync))
            .await
            .context("commit task")?
            .context("committing the replay's offsets")?;
        tracing::debug!(offsets = ?moved, "replay offsets committed");
        self.commit_points.mark_committed(&moved);
        Ok(())
    }

    fn pause(&self, partition: i32) {
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition(&self.dlq_topic, partition);
        if let Err(err) = self.consumer.pause(&partitions) {
            tracing::debug!(error = %err, partition, "cannot pause a finished partition");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(text: &str) -> DateTime<Utc> {
        parse_time(text).expect("valid time")
    }

    fn letter(class: &str, failed_at: &str, partition: i32, offset: i64) -> DeadLetterHeaders {
        DeadLetterHeaders {
            error_class: Some(class.into()),
            error_message: Some(format!("{class} failure")),
            failed_at: Some(time(failed_at)),
            source_topic: Some("audit-events".into()),
            source_partition: Some(partition),
            source_offset: Some(offset),
            attempt: Some(1),
        }
    }

    fn record_with(headers: &[(&str, Option<&[u8]>)]) -> SourceRecord {
        SourceRecord {
            topic: "audit-events.dlq".into(),
            partition: 0,
            offset: 7,
            timestamp_ms: None,
            key: Some(b"k".to_vec()),
            payload: Some(b"v".to_vec()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec)))
                .collect(),
        }
    }

    #[test]
    fn offset_ranges_are_inclusive_and_may_be_open_ended() {
        let range: OffsetRange = "10..20".parse().unwrap();
        assert_eq!(range, OffsetRange { from: 10, to: 20 });
        assert!(range.contains(10) && range.contains(20));
        assert!(!range.contains(9) && !range.contains(21));
        assert_eq!(
            "5..".parse::<OffsetRange>().unwrap(),
            OffsetRange {
                from: 5,
                to: i64::MAX
            }
        );
        assert_eq!(
            "..5".parse::<OffsetRange>().unwrap(),
            OffsetRange { from: 0, to: 5 }
        );
        assert_eq!(
            " 3 .. 3 ".parse::<OffsetRange>().unwrap(),
            OffsetRange { from: 3, to: 3 }
        );
    }

    #[test]
    fn malformed_offset_ranges_are_refused_with_the_input() {
        for bad in ["", "..", "5", "5-9", "9..5", "-1..3", "a..b", "1...3"] {
            let err = bad.parse::<OffsetRange>().unwrap_err();
            assert_eq!(err, ReplayArgError::OffsetRange(bad.to_owned()), "{bad:?}");
        }
    }

    #[test]
    fn times_are_rfc3339_and_normalised_to_utc() {
        assert_eq!(
            time("2024-05-01T14:00:00+02:00"),
            time("2024-05-01T12:00:00Z")
        );
        assert!(matches!(
            parse_time("2024-05-01 12:00"),
            Err(ReplayArgError::Time { .. })
        ));
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn an_empty_filter_selects_everything() {
        let filter = ReplayFilter::default();
        assert!(filter.matches(&letter("decode", "2024-05-01T00:00:00Z", 0, 1)));
        assert!(filter.matches(&DeadLetterHeaders::default()));
    }

    #[test]
    fn error_classes_select_any_of_the_named_classes() {
        let filter = ReplayFilter {
            error_classes: vec!["decode".into(), "out_of_window".into()],
            ..Default::default()
        };
        assert!(filter.matches(&letter("decode", "2024-05-01T00:00:00Z", 0, 1)));
        assert!(filter.matches(&letter("out_of_window", "2024-05-01T00:00:00Z", 0, 1)));
        assert!(!filter.matches(&letter("validation", "2024-05-01T00:00:00Z", 0, 1)));
        assert!(!filter.matches(&DeadLetterHeaders::default()));
    }

    #[test]
    fn the_time_window_includes_since_and_excludes_until() {
        let filter = ReplayFilter {
            since: Some(time("2024-05-01T10:00:00Z")),
            until: Some(time("2024-05-01T12:00:00Z")),
            ..Default::default()
        };
        let at = |t: &str| letter("decode", t, 0, 1);
        assert!(!filter.matches(&at("2024-05-01T09:59:59.999Z")));
        assert!(filter.matches(&at("2024-05-01T10:00:00Z")));
        assert!(filter.matches(&at("2024-05-01T11:59:59.999Z")));
        assert!(!filter.matches(&at("2024-05-01T12:00:00Z")));
        let mut undated = at("2024-05-01T11:00:00Z");
        undated.failed_at = None;
        assert!(!filter.matches(&undated), "no failure time, no time match");
    }

    #[test]
    fn partition_and_offsets_combine_with_and() {
        let filter = ReplayFilter {
            error_classes: vec!["decode".into()],
            source_partition: Some(2),
            source_offsets: Some(OffsetRange { from: 10, to: 12 }),
            ..Default::default()
        };
        let t = "2024-05-01T00:00:00Z";
        assert!(filter.matches(&letter("decode", t, 2, 10)));
        assert!(filter.matches(&letter("decode", t, 2, 12)));
        assert!(!filter.matches(&letter("decode", t, 2, 13)));
        assert!(!filter.matches(&letter("decode", t, 1, 11)));
        assert!(!filter.matches(&letter("schema", t, 2, 11)));
    }

    #[test]
    fn headers_are_read_from_the_contract_and_the_last_value_wins() {
        let record = record_with(&[
            ("traceparent", Some(b"00-abc")),
            (header::ERROR_CLASS, Some(b"old")),
            (header::ERROR_CLASS, Some(b"out_of_window")),
            (header::ERROR_MESSAGE, Some(b"occurred_at too old")),
            (header::FAILED_AT, Some(b"2024-05-01T12:00:00.123Z")),
            (header::SOURCE_TOPIC, Some(b"audit-events")),
            (header::SOURCE_PARTITION, Some(b"3")),
            (header::SOURCE_OFFSET, Some(b"42")),
            (header::ATTEMPT, Some(b"2")),
        ]);
        let letter = DeadLetterHeaders::from_record(&record);
        assert_eq!(letter.error_class.as_deref(), Some("out_of_window"));
        assert_eq!(letter.error_message.as_deref(), Some("occurred_at too old"));
        assert_eq!(letter.failed_at, Some(time("2024-05-01T12:00:00.123Z")));
        assert_eq!(letter.source_topic.as_deref(), Some("audit-events"));
        assert_eq!(letter.source_partition, Some(3));
        assert_eq!(letter.source_offset, Some(42));
        assert_eq!(letter.attempt, Some(2));
    }

    #[test]
    fn unreadable_headers_count_as_missing() {
        let record = record_with(&[
            (header::FAILED_AT, Some(b"last tuesday")),
            (header::SOURCE_PARTITION, Some(b"x")),
            (header::ATTEMPT, Some(&[0xff, 0xfe])),
            (header::SOURCE_TOPIC, Some(b"")),
            (header::ERROR_CLASS, None),
        ]);
        let letter = DeadLetterHeaders::from_record(&record);
        assert_eq!(letter, DeadLetterHeaders::default());
        assert_eq!(letter.attempt_or_first(), 1);
    }

    #[test]
    fn a_record_is_parked_once_it_has_been_replayed_max_attempts_times() {
        // Attempt 1 is the first failure: never replayed.
        assert!(!out_of_attempts(1, 2));
        assert!(!out_of_attempts(2, 2));
        assert!(out_of_attempts(3, 2));
        assert!(out_of_attempts(4, 2));
        assert!(out_of_attempts(1, 0), "max 0 parks everything");
        assert!(!out_of_attempts(0, 1), "attempt 0 is treated like 1");
    }

    #[test]
    fn routing_republishes_with_the_next_attempt_or_parks() {
        let options = ReplayOptions {
            max_attempts: 2,
            ..Default::default()
        };
        let mut first = letter("decode", "2024-05-01T00:00:00Z", 0, 1);
        assert_eq!(
            route(&first, &options),
            Route::Republish {
                topic: "audit-events".into(),
                attempt: 2
            }
        );
        first.attempt = Some(3);
        assert_eq!(
            route(&first, &options),
            Route::Park(ParkReason::OutOfAttempts)
        );
        first.attempt = None;
        first.source_topic = None;
        assert_eq!(
            route(&first, &options),
            Route::Park(ParkReason::NoSourceTopic)
        );
        let redirected = ReplayOptions {
            to_topic: Some("audit-events-retry".into()),
            ..options.clone()
        };
        assert_eq!(
            route(&first, &redirected),
            Route::Republish {
                topic: "audit-events-retry".into(),
                attempt: 2
            }
        );
        let only_schema = ReplayOptions {
            filter: ReplayFilter {
                error_classes: vec!["schema".into()],
                ..Default::default()
            },
            ..options
        };
        assert_eq!(route(&first, &only_schema), Route::Skip);
    }

    #[test]
    fn republished_headers_keep_the_originals_in_order_and_carry_the_next_attempt() {
        let headers = vec![
            ("traceparent".to_string(), Some(b"00-abc".to_vec())),
            (header::ERROR_CLASS.to_string(), Some(b"decode".to_vec())),
            ("empty".to_string(), None),
            (header::ATTEMPT.to_string(), Some(b"1".to_vec())),
            ("binary".to_string(), Some(vec![0, 255])),
        ];
        assert_eq!(
            republish_headers(&headers, 2),
            vec![
                ("traceparent".to_string(), Some(b"00-abc".to_vec())),
                ("empty".to_string(), None),
                ("binary".to_string(), Some(vec![0, 255])),
                (header::ATTEMPT.to_string(), Some(b"2".to_vec())),
            ]
        );
    }

    #[test]
    fn the_replay_ends_when_every_partition_reaches_its_snapshot() {
        let mut end = EndOfDlq::new([
            PartitionSnapshot {
                partition: 0,
                start: 0,
                end: 3,
            },
            PartitionSnapshot {
                partition: 1,
                start: 5,
                end: 6,
            },
            // Empty, and fully committed: finished from the start.
            PartitionSnapshot {
                partition: 2,
                start: 0,
                end: 0,
            },
            PartitionSnapshot {
                partition: 3,
                start: 9,
                end: 9,
            },
        ]);
        assert_eq!(end.total(), 4);
        assert_eq!(
            end.unfinished()
                .iter()
                .map(|p| p.partition)
                .collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert!(end.is_done(2) && end.is_done(3));
        assert_eq!(end.admit(0, 0), Admission::InSnapshot);
        assert_eq!(end.admit(0, 1), Admission::InSnapshot);
        assert!(!end.is_done(0));
        assert_eq!(end.admit(1, 5), Admission::InSnapshot);
        assert!(end.is_done(1), "the last offset before the end finishes it");
        assert!(!end.all_done());
        assert_eq!(end.read(), 3);
        assert_eq!(end.admit(0, 2), Admission::InSnapshot);
        assert!(end.all_done());
        assert_eq!(end.read(), 4);
    }

    #[test]
    fn records_that_arrive_after_the_start_are_left_alone() {
        let mut end = EndOfDlq::new([PartitionSnapshot {
            partition: 0,
            start: 0,
            end: 10,
        }]);
        assert_eq!(end.admit(0, 4), Admission::InSnapshot);
        assert_eq!(
            end.admit(0, 10),
            Admission::AfterSnapshot,
            "offset at the snapshot end"
        );
        assert!(end.is_done(0));
        assert_eq!(
            end.admit(0, 5),
            Admission::AfterSnapshot,
            "finished stays finished"
        );
        assert_eq!(
            end.admit(7, 0),
            Admission::AfterSnapshot,
            "a partition added later"
        );
    }

    #[test]
    fn the_end_of_a_partition_finishes_it_despite_offset_gaps() {
        // Offsets 8 and 9 are transaction markers or compacted away: never delivered.
        let mut end = EndOfDlq::new([PartitionSnapshot {
            partition: 0,
            start: 0,
            end: 10,
        }]);
        assert_eq!(end.admit(0, 7), Admission::InSnapshot);
        assert!(!end.all_done());
        end.reached_eof(0);
        assert!(end.all_done());
        assert_eq!(end.read(), 10);
    }

    #[test]
    fn commit_points_stop_at_the_first_unacknowledged_record() {
        let mut points = CommitPoints::default();
        assert!(points.settle(0, 4, true));
        assert!(points.settle(1, 9, true));
        assert_eq!(points.moved(), vec![(0, 5), (1, 10)]);
        points.mark_committed(&points.moved());
        assert!(points.moved().is_empty(), "nothing new to commit");
        assert!(points.settle(0, 5, true));
        assert_eq!(points.moved(), vec![(0, 6)]);
        assert!(!points.settle(1, 10, false));
        assert!(
            !points.settle(0, 6, true),
            "acknowledged after a failure: still not committable"
        );
        assert_eq!(points.moved(), vec![(0, 6)]);
    }

    #[test]
    fn the_default_group_is_stable_and_follows_the_selection_not_the_pace() {
        let base = ReplayOptions {
            filter: ReplayFilter {
                error_classes: vec!["out_of_window".into(), "decode".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        let group = base.default_group_id("audit-events.dlq");
        assert!(
            group.starts_with("auditflow-replay-audit-events.dlq-"),
            "{group}"
        );
        assert_eq!(group.len(), "auditflow-replay-audit-events.dlq-".len() + 8);
        // Pinned: a change here makes every operator's replay start over.
        assert_eq!(group, "auditflow-replay-audit-events.dlq-e7aa8e97");

        let reordered = ReplayOptions {
            filter: ReplayFilter {
                error_classes: vec!["decode".into(), "out_of_window".into(), "decode".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        let paced = ReplayOptions {
            max: Some(10),
            rate: Some(5.0),
            max_attempts: 7,
            dry_run: true,
            ..base.clone()
        };
        let explicit_default_parking = ReplayOptions {
            parking_topic: Some("audit-events.dlq.parking".into()),
            ..base.clone()
        };
        for same in [reordered, paced, explicit_default_parking] {
            assert_eq!(same.default_group_id("audit-events.dlq"), group);
        }

        let mut different = Vec::new();
        different.push(ReplayOptions {
            to_topic: Some("elsewhere".into()),
            ..base.clone()
        });
        let mut filtered = base.clone();
        filtered.filter.source_offsets = Some(OffsetRange { from: 1, to: 2 });
        different.push(filtered);
        let mut since = base.clone();
        since.filter.since = Some(time("2024-05-01T00:00:00Z"));
        different.push(since);
        let mut partition = base.clone();
        partition.filter.source_partition = Some(0);
        different.push(partition);
        for options in different {
            assert_ne!(options.default_group_id("audit-events.dlq"), group);
        }
        assert_ne!(base.default_group_id("other.dlq"), group);
        let named = ReplayOptions {
            group: Some("mine".into()),
            ..base
        };
        assert_eq!(named.group_id("audit-events.dlq"), "mine");
    }

    #[test]
    fn contradictory_options_are_refused() {
        let dlq = "audit-events.dlq";
        let ok = ReplayOptions::default();
        assert_eq!(ok.validate(dlq), Ok(()));
        let cases = [
            ReplayOptions {
                rate: Some(0.0),
                ..ok.clone()
            },
            ReplayOptions {
                rate: Some(f64::NAN),
                ..ok.clone()
            },
            ReplayOptions {
                max: Some(0),
                ..ok.clone()
            },
            ReplayOptions {
                to_topic: Some(dlq.into()),
                ..ok.clone()
            },
            ReplayOptions {
                parking_topic: Some(dlq.into()),
                ..ok.clone()
            },
            ReplayOptions {
                group: Some(" ".into()),
                ..ok.clone()
            },
            ReplayOptions {
                filter: ReplayFilter {
                    since: Some(time("2024-05-02T00:00:00Z")),
                    until: Some(time("2024-05-01T00:00:00Z")),
                    ..Default::default()
                },
                ..ok.clone()
            },
        ];
        for options in cases {
            assert!(
                matches!(options.validate(dlq), Err(ReplayArgError::Options(_))),
                "{options:?}"
            );
        }
    }

    #[test]
    fn the_histogram_ranks_messages_by_count_then_text() {
        let mut histogram = ErrorHistogram::default();
        let mut add = |class: Option<&str>, message: Option<&str>, times: usize| {
            for _ in 0..times {
                histogram.add(&DeadLetterHeaders {
                    error_class: class.map(str::to_owned),
                    error_message: message.map(str::to_owned),
                    ..Default::default()
                });
            }
        };
        add(Some("decode"), Some("bad magic byte"), 3);
        add(Some("decode"), Some("truncated"), 1);
        add(Some("out_of_window"), Some("too old"), 3);
        add(None, None, 2);
        for i in 0..12 {
            add(Some("validation"), Some(&format!("bad id {i:02}")), 1);
        }
        let classes: Vec<(&str, u64)> = histogram
            .classes()
            .iter()
            .map(|(c, n)| (c.as_str(), *n))
            .collect();
        assert_eq!(
            classes,
            vec![
                ("(none)", 2),
                ("decode", 4),
                ("out_of_window", 3),
                ("validation", 12)
            ]
        );
        let top = histogram.top_messages(TOP_MESSAGES);
        assert_eq!(top.len(), 10);
        assert_eq!(top[0], ("bad magic byte".to_string(), 3));
        assert_eq!(top[1], ("too old".to_string(), 3));
        assert_eq!(top[2], ("(none)".to_string(), 2));
        assert_eq!(top[3], ("bad id 00".to_string(), 1));
        assert_eq!(top[9], ("bad id 06".to_string(), 1));
    }

    #[test]
    fn the_summary_line_has_the_histogram_only_for_dry_runs() {
        let mut summary = ReplaySummary {
            matched: 3,
            replayed: 2,
            parked: 1,
            skipped: 4,
            retries: 0,
            dry_run: false,
            elapsed_s: 1.5,
            interrupted: false,
            group: "g".into(),
            classes: None,
            top_messages: None,
            dlq_topic: "d".into(),
            parking_topic: "d.parking".into(),
        };
        let line: serde_json::Value = serde_json::to_value(&summary).unwrap();
        assert_eq!(
            line,
            serde_json::json!({"matched":3,"replayed":2,"parked":1,"skipped":4,"retries":0,"dry_run":false,
                "elapsed_s":1.5,"interrupted":false,"group":"g"})
        );
        summary.dry_run = true;
        summary.classes = Some(BTreeMap::from([("decode".to_string(), 3)]));
        summary.top_messages = Some(vec![("bad magic byte".to_string(), 3)]);
        let line: serde_json::Value = serde_json::to_value(&summary).unwrap();
        assert_eq!(line["classes"], serde_json::json!({"decode": 3}));
        assert_eq!(
            line["top_messages"],
            serde_json::json!([["bad magic byte", 3]])
        );
        assert!(summary.to_string().contains("bad magic byte"));
    }
}
