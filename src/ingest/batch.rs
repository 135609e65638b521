//! Accumulates decoded events into one Postgres transaction's worth of rows.
//!
//! A batch is flushed when it reaches `max_events` rows, `max_bytes` of payload, or when its
//! oldest message has waited `max_wait`, whichever comes first. Besides rows, a batch carries
//! every message it consumed (stored, duplicate or dead-lettered), so that once it is done the
//! offsets of all of them can be stored together.
//!
//! Events repeated inside one batch (same `event_id` and `occurred_at`) are dropped here, before
//! they reach the database; when the repeat's content differs, it is counted as a conflict and
//! logged rather than merged.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use foldhash::fast::RandomState;
use tokio::time::Instant;
use uuid::Uuid;

use crate::config::BatchConfig;
use crate::ingest::decode::DecodedView;
use crate::ingest::dlq::{DeadLetter, Failure};
use crate::ingest::notify::Resources;
use crate::ingest::offsets::Delivery;
use crate::ingest::sources::{SourceRecords, SourceRef};
use crate::ingest::store::{CopyRows, RowMeta};

/// Flush limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Rows per batch.
    pub max_events: usize,
    /// Payload bytes per batch.
    pub max_bytes: usize,
    /// Longest wait of the oldest message.
    pub max_wait: Duration,
}

impl From<&BatchConfig> for BatchLimits {
    fn from(config: &BatchConfig) -> Self {
        BatchLimits {
            max_events: config.batch_max_events,
            max_bytes: config.batch_max_bytes,
            max_wait: config.max_wait(),
        }
    }
}

/// The dead-letter class of a record whose id and time are stored with other content.
pub const CONFLICT_CLASS: &str = "conflict";

/// What [`Batch::add_event`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// It became a row.
    Row,
    /// The same event is already in this batch.
    Duplicate,
    /// An event with the same key but different content is already in this batch.
    Conflict,
}

/// One batch in the making, then in flight.
#[derive(Debug)]
pub struct Batch {
    /// Sequence number of the batch within this process.
    pub seq: u64,
    /// Rows, COPY-encoded.
    pub rows: CopyRows,
    /// The source message of each row, same order, for dead-lettering a row the database refuses.
    pub row_sources: SourceRecords,
    /// Records that could not be decoded or validated, to dead-letter before the offsets move.
    pub dead_letters: Vec<DeadLetter>,
    /// Every message this batch consumed.
    pub deliveries: Vec<Delivery>,
    /// The resources the rows touch: what readers of the table must invalidate once this batch
    /// is committed (with the tenants and times of each transaction's summary).
    pub resources: Resources,
    /// Kafka timestamps (ms) of the rows, for end-to-end latency.
    pub kafka_timestamps_ms: Vec<i64>,
    /// Events dropped as repeats within this batch.
    pub num_duplicates: u64,
    /// Of those, repeats with different content.
    pub num_conflicts: u64,
    num_payload_bytes: usize,
    opened_at: Option<Instant>,
    seen: HashMap<(Uuid, DateTime<Utc>), [u8; 16], RandomState>,
}

impl Batch {
    /// Creates an empty batch.
    pub fn new(seq: u64) -> Self {
        Batch {
            seq,
            rows: CopyRows::new(),
            row_sources: SourceRecords::default(),
            dead_letters: Vec::new(),
            deliveries: Vec::new(),
            resources: Resources::default(),
            kafka_timestamps_ms: Vec::new(),
            num_duplicates: 0,
            num_conflicts: 0,
            num_payload_bytes: 0,
            opened_at: None,
            seen: HashMap::default(),
        }
    }

    /// Creates the empty batch `seq` that follows this one, its buffers sized like this one's:
    /// consecutive batches of a steady stream are alike.
    pub fn successor(&self, seq: u64) -> Self {
        Batch {
            rows: self.rows.sized_like(),
            row_sources: SourceRecords::sized_like(&self.row_sources),
            deliveries: Vec::with_capacity(self.deliveries.len()),
            kafka_timestamps_ms: Vec::with_capacity(self.kafka_timestamps_ms.len()),
            seen: HashMap::with_capacity_and_hasher(self.seen.len(), RandomState::default()),
            ..Batch::new(seq)
        }
    }

