//! The replay loop: read, filter, route, write with bounded in-flight records, commit what is
//! acknowledged in read order, report progress.

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::FutureExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::breaker::{Breaker, BreakerError};
use crate::ingest::dlq::SourceRecord;
use crate::ingest::sources::SourceRef;
use crate::kafka::{self, QuietContext};

use super::route::{republish_headers, route, DeadLetterHeaders, Route};
use super::snapshot::{Admission, EndOfDlq};
use super::{ErrorHistogram, ReplayOptions, MISSING};

/// How often a progress line is logged when stderr is not a terminal.
const PROGRESS_LINE_INTERVAL: Duration = Duration::from_secs(2);

/// How often acknowledged progress is committed.
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Records sent and not yet acknowledged, at most; bounds memory and the work a crash repeats.
pub(super) const MAX_IN_FLIGHT: usize = 1_000;

#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Counts {
    /// Matching records read, whether or not written yet; `--max` counts these.
    matched_read: u64,
    pub(super) matched: u64,
    pub(super) replayed: u64,
    pub(super) parked: u64,
    pub(super) skipped: u64,
    pub(super) retries: u64,
}

/// The offsets a replay may commit: per partition, just past the last record settled in read
/// order. The first record that was not acknowledged freezes them, so nothing after it is
/// committed even if the broker acknowledged it (the next run re-publishes those; the sink
/// stores them once).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct CommitPoints {
    pub(super) next: BTreeMap<i32, i64>,
    pub(super) committed: BTreeMap<i32, i64>,
    pub(super) failed: bool,
}

impl CommitPoints {
    /// Settles the record at `offset`; returns false (and freezes) when it or an earlier record
    /// failed.
    pub(super) fn settle(&mut self, partition: i32, offset: i64, acknowledged: bool) -> bool {
        self.failed |= !acknowledged;
        if self.failed {
            return false;
        }
        self.next.insert(partition, offset + 1);
        true
    }

    /// Partitions whose commit point moved since the last commit, with the offset to commit.
    pub(super) fn moved(&self) -> Vec<(i32, i64)> {
        self.next
            .iter()
            .filter(|(partition, offset)| self.committed.get(partition) != Some(offset))
            .map(|(&partition, &offset)| (partition, offset))
            .collect()
    }

    pub(super) fn mark_committed(&mut self, offsets: &[(i32, i64)]) {
        self.committed.extend(offsets.iter().copied());
    }
}

/// A record read and not yet settled, in read order.
pub(super) struct InFlight {
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) action: Action,
    /// `None` for skipped records, which are settled as soon as everything before is, and for
    /// a written record whose first attempt already failed (see `first_failure`).
    pub(super) delivery: Option<DeliveryFuture>,
    /// What to write again if the first attempt is not acknowledged; `None` for skipped records.
    resend: Option<Resend>,
    /// The first attempt's failure, seen without waiting; the retry happens in `settle_front`.
    first_failure: Option<anyhow::Error>,
}

/// A written record, kept until acknowledged so a failed write can be retried.
pub(super) struct Resend {
    pub(super) topic: String,
    pub(super) record: SourceRecord,
    pub(super) headers: Vec<(String, Option<Vec<u8>>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    Skipped,
    Replayed,
    Parked,
}

/// What a delivery future resolved to, as success or the reason it failed.
pub(super) fn acknowledgement(
    result: <DeliveryFuture as std::future::Future>::Output,
) -> anyhow::Result<()> {
    match result {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((err, _))) => Err(err.into()),
        Err(_) => Err(anyhow::anyhow!("the producer dropped the delivery")),
    }
}

/// Spaces writes `1/rate` apart; a stall does not turn into a burst afterwards. The rate is
/// read at every write, so a live reload takes effect at once.
pub(super) struct RateLimit {
    pub(super) rate: watch::Receiver<Option<f64>>,
    pub(super) next: Instant,
}

impl RateLimit {
    pub(super) fn new(rate: watch::Receiver<Option<f64>>) -> Self {
        RateLimit {
            rate,
            next: Instant::now(),
        }
    }

    pub(super) async fn wait(&mut self) {
        let Some(rate) = *self.rate.borrow() else {
            return;
        };
        tokio::time::sleep_until(self.next).await;
        self.next = self.next.max(Instant::now()) + Duration::from_secs_f64(1.0 / rate);
    }
}

/// A progress bar on a terminal, a log line every few seconds otherwise.
pub(super) enum Progress {
    Bar(ProgressBar),
    Lines { next_at: Instant },
}

impl Progress {
    pub(super) fn new(total: u64) -> Self {
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

    pub(super) fn update(&mut self, end: &EndOfDlq, counts: &Counts) {
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

    pub(super) fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// The state of one replay between reading and committing.
pub(super) struct ReplayRun<'a> {
    pub(super) options: &'a ReplayOptions,
    pub(super) dlq_topic: String,
    pub(super) parking_topic: String,
    pub(super) consumer: Arc<StreamConsumer<QuietContext>>,
    /// `None` in a dry run: nothing can be written.
    pub(super) producer: Option<kafka::Producer>,
    pub(super) end: EndOfDlq,
    pub(super) in_flight: VecDeque<InFlight>,
    pub(super) commit_points: CommitPoints,
    pub(super) counts: Counts,
    pub(super) histogram: Option<ErrorHistogram>,
    pub(super) rate: RateLimit,
    pub(super) progress: Progress,
    /// Guards retried writes with the interactive thresholds.
    pub(super) breaker: Breaker,
}

/// Whether the read loop stopped because of shutdown.
pub(super) type Interrupted = bool;

impl ReplayRun<'_> {
    pub(super) fn finished(&self) -> bool {
        self.end.all_done()
            || self
                .options
                .max
                .is_some_and(|max| self.counts.matched_read >= max)
    }

    /// Reads and handles records until the snapshot's end, `--max`, or shutdown.
    pub(super) async fn run(
        &mut self,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Interrupted> {
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
                        let record = SourceRef::from_message(&message).to_record();
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
    pub(super) async fn handle(
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
        // A refusal at enqueue time (the producer already knows the topic is failing) is retried
        // like a failed acknowledgement: in order, under the breaker.
        let (delivery, first_failure) = match self.send(&topic, &record, &headers).await {
            Ok(delivery) => (Some(delivery), None),
            Err(err) => (None, Some(err)),
        };
        self.in_flight.push_back(InFlight {
            partition,
            offset,
            action,
            delivery,
            resend: Some(Resend {
                topic,
                record,
                headers,
            }),
            first_failure,
        });
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            self.settle_front().await?;
        }
        Ok(false)
    }

    /// Hands one record to the producer; waits while its queue is full.
    pub(super) async fn send(
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
    pub(super) async fn retry(&mut self, resend: &Resend) -> anyhow::Result<()> {
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
    pub(super) async fn settle_all(&mut self) -> anyhow::Result<()> {
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
    pub(super) fn settled(
        &mut self,
        entry: InFlight,
        acknowledged: anyhow::Result<()>,
    ) -> anyhow::Result<()> {
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
    pub(super) async fn commit(&mut self) -> anyhow::Result<()> {
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

    pub(super) fn pause(&self, partition: i32) {
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition(&self.dlq_topic, partition);
        if let Err(err) = self.consumer.pause(&partitions) {
            tracing::debug!(error = %err, partition, "cannot pause a finished partition");
        }
    }
}
