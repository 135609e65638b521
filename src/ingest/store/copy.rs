//! Rows of one batch encoded as PostgreSQL COPY text while the batch is filled, so the store only
//! streams bytes.

use std::collections::{BTreeSet, HashMap};
use std::io::Write as _;

use chrono::{DateTime, NaiveDate, Utc};

use super::summary::{BatchSummary, TenantRange};
use crate::chain::{self, DayDigests, Hash, StoredRow};
use crate::event::AuditEvent;

/// Rows of one batch, already encoded as COPY text.
#[derive(Debug, Default)]
pub struct CopyRows {
    data: Vec<u8>,
    row_ends: Vec<usize>,
    days: BTreeSet<NaiveDate>,
    /// Per row: its tenant (an index into `tenants`) and `occurred_at`, for the summary of
    /// what a range stores.
    row_keys: Vec<(u32, DateTime<Utc>)>,
    tenants: Vec<String>,
    tenant_index: HashMap<String, u32>,
    /// Per row: its Kafka partition and offset, and its [`chain::row_digest`].
    links: Vec<(i32, i64, Hash)>,
}

/// Everything a row carries besides the event.
#[derive(Debug, Clone, Copy)]
pub struct RowMeta<'a> {
    /// See [`crate::event::content_hash`].
    pub content_hash: [u8; 16],
    /// `schema_version`: the writer schema's file version, when it came from `schemas/` (NULL
    /// when it came from a schema registry, whose ids are not versions).
    pub schema_version: Option<u32>,
    /// `writer_schema_id`: the writer schema's Confluent id as the producer wrote it, i.e. the
    /// registry id, or the file version without a registry. Up to 2^32-1 (`bigint`).
    pub writer_schema_id: Option<u32>,
    /// Source topic.
    pub topic: &'a str,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// The Kafka message timestamp.
    pub kafka_timestamp: Option<DateTime<Utc>>,
}

impl CopyRows {
    /// Creates an empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one row.
    pub fn push(&mut self, event: &AuditEvent, meta: RowMeta<'_>) {
        let buf = &mut self.data;
        write_text(buf, &event.event_id.to_string());
        buf.push(b'\t');
        write_timestamp(buf, event.occurred_at);
        for value in [
            Some(event.tenant_id.as_str()),
            Some(event.actor.id.as_str()),
            Some(event.actor.actor_type.as_str()),
            event.actor.ip.as_deref(),
            event.actor.user_agent.as_deref(),
            Some(event.action.as_str()),
            Some(event.resource.resource_type.as_str()),
            Some(event.resource.id.as_str()),
            Some(event.outcome.as_str()),
            event.reason.as_deref(),
            event.trace_id.as_deref(),
            event.details.as_deref(),
            event.session_id.as_deref(),
        ] {
            buf.push(b'\t');
            write_nullable(buf, value);
        }
        buf.extend_from_slice(b"\t\\\\x");
        for byte in meta.content_hash {
            // Writing into a Vec cannot fail.
            let _ = write!(buf, "{byte:02x}");
        }
        for number in [meta.schema_version, meta.writer_schema_id] {
            buf.push(b'\t');
            match number {
                Some(number) => {
                    let _ = write!(buf, "{number}");
                }
                None => buf.extend_from_slice(b"\\N"),
            }
        }
        buf.push(b'\t');
        write_text(buf, meta.topic);
        let _ = write!(buf, "\t{}\t{}\t", meta.partition, meta.offset);
        match meta.kafka_timestamp {
            Some(ts) => write_timestamp(buf, ts),
            None => buf.extend_from_slice(b"\\N"),
        }
        buf.push(b'\n');
        self.row_ends.push(buf.len());
        self.days.insert(event.occurred_at.date_naive());
        let tenant = match self.tenant_index.get(event.tenant_id.as_str()) {
            Some(index) => *index,
            None => {
                let index = u32::try_from(self.tenants.len()).unwrap_or(u32::MAX);
                self.tenants.push(event.tenant_id.clone());
                self.tenant_index.insert(event.tenant_id.clone(), index);
                index
            }
        };
        self.row_keys.push((tenant, event.occurred_at));
        self.links
            .push((meta.partition, meta.offset, stored_row_digest(event, &meta)));
    }

    /// The hash chain's per-day digests of the rows in `range` for which `stored` is true (the
    /// rows a transaction actually inserted).
    pub fn day_digests(
        &self,
        range: std::ops::Range<usize>,
        mut stored: impl FnMut(i32, i64) -> bool,
    ) -> DayDigests {
        let mut days = DayDigests::new();
        for index in range {
            let (partition, offset, digest) = self.links[index];
            if stored(partition, offset) {
                days.add(
                    self.row_keys[index].1.date_naive(),
                    partition,
                    offset,
                    digest,
                );
            }
        }
        days
    }

    /// Per tenant, the `occurred_at` range and count of rows `range`: what a transaction that
    /// stores exactly those rows stored (capped, see [`BatchSummary::capped`]).
    pub fn summary(&self, range: std::ops::Range<usize>) -> BatchSummary {
        let mut per_tenant: HashMap<u32, TenantRange> = HashMap::new();
        for (tenant, occurred_at) in &self.row_keys[range] {
            let row = TenantRange::at(*occurred_at);
            per_tenant
                .entry(*tenant)
                .and_modify(|existing| existing.merge(row))
                .or_insert(row);
        }
        let mut summary = BatchSummary::default();
        for (tenant, range) in per_tenant {
            if let Some(name) = self.tenants.get(tenant as usize) {
                summary.add(name, range);
            }
        }
        summary.capped()
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

    /// The encoded bytes of rows `range`.
    pub fn bytes_of(&self, range: std::ops::Range<usize>) -> &[u8] {
        if range.is_empty() {
            return &[];
        }
        let start = if range.start == 0 {
            0
        } else {
            self.row_ends[range.start - 1]
        };
        &self.data[start..self.row_ends[range.end - 1]]
    }
}

/// The row's digest as `auditflow verify` recomputes it from the stored columns. A `details`
/// that is not JSON cannot be stored either (the column is `jsonb`), so its row never joins a
/// link; it gets a zero digest rather than an error here.
fn stored_row_digest(event: &AuditEvent, meta: &RowMeta<'_>) -> Hash {
    let row = StoredRow {
        event_id: event.event_id,
        occurred_at_micros: event.occurred_at.timestamp_micros(),
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
        kafka_timestamp_micros: meta.kafka_timestamp.map(|ts| ts.timestamp_micros()),
    };
    chain::row_digest(&row).unwrap_or([0; 32])
}

fn write_timestamp(buf: &mut Vec<u8>, ts: DateTime<Utc>) {
    let _ = write!(buf, "{}", ts.format("%Y-%m-%d %H:%M:%S%.6f+00"));
}

fn write_nullable(buf: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(text) => write_text(buf, text),
        None => buf.extend_from_slice(b"\\N"),
    }
}

/// Escapes a value for COPY text format. NUL never gets here: the decoder rejects it.
fn write_text(buf: &mut Vec<u8>, text: &str) {
    for &byte in text.as_bytes() {
        match byte {
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            _ => buf.push(byte),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_separators() {
        let mut buf = Vec::new();
        write_text(&mut buf, "a\tb\nc\\d\re");
        assert_eq!(buf, b"a\\tb\\nc\\\\d\\re");
    }
}