    /// Turns a batch that is done with into the empty batch `seq`, keeping its buffers: the
    /// sink hands stored batches back to the loop that fills them, so their memory is reused,
    /// and freed (the records it holds) on the thread that allocated it.
    pub fn recycle(mut self, seq: u64) -> Self {
        self.seq = seq;
        self.rows.clear();
        self.row_sources.clear();
        self.dead_letters.clear();
        self.deliveries.clear();
        self.resources.clear();
        self.kafka_timestamps_ms.clear();
        self.num_duplicates = 0;
        self.num_conflicts = 0;
        self.num_payload_bytes = 0;
        self.opened_at = None;
        self.seen.clear();
        self
    }

    fn touch(&mut self, delivery: Delivery, num_bytes: usize) {
        self.opened_at.get_or_insert_with(Instant::now);
        self.deliveries.push(delivery);
        self.num_payload_bytes += num_bytes;
    }

    /// Adds a decoded event.
    pub fn add_event(
        &mut self,
        delivery: Delivery,
        decoded: &DecodedView<'_>,
        content_hash: [u8; 16],
        source: SourceRef<'_>,
    ) -> Added {
        let num_bytes = source.payload_len();
        self.touch(delivery, num_bytes);
        let event = &decoded.event;
        match self.seen.get(&(event.event_id, event.occurred_at)) {
            Some(hash) if *hash == content_hash => {
                self.num_duplicates += 1;
                return Added::Duplicate;
            }
            Some(first) => {
                // Not a retry: an id reused for other content. The first stays; the repeat is
                // evidence too, so it goes to the dead-letter topic, never silently away.
                self.num_conflicts += 1;
                tracing::warn!(
                    event_id = %event.event_id,
                    partition = source.partition,
                    offset = source.offset,
                    "event id repeats with different content within a batch; dead-lettering the repeat"
                );
                let message = format!(
                    "event {} at {} repeats within its batch with different content (content_hash \
                     {}); the first record with this id and time (content_hash {}) is stored, \
                     this one is not",
                    event.event_id,
                    event.occurred_at.to_rfc3339(),
                    crate::chain::to_hex(&content_hash),
                    crate::chain::to_hex(first),
                );
                self.dead_letters.push(DeadLetter::new(
                    source.to_record(),
                    Failure {
                        class: CONFLICT_CLASS.to_owned(),
                        message,
                        sqlstate: None,
                    },
                ));
                return Added::Conflict;
            }
            None => {}
        }
        self.seen
            .insert((event.event_id, event.occurred_at), content_hash);
        self.rows.push_with_details(
            event,
            decoded.details_canonical.as_deref(),
            RowMeta {
                content_hash,
                schema_version: decoded.writer.file_version(),
                writer_schema_id: Some(decoded.writer.number()),
                topic: source.topic,
                partition: source.partition,
                offset: source.offset,
                kafka_timestamp: source
                    .timestamp_ms
                    .and_then(DateTime::from_timestamp_millis),
            },
        );
        if let Some(ts) = source.timestamp_ms {
            self.kafka_timestamps_ms.push(ts);
        }
        self.resources
            .insert(event.resource_type, event.resource_id);
        self.row_sources.push(&source);
        Added::Row
    }

    /// Adds a record that must be dead-lettered.
    pub fn add_dead_letter(&mut self, delivery: Delivery, letter: DeadLetter) {
        let num_bytes = letter.source.payload.as_ref().map_or(0, Vec::len);
        self.touch(delivery, num_bytes);
        self.dead_letters.push(letter);
    }

