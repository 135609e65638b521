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
//!
//! Parts: `snapshot` fixes where the replay ends, `route` decides where each record goes, `run`
//! is the loop that reads, writes, commits and reports.

mod route;
mod run;
mod snapshot;
#[cfg(test)]
mod tests;

pub use route::{out_of_attempts, republish_headers, route, DeadLetterHeaders, ParkReason, Route};
pub use snapshot::{Admission, EndOfDlq, PartitionSnapshot};

use run::{CommitPoints, Counts, Progress, RateLimit, ReplayRun};
use snapshot::snapshot_dlq;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::breaker::Breaker;
use crate::config::Config;
use crate::kafka::{self, QuietContext};

/// What a dry run calls a record without an error class or message header.
pub(super) const MISSING: &str = "(none)";

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

/// Error classes and messages of the records a dry run matched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorHistogram {
    pub(super) classes: BTreeMap<String, u64>,
    pub(super) messages: HashMap<String, u64>,
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
    let consumer: StreamConsumer<QuietContext> = kafka::consumer(
        kafka::client_config(brokers, &config.kafka)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "true"),
        &config.kafka,
        "dead-letter consumer",
    )?;
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
    let producer: Option<kafka::Producer> = if options.dry_run {
        None
    } else {
        Some(kafka::producer(
            &kafka::durable_producer_config(brokers, &config.kafka),
            &config.kafka,
            "replay producer",
        )?)
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

/// How many times a record may be replayed before it is parked, unless `--max-attempts` says.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// The parking topic is the dead-letter topic with this suffix, unless `--parking-topic` says.
pub const PARKING_SUFFIX: &str = ".parking";

/// How many of the most common error messages a dry run reports.
pub const TOP_MESSAGES: usize = 10;
