//! Rows of one batch encoded as PostgreSQL binary COPY tuples while the batch is filled, so the
//! store only streams bytes.
//!
//! Each row is encoded once, straight from the decoded event, at push time: a uuid is its 16
//! bytes, a timestamp one big-endian i64 of microseconds since 2000-01-01, `jsonb` a version byte
//! and the text, integers big-endian; text needs no escaping. The binary header and trailer are
//! not part of the rows: a write covers any sub-range of the batch (poison isolation bisects
//! ranges), so [`super::copy_into`] sends [`BINARY_HEADER`], the range's bytes and
//! [`BINARY_TRAILER`] as separate chunks, never copying the rows into a new buffer.
//!
//! The tuples carry the 22 columns of `COLUMNS` (store/mod.rs) and nothing else: `publisher_id`,
//! `batch_seq` and `ingested_at` come from the columns' defaults (migration 0005).

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, NaiveDate, Utc};
use foldhash::fast::RandomState;

use super::summary::{BatchSummary, TenantRange};
use crate::chain::{self, DayDigests, Hash, StoredRow};
use crate::event::{AuditEvent, EventView};

/// The binary COPY header: signature, flags (none), header extension length (none).
pub const BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The binary COPY trailer: a field count of -1.
pub const BINARY_TRAILER: &[u8] = &[0xff, 0xff];

/// Fields per tuple: the columns of `COLUMNS` in store/mod.rs, in that order.
const NUM_FIELDS: i16 = 22;

/// Microseconds from the Unix epoch to PostgreSQL's, 2000-01-01 00:00:00 UTC.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// `jsonb`'s binary input format version: the JSON text follows.
const JSONB_VERSION: u8 = 1;

/// Rows of one batch, already encoded as binary COPY tuples.
#[derive(Debug, Default)]
pub struct CopyRows {
    data: Vec<u8>,
    row_ends: Vec<usize>,
    days: BTreeSet<NaiveDate>,
    /// Per row: its tenant (an index into `tenants`) and `occurred_at`, for the summary of
    /// what a range stores.
    row_keys: Vec<(u32, DateTime<Utc>)>,
    tenants: Vec<String>,
    tenant_index: HashMap<String, u32, RandomState>,
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

    /// Creates an empty set with room for as many rows and bytes as `self` holds, so that
    /// filling the next batch like this one does not grow its buffers step by step (growing
    /// the multi-megabyte row buffer took ~5% of the sink's CPU).
    pub fn sized_like(&self) -> Self {
        CopyRows {
            data: Vec::with_capacity(self.data.len()),
            row_ends: Vec::with_capacity(self.row_ends.len()),
            row_keys: Vec::with_capacity(self.row_keys.len()),
            links: Vec::with_capacity(self.links.len()),
            ..Self::default()
        }
    }

    /// Empties the set, keeping its buffers for the next rows.
    pub fn clear(&mut self) {
        self.data.clear();
        self.row_ends.clear();
        self.days.clear();
        self.row_keys.clear();
        self.tenants.clear();
        self.tenant_index.clear();
        self.links.clear();
    }

    /// Appends one row.
    pub fn push(&mut self, event: &AuditEvent, meta: RowMeta<'_>) {
        self.push_with_details(&event.view(), None, meta);
    }