    /// True when no message has been added.
    pub fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
    }

    /// Number of messages consumed into this batch.
    pub fn num_messages(&self) -> usize {
        self.deliveries.len()
    }

    /// True when a size limit is reached.
    pub fn is_full(&self, limits: &BatchLimits) -> bool {
        self.rows.len() >= limits.max_events
            || self.deliveries.len() >= limits.max_events.saturating_mul(2)
            || self.num_payload_bytes >= limits.max_bytes
    }

    /// When the batch must be flushed at the latest, if it holds anything.
    pub fn deadline(&self, limits: &BatchLimits) -> Option<Instant> {
        self.opened_at.map(|opened| opened + limits.max_wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ActorType, EventView, Outcome};

    fn limits() -> BatchLimits {
        BatchLimits {
            max_events: 3,
            max_bytes: 1_000,
            max_wait: Duration::from_millis(100),
        }
    }

    fn decoded(id: u128, tenant: &'static str) -> DecodedView<'static> {
        DecodedView {
            event: EventView {
                event_id: Uuid::from_u128(id),
                occurred_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
                tenant_id: tenant,
                actor_id: "u1",
                actor_type: ActorType::User,
                actor_ip: None,
                actor_user_agent: None,
                action: "order.update",
                resource_type: "order",
                resource_id: "o1",
                outcome: Outcome::Success,
                reason: None,
                trace_id: None,
                details: None,
                session_id: None,
            },
            writer: crate::ingest::decode::WriterId::File(2),
            wire_format: crate::ingest::decode::WireFormat::Confluent,
            details_canonical: None,
        }
    }

    fn source(offset: i64, num_bytes: usize) -> SourceRef<'static> {
        static ZEROS: [u8; 1_000] = [0; 1_000];
        SourceRef::headerless("t", 0, offset, Some(1), None, Some(&ZEROS[..num_bytes]))
    }

    fn delivery(offset: i64) -> Delivery {
        Delivery {
            partition: 0,
            offset,
            epoch: 1,
        }
    }

    #[test]
    fn flushes_on_max_events() {
        let mut batch = Batch::new(1);
        for i in 0..3 {
            assert!(!batch.is_full(&limits()));
            batch.add_event(
                delivery(i),
                &decoded(i as u128, "t"),
                [0; 16],
                source(i, 10),
            );
        }
        assert!(batch.is_full(&limits()));
        assert_eq!(batch.rows.len(), 3);
    }

    #[test]
    fn a_successor_is_empty_and_sized_like_its_predecessor() {
        let mut batch = Batch::new(1);
        for i in 0..3 {
            batch.add_event(
                delivery(i),
                &decoded(i as u128, "t"),
                [0; 16],
                source(i, 10),
            );
        }
        let next = batch.successor(2);
        assert_eq!(next.seq, 2);
        assert!(next.is_empty() && next.rows.is_empty() && next.row_sources.is_empty());
        assert!(next.deadline(&limits()).is_none());
        assert!(next.deliveries.capacity() >= 3 && next.row_sources.capacity() >= 3);
    }

    #[test]
    fn flushes_on_max_bytes() {
        let mut batch = Batch::new(1);
        batch.add_event(delivery(0), &decoded(1, "t"), [0; 16], source(0, 999));
        assert!(!batch.is_full(&limits()));
        batch.add_event(delivery(1), &decoded(2, "t"), [0; 16], source(1, 1));
        assert!(batch.is_full(&limits()));
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_runs_from_the_first_message() {
        let mut batch = Batch::new(1);
        assert_eq!(
            batch.deadline(&limits()),
            None,
            "an empty batch never expires"
        );
        let start = Instant::now();
        batch.add_event(delivery(0), &decoded(1, "t"), [0; 16], source(0, 1));
        tokio::time::advance(Duration::from_millis(60)).await;
        batch.add_event(delivery(1), &decoded(2, "t"), [0; 16], source(1, 1));
        assert_eq!(
            batch.deadline(&limits()),
            Some(start + Duration::from_millis(100))
        );
    }

    #[test]
    fn repeats_within_a_batch_become_one_row() {
        let mut batch = Batch::new(1);
        let event = decoded(7, "t");
        assert_eq!(
            batch.add_event(delivery(0), &event, [1; 16], source(0, 1)),
            Added::Row
        );
        assert_eq!(
            batch.add_event(delivery(1), &event, [1; 16], source(1, 1)),
            Added::Duplicate
        );
        assert_eq!(
            batch.add_event(delivery(2), &event, [2; 16], source(2, 1)),
            Added::Conflict
        );
        assert_eq!(batch.rows.len(), 1);
        assert_eq!(batch.num_duplicates, 1);
        assert_eq!(batch.num_conflicts, 1);
        assert_eq!(
            batch.dead_letters.len(),
            1,
            "the conflicting repeat is dead-lettered"
        );
        assert_eq!(batch.dead_letters[0].failure.class, "conflict");
        assert!(batch.dead_letters[0]
            .failure
            .message
            .contains(&"02".repeat(16)));
        assert_eq!(batch.num_messages(), 3, "every message's offset is carried");
    }

    #[test]
    fn dead_letters_count_as_messages_but_not_rows() {
        let mut batch = Batch::new(1);
        batch.add_dead_letter(
            delivery(0),
            DeadLetter {
                source: source(0, 5).to_record(),
                failure: crate::ingest::dlq::Failure {
                    class: "decode".into(),
                    message: "bad".into(),
                    sqlstate: None,
                },
                failed_at: Utc::now(),
                omitted: None,
            },
        );
        assert!(!batch.is_empty());
        assert!(batch.rows.is_empty());
        assert!(batch.deadline(&limits()).is_some());
    }

    #[test]
    fn a_recycled_batch_is_empty_and_forgets_what_it_saw() {
        let mut batch = Batch::new(1);
        let event = decoded(1, "acme");
        assert_eq!(
            batch.add_event(delivery(1), &event, [1; 16], source(1, 10)),
            Added::Row
        );
        let recycled = batch.recycle(7);
        assert_eq!(recycled.seq, 7);
        assert!(recycled.is_empty() && recycled.rows.is_empty());
        assert!(recycled.row_sources.is_empty() && recycled.kafka_timestamps_ms.is_empty());
        assert!(recycled.resources.is_empty());
        assert_eq!(recycled.deadline(&limits()), None);
        assert!(!recycled.is_full(&limits()));
        let mut recycled = recycled;
        // The same event is new to the next batch: not a repeat within it.
        assert_eq!(
            recycled.add_event(delivery(2), &event, [1; 16], source(2, 10)),
            Added::Row
        );
        assert_eq!(recycled.rows.len(), 1);
    }
}

/// The consumer task's work per event, without Kafka or the database: decode and validate,
/// content hash, and the batch (COPY encoding, row digest, deduplication, invalidation set),
/// over the benchmark's own generated events, batches of the default size split over two store
/// streams as the sink does. Run with
/// `cargo test --release --lib batch::consumer_path_benchmark -- --ignored --nocapture`
/// (or under `valgrind --tool=callgrind` for instruction counts, which do not drift).
#[cfg(test)]
mod consumer_path_benchmark {
    use super::*;
    use crate::ingest::decode::{Decoder, Policy};
    use crate::tools::generate::{EventGenerator, GeneratorConfig};

    #[test]
    #[ignore = "benchmark; run it in release"]
    fn consumer_path_benchmark() {
        let events: u64 = std::env::var("AUDITFLOW_BENCH_EVENTS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(100_000);
        let now = Utc::now();
        let records: Vec<(Vec<u8>, Vec<u8>)> = EventGenerator::new(GeneratorConfig {
            count: events,
            duplicate_ratio: 0.0,
            invalid_ratio: 0.0,
            seed: 7,
            now,
        })
        .map(|record| (record.key, record.payload))
        .collect();
        let decoder = Decoder::embedded();
        let policy = Policy::default();
        let max_events = 5_000;
        let started = std::time::Instant::now();
        let mut batch = Batch::new(0);
        let mut rows = 0;
        for (offset, (key, payload)) in records.iter().enumerate() {
            let partition = (offset % 16) as i32;
            let source = SourceRef::headerless(
                "bench",
                partition,
                offset as i64,
                Some(now.timestamp_millis()),
                Some(key),
                Some(payload),
            );
            let delivery = Delivery {
                partition,
                offset: offset as i64,
                epoch: 0,
            };
            let decoded = decoder
                .decode_view_validated(payload, now, &policy)
                .expect("generated events are valid");
            let hash = crate::event::view_content_hash(&decoded.event);
            if batch.add_event(delivery, &decoded, hash, source) == Added::Row {
                rows += 1;
            }
            if batch.rows.len() == max_events {
                let next = batch.successor(batch.seq + 1);
                let done = std::mem::replace(&mut batch, next);
                // What the store streams take, split as the sink splits them (one pass over
                // the rows' partitions, a partition always to the same stream).
                let mut indices: Vec<Vec<usize>> = vec![Vec::new(); 2];
                for (row, partition) in done.row_sources.partitions().enumerate() {
                    indices[crate::ingest::sink::stream_of(partition, 2)].push(row);
                }
                for rows in &indices {
                    std::hint::black_box(done.rows.select(rows));
                }
                let mut message = crate::ingest::notify::Invalidation::new(done.seq);
                message.resources = done.resources.clone();
                std::hint::black_box(message.to_json().ok());
            }
        }
        let us = started.elapsed().as_secs_f64() * 1e6 / events as f64;
        assert_eq!(rows, events);
        println!("consumer path: {us:.2} us/event over {events} events");
    }
}
