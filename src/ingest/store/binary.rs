//! Rows of one batch in PostgreSQL's binary COPY format, encoded straight from the decoded event
//! while the batch is filled, with each row's chain digest ([`crate::chain::row_digest`]).
//!
//! A row's fields are encoded once, at push time, without the three columns only the write knows
//! (`publisher_id`, `batch_seq`, `ingested_at`: the link the row belongs to, and when); the store
//! appends those to every row of the range it writes ([`BinaryRows::copy_data`]). Binary values
//! need no escaping and no formatting: a uuid is its 16 bytes, a timestamp one big-endian i64 of
//! microseconds since 2000-01-01, `jsonb` a version byte and the text.

use std::collections::BTreeSet;

use chrono::{DateTime, NaiveDate, Utc};

use super::copy::RowMeta;
use crate::chain::{self, CanonicalJsonError, DayDigests, Hash, StoredRow};
use crate::event::AuditEvent;

/// The columns of a COPY, in order; the staging table has the same ones.
pub const COLUMNS: &str = "event_id, occurred_at, tenant_id, actor_id, actor_type, actor_ip, \
    actor_user_agent, action, resource_type, resource_id, outcome, reason, trace_id, details, \
    session_id, content_hash, schema_version, writer_schema_id, kafka_topic, kafka_partition, \
    kafka_offset, kafka_timestamp, publisher_id, batch_seq, ingested_at";

/// Fields a row carries ([`COLUMNS`]).
const FIELDS: i16 = 25;

/// Microseconds from the Unix epoch to PostgreSQL's, 2000-01-01 00:00:00 UTC.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The binary COPY header: signature, flags, header extension length.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The link every row of one write belongs to, and the time of that write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkColumns {
    /// `publishers.publisher_id` of the store stream.
    pub publisher_id: i32,
    /// The link's sequence number in its publisher's chain.
    pub batch_seq: u64,
    /// When the rows were written (the link records it too).
    pub ingested_at: DateTime<Utc>,
}

/// The rows of one batch, encoded.
#[derive(Debug, Default)]
pub struct BinaryRows {
    data: Vec<u8>,
    row_ends: Vec<usize>,
    /// Per row: its day, Kafka partition and offset, and chain digest.
    digests: Vec<(NaiveDate, i32, i64, Hash)>,
    days: BTreeSet<NaiveDate>,
}

impl BinaryRows {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one row. Fails only when `details` is not JSON, which validation refuses first.
    pub fn push(&mut self, event: &AuditEvent, meta: RowMeta<'_>) -> Result<(), CanonicalJsonError> {
        let occurred_at = event.occurred_at.timestamp_micros();
        let kafka_timestamp = meta.kafka_timestamp.map(|ts| ts.timestamp_micros());
        let digest = chain::row_digest(&StoredRow {
            event_id: event.event_id,
            occurred_at_micros: occurred_at,
            tenant_id: &event.tenant_id,
            actor_id: &event.actor.id,
            actor_type: event.actor.actor_type.as_str(),
            actor_ip: event.actor.ip.as_deref(),
            actor_user_agent: event.actor.user_agent.as_deref(),
            action: &event.action,
            resource_type: &event.resource.resource_type,
            resource_id: &event.resource.id,
            outcome: event.outcome.as_str(),
            reason: event.reason.as_deref(),
            trace_id: event.trace_id.as_deref(),
            details: event.details.as_deref(),
            session_id: event.session_id.as_deref(),
            content_hash: &meta.content_hash,
            schema_version: meta.schema_version.and_then(|v| i16::try_from(v).ok()),
            writer_schema_id: meta.writer_schema_id.map(i64::from),
            kafka_topic: meta.topic,
            kafka_partition: meta.partition,
            kafka_offset: meta.offset,
            kafka_timestamp_micros: kafka_timestamp,
        })?;
        let out = &mut self.data;
        field(out, event.event_id.as_bytes());
        timestamp(out, occurred_at);
        for text in [
            event.tenant_id.as_str(),
            &event.actor.id,
            event.actor.actor_type.as_str(),
        ] {
            field(out, text.as_bytes());
        }
        nullable(out, event.actor.ip.as_deref().map(str::as_bytes));
        nullable(out, event.actor.user_agent.as_deref().map(str::as_bytes));
        for text in [
            event.action.as_str(),
            &event.resource.resource_type,
            &event.resource.id,
            event.outcome.as_str(),
        ] {
            field(out, text.as_bytes());
        }
        nullable(out, event.reason.as_deref().map(str::as_bytes));
        nullable(out, event.trace_id.as_deref().map(str::as_bytes));
        match event.details.as_deref() {
            Some(details) => {
                // jsonb's binary input: a version byte, then the text.
                length(out, details.len() + 1);
                out.push(1);
                out.extend_from_slice(details.as_bytes());
            }
            None => null(out),
        }
        nullable(out, event.session_id.as_deref().map(str::as_bytes));
        field(out, &meta.content_hash);
        match meta.schema_version.and_then(|v| i16::try_from(v).ok()) {
            Some(version) => field(out, &version.to_be_bytes()),
            None => null(out),
        }
        match meta.writer_schema_id {
            Some(id) => field(out, &i64::from(id).to_be_bytes()),
            None => null(out),
        }
        field(out, meta.topic.as_bytes());
        field(out, &meta.partition.to_be_bytes());
        field(out, &meta.offset.to_be_bytes());
        match kafka_timestamp {
            Some(micros) => timestamp(out, micros),
            None => null(out),
        }
        self.row_ends.push(out.len());
        let day = event.occurred_at.date_naive();
        self.days.insert(day);
        self.digests.push((day, meta.partition, meta.offset, digest));
        Ok(())
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.row_ends.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.row_ends.is_empty()
    }

