//! Writes batches of decoded events into the partitioned `events` table.
//!
//! A batch is one transaction. Rows travel as PostgreSQL COPY text, encoded while the batch is
//! being filled ([`CopyRows::push`]), so the store only streams bytes.
//!
//! Deduplication: the primary key `(event_id, occurred_at)` is the identity of an event. The
//! normal path copies straight into `events` (the fastest way in). If that hits a unique
//! violation, the transaction is rolled back and the batch goes through the duplicate-tolerant
//! path: COPY into a per-connection temporary staging table, then
//! `INSERT ... SELECT ... ON CONFLICT DO NOTHING`, which counts what was skipped. After a batch
//! that contained duplicates the store keeps using the staging path until a batch comes through
//! clean, so a redelivery burst after a restart costs one wasted COPY, not one per batch.
//! Skipped rows whose content differs from the stored row (same id, different event) are counted
//! and logged, never merged.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgPool};

use crate::breaker::{Breaker, BreakerError};
use crate::config::DatabaseConfig;
use crate::event::AuditEvent;
use crate::ops::partitions::{self, quote_ident, PartitionInterval};

/// Migrations embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Columns in COPY order. The staging table has the same ones.
const COLUMNS: &str = "event_id, occurred_at, tenant_id, actor_id, actor_type, actor_ip, \
    actor_user_agent, action, resource_type, resource_id, outcome, reason, trace_id, details, \
    session_id, content_hash, schema_version, kafka_topic, kafka_partition, kafka_offset, kafka_timestamp";

/// Per-connection staging table for the duplicate-tolerant path; emptied at every commit.
const CREATE_STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS auditflow_staging (
    event_id uuid NOT NULL, occurred_at timestamptz NOT NULL, tenant_id text NOT NULL,
    actor_id text NOT NULL, actor_type text NOT NULL, actor_ip text, actor_user_agent text,
    action text NOT NULL, resource_type text NOT NULL, resource_id text NOT NULL,
    outcome text NOT NULL, reason text, trace_id text, details jsonb, session_id text,
    content_hash bytea NOT NULL, schema_version smallint, kafka_topic text NOT NULL,
    kafka_partition integer NOT NULL, kafka_offset bigint NOT NULL, kafka_timestamp timestamptz
) ON COMMIT DELETE ROWS";

/// Errors from the database side.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database (or the pool in front of it) failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The Postgres circuit breaker is open, or its probe timed out: the database was not
    /// (fully) tried.
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

/// Whether an error is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The database is unavailable, slow or overloaded: retry the same batch later.
    Transient,
    /// Something in the data is wrong: retrying the same rows fails again.
    Permanent,
}

impl StoreError {
    /// Classifies the error from its type and SQLSTATE, never from its message.
    pub fn retry(&self) -> Retry {
        match self {
            StoreError::Database(err) => classify(err),
            StoreError::Migrate(_) => Retry::Permanent,
            StoreError::Unavailable(_) => Retry::Transient,
        }
    }

    /// The SQLSTATE, when the server sent one.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            StoreError::Database(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
            _ => None,
        }
    }
}

/// Classifies a sqlx error as transient or permanent.
pub fn classify(err: &sqlx::Error) -> Retry {
    match err {
        sqlx::Error::Database(db) => classify_sqlstate(db.code().as_deref().unwrap_or("")),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => Retry::Transient,
        _ => Retry::Permanent,
    }
}

/// Classifies a SQLSTATE: connection trouble, shutdown, overload, lock and serialization
/// conflicts are transient; data exceptions and integrity violations are permanent.
pub fn classify_sqlstate(code: &str) -> Retry {
    match code {
        "57P01" | "57P02" | "57P03" | "53300" | "53200" | "53100" | "40001" | "40P01" | "55P03"
        | "57014" => Retry::Transient,
        _ if code.starts_with("08") => Retry::Transient,
        _ if code.starts_with("22") || code.starts_with("23") => Retry::Permanent,
        // Unknown classes (syntax, privileges, missing objects) will not fix themselves by
        // retrying the same statement, but they are not the record's fault either; treat as
        // transient so nothing is dead-lettered for an operator's mistake.
        _ => Retry::Transient,
    }
}

/// Rows of one batch, already encoded as COPY text.
#[derive(Debug, Default)]
pub struct CopyRows {
    data: Vec<u8>,
    row_ends: Vec<usize>,
    days: BTreeSet<NaiveDate>,
}