    /// Appends one row whose `details` the caller canonicalised already (see
    /// [`crate::ingest::decode::Decoded::details_canonical`]).
    pub fn push_with_details(
        &mut self,
        event: &EventView<'_>,
        details_canonical: Option<&[u8]>,
        meta: RowMeta<'_>,
    ) {
        let out = &mut self.data;
        out.extend_from_slice(&NUM_FIELDS.to_be_bytes());
        field(out, event.event_id.as_bytes());
        timestamp(out, event.occurred_at);
        text(out, event.tenant_id);
        text(out, event.actor_id);
        text(out, event.actor_type.as_str());
        nullable_text(out, event.actor_ip);
        nullable_text(out, event.actor_user_agent);
        text(out, event.action);
        text(out, event.resource_type);
        text(out, event.resource_id);
        text(out, event.outcome.as_str());
        nullable_text(out, event.reason);
        nullable_text(out, event.trace_id);
        match event.details {
            Some(details) => {
                length(out, details.len() + 1);
                out.push(JSONB_VERSION);
                out.extend_from_slice(details.as_bytes());
            }
            None => null(out),
        }
        nullable_text(out, event.session_id);
        field(out, &meta.content_hash);
        match meta.schema_version {
            Some(version) => match i16::try_from(version) {
                Ok(smallint) => field(out, &smallint.to_be_bytes()),
                // Out of smallint's range: sent as 4 bytes, which the server refuses for this
                // row (SQLSTATE 22P03, permanent), as it refused the number in COPY text.
                Err(_) => field(out, &version.to_be_bytes()),
            },
            None => null(out),
        }
        match meta.writer_schema_id {
            Some(id) => field(out, &i64::from(id).to_be_bytes()),
            None => null(out),
        }
        text(out, meta.topic);
        field(out, &meta.partition.to_be_bytes());
        field(out, &meta.offset.to_be_bytes());
        match meta.kafka_timestamp {
            Some(ts) => timestamp(out, ts),
            None => null(out),
        }
        self.row_ends.push(out.len());
        self.days.insert(event.occurred_at.date_naive());
        let tenant = match self.tenant_index.get(event.tenant_id) {
            Some(index) => *index,
            None => {
                let index = u32::try_from(self.tenants.len()).unwrap_or(u32::MAX);
                self.tenants.push(event.tenant_id.to_owned());
                self.tenant_index.insert(event.tenant_id.to_owned(), index);
                index
            }
        };
        self.row_keys.push((tenant, event.occurred_at));
        self.links.push((
            meta.partition,
            meta.offset,
            stored_row_digest(event, details_canonical, &meta),
        ));
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

    /// The rows at `indices` (ascending), as rows of their own: what one store stream writes of a
    /// batch. Encoded bytes are copied, not re-encoded.
    pub fn select(&self, indices: &[usize]) -> CopyRows {
        let share = |len: usize| len * indices.len() / self.len().max(1) + 1;
        let mut selected = CopyRows {
            data: Vec::with_capacity(share(self.data.len()) + share(self.data.len()) / 8),
            row_ends: Vec::with_capacity(indices.len()),
            row_keys: Vec::with_capacity(indices.len()),
            links: Vec::with_capacity(indices.len()),
            ..CopyRows::default()
        };
        // This set's tenant index of each of ours, once it is needed.
        let mut renumbered: Vec<Option<u32>> = vec![None; self.tenants.len()];
        for &index in indices {
            let start = if index == 0 {
                0
            } else {
                self.row_ends[index - 1]
            };
            selected
                .data
                .extend_from_slice(&self.data[start..self.row_ends[index]]);
            selected.row_ends.push(selected.data.len());
            let (tenant, occurred_at) = self.row_keys[index];
            selected.days.insert(occurred_at.date_naive());
            let tenant = match renumbered.get(tenant as usize).copied().flatten() {
                Some(existing) => existing,
                None => {
                    let name = self
                        .tenants
                        .get(tenant as usize)
                        .cloned()
                        .unwrap_or_default();
                    let new = u32::try_from(selected.tenants.len()).unwrap_or(u32::MAX);
                    if let Some(slot) = renumbered.get_mut(tenant as usize) {
                        *slot = Some(new);
                    }
                    selected.tenant_index.insert(name.clone(), new);
                    selected.tenants.push(name);
                    new
                }
            };
            selected.row_keys.push((tenant, occurred_at));
            selected.links.push(self.links[index]);
        }
        selected
    }

    /// The encoded tuples of rows `range`, without the binary COPY header and trailer.
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
fn stored_row_digest(
    event: &EventView<'_>,
    details_canonical: Option<&[u8]>,
    meta: &RowMeta<'_>,
) -> Hash {
    let row = StoredRow {
        event_id: event.event_id,
        occurred_at_micros: event.occurred_at.timestamp_micros(),
        tenant_id: event.tenant_id,
        actor_id: event.actor_id,
        actor_type: event.actor_type.as_str(),
        actor_ip: event.actor_ip,
        actor_user_agent: event.actor_user_agent,
        action: event.action,
        resource_type: event.resource_type,
        resource_id: event.resource_id,
        outcome: event.outcome.as_str(),
        reason: event.reason,
        trace_id: event.trace_id,
        details: event.details,
        details_canonical,
        session_id: event.session_id,
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

/// A field's length word. No field reaches 2 GiB: the event size limit is far below it.
fn length(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(&i32::try_from(len).unwrap_or(i32::MAX).to_be_bytes());
}

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    length(out, bytes.len());
    out.extend_from_slice(bytes);
}

fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(&(-1i32).to_be_bytes());
}

/// Text as is: binary COPY needs no escaping. NUL never gets here: the decoder rejects it.
fn text(out: &mut Vec<u8>, value: &str) {
    field(out, value.as_bytes());
}

fn nullable_text(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(value) => text(out, value),
        None => null(out),
    }
}

/// `timestamptz`: microseconds since PostgreSQL's epoch (negative before 2000), truncated like
/// [`DateTime::timestamp_micros`], which the row digest uses too.
fn timestamp(out: &mut Vec<u8>, ts: DateTime<Utc>) {
    let micros = ts.timestamp_micros().saturating_sub(POSTGRES_EPOCH_MICROS);
    field(out, &micros.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Actor, ActorType, Outcome, Resource};
    use crate::ingest::decode::SizeLimits;
    use chrono::TimeZone as _;
    use uuid::Uuid;

    fn event() -> AuditEvent {
        AuditEvent {
            event_id: Uuid::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            occurred_at: Utc.with_ymd_and_hms(2026, 12, 1, 12, 30, 15).unwrap()
                + chrono::Duration::microseconds(123_456),
            tenant_id: "tenant-a".to_owned(),
            actor: Actor {
                id: "user-1".to_owned(),
                actor_type: ActorType::User,
                ip: Some("10.0.0.1".to_owned()),
                user_agent: Some("curl/8".to_owned()),
            },
            action: "order.update".to_owned(),
            resource: Resource {
                resource_type: "order".to_owned(),
                id: "o-1".to_owned(),
            },
            outcome: Outcome::Success,
            reason: Some("ok".to_owned()),
            trace_id: Some("trace".to_owned()),
            details: Some(r#"{"a":1}"#.to_owned()),
            session_id: Some("session".to_owned()),
        }
    }

    fn meta() -> RowMeta<'static> {
        RowMeta {
            content_hash: [7; 16],
            schema_version: Some(2),
            writer_schema_id: Some(2),
            topic: "audit-events",
            partition: 3,
            offset: 42,
            kafka_timestamp: Some(Utc.with_ymd_and_hms(2026, 12, 1, 12, 30, 16).unwrap()),
        }
    }

    /// Splits one encoded tuple into its fields (`None` for NULL), as the server reads them,
    /// checking the field count and that nothing is left over.
    fn fields(tuple: &[u8]) -> Vec<Option<&[u8]>> {
        let count = i16::from_be_bytes([tuple[0], tuple[1]]);
        assert_eq!(count, NUM_FIELDS);
        let mut rest = &tuple[2..];
        let mut fields = Vec::new();
        for _ in 0..count {
            let len = i32::from_be_bytes(rest[..4].try_into().unwrap());
            rest = &rest[4..];
            if len < 0 {
                assert_eq!(len, -1);
                fields.push(None);
            } else {
                let (value, tail) = rest.split_at(len as usize);
                fields.push(Some(value));
                rest = tail;
            }
        }
        assert!(rest.is_empty(), "{} bytes after the last field", rest.len());
        fields
    }

    fn encode(event: &AuditEvent, meta: RowMeta<'_>) -> Vec<Vec<Option<Vec<u8>>>> {
        let mut rows = CopyRows::new();
        rows.push(event, meta);
        rows.push(event, meta);
        assert_eq!(rows.len(), 2);
        (0..2)
            .map(|index| {
                fields(rows.bytes_of(index..index + 1))
                    .into_iter()
                    .map(|field| field.map(<[u8]>::to_vec))
                    .collect()
            })
            .collect()
    }

    fn one(event: &AuditEvent, meta: RowMeta<'_>) -> Vec<Option<Vec<u8>>> {
        let rows = encode(event, meta);
        assert_eq!(rows[0], rows[1], "every row is encoded alike");
        rows.into_iter().next().unwrap()
    }

    fn micros(field: &Option<Vec<u8>>) -> i64 {
        i64::from_be_bytes(field.as_deref().unwrap().try_into().unwrap())
    }

    #[test]
    fn every_column_is_encoded_in_copy_order_with_its_binary_type() {
        let row = one(&event(), meta());
        assert_eq!(row.len(), 22);
        assert_eq!(
            row[0].as_deref(),
            Some(&0x0123_4567_89ab_cdef_0011_2233_4455_6677u128.to_be_bytes()[..])
        );
        // 2026-12-01 12:30:15.123456 UTC, counted from 2000-01-01.
        assert_eq!(micros(&row[1]), 849_443_415_123_456);
        let texts: Vec<&[u8]> = [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 18]
            .iter()
            .map(|&index| row[index].as_deref().unwrap())
            .collect();
        assert_eq!(
            texts,
            [
                &b"tenant-a"[..],
                b"user-1",
                b"USER",
                b"10.0.0.1",
                b"curl/8",
                b"order.update",
                b"order",
                b"o-1",
                b"SUCCESS",
                b"ok",
                b"trace",
                b"session",
                b"audit-events",
            ]
        );
        assert_eq!(row[13].as_deref(), Some(&b"\x01{\"a\":1}"[..]));
        assert_eq!(row[15].as_deref(), Some(&[7u8; 16][..]));
        assert_eq!(row[16].as_deref(), Some(&2i16.to_be_bytes()[..]));
        assert_eq!(row[17].as_deref(), Some(&2i64.to_be_bytes()[..]));
        assert_eq!(row[19].as_deref(), Some(&3i32.to_be_bytes()[..]));
        assert_eq!(row[20].as_deref(), Some(&42i64.to_be_bytes()[..]));
        assert_eq!(micros(&row[21]), 849_443_416_000_000);
    }

    #[test]
    fn absent_optional_values_are_null_not_empty() {
        let mut event = event();
        event.actor.ip = None;
        event.actor.user_agent = None;
        event.reason = None;
        event.trace_id = None;
        event.details = None;
        event.session_id = None;
        let meta = RowMeta {
            schema_version: None,
            writer_schema_id: None,
            kafka_timestamp: None,
            ..meta()
        };
        let row = one(&event, meta);
        let nulls: Vec<usize> = (0..row.len()).filter(|&i| row[i].is_none()).collect();
        assert_eq!(nulls, [5, 6, 11, 12, 13, 14, 16, 17, 21]);
    }

    #[test]
    fn empty_strings_are_zero_length_values_not_null() {
        let mut event = event();
        event.tenant_id = String::new();
        event.actor.ip = Some(String::new());
        event.reason = Some(String::new());
        let row = one(&event, meta());
        for index in [2, 5, 11] {
            assert_eq!(row[index].as_deref(), Some(&b""[..]), "field {index}");
        }
    }

    #[test]
    fn text_travels_unescaped_including_copy_text_separators_and_unicode() {
        let awkward = "tab\there\nnewline\\backslash \\N carriage\rreturn";
        let unicode = "Zoë → 東京 🚀 \u{200b}";
        let mut event = event();
        event.reason = Some(awkward.to_owned());
        event.actor.user_agent = Some(unicode.to_owned());
        event.details = Some(format!(r#"{{"name":"{}"}}"#, unicode));
        let row = one(&event, meta());
        assert_eq!(row[11].as_deref(), Some(awkward.as_bytes()));
        assert_eq!(row[6].as_deref(), Some(unicode.as_bytes()));
        let details = row[13].as_deref().unwrap();
        assert_eq!(details[0], JSONB_VERSION);
        assert_eq!(&details[1..], event.details.as_deref().unwrap().as_bytes());
    }

    #[test]
    fn fields_at_their_size_limits_keep_their_exact_length() {
        let limits = SizeLimits::default();
        let mut event = event();
        event.tenant_id = "t".repeat(limits.key_field_bytes);
        event.actor.user_agent = Some("é".repeat(limits.text_field_bytes / 2));
        let padding = limits.details_bytes - r#"{"pad":""}"#.len();
        event.details = Some(format!(r#"{{"pad":"{}"}}"#, "x".repeat(padding)));
        let row = one(&event, meta());
        assert_eq!(row[2].as_ref().unwrap().len(), limits.key_field_bytes);
        assert_eq!(row[6].as_ref().unwrap().len(), limits.text_field_bytes);
        assert_eq!(row[13].as_ref().unwrap().len(), limits.details_bytes + 1);
    }

    #[test]
    fn timestamps_before_2000_and_before_1970_are_negative_micros() {
        let mut event = event();
        event.occurred_at = Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 59).unwrap()
            + chrono::Duration::microseconds(999_999);
        let meta = RowMeta {
            kafka_timestamp: Some(
                Utc.with_ymd_and_hms(1969, 12, 31, 23, 59, 59).unwrap()
                    + chrono::Duration::microseconds(500_000),
            ),
            ..meta()
        };
        let row = one(&event, meta);
        assert_eq!(micros(&row[1]), -1);
        assert_eq!(micros(&row[21]), -POSTGRES_EPOCH_MICROS - 500_000);
        let mut epoch = self::event();
        epoch.occurred_at = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(micros(&one(&epoch, self::meta())[1]), 0);
    }

    #[test]
    fn sub_microsecond_digits_are_truncated_like_the_row_digest() {
        let mut event = event();
        event.occurred_at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
            + chrono::Duration::nanoseconds(1_999);
        let row = one(&event, meta());
        assert_eq!(
            micros(&row[1]),
            event.occurred_at.timestamp_micros() - POSTGRES_EPOCH_MICROS
        );
        assert_eq!(micros(&row[1]) % 1_000_000, 1);
    }

    #[test]
    fn nested_json_details_are_sent_verbatim_after_the_jsonb_version() {
        let nested = r#"{"a":{"b":[1,{"c":null,"d":"e\"f\\g\n"}],"h":{"i":{"j":true}}},"k":[]}"#;
        let mut event = event();
        event.details = Some(nested.to_owned());
        let row = one(&event, meta());
        let mut expected = vec![JSONB_VERSION];
        expected.extend_from_slice(nested.as_bytes());
        assert_eq!(row[13].as_deref(), Some(&expected[..]));
    }

    #[test]
    fn numbers_at_their_column_limits_are_big_endian() {
        let meta = RowMeta {
            schema_version: Some(i16::MAX as u32),
            writer_schema_id: Some(u32::MAX),
            partition: i32::MAX,
            offset: i64::MAX,
            ..meta()
        };
        let row = one(&event(), meta);
        assert_eq!(row[16].as_deref(), Some(&i16::MAX.to_be_bytes()[..]));
        assert_eq!(
            row[17].as_deref(),
            Some(&i64::from(u32::MAX).to_be_bytes()[..])
        );
        assert_eq!(row[19].as_deref(), Some(&i32::MAX.to_be_bytes()[..]));
        assert_eq!(row[20].as_deref(), Some(&i64::MAX.to_be_bytes()[..]));
    }

    #[test]
    fn a_schema_version_past_smallint_is_sent_so_that_the_server_refuses_it() {
        let meta = RowMeta {
            schema_version: Some(40_000),
            ..meta()
        };
        let row = one(&event(), meta);
        // Four bytes where smallint takes two: "incorrect binary data format", as COPY text
        // refused the out-of-range number; never silently NULL.
        assert_eq!(row[16].as_deref(), Some(&40_000u32.to_be_bytes()[..]));
    }

    #[test]
    fn ranges_are_whole_tuples_and_the_header_and_trailer_frame_them() {
        let mut rows = CopyRows::new();
        for offset in 0..5 {
            rows.push(&event(), RowMeta { offset, ..meta() });
        }
        let all = rows.bytes_of(0..5);
        assert_eq!(all.len(), rows.num_bytes());
        let middle = rows.bytes_of(1..4);
        assert_eq!(middle.len() * 5, all.len() * 3);
        assert_eq!(fields(rows.bytes_of(3..4))[20].unwrap(), 3i64.to_be_bytes());
        assert!(rows.bytes_of(2..2).is_empty());
        assert_eq!(BINARY_HEADER.len(), 19);
        assert!(BINARY_HEADER.starts_with(b"PGCOPY\n\xff\r\n\0"));
        assert_eq!(
            i16::from_be_bytes([BINARY_TRAILER[0], BINARY_TRAILER[1]]),
            -1
        );
    }
}
