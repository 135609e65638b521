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
//!
//! May touch: rows of `events` (COPY and INSERT only), its own temporary staging table, and
//! partitions only through [`crate::db::partition::ensure_partition`].

mod copy;

pub use copy::{CopyRows, RowMeta};

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{Connection, PgPool};

use crate::breaker::{Breaker, BreakerError};
use crate::config::DatabaseConfig;
use crate::db::partition::{self, PartitionInterval};
use crate::db::quote_ident;
use crate::db::retry::{classify, is_partition_missing, Retry};

/// Columns in COPY order. The staging table has the same ones.
const COLUMNS: &str = "event_id, occurred_at, tenant_id, actor_id, actor_type, actor_ip, \
    actor_user_agent, action, resource_type, resource_id, outcome, reason, trace_id, details, \
    session_id, content_hash, schema_version, writer_schema_id, kafka_topic, kafka_partition, \
    kafka_offset, kafka_timestamp";

/// Per-connection staging table for the duplicate-tolerant path; emptied at every commit.
const CREATE_STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS auditflow_staging (
    event_id uuid NOT NULL, occurred_at timestamptz NOT NULL, tenant_id text NOT NULL,
    actor_id text NOT NULL, actor_type text NOT NULL, actor_ip text, actor_user_agent text,
    action text NOT NULL, resource_type text NOT NULL, resource_id text NOT NULL,
    outcome text NOT NULL, reason text, trace_id text, details jsonb, session_id text,
    content_hash bytea NOT NULL, schema_version smallint, writer_schema_id bigint,
    kafka_topic text NOT NULL,
    kafka_partition integer NOT NULL, kafka_offset bigint NOT NULL, kafka_timestamp timestamptz
) ON COMMIT DELETE ROWS";

/// Errors from the database side.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database (or the pool in front of it) failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The Postgres circuit breaker is open, or its probe timed out: the database was not
    /// (fully) tried.
    #[error("database unavailable: {0}")]
    Unavailable(String),
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

impl std::ops::AddAssign for WriteOutcome {
    fn add_assign(&mut self, other: Self) {
        self.stored += other.stored;
        self.duplicates += other.duplicates;
        self.conflicts += other.conflicts;
    }
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

/// Opens the ingest pool: the database settings, plus the per-connection staging table the
/// duplicate-tolerant path writes through.
pub async fn connect(config: &DatabaseConfig, url: &str) -> Result<PgPool, StoreError> {
    let mut settings = config.pool_settings();
    settings.session_setup = &[CREATE_STAGING];
    Ok(crate::db::connect(url, &settings).await?)
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
            let known = self.known_days.lock();
            days.into_iter()
                .filter(|day| !known.contains(day))
                .collect()
        };
        for day in missing {
            partition::ensure_partition(&self.pool, &self.schema, self.partition_interval, day)
                .await?;
            self.known_days.lock().insert(day);
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
        let result = self
            .breaker
            .call(self.write_unguarded(rows, range), |err: &StoreError| {
                err.retry() == Retry::Transient
            })
            .await
            .map_err(|err| match err {
                BreakerError::Inner(err) => err,
                other => StoreError::Unavailable(other.to_string()),
            });
        if let Err(StoreError::Database(err)) = &result {
            if is_partition_missing(err) {
                // Dropped or detached out of band: forget what this process thinks exists, so
                // the retry creates the partition again.
                tracing::warn!(
                    schema = %self.schema,
                    "a partition the batch needs is missing; recreating it before the retry"
                );
                self.known_days.lock().clear();
            }
        }
        result
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