/// Everything a row carries besides the event.
#[derive(Debug, Clone, Copy)]
pub struct RowMeta<'a> {
    /// See [`crate::event::content_hash`].
    pub content_hash: [u8; 16],
    /// The writer schema version, when known.
    pub schema_version: Option<u32>,
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
        buf.push(b'\t');
        match meta.schema_version {
            Some(version) => {
                let _ = write!(buf, "{version}");
            }
            None => buf.extend_from_slice(b"\\N"),
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

/// What one batch write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Rows inserted.
    pub stored: u64,
    /// Rows skipped because the same key was already stored.
    pub duplicates: u64,
    /// Of the skipped rows, those whose content differs from the stored row.
    pub conflicts: u64,
}

/// The database side of the sink: a pool, the schema, and which partitions are known to exist.
#[derive(Debug)]
pub struct Store {
    pool: PgPool,
    schema: String,
    known_days: Mutex<BTreeSet<NaiveDate>>,
    expect_duplicates: AtomicBool,
    breaker: Arc<Breaker>,
    num_writes: AtomicU64,
    partition_interval: PartitionInterval,
}

/// Opens a pool whose connections use `schema` as search path and have the staging table.
pub async fn connect(config: &DatabaseConfig, url: &str) -> Result<PgPool, StoreError> {
    let options = PgConnectOptions::from_str(url)?
        .application_name("auditflow")
        .options([("search_path", config.db_schema.as_str())]);
    let pool = PgPoolOptions::new()
        .max_connections(config.db_max_connections)
        .min_connections(0)
        .acquire_timeout(config.acquire_timeout())
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                conn.execute("SET client_min_messages = warning").await?;
                conn.execute(CREATE_STAGING).await?;
                Ok(())
            })
        })
        .connect_lazy_with(options);
    Ok(pool)
}

/// Creates the schema if needed and runs the embedded migrations in it.
///
/// Replicas starting together all migrate: a session advisory lock per schema serializes them
/// (`CREATE SCHEMA IF NOT EXISTS` alone races on the catalog's unique index).
pub async fn migrate(pool: &PgPool, schema: &str) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await?;
    let key = format!("auditflow.migrate.{schema}");
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
        .bind(&key)
        .execute(&mut *conn)
        .await?;
    let result = async {
        sqlx::query(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(schema)
        ))
        .execute(&mut *conn)
        .await?;
        MIGRATOR.run(&mut *conn).await?;
        Ok::<(), StoreError>(())
    }
    .await;
    sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
        .bind(&key)
        .execute(&mut *conn)
        .await?;
    result
}

impl Store {
    /// Wraps a pool opened by [`connect`] on a migrated schema; every write goes through
    /// `breaker`.
    pub fn new(pool: PgPool, schema: impl Into<String>, breaker: Arc<Breaker>) -> Self {
        Store {
            pool,
            schema: schema.into(),
            known_days: Mutex::new(BTreeSet::new()),
            // After a restart, redeliveries are likely: start on the tolerant path.
            expect_duplicates: AtomicBool::new(true),
            breaker,
            num_writes: AtomicU64::new(0),
            partition_interval: PartitionInterval::Day,
        }
    }

    /// Creates missing partitions with `interval` (`AUDITFLOW_PARTITION_INTERVAL`) instead of
    /// daily ones.
    pub fn with_partition_interval(mut self, interval: PartitionInterval) -> Self {
        self.partition_interval = interval;
        self
    }

