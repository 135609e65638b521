//! Where the replay ends: the dead-letter topic's high watermarks taken at start, and which
//! records fall before them.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::QuietContext;

/// Bound on each metadata, watermark and committed-offset request at start.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

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
    pub(super) partitions: BTreeMap<i32, PartitionPosition>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct PartitionPosition {
    pub(super) start: i64,
    pub(super) end: i64,
    pub(super) position: i64,
    pub(super) done: bool,
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

/// Reads partitions, watermarks and the group's committed offsets (blocking calls).
pub(super) fn snapshot_dlq(
    consumer: &StreamConsumer<QuietContext>,
    topic: &str,
) -> anyhow::Result<Vec<PartitionSnapshot>> {
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