    /// Encoded size in bytes.
    pub fn num_bytes(&self) -> usize {
        self.data.len()
    }

    /// The days (UTC) the rows fall on, i.e. the partitions they need.
    pub fn days(&self) -> &BTreeSet<NaiveDate> {
        &self.days
    }

    /// Row `index`'s Kafka partition and offset.
    pub fn coordinates(&self, index: usize) -> (i32, i64) {
        let (_, partition, offset, _) = self.digests[index];
        (partition, offset)
    }

    /// The per-day digests of rows `range` for which `stored` says yes (the rows a write
    /// actually inserted).
    pub fn day_digests(
        &self,
        range: std::ops::Range<usize>,
        mut stored: impl FnMut(usize) -> bool,
    ) -> Vec<chain::DayDigest> {
        let mut days = DayDigests::new();
        for index in range {
            if stored(index) {
                let (day, partition, offset, digest) = self.digests[index];
                days.add(day, partition, offset, digest);
            }
        }
        days.finish()
    }

    /// The whole COPY data for rows `range`, each completed with `link`'s columns.
    pub fn copy_data(&self, range: std::ops::Range<usize>, link: LinkColumns) -> Vec<u8> {
        let start = if range.start == 0 { 0 } else { self.row_ends[range.start - 1] };
        let end = if range.is_empty() { start } else { self.row_ends[range.end - 1] };
        let mut out = Vec::with_capacity(HEADER.len() + (end - start) + range.len() * 36 + 2);
        out.extend_from_slice(HEADER);
        let mut row_start = start;
        for index in range {
            let row_end = self.row_ends[index];
            out.extend_from_slice(&FIELDS.to_be_bytes());
            out.extend_from_slice(&self.data[row_start..row_end]);
            field(&mut out, &link.publisher_id.to_be_bytes());
            field(&mut out, &i64::try_from(link.batch_seq).unwrap_or(i64::MAX).to_be_bytes());
            timestamp(&mut out, link.ingested_at.timestamp_micros());
            row_start = row_end;
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }
}

fn length(out: &mut Vec<u8>, len: usize) {
    // A field longer than 2 GiB cannot reach here: the event size limit is far below it.
    out.extend_from_slice(&i32::try_from(len).unwrap_or(i32::MAX).to_be_bytes());
}

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    length(out, bytes.len());
    out.extend_from_slice(bytes);
}

fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(&(-1i32).to_be_bytes());
}

fn nullable(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(bytes) => field(out, bytes),
        None => null(out),
    }
}

fn timestamp(out: &mut Vec<u8>, unix_micros: i64) {
    field(out, &(unix_micros - POSTGRES_EPOCH_MICROS).to_be_bytes());
}