    /// The Postgres circuit breaker.
    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }

    /// Write transactions attempted so far (each [`Store::write`] call that reached the database).
    pub fn num_writes(&self) -> u64 {
        self.num_writes.load(Ordering::Relaxed)
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Creates the partitions for `days` that this process has not seen yet.
    pub async fn ensure_partitions(
        &self,
        days: impl IntoIterator<Item = NaiveDate>,
    ) -> Result<(), StoreError> {
        let missing: Vec<NaiveDate> = {
            let known = self.known_days.lock().unwrap_or_else(|e| e.into_inner());
            days.into_iter()
                .filter(|day| !known.contains(day))
                .collect()
        };
        for day in missing {
            partitions::ensure_partition(&self.pool, &self.schema, self.partition_interval, day)
                .await?;
            self.known_days
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(day);
        }
        Ok(())
    }

    /// Writes rows `range` of `rows` in one transaction, deduplicated, through the breaker.
    pub async fn write(
        &self,
        rows: &CopyRows,
        range: std::ops::Range<usize>,
    ) -> Result<WriteOutcome, StoreError> {
        if range.is_empty() {
            return Ok(WriteOutcome::default());
        }
        self.breaker
            .call(self.write_unguarded(rows, range), |err: &StoreError| {
                err.retry() == Retry::Transient
            })
            .await
            .map_err(|err| match err {
                BreakerError::Inner(err) => err,
                other => StoreError::Unavailable(other.to_string()),
            })
    }

    async fn write_unguarded(
        &self,
        rows: &CopyRows,
        range: std::ops::Range<usize>,
    ) -> Result<WriteOutcome, StoreError> {
        self.num_writes.fetch_add(1, Ordering::Relaxed);
        self.ensure_partitions(rows.days().iter().copied()).await?;
        let data = rows.bytes_of(range.clone());
        let num_rows = range.len() as u64;
        let mut conn = self.pool.acquire().await?;
        if !self.expect_duplicates.load(Ordering::Relaxed) {
            let mut tx = conn.begin().await?;
            match copy_into(
                &mut tx,
                &format!("{}.events", quote_ident(&self.schema)),
                data,
            )
            .await
            {
                Ok(_) => {
                    tx.commit().await?;
                    return Ok(WriteOutcome {
                        stored: num_rows,
                        ..WriteOutcome::default()
                    });
                }
                Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23505") => {
                    tx.rollback().await?;
                    self.expect_duplicates.store(true, Ordering::Relaxed);
                }
                Err(err) => return Err(err.into()),
            }
        }
        let mut tx = conn.begin().await?;
        copy_into(&mut tx, "pg_temp.auditflow_staging", data).await?;
        let stored = sqlx::query(&format!(
            "INSERT INTO {}.events ({COLUMNS}) SELECT {COLUMNS} FROM pg_temp.auditflow_staging \
             ON CONFLICT DO NOTHING",
            quote_ident(&self.schema)
        ))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let duplicates = num_rows - stored;
        let mut conflicts = 0;
        if duplicates > 0 {
            let rows: Vec<(uuid::Uuid, DateTime<Utc>, i32, i64)> = sqlx::query_as(&format!(
                "SELECT s.event_id, s.occurred_at, s.kafka_partition, s.kafka_offset \
                 FROM pg_temp.auditflow_staging s JOIN {}.events e \
                   ON e.event_id = s.event_id AND e.occurred_at = s.occurred_at \
                 WHERE e.content_hash <> s.content_hash",
                quote_ident(&self.schema)
            ))
            .fetch_all(&mut *tx)
            .await?;
            conflicts = rows.len() as u64;
            for (event_id, occurred_at, partition, offset) in rows.iter().take(20) {
                tracing::warn!(
                    %event_id, %occurred_at, partition, offset,
                    "event id repeats with different content; kept the stored row"
                );
            }
        }
        tx.commit().await?;
        if duplicates == 0 {
            self.expect_duplicates.store(false, Ordering::Relaxed);
        }
        Ok(WriteOutcome {
            stored,
            duplicates,
            conflicts,
        })
    }
}

/// Streams COPY text rows into `table` (already quoted) on `conn`; returns the rows copied.
pub async fn copy_into(
    conn: &mut sqlx::PgConnection,
    table: &str,
    data: &[u8],
) -> Result<u64, sqlx::Error> {
    let mut copy = conn
        .copy_in_raw(&format!("COPY {table} ({COLUMNS}) FROM STDIN"))
        .await?;
    // PgCopyIn buffers; send in chunks so a large batch does not double its memory.
    for chunk in data.chunks(1 << 20) {
        if let Err(err) = copy.send(chunk).await {
            let _ = copy.abort("send failed").await;
            return Err(err);
        }
    }
    copy.finish().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_classify_by_class_not_text() {
        for transient in [
            "08000", "08006", "08P01", "57P01", "53300", "40001", "40P01", "55P03",
        ] {
            assert_eq!(
                classify_sqlstate(transient),
                Retry::Transient,
                "{transient}"
            );
        }
        for permanent in [
            "22001", "22P02", "22P05", "23502", "23514", "23503", "23505",
        ] {
            assert_eq!(
                classify_sqlstate(permanent),
                Retry::Permanent,
                "{permanent}"
            );
        }
    }

    #[test]
    fn pool_and_io_errors_are_transient() {
        assert_eq!(classify(&sqlx::Error::PoolTimedOut), Retry::Transient);
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(classify(&sqlx::Error::Io(io)), Retry::Transient);
        assert_eq!(classify(&sqlx::Error::RowNotFound), Retry::Permanent);
    }

    #[test]
    fn copy_text_escapes_separators() {
        let mut buf = Vec::new();
        write_text(&mut buf, "a\tb\nc\\d\re");
        assert_eq!(buf, b"a\\tb\\nc\\\\d\\re");
    }
}
