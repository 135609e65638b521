//! The consumer side of the sink: rebalance callbacks (commit before partitions go, track
//! assignments and group membership), consumer lag from librdkafka's statistics, pausing and
//! resuming the assignment, and storing offsets into the consumer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientContext, Statistics, TopicPartitionList};
use tokio::time::Instant;

use super::offsets::{OffsetStore, OffsetTracker, Partition, StoreOffsetError};
use super::stats::SinkStats;
use crate::kafka::ClientLog;
use crate::observe::StatusBoard;

/// How long a finished batch may wait for the store before the consumer pauses its partitions.
pub const PAUSE_AFTER: Duration = Duration::from_secs(2);

/// Rebalance hooks: commit what is done before partitions go, track assignments.
pub struct SinkContext {
    pub(crate) tracker: Arc<Mutex<OffsetTracker>>,
    pub(crate) topic: String,
    /// The group membership as idleness sees it.
    pub(crate) membership: Arc<Mutex<Membership>>,
    pub(crate) stats: Arc<SinkStats>,
    pub(crate) board: Arc<StatusBoard>,
    /// librdkafka's logs and errors, throttled and redacted.
    pub(crate) log: ClientLog,
    /// Set at shutdown before the consumer leaves the group. The revoke that closing brings does
    /// not commit: the shutdown commit ran just before, closing commits the stored offsets itself
    /// (`enable.auto.commit`), and a synchronous commit from inside the close can wait for a
    /// reply that never comes (seen while the group was rebalancing: the process never exited).
    pub(crate) closing: AtomicBool,
}

/// Whether the consumer holds an assignment, and since when. Between a revoke and the next
/// assignment the consumer cannot receive anything, so it is never idle then; after an
/// assignment, idleness counts from the assignment.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Membership {
    pub(crate) assigned: bool,
    pub(crate) changed_at: Option<Instant>,
    /// Counts assignments; a pause must be re-applied to partitions assigned after it.
    pub(crate) generation: u64,
}

impl ClientContext for SinkContext {
    /// Publishes consumer lag per assigned partition (`statistics.interval.ms`).
    fn stats(&self, statistics: Statistics) {
        let tracker = self.tracker.lock();
        if let Some(topic) = statistics.topics.get(&self.topic) {
            for (partition, stats) in &topic.partitions {
                if *partition >= 0 && tracker.is_assigned(*partition) {
                    self.board
                        .set_partition_lag(&self.topic, *partition, stats.consumer_lag);
                }
            }
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.log.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(&error, reason);
    }
}

impl ConsumerContext for SinkContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            // Offsets stored so far are everything that is durable; commit them before another
            // replica takes over. Messages still in flight here are redelivered there and
            // deduplicated by the primary key.
            let commit_took = if self.closing.load(Ordering::Acquire) {
                Duration::ZERO
            } else {
                commit_sync(consumer, "revoke")
            };
            {
                let mut membership = self.membership.lock();
                membership.assigned = false;
                membership.changed_at = Some(Instant::now());
            }
            self.stats.revokes.fetch_add(1, Ordering::Relaxed);
            self.board.set_joined(false);
            let mut tracker = self.tracker.lock();
            for element in partitions.elements_for_topic(&self.topic) {
                tracker.revoke(element.partition());
                self.board
                    .remove_partition(&self.topic, element.partition());
            }
            tracing::info!(
                partitions = ?partition_ids(partitions),
                commit_ms = commit_took.as_secs_f64() * 1e3,
                "partitions revoked"
            );
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                let mut tracker = self.tracker.lock();
                for element in partitions.elements_for_topic(&self.topic) {
                    tracker.assign(element.partition());
                }
                {
                    let mut membership = self.membership.lock();
                    membership.assigned = true;
                    membership.changed_at = Some(Instant::now());
                    membership.generation += 1;
                }
                self.board.set_joined(true);
                tracing::info!(partitions = ?partition_ids(partitions), "partitions assigned");
            }
            Rebalance::Error(err) => tracing::warn!(error = %err, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

fn partition_ids(partitions: &TopicPartitionList) -> Vec<i32> {
    partitions
        .elements()
        .iter()
        .map(|e| e.partition())
        .collect()
}

/// Commits stored offsets synchronously; "nothing to commit" is not an error.
///
/// A synchronous commit waits for the group coordinator (one round trip, up to librdkafka's
/// socket timeout when the coordinator is slow). The rebalance callback runs inside the
/// consumer's poll, on a runtime worker, and must finish the commit before the partitions go, so
/// the wait is announced to the runtime with `block_in_place`: the worker's other tasks move to
/// another worker instead of stalling behind it. The duration is recorded
/// (`auditflow_offset_commit_seconds{when}`).
pub(crate) fn commit_sync<C: Consumer<SinkContext>>(consumer: &C, when: &'static str) -> Duration {
    let started = std::time::Instant::now();
    let result = blocking(|| consumer.commit_consumer_state(CommitMode::Sync));
    let took = started.elapsed();
    metrics::histogram!("auditflow_offset_commit_seconds", "when" => when)
        .record(took.as_secs_f64());
    match result {
        Ok(()) => tracing::debug!(when, "offsets committed"),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(err) => tracing::warn!(error = %err, when, "offset commit failed"),
    }
    took
}

/// Runs a blocking call from code that may be on a runtime worker: through `block_in_place` on a
/// multi-threaded runtime, directly elsewhere (a current-thread runtime cannot hand its tasks
/// over, and a plain thread needs no help).
pub(crate) fn blocking<T>(call: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(call)
        }
        _ => call(),
    }
}

/// The consumer type of the sink.
pub type SinkConsumer = StreamConsumer<SinkContext>;

/// Pauses (or resumes) every partition currently assigned.
pub(crate) fn set_paused(consumer: &SinkConsumer, pause: bool) {
    let assignment = match consumer.assignment() {
        Ok(assignment) => assignment,
        Err(err) => {
            tracing::warn!(error = %err, "cannot read assignment");
            return;
        }
    };
    let result = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    if let Err(err) = result {
        tracing::warn!(error = %err, pause, "pause/resume failed");
    }
}

/// The consumer's offset store for one topic.
pub(crate) struct TopicOffsets<'a> {
    /// The consumer.
    pub(crate) consumer: &'a SinkConsumer,
    /// The consumed topic.
    pub(crate) topic: &'a str,
}

impl OffsetStore for TopicOffsets<'_> {
    fn store(&self, partition: Partition, next: i64) -> Result<(), StoreOffsetError> {
        // store_offset takes the last processed offset and commits it + 1.
        match self.consumer.store_offset(self.topic, partition, next - 1) {
            Ok(()) => Ok(()),
            Err(KafkaError::StoreOffset(RDKafkaErrorCode::State)) => {
                Err(StoreOffsetError::Unassigned)
            }
            Err(err) => Err(StoreOffsetError::Other(err.to_string())),
        }
    }
}
