//! Partitions of the `events` table: created on demand by the ingest path, and kept through
//! their lifecycle by maintenance (premake, retention as a soft delete, legal holds, a grace
//! period before drop, restore).
//!
//! ```text
//!            premake                retention                  grace
//!  (absent) ────────▶ attached ───────────────▶ retired ───────────────▶ dropped
//!                     events_p…   DETACH        retired_events_p…  DROP
//!                        ▲        CONCURRENTLY  (detached, same
//!                        │        + rename       schema, queryable)
//!                        └──────── restore ◀──────────┘
//!  a legal hold covering a partition's range blocks retire and drop
//! ```
//!
//! Names: a partition covers one interval of UTC time and is named after it: `events_pYYYYMMDD`
//! (day), `events_pIYYYwIW` (ISO week, Monday 00:00 UTC to the next Monday, named by ISO year and
//! week number like pg_partman), `events_pYYYYMM` (month). A retired partition is renamed
//! `retired_<name>`. Every identifier in DDL is built from a [`PartitionSpec`] (an interval and
//! a date) and quoted; a name read from the catalog or from a plan file is only used after it
//! has been parsed back into a spec that reproduces it exactly, so no event content and no stray
//! catalog name reaches DDL.
//!
//! Creation ([`ensure_partition`], and `create` actions) is serialized across replicas by a
//! transaction-scoped advisory lock on the schema and checks coverage in `pg_catalog`, so it
//! reports the truth: of eight replicas creating the same partition at once exactly one sees
//! [`Creation::Created`]. A day already covered by any attached partition, whatever its name or
//! interval, "already existed". The table is created on its own and then attached (`ATTACH
//! PARTITION` takes only a `SHARE UPDATE EXCLUSIVE` lock on `events`, so it waits neither for nor
//! in front of inserts and long readers, unlike `CREATE TABLE ... PARTITION OF`).
//!
//! Lifecycle: [`PartitionLifecycle::plan`] reads the catalog, the `partition_lifecycle`
//! bookkeeping table and the active `legal_holds` and decides, for a given `now`, what to create,
//! retire and drop, and why other partitions are kept. [`PartitionLifecycle::apply`] executes a
//! plan's actions in order and re-checks each one at the moment it runs (by planning again for
//! that partition under the relevant locks): an action whose precondition no longer holds is
//! skipped with the reason. [`maintain_partitions_once`] does both under a session advisory lock,
//! so one replica at a time maintains, and [`run_maintenance`] repeats it on an interval.
//! Maintenance DDL runs with a short `lock_timeout`: a statement that would queue behind
//! application traffic is cancelled (SQLSTATE 55P03), reported as skipped and retried next
//! round.
//!
//! Retiring a partition: (1) in one transaction, with `legal_holds` locked against new holds,
//! re-check and record it in `partition_lifecycle` as `retiring`; (2) `DETACH PARTITION ...
//! CONCURRENTLY` (outside any transaction; `FINALIZE` when an earlier detach was interrupted;
//! plain `DETACH` only when Postgres refuses `CONCURRENTLY` because a default partition exists);
//! (3) rename to `retired_<name>` and mark it `retired`. A crash or lock timeout between the
//! steps leaves a `retiring` row that the next plan finishes. Holds block starting a retirement,
//! not finishing one: a retired partition keeps every row and can be restored.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, Utc, Weekday};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres};
use tokio_util::sync::CancellationToken;

use crate::breaker::{Breaker, BreakerError};
use crate::config::PartitionConfig;
use crate::ingest::store::{classify, Retry};

/// Prefix of a retired partition's name.
pub const RETIRED_PREFIX: &str = "retired_";

/// Lock timeout of the ingest path's partition creation: it must succeed for the batch to be
/// written, and `ATTACH PARTITION` conflicts only with other DDL on `events`.
const INGEST_LOCK_TIMEOUT: StdDuration = StdDuration::from_secs(10);

/// Describes the partition metrics for the Prometheus exposition (call once at start-up).
pub fn describe_metrics() {
    metrics::describe_gauge!(
        "auditflow_partitions",
        "partitions of events by state: attached, retired (detached, not dropped yet)"
    );
    metrics::describe_counter!(
        "auditflow_partitions_created_total",
        "partitions created, by maintenance or on demand by the sink"
    );
    metrics::describe_counter!(
        "auditflow_partitions_retired_total",
        "partitions detached and renamed after retention"
    );
    metrics::describe_counter!(
        "auditflow_partitions_dropped_total",
        "retired partitions dropped after the grace period"
    );
    metrics::describe_gauge!(
        "auditflow_partition_premake_ahead_seconds",
        "upper bound of the newest attached partition minus now; alert when below premake"
    );
}

/// After a round with skipped or failed actions, the next round comes at most this much later.
const RETRY_SOON: StdDuration = StdDuration::from_secs(30);

/// What [`ensure_partition`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creation {
    /// This call created the partition.
    Created,
    /// The day was already covered by an attached partition.
    AlreadyExisted,
}

/// The range of time one partition covers.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PartitionInterval {
    /// One UTC day: `events_pYYYYMMDD`.
    #[default]
    Day,
    /// One ISO week, Monday 00:00 UTC to the next Monday: `events_pIYYYwIW`.
    Week,
    /// One calendar month in UTC: `events_pYYYYMM`.
    Month,
}

impl PartitionInterval {
    /// The name used in configuration and output.
    pub fn as_str(self) -> &'static str {
        match self {
            PartitionInterval::Day => "day",
            PartitionInterval::Week => "week",
            PartitionInterval::Month => "month",
        }
    }
}

impl fmt::Display for PartitionInterval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PartitionInterval {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "day" => Ok(PartitionInterval::Day),
            "week" => Ok(PartitionInterval::Week),
            "month" => Ok(PartitionInterval::Month),
            other => Err(format!("expected day, week or month, got {other:?}")),
        }
    }
}

/// One partition auditflow manages: an interval and the first day it covers. Its name and bounds
/// derive from these two only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionSpec {
    interval: PartitionInterval,
    start: NaiveDate,
}

impl PartitionSpec {
    /// The partition of `interval` that contains `day`.
    pub fn containing(interval: PartitionInterval, day: NaiveDate) -> Self {
        let start = match interval {
            PartitionInterval::Day => day,
            PartitionInterval::Week => {
                day - Duration::days(i64::from(day.weekday().num_days_from_monday()))
            }
            PartitionInterval::Month => day.with_day(1).unwrap_or(day),
        };
        PartitionSpec { interval, start }
    }

    /// Parses a partition name (`events_p…`) back into its spec; `None` unless the spec's name
    /// is exactly `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        let rest = name.strip_prefix("events_p")?;
        let digits = |text: &str| -> Option<u32> {
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            text.parse().ok()
        };
        let spec = match rest.len() {
            8 => PartitionSpec {
                interval: PartitionInterval::Day,
                start: NaiveDate::from_ymd_opt(
                    digits(&rest[..4])? as i32,
                    digits(&rest[4..6])?,
                    digits(&rest[6..8])?,
                )?,
            },
            7 if rest.as_bytes()[4] == b'w' => PartitionSpec {
                interval: PartitionInterval::Week,
                start: NaiveDate::from_isoywd_opt(
                    digits(&rest[..4])? as i32,
                    digits(&rest[5..7])?,
                    Weekday::Mon,
                )?,
            },
            6 => PartitionSpec {
                interval: PartitionInterval::Month,
                start: NaiveDate::from_ymd_opt(
                    digits(&rest[..4])? as i32,
                    digits(&rest[4..6])?,
                    1,
                )?,
            },
            _ => return None,
        };
        (spec.name() == name).then_some(spec)
    }

    /// Parses a retired partition's name (`retired_events_p…`).
    pub fn from_retired_name(name: &str) -> Option<Self> {
        Self::from_name(name.strip_prefix(RETIRED_PREFIX)?)
    }

    /// The interval.
    pub fn interval(&self) -> PartitionInterval {
        self.interval
    }

    /// The first day covered.
    pub fn start(&self) -> NaiveDate {
        self.start
    }

    /// The first day not covered any more.
    pub fn end(&self) -> NaiveDate {
        match self.interval {
            PartitionInterval::Day => self.start + Duration::days(1),
            PartitionInterval::Week => self.start + Duration::days(7),
            PartitionInterval::Month => {
                let (year, month) = if self.start.month() == 12 {
                    (self.start.year() + 1, 1)
                } else {
                    (self.start.year(), self.start.month() + 1)
                };
                NaiveDate::from_ymd_opt(year, month, 1).unwrap_or(self.start + Duration::days(31))
            }
        }
    }

    /// The lower bound (inclusive), midnight UTC.
    pub fn from(&self) -> DateTime<Utc> {
        midnight(self.start)
    }

    /// The upper bound (exclusive), midnight UTC.
    pub fn to(&self) -> DateTime<Utc> {
        midnight(self.end())
    }

    /// The next partition of the same interval.
    pub fn next(&self) -> Self {
        Self::containing(self.interval, self.end())
    }

    /// The table name while attached.
    pub fn name(&self) -> String {
        match self.interval {
            PartitionInterval::Day => format!("events_p{}", self.start.format("%Y%m%d")),
            PartitionInterval::Week => {
                let week = self.start.iso_week();
                format!("events_p{:04}w{:02}", week.year(), week.week())
            }
            PartitionInterval::Month => format!("events_p{}", self.start.format("%Y%m")),
        }
    }

    /// The table name once retired.
    pub fn retired_name(&self) -> String {
        format!("{RETIRED_PREFIX}{}", self.name())
    }

    fn days(&self) -> impl Iterator<Item = NaiveDate> {
        let end = self.end();
        self.start.iter_days().take_while(move |day| *day < end)
    }

    /// `FOR VALUES FROM (...) TO (...)`, from dates only.
    fn bounds_sql(&self) -> String {
        format!(
            "FOR VALUES FROM ('{} 00:00:00+00') TO ('{} 00:00:00+00')",
            self.start.format("%Y-%m-%d"),
            self.end().format("%Y-%m-%d")
        )
    }
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    day.and_time(NaiveTime::MIN).and_utc()
}

/// The partition's table name for a day (daily interval).
pub fn partition_name(day: NaiveDate) -> String {
    PartitionSpec::containing(PartitionInterval::Day, day).name()
}

/// A double-quoted identifier. Callers pass names built from dates and validated schema names.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Parses a time given on the command line: RFC 3339, or a date meaning midnight UTC.
pub fn parse_time(value: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(value) {
        return Ok(time.to_utc());
    }
    NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .map(midnight)
        .map_err(|_| format!("expected an RFC 3339 time or a YYYY-MM-DD date, got {value:?}"))
}

/// Runs one unparameterised statement (DDL, `SET`, `LOCK`) without preparing it: the names in it
/// change from call to call, so a cached prepared statement would never be reused.
async fn execute_ddl(conn: &mut PgConnection, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::query(sql)
        .persistent(false)
        .execute(conn)
        .await
        .map(drop)
}

/// The advisory lock key serializing partition creation on one schema's `events` table.
fn ddl_lock_key(schema: &str) -> String {
    format!("auditflow.partitions.{schema}")
}

/// The session advisory lock key that lets one replica at a time maintain `schema`'s partitions
/// (`pg_try_advisory_lock(hashtextextended(key, 0))`). Public for operators' tooling and tests.
pub fn maintenance_lock_key(schema: &str) -> String {
    format!("auditflow.partition-maintenance.{schema}")
}

/// Creates the daily partition for `day` unless the day is covered; see [`ensure_partition`].
pub async fn ensure_day(
    pool: &PgPool,
    schema: &str,
    day: NaiveDate,
) -> Result<Creation, sqlx::Error> {
    ensure_partition(pool, schema, PartitionInterval::Day, day).await
}

/// Makes sure `day` is covered by an attached partition, creating the partition of `interval`
/// that contains it if none covers it.
///
/// Safe to call from many replicas at once: a transaction-scoped advisory lock makes the coverage
/// check and the creation atomic with respect to other auditflow processes, and an overlap
/// reported by Postgres (someone else's DDL) also counts as "already existed". If the interval's
/// range is partly covered by partitions of another interval (the setting was changed), the day
/// gets a daily partition instead.
pub async fn ensure_partition(
    pool: &PgPool,
    schema: &str,
    interval: PartitionInterval,
    day: NaiveDate,
) -> Result<Creation, sqlx::Error> {
    let mut tx = pool.begin().await?;
    set_local_lock_timeout(&mut tx, INGEST_LOCK_TIMEOUT).await?;
    lock_ddl(&mut tx, schema).await?;
    let attached = attached_partitions(&mut tx, schema).await?;
    let day_spec = PartitionSpec::containing(PartitionInterval::Day, day);
    if attached.iter().any(|p| p.overlaps_spec(&day_spec)) {
        tx.commit().await?;
        return Ok(Creation::AlreadyExisted);
    }
    let mut target = PartitionSpec::containing(interval, day);
    if attached.iter().any(|p| p.overlaps_spec(&target)) {
        target = day_spec;
    }
    match create_and_attach(&mut tx, schema, &target).await {
        Ok(()) => {}
        Err(err) if sqlstate(&err).as_deref() == Some("42P17") => {
            tx.rollback().await?;
            return Ok(Creation::AlreadyExisted);
        }
        Err(err) => return Err(err),
    }
    tx.commit().await?;
    tracing::info!(schema, partition = %target.name(), "created partition");
    metrics::counter!("auditflow_partitions_created_total").increment(1);
    Ok(Creation::Created)
}

async fn set_local_lock_timeout(
    conn: &mut PgConnection,
    timeout: StdDuration,
) -> Result<(), sqlx::Error> {
    // An integer is the only thing spliced in.
    sqlx::query(&format!("SET LOCAL lock_timeout = {}", timeout.as_millis()))
        .execute(conn)
        .await?;
    Ok(())
}

async fn lock_ddl(conn: &mut PgConnection, schema: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(ddl_lock_key(schema))
        .execute(conn)
        .await?;
    Ok(())
}

/// Creates the spec's table like `events` and attaches it. Indexes are created by the attach
/// (with the same names `PARTITION OF` would give them).
async fn create_and_attach(
    conn: &mut PgConnection,
    schema: &str,
    spec: &PartitionSpec,
) -> Result<(), sqlx::Error> {
    let schema_q = quote_ident(schema);
    let name_q = quote_ident(&spec.name());
    execute_ddl(
        &mut *conn,
        &format!(
        "CREATE TABLE {schema_q}.{name_q} (LIKE {schema_q}.events INCLUDING ALL EXCLUDING INDEXES)"
    ),
    )
    .await?;
    execute_ddl(
        &mut *conn,
        &format!(
            "ALTER TABLE {schema_q}.events ATTACH PARTITION {schema_q}.{name_q} {}",
            spec.bounds_sql()
        ),
    )
    .await?;
    Ok(())
}

fn sqlstate(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|code| code.into_owned()),
        _ => None,
    }
}

/// True when the connection or the server is the problem (not this statement): such errors end a
/// maintenance round instead of being reported per action.
fn is_connection_problem(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(_) => sqlstate(err).is_some_and(|code| {
            code.starts_with("08") || code.starts_with("57P") || code.starts_with("53")
        }),
        other => classify(other) == Retry::Transient,
    }
}

/// Errors of the partition lifecycle.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Another replica holds the maintenance lock; nothing was changed.
    #[error("partition maintenance is running elsewhere (advisory lock held); retry later")]
    Busy,
    /// The Postgres circuit breaker is open or its probe timed out.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The request cannot be carried out as asked (unknown name, empty reason, bad range, ...).
    #[error("{0}")]
    Invalid(String),
}

impl PartitionError {
    /// True for failures that say the database is unavailable (they count against a breaker);
    /// lock timeouts, deadlocks and refusals do not.
    pub fn is_unavailability(&self) -> bool {
        match self {
            PartitionError::Database(err) => is_connection_problem(err),
            PartitionError::Unavailable(_) => true,
            PartitionError::Busy | PartitionError::Invalid(_) => false,
        }
    }
}

/// True for errors that mean "the table is busy": retry later.
fn is_lock_conflict(err: &PartitionError) -> bool {
    matches!(err, PartitionError::Database(db)
        if matches!(sqlstate(db).as_deref(), Some("55P03" | "40P01")))
}

/// A range whose ends may be unbounded (`None`: MINVALUE / MAXVALUE).
type Bounds = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// An attached partition as the catalog shows it (any name, possibly not auditflow's).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct Attached {
    name: String,
    /// `None`: MINVALUE.
    #[sqlx(rename = "range_from")]
    from: Option<DateTime<Utc>>,
    /// `None`: MAXVALUE.
    #[sqlx(rename = "range_to")]
    to: Option<DateTime<Utc>>,
    is_default: bool,
    /// An interrupted `DETACH ... CONCURRENTLY` left it half detached (`FINALIZE` finishes it).
    detach_pending: bool,
}

impl Attached {
    fn overlaps(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> bool {
        !self.is_default && self.from.is_none_or(|f| f < to) && self.to.is_none_or(|t| from < t)
    }

    fn overlaps_spec(&self, spec: &PartitionSpec) -> bool {
        self.overlaps(spec.from(), spec.to())
    }
}

/// A row of `partition_lifecycle`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct LifecycleRow {
    partition_name: String,
    state: String,
    range_from: DateTime<Utc>,
    range_to: DateTime<Utc>,
    retired_at: DateTime<Utc>,
    restored_at: Option<DateTime<Utc>>,
    dropped_at: Option<DateTime<Utc>>,
}

const LIFECYCLE_COLUMNS: &str =
    "partition_name, state, range_from, range_to, retired_at, restored_at, dropped_at";

/// An active legal hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Hold {
    /// The id `release` takes.
    pub id: i64,
    /// Start of the held range (inclusive).
    pub range_from: DateTime<Utc>,
    /// End of the held range (exclusive).
    pub range_to: DateTime<Utc>,
    /// Why (case number, request).
    pub reason: String,
    /// When it was placed (database time).
    pub created_at: DateTime<Utc>,
    /// The database role that placed it.
    pub created_by: String,
}

impl Hold {
    fn overlaps(&self, from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> bool {
        from.is_none_or(|f| f < self.range_to) && to.is_none_or(|t| self.range_from < t)
    }
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "hold {}  {}  {:?}  (placed {} by {})",
            self.id,
            Range(Some(self.range_from), Some(self.range_to)),
            self.reason,
            self.created_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            self.created_by
        )
    }
}

/// What the planner reads.
#[derive(Debug, Clone, Default)]
struct Inventory {
    attached: Vec<Attached>,
    /// Every table in the schema (attached or not).
    tables: BTreeSet<String>,
    /// Lifecycle rows not yet dropped, by partition name.
    lifecycle: BTreeMap<String, LifecycleRow>,
    holds: Vec<Hold>,
}

async fn events_exists(conn: &mut PgConnection, schema: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT to_regclass(format('%I.events', $1::text)) IS NOT NULL")
        .bind(schema)
        .fetch_one(conn)
        .await
}

async fn attached_partitions(
    conn: &mut PgConnection,
    schema: &str,
) -> Result<Vec<Attached>, sqlx::Error> {
    // Bounds are printed by pg_get_expr in the session's time zone and DateStyle and cast back in
    // the same session, so the round trip is exact. MINVALUE/MAXVALUE do not match and are NULL.
    sqlx::query_as(
        r#"SELECT c.relname::text AS name,
                  b.bound = 'DEFAULT' AS is_default,
                  (regexp_match(b.bound, 'FROM \(''([^'']*)''\)'))[1]::timestamptz AS range_from,
                  (regexp_match(b.bound, 'TO \(''([^'']*)''\)'))[1]::timestamptz AS range_to,
                  i.inhdetachpending AS detach_pending
           FROM pg_catalog.pg_inherits i
           JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
           CROSS JOIN LATERAL (SELECT pg_catalog.pg_get_expr(c.relpartbound, c.oid) AS bound) b
           WHERE i.inhparent = to_regclass(format('%I.events', $1::text))
           ORDER BY range_from NULLS FIRST, name"#,
    )
    .bind(schema)
    .fetch_all(conn)
    .await
}

async fn read_inventory(
    conn: &mut PgConnection,
    schema: &str,
) -> Result<Inventory, PartitionError> {
    if !events_exists(&mut *conn, schema).await? {
        return Err(PartitionError::Invalid(format!(
            "schema {schema:?} has no events table; run `auditflow migrate` first"
        )));
    }
    let attached = attached_partitions(&mut *conn, schema).await?;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'f')",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await?;
    let schema_q = quote_ident(schema);
    let lifecycle: Vec<LifecycleRow> = sqlx::query_as(&format!(
        "SELECT {LIFECYCLE_COLUMNS} FROM {schema_q}.partition_lifecycle WHERE state <> 'dropped'"
    ))
    .fetch_all(&mut *conn)
    .await?;
    let holds: Vec<Hold> = sqlx::query_as(&format!(
        "SELECT id, range_from, range_to, reason, created_at, created_by \
         FROM {schema_q}.legal_holds WHERE released_at IS NULL ORDER BY id"
    ))
    .fetch_all(&mut *conn)
    .await?;
    Ok(Inventory {
        attached,
        tables: tables.into_iter().collect(),
        lifecycle: lifecycle
            .into_iter()
            .map(|row| (row.partition_name.clone(), row))
            .collect(),
        holds,
    })
}

/// What an action does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    /// Create and attach a partition.
    Create,
    /// Detach a partition past retention and rename it to its retired name.
    Retire,
    /// Drop a retired partition whose grace period is over.
    Drop,
}

impl ActionKind {
    fn as_str(self) -> &'static str {
        match self {
            ActionKind::Create => "create",
            ActionKind::Retire => "retire",
            ActionKind::Drop => "drop",
        }
    }
}

/// One step of a [`Plan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    /// What is done.
    pub kind: ActionKind,
    /// The partition's name while attached (`events_p…`); with `from` and `to` it must match its
    /// [`PartitionSpec`] or the action is skipped.
    pub partition: String,
    /// The table the DDL acts on: the partition itself for `create` and `retire`, its retired
    /// name for `drop`.
    pub table: String,
    /// Lower bound of the partition's range (inclusive).
    pub from: DateTime<Utc>,
    /// Upper bound (exclusive).
    pub to: DateTime<Utc>,
    /// Why, in words.
    pub reason: String,
}

impl Action {
    fn new(kind: ActionKind, spec: &PartitionSpec, reason: String) -> Self {
        Action {
            kind,
            partition: spec.name(),
            table: match kind {
                ActionKind::Create | ActionKind::Retire => spec.name(),
                ActionKind::Drop => spec.retired_name(),
            },
            from: spec.from(),
            to: spec.to(),
            reason,
        }
    }

    /// The spec, if the names and bounds are exactly what the dates give.
    fn spec(&self) -> Option<PartitionSpec> {
        let spec = PartitionSpec::from_name(&self.partition)?;
        let expected = Action::new(self.kind, &spec, String::new());
        (expected.table == self.table && expected.from == self.from && expected.to == self.to)
            .then_some(spec)
    }

    fn same_step(&self, other: &Action) -> bool {
        self.kind == other.kind
            && self.partition == other.partition
            && self.table == other.table
            && self.from == other.from
            && self.to == other.to
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = match self.kind {
            ActionKind::Retire => format!("{} -> {RETIRED_PREFIX}{}", self.table, self.partition),
            _ => self.table.clone(),
        };
        write!(
            f,
            "{:<6}  {target}  {}  {}",
            self.kind.as_str(),
            Range(Some(self.from), Some(self.to)),
            self.reason
        )
    }
}

/// A partition the plan leaves alone although something might be expected of it, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    /// The table as it is named now.
    pub table: String,
    /// Lower bound (inclusive); `None` for MINVALUE.
    pub from: Option<DateTime<Utc>>,
    /// Upper bound (exclusive); `None` for MAXVALUE.
    pub to: Option<DateTime<Utc>>,
    /// Why it is kept.
    pub reason: String,
    /// The legal holds keeping it, if any.
    pub holds: Vec<i64>,
}

impl fmt::Display for Kept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "keep    {}  {}  {}",
            self.table,
            Range(self.from, self.to),
            self.reason
        )
    }
}

/// What maintenance would do at `now`, and why it keeps what it keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The schema of the `events` table.
    pub schema: String,
    /// The time the plan is for (the clock; `--now` simulates another).
    pub now: DateTime<Utc>,
    /// `AUDITFLOW_PARTITION_INTERVAL` when planned.
    pub interval: PartitionInterval,
    /// `AUDITFLOW_PARTITION_PREMAKE` when planned.
    pub premake: u32,
    /// `AUDITFLOW_PARTITION_RETENTION_DAYS` when planned (0: forever).
    pub retention_days: u32,
    /// `AUDITFLOW_PARTITION_RETIRED_GRACE_DAYS` when planned.
    pub retired_grace_days: u32,
    /// The steps, in the order `apply` runs them: create, then retire, then drop.
    pub actions: Vec<Action>,
    /// Partitions past retention or retired ones past grace that stay, with the reason.
    pub kept: Vec<Kept>,
    /// Anomalies found that maintenance does not fix by itself.
    pub warnings: Vec<String>,
}

impl Plan {
    fn kept_reason(&self, table: &str) -> Option<&str> {
        self.kept
            .iter()
            .find(|kept| kept.table == table)
            .map(|kept| kept.reason.as_str())
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let retention = if self.retention_days == 0 {
            "forever".to_string()
        } else {
            format!("{} days", self.retention_days)
        };
        writeln!(
            f,
            "partition plan for {}.events at {}: interval {}, premake {}, retention {}, retired grace {} days",
            self.schema,
            self.now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            self.interval,
            self.premake,
            retention,
            self.retired_grace_days
        )?;
        for action in &self.actions {
            writeln!(f, "  {action}")?;
        }
        for kept in &self.kept {
            writeln!(f, "  {kept}")?;
        }
        for warning in &self.warnings {
            writeln!(f, "  warning: {warning}")?;
        }
        let count = |kind| self.actions.iter().filter(|a| a.kind == kind).count();
        write!(
            f,
            "{} to create, {} to retire, {} to drop, {} kept",
            count(ActionKind::Create),
            count(ActionKind::Retire),
            count(ActionKind::Drop),
            self.kept.len()
        )
    }
}

/// Formats `[from, to)`, as dates when both are midnight UTC.
struct Range(Option<DateTime<Utc>>, Option<DateTime<Utc>>);

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole_days = [self.0, self.1]
            .iter()
            .flatten()
            .all(|t| t.time() == NaiveTime::MIN);
        let show = |t: Option<DateTime<Utc>>, unbounded: &str| match t {
            None => unbounded.to_string(),
            Some(t) if whole_days => t.format("%Y-%m-%d").to_string(),
            Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        };
        write!(
            f,
            "[{}, {})",
            show(self.0, "MINVALUE"),
            show(self.1, "MAXVALUE")
        )
    }
}

fn describe_holds(holds: &[&Hold]) -> String {
    holds
        .iter()
        .map(|hold| {
            format!(
                "legal hold {} ({:?}, {})",
                hold.id,
                hold.reason,
                Range(Some(hold.range_from), Some(hold.range_to))
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn count_of(interval: PartitionInterval, count: u32) -> String {
    let unit = interval.as_str();
    if count == 1 {
        format!("1 {unit}")
    } else {
        format!("{count} {unit}s")
    }
}

fn timestamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Decides what maintenance does at `now`. Pure: everything it needs is in `inventory`.
fn plan_from(
    inventory: &Inventory,
    schema: &str,
    config: &PartitionConfig,
    now: DateTime<Utc>,
) -> Plan {
    let mut plan = Plan {
        schema: schema.to_string(),
        now,
        interval: config.partition_interval,
        premake: config.partition_premake,
        retention_days: config.partition_retention_days,
        retired_grace_days: config.partition_retired_grace_days,
        actions: Vec::new(),
        kept: Vec::new(),
        warnings: Vec::new(),
    };
    plan_creation(inventory, config, now, &mut plan);
    plan_retirement(inventory, config, now, &mut plan);
    plan_drop(inventory, config, now, &mut plan);
    plan
}

fn plan_creation(
    inventory: &Inventory,
    config: &PartitionConfig,
    now: DateTime<Utc>,
    plan: &mut Plan,
) {
    let interval = config.partition_interval;
    let current = PartitionSpec::containing(interval, now.date_naive());
    let mut last = current;
    for _ in 0..config.partition_premake {
        last = last.next();
    }
    // Ranges covered so far: attached partitions plus the ones planned here.
    let mut covered: Vec<Bounds> = inventory
        .attached
        .iter()
        .filter(|p| !p.is_default)
        .map(|p| (p.from, p.to))
        .collect();
    let overlaps = |covered: &[Bounds], spec: &PartitionSpec| {
        covered
            .iter()
            .any(|(f, t)| f.is_none_or(|f| f < spec.to()) && t.is_none_or(|t| spec.from() < t))
    };
    let mut day = current.start();
    while day < last.end() {
        let day_spec = PartitionSpec::containing(PartitionInterval::Day, day);
        let next_day = day + Duration::days(1);
        if overlaps(&covered, &day_spec) {
            day = next_day;
            continue;
        }
        let natural = PartitionSpec::containing(interval, day);
        let ahead = {
            let mut spec = current;
            let mut steps = 0;
            while spec != natural && steps <= config.partition_premake {
                spec = spec.next();
                steps += 1;
            }
            steps
        };
        let why = if ahead == 0 {
            format!("the current {interval}")
        } else {
            format!(
                "premake: {} ahead (AUDITFLOW_PARTITION_PREMAKE={})",
                count_of(interval, ahead),
                config.partition_premake
            )
        };
        let (target, why) = if overlaps(&covered, &natural) {
            (
                day_spec,
                format!("{why}; daily because partitions of another interval cover part of the {interval}"),
            )
        } else {
            (natural, why)
        };
        if inventory.tables.contains(&target.name()) {
            plan.warnings.push(format!(
                "a table named {} exists but is not attached to events: {} is not covered \
                 (attach or rename it)",
                target.name(),
                Range(Some(target.from()), Some(target.to()))
            ));
        } else {
            plan.actions
                .push(Action::new(ActionKind::Create, &target, why));
        }
        covered.push((Some(target.from()), Some(target.to())));
        day = next_day;
    }
}

fn plan_retirement(
    inventory: &Inventory,
    config: &PartitionConfig,
    now: DateTime<Utc>,
    plan: &mut Plan,
) {
    let grace = Duration::days(i64::from(config.partition_retired_grace_days));
    let mut retiring: BTreeSet<String> = BTreeSet::new();
    let mut actions = Vec::new();
    // Interrupted retirements first: one pending detach blocks every other concurrent detach.
    for row in inventory
        .lifecycle
        .values()
        .filter(|row| row.state == "retiring")
    {
        let Some(spec) = PartitionSpec::from_name(&row.partition_name) else {
            plan.warnings.push(format!(
                "partition_lifecycle row {:?} is not an auditflow partition name; ignored",
                row.partition_name
            ));
            continue;
        };
        let attached = inventory
            .attached
            .iter()
            .find(|p| p.name == spec.name() || p.name == spec.retired_name());
        if attached.is_some_and(|p| !p.detach_pending) {
            // The detach never started (it timed out waiting for a lock): an ordinary candidate
            // below, so holds and retention are checked again.
            continue;
        }
        let present = inventory.tables.contains(&spec.name())
            || inventory.tables.contains(&spec.retired_name());
        if !present {
            plan.warnings.push(format!(
                "{} is recorded as retiring but neither it nor {} exists",
                spec.name(),
                spec.retired_name()
            ));
            continue;
        }
        retiring.insert(spec.name());
        actions.push(Action::new(
            ActionKind::Retire,
            &spec,
            format!(
                "finishing the retirement started {} (interrupted or timed out)",
                timestamp(row.retired_at)
            ),
        ));
    }
    if config.partition_retention_days > 0 {
        let cutoff = now - Duration::days(i64::from(config.partition_retention_days));
        let mut candidates: Vec<&Attached> = inventory
            .attached
            .iter()
            .filter(|p| !p.is_default && p.to.is_some_and(|to| to <= cutoff))
            .filter(|p| !retiring.contains(&p.name))
            .collect();
        candidates.sort_by_key(|p| (!p.detach_pending, p.from));
        for partition in candidates {
            let kept = |reason: String, holds: Vec<i64>| Kept {
                table: partition.name.clone(),
                from: partition.from,
                to: partition.to,
                reason,
                holds,
            };
            let spec = PartitionSpec::from_name(&partition.name).filter(|spec| {
                Some(spec.from()) == partition.from && Some(spec.to()) == partition.to
            });
            let Some(spec) = spec else {
                plan.kept.push(kept(
                    "past retention, but not named or bounded like an auditflow partition; left alone"
                        .into(),
                    Vec::new(),
                ));
                continue;
            };
            let holds: Vec<&Hold> = inventory
                .holds
                .iter()
                .filter(|hold| hold.overlaps(partition.from, partition.to))
                .collect();
            if !holds.is_empty() {
                plan.kept.push(kept(
                    format!("past retention, kept by {}", describe_holds(&holds)),
                    holds.iter().map(|hold| hold.id).collect(),
                ));
                continue;
            }
            if let Some(restored_at) = inventory
                .lifecycle
                .get(&spec.name())
                .filter(|row| row.state == "restored")
                .and_then(|row| row.restored_at)
            {
                if restored_at + grace > now {
                    plan.kept.push(kept(
                        format!(
                            "past retention, restored {}; retired again from {} unless a legal hold covers it",
                            timestamp(restored_at),
                            timestamp(restored_at + grace)
                        ),
                        Vec::new(),
                    ));
                    continue;
                }
            }
            actions.push(Action::new(
                ActionKind::Retire,
                &spec,
                format!(
                    "ended {}, before the retention cutoff {} (AUDITFLOW_PARTITION_RETENTION_DAYS={})",
                    timestamp(spec.to()),
                    timestamp(cutoff),
                    config.partition_retention_days
                ),
            ));
        }
    }
    for partition in inventory.attached.iter().filter(|p| p.detach_pending) {
        let handled = actions
            .iter()
            .any(|a: &Action| a.table == partition.name || a.partition == partition.name);
        if !handled {
            plan.warnings.push(format!(
                "{} is pending detach (an interrupted DETACH ... CONCURRENTLY that maintenance does \
                 not own); no other partition can be detached concurrently until it is finalized \
                 (ALTER TABLE events DETACH PARTITION ... FINALIZE)",
                partition.name
            ));
        }
    }
    plan.actions.extend(actions);
}

fn plan_drop(inventory: &Inventory, config: &PartitionConfig, now: DateTime<Utc>, plan: &mut Plan) {
    let grace = Duration::days(i64::from(config.partition_retired_grace_days));
    for row in inventory
        .lifecycle
        .values()
        .filter(|row| row.state == "retired")
    {
        let Some(spec) = PartitionSpec::from_name(&row.partition_name)
            .filter(|spec| spec.from() == row.range_from && spec.to() == row.range_to)
        else {
            plan.warnings.push(format!(
                "partition_lifecycle row {:?} does not match an auditflow partition; ignored",
                row.partition_name
            ));
            continue;
        };
        let table = spec.retired_name();
        if !inventory.tables.contains(&table) {
            plan.warnings.push(format!(
                "{table} is recorded as retired but does not exist (dropped by hand?)"
            ));
            continue;
        }
        if inventory.attached.iter().any(|p| p.name == table) {
            plan.warnings.push(format!(
                "{table} is recorded as retired but is attached to events; left alone"
            ));
            continue;
        }
        let kept = |reason: String, holds: Vec<i64>| Kept {
            table: table.clone(),
            from: Some(spec.from()),
            to: Some(spec.to()),
            reason,
            holds,
        };
        let holds: Vec<&Hold> = inventory
            .holds
            .iter()
            .filter(|hold| hold.overlaps(Some(spec.from()), Some(spec.to())))
            .collect();
        let due = row.retired_at + grace;
        if due > now {
            plan.kept.push(kept(
                format!(
                    "retired {}; dropped from {} (AUDITFLOW_PARTITION_RETIRED_GRACE_DAYS={})",
                    timestamp(row.retired_at),
                    timestamp(due),
                    config.partition_retired_grace_days
                ),
                holds.iter().map(|hold| hold.id).collect(),
            ));
            continue;
        }
        if !holds.is_empty() {
            plan.kept.push(kept(
                format!(
                    "retired {}, grace over, kept by {}",
                    timestamp(row.retired_at),
                    describe_holds(&holds)
                ),
                holds.iter().map(|hold| hold.id).collect(),
            ));
            continue;
        }
        plan.actions.push(Action::new(
            ActionKind::Drop,
            &spec,
            format!(
                "retired {}; the grace period ended {}",
                timestamp(row.retired_at),
                timestamp(due)
            ),
        ));
    }
}

/// What became of one action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The partition was created and attached by this action.
    Created,
    /// The range was already covered when the action ran.
    AlreadyExisted,
    /// The partition was detached and renamed to its retired name.
    Retired,
    /// The retired partition was dropped.
    Dropped,
    /// The precondition no longer held, or the table was busy (lock timeout): nothing changed
    /// (a retirement may be half done and is finished next round).
    Skipped {
        /// Why.
        detail: String,
    },
    /// The database refused the DDL for a reason other than a lock conflict.
    Failed {
        /// The error.
        detail: String,
    },
}

impl Outcome {
    /// True for the outcomes that leave nothing to retry.
    pub fn is_done(&self) -> bool {
        !matches!(self, Outcome::Skipped { .. } | Outcome::Failed { .. })
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Created => f.write_str("created"),
            Outcome::AlreadyExisted => f.write_str("already existed"),
            Outcome::Retired => f.write_str("retired"),
            Outcome::Dropped => f.write_str("dropped"),
            Outcome::Skipped { detail } => write!(f, "skipped: {detail}"),
            Outcome::Failed { detail } => write!(f, "failed: {detail}"),
        }
    }
}

/// An action and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionResult {
    /// The action, as planned.
    #[serde(flatten)]
    pub action: Action,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What [`PartitionLifecycle::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    /// The schema.
    pub schema: String,
    /// The plan's time.
    pub now: DateTime<Utc>,
    /// One result per action of the plan, in the plan's order.
    pub results: Vec<ActionResult>,
}

impl fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "partition maintenance of {}.events at {}",
            self.schema,
            timestamp(self.now)
        )?;
        for result in &self.results {
            writeln!(f, "  {}: {}", result.action, result.outcome)?;
        }
        let done = self.results.iter().filter(|r| r.outcome.is_done()).count();
        write!(
            f,
            "{done} done, {} skipped or failed",
            self.results.len() - done
        )
    }
}

/// What [`PartitionLifecycle::restore`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    /// The partition, attached again under its original name.
    pub partition: String,
    /// Lower bound (inclusive).
    pub from: DateTime<Utc>,
    /// Upper bound (exclusive).
    pub to: DateTime<Utc>,
    /// When (the clock used).
    pub restored_at: DateTime<Utc>,
    /// Still past retention: maintenance retires it again from `retire_again_from` unless a legal
    /// hold covers it.
    pub past_retention: bool,
    /// The end of the protection a restore gives (restored_at + the retired grace period).
    pub retire_again_from: DateTime<Utc>,
}

impl fmt::Display for Restored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "restored {} {}",
            self.partition,
            Range(Some(self.from), Some(self.to))
        )?;
        if self.past_retention {
            write!(
                f,
                "; it is past retention: maintenance retires it again from {} unless a legal hold covers it",
                timestamp(self.retire_again_from)
            )?;
        }
        Ok(())
    }
}

/// What one maintenance round did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaintenanceRound {
    /// Another replica holds the maintenance lock: nothing was read or changed.
    Skipped,
    /// This replica planned and applied.
    Done {
        /// The plan (with what is kept and why).
        plan: Plan,
        /// What became of its actions.
        report: ApplyReport,
    },
}

/// The partition lifecycle of one schema's `events` table: planning, applying, legal holds and
/// restore. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PartitionLifecycle {
    pool: PgPool,
    schema: String,
    config: PartitionConfig,
    breaker: Option<Arc<Breaker>>,
}

/// A pooled connection holding the maintenance lock, with the maintenance `lock_timeout` set for
/// the session. It is closed rather than returned to the pool, so neither the lock nor the
/// setting can leak to another user of the pool, even if the holder is dropped mid-way.
struct MaintenanceLock {
    conn: PoolConnection<Postgres>,
    key: String,
}

impl MaintenanceLock {
    async fn try_acquire(
        pool: &PgPool,
        schema: &str,
        lock_timeout: StdDuration,
    ) -> Result<Option<Self>, sqlx::Error> {
        let mut conn = pool.acquire().await?;
        conn.close_on_drop();
        execute_ddl(
            &mut conn,
            &format!("SET lock_timeout = {}", lock_timeout.as_millis()),
        )
        .await?;
        let key = maintenance_lock_key(schema);
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                .bind(&key)
                .fetch_one(&mut *conn)
                .await?;
        Ok(locked.then_some(MaintenanceLock { conn, key }))
    }

    async fn release(mut self) {
        // Closing the connection (on drop) releases the lock anyway; unlocking first is tidier
        // for whoever watches pg_locks.
        if let Err(err) = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
            .bind(&self.key)
            .execute(&mut *self.conn)
            .await
        {
            tracing::debug!(error = %err, "could not unlock the maintenance lock; closing the connection");
        }
    }
}

impl PartitionLifecycle {
    /// The lifecycle of `schema`'s `events` table (migrated), using `pool`.
    pub fn new(pool: PgPool, schema: impl Into<String>, config: PartitionConfig) -> Self {
        PartitionLifecycle {
            pool,
            schema: schema.into(),
            config,
            breaker: None,
        }
    }

    /// Sends every database call of the public methods through `breaker` (interactive commands
    /// use the interactive thresholds). Lock timeouts and refusals do not count as failures.
    pub fn with_breaker(mut self, breaker: Arc<Breaker>) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// The schema.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The settings.
    pub fn config(&self) -> &PartitionConfig {
        &self.config
    }

    async fn guarded<T>(
        &self,
        call: impl Future<Output = Result<T, PartitionError>>,
    ) -> Result<T, PartitionError> {
        match &self.breaker {
            None => call.await,
            Some(breaker) => breaker
                .call(call, PartitionError::is_unavailability)
                .await
                .map_err(|err| match err {
                    BreakerError::Inner(err) => err,
                    other => PartitionError::Unavailable(other.to_string()),
                }),
        }
    }

    /// Reads the catalog, the lifecycle bookkeeping and the holds, and says what maintenance
    /// would do at `now`. Changes nothing.
    pub async fn plan(&self, now: DateTime<Utc>) -> Result<Plan, PartitionError> {
        self.guarded(async {
            let mut conn = self.pool.acquire().await?;
            let inventory = read_inventory(&mut conn, &self.schema).await?;
            Ok(plan_from(&inventory, &self.schema, &self.config, now))
        })
        .await
    }

    /// Carries out `plan`'s actions in order, under the maintenance lock
    /// ([`PartitionError::Busy`] if another replica holds it), each re-checked when it runs.
    pub async fn apply(&self, plan: &Plan) -> Result<ApplyReport, PartitionError> {
        if plan.schema != self.schema {
            return Err(PartitionError::Invalid(format!(
                "the plan is for schema {:?}, not {:?}",
                plan.schema, self.schema
            )));
        }
        self.guarded(async {
            let Some(mut lock) =
                MaintenanceLock::try_acquire(&self.pool, &self.schema, self.config.lock_timeout())
                    .await?
            else {
                return Err(PartitionError::Busy);
            };
            let report = self.apply_on(&mut lock.conn, plan).await;
            lock.release().await;
            report
        })
        .await
    }

    /// Places a legal hold on `[from, to)`: no partition overlapping it is retired or dropped
    /// until it is released. Returns the hold's id.
    pub async fn hold(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        reason: &str,
    ) -> Result<i64, PartitionError> {
        if from >= to {
            return Err(PartitionError::Invalid(format!(
                "a hold needs from < to, got {} and {}",
                timestamp(from),
                timestamp(to)
            )));
        }
        if reason.trim().is_empty() {
            return Err(PartitionError::Invalid(
                "a hold needs a reason (--reason)".into(),
            ));
        }
        self.guarded(async {
            let id: i64 = sqlx::query_scalar(&format!(
                "INSERT INTO {}.legal_holds (range_from, range_to, reason) VALUES ($1, $2, $3) \
                 RETURNING id",
                quote_ident(&self.schema)
            ))
            .bind(from)
            .bind(to)
            .bind(reason.trim())
            .fetch_one(&self.pool)
            .await?;
            tracing::info!(schema = %self.schema, id, %from, %to, reason, "legal hold placed");
            Ok(id)
        })
        .await
    }

    /// Releases hold `id`; the partitions it kept follow the normal lifecycle again.
    pub async fn release(&self, id: i64) -> Result<(), PartitionError> {
        self.guarded(async {
            let schema_q = quote_ident(&self.schema);
            let released = sqlx::query(&format!(
                "UPDATE {schema_q}.legal_holds SET released_at = now(), released_by = current_user \
                 WHERE id = $1 AND released_at IS NULL"
            ))
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
            if released == 0 {
                let exists: bool = sqlx::query_scalar(&format!(
                    "SELECT EXISTS (SELECT 1 FROM {schema_q}.legal_holds WHERE id = $1)"
                ))
                .bind(id)
                .fetch_one(&self.pool)
                .await?;
                return Err(PartitionError::Invalid(if exists {
                    format!("hold {id} is already released")
                } else {
                    format!("there is no hold {id}")
                }));
            }
            tracing::info!(schema = %self.schema, id, "legal hold released");
            Ok(())
        })
        .await
    }

    /// The active legal holds.
    pub async fn holds(&self) -> Result<Vec<Hold>, PartitionError> {
        self.guarded(async {
            let holds = sqlx::query_as(&format!(
                "SELECT id, range_from, range_to, reason, created_at, created_by \
                 FROM {}.legal_holds WHERE released_at IS NULL ORDER BY id",
                quote_ident(&self.schema)
            ))
            .fetch_all(&self.pool)
            .await?;
            Ok(holds)
        })
        .await
    }

    /// Re-attaches the retired partition `name` (its retired or its original name) under its
    /// original name. Maintenance leaves it attached for the retired grace period after `now`;
    /// past that it is retired again if it is past retention and no hold covers it.
    pub async fn restore(
        &self,
        name: &str,
        now: DateTime<Utc>,
    ) -> Result<Restored, PartitionError> {
        let spec = PartitionSpec::from_retired_name(name)
            .or_else(|| PartitionSpec::from_name(name))
            .ok_or_else(|| {
                PartitionError::Invalid(format!(
                    "{name:?} is not the name of an auditflow partition (events_p… or retired_events_p…)"
                ))
            })?;
        self.guarded(async {
            let Some(mut lock) =
                MaintenanceLock::try_acquire(&self.pool, &self.schema, self.config.lock_timeout())
                    .await?
            else {
                return Err(PartitionError::Busy);
            };
            let restored = self.restore_on(&mut lock.conn, &spec, now).await;
            lock.release().await;
            restored
        })
        .await
    }

    async fn restore_on(
        &self,
        conn: &mut PgConnection,
        spec: &PartitionSpec,
        now: DateTime<Utc>,
    ) -> Result<Restored, PartitionError> {
        let schema_q = quote_ident(&self.schema);
        let mut tx = conn.begin().await?;
        lock_ddl(&mut tx, &self.schema).await?;
        let row: Option<LifecycleRow> = sqlx::query_as(&format!(
            "SELECT {LIFECYCLE_COLUMNS} FROM {schema_q}.partition_lifecycle \
             WHERE partition_name = $1 FOR UPDATE"
        ))
        .bind(spec.name())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(LifecycleRow {
            state,
            range_from: from,
            range_to: to,
            dropped_at,
            ..
        }) = row
        else {
            return Err(PartitionError::Invalid(format!(
                "{} was never retired by auditflow",
                spec.name()
            )));
        };
        match state.as_str() {
            "retired" => {}
            "retiring" => {
                return Err(PartitionError::Invalid(format!(
                    "the retirement of {} is unfinished (if it is still attached there is nothing \
                     to restore; otherwise run `auditflow partitions apply` to finish it first)",
                    spec.name()
                )))
            }
            "dropped" => {
                return Err(PartitionError::Invalid(format!(
                    "{} was dropped{}; its rows are gone",
                    spec.retired_name(),
                    dropped_at
                        .map(|t| format!(" at {}", timestamp(t)))
                        .unwrap_or_default()
                )))
            }
            other => {
                return Err(PartitionError::Invalid(format!(
                    "{} is {other}, not retired",
                    spec.name()
                )))
            }
        }
        if from != spec.from() || to != spec.to() {
            return Err(PartitionError::Invalid(format!(
                "partition_lifecycle records {} for {}, which does not match its name",
                Range(Some(from), Some(to)),
                spec.name()
            )));
        }
        let retired_q = quote_ident(&spec.retired_name());
        execute_ddl(
            &mut tx,
            &format!(
                "ALTER TABLE {schema_q}.events ATTACH PARTITION {schema_q}.{retired_q} {}",
                spec.bounds_sql()
            ),
        )
        .await?;
        execute_ddl(
            &mut tx,
            &format!(
                "ALTER TABLE {schema_q}.{retired_q} RENAME TO {}",
                quote_ident(&spec.name())
            ),
        )
        .await?;
        sqlx::query(&format!(
            "UPDATE {schema_q}.partition_lifecycle SET state = 'restored', restored_at = $2 \
             WHERE partition_name = $1"
        ))
        .bind(spec.name())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(schema = %self.schema, partition = %spec.name(), "restored partition");
        let retention = self.config.retention();
        Ok(Restored {
            partition: spec.name(),
            from,
            to,
            restored_at: now,
            past_retention: retention.is_some_and(|days| to <= now - days),
            retire_again_from: now + self.config.retired_grace(),
        })
    }

    async fn apply_on(
        &self,
        conn: &mut PgConnection,
        plan: &Plan,
    ) -> Result<ApplyReport, PartitionError> {
        let mut results = Vec::with_capacity(plan.actions.len());
        for action in &plan.actions {
            let outcome = match self.apply_action(conn, plan.now, action).await {
                Ok(outcome) => outcome,
                Err(err) if is_lock_conflict(&err) => Outcome::Skipped {
                    detail: format!(
                        "the table is busy (lock_timeout {} ms, AUDITFLOW_PARTITION_LOCK_TIMEOUT_MS); retried next round",
                        self.config.partition_lock_timeout_ms
                    ),
                },
                Err(PartitionError::Database(err)) if !is_connection_problem(&err) => {
                    Outcome::Failed {
                        detail: err.to_string(),
                    }
                }
                Err(err) => return Err(err),
            };
            match &outcome {
                Outcome::Created => {
                    metrics::counter!("auditflow_partitions_created_total").increment(1)
                }
                Outcome::Retired => {
                    metrics::counter!("auditflow_partitions_retired_total").increment(1)
                }
                Outcome::Dropped => {
                    metrics::counter!("auditflow_partitions_dropped_total").increment(1)
                }
                _ => {}
            }
            if outcome.is_done() {
                tracing::info!(schema = %self.schema, action = action.kind.as_str(), table = %action.table, outcome = %outcome, "partition maintenance");
            } else {
                tracing::warn!(schema = %self.schema, action = action.kind.as_str(), table = %action.table, outcome = %outcome, "partition maintenance");
            }
            results.push(ActionResult {
                action: action.clone(),
                outcome,
            });
        }
        Ok(ApplyReport {
            schema: self.schema.clone(),
            now: plan.now,
            results,
        })
    }

    async fn apply_action(
        &self,
        conn: &mut PgConnection,
        now: DateTime<Utc>,
        action: &Action,
    ) -> Result<Outcome, PartitionError> {
        let Some(spec) = action.spec() else {
            return Ok(Outcome::Skipped {
                detail: "the names and bounds do not match what their dates give; not touched"
                    .into(),
            });
        };
        match action.kind {
            ActionKind::Create => self.apply_create(conn, &spec).await,
            ActionKind::Retire => self.apply_retire(conn, now, action, &spec).await,
            ActionKind::Drop => self.apply_drop(conn, now, action, &spec).await,
        }
    }

    async fn apply_create(
        &self,
        conn: &mut PgConnection,
        spec: &PartitionSpec,
    ) -> Result<Outcome, PartitionError> {
        let mut tx = conn.begin().await?;
        lock_ddl(&mut tx, &self.schema).await?;
        let attached = attached_partitions(&mut tx, &self.schema).await?;
        let overlapping: Vec<&Attached> =
            attached.iter().filter(|p| p.overlaps_spec(spec)).collect();
        if !overlapping.is_empty() {
            tx.commit().await?;
            let every_day_covered = spec.days().all(|day| {
                let day = PartitionSpec::containing(PartitionInterval::Day, day);
                overlapping.iter().any(|p| p.overlaps_spec(&day))
            });
            return Ok(if every_day_covered {
                Outcome::AlreadyExisted
            } else {
                Outcome::Skipped {
                    detail: format!(
                        "the range overlaps {} now; the uncovered days are created when needed",
                        overlapping
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }
            });
        }
        let exists: bool = sqlx::query_scalar(
            "SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL",
        )
        .bind(&self.schema)
        .bind(spec.name())
        .fetch_one(&mut *tx)
        .await?;
        if exists {
            tx.commit().await?;
            return Ok(Outcome::Skipped {
                detail: format!("a table named {} exists but is not attached", spec.name()),
            });
        }
        match create_and_attach(&mut tx, &self.schema, spec).await {
            Ok(()) => {}
            Err(err) if sqlstate(&err).as_deref() == Some("42P17") => {
                tx.rollback().await?;
                return Ok(Outcome::AlreadyExisted);
            }
            Err(err) => return Err(err.into()),
        }
        tx.commit().await?;
        Ok(Outcome::Created)
    }

    /// Plans again from what the catalog says now (inside the caller's transaction and locks)
    /// and tells whether `action` is still part of the plan; if not, why.
    async fn recheck(
        &self,
        conn: &mut PgConnection,
        now: DateTime<Utc>,
        action: &Action,
    ) -> Result<Option<String>, PartitionError> {
        let inventory = read_inventory(conn, &self.schema).await?;
        let fresh = plan_from(&inventory, &self.schema, &self.config, now);
        if fresh.actions.iter().any(|a| a.same_step(action)) {
            return Ok(None);
        }
        Ok(Some(
            fresh
                .kept_reason(&action.table)
                .map(|reason| format!("no longer applies: {reason}"))
                .unwrap_or_else(|| {
                    "no longer applies (the partition changed since the plan)".into()
                }),
        ))
    }

    async fn apply_retire(
        &self,
        conn: &mut PgConnection,
        now: DateTime<Utc>,
        action: &Action,
        spec: &PartitionSpec,
    ) -> Result<Outcome, PartitionError> {
        let schema_q = quote_ident(&self.schema);
        let name = spec.name();
        // Step 1: re-check with new holds locked out, and record the intent.
        let mut tx = conn.begin().await?;
        execute_ddl(
            &mut tx,
            &format!("LOCK TABLE {schema_q}.legal_holds IN SHARE MODE"),
        )
        .await?;
        if let Some(detail) = self.recheck(&mut tx, now, action).await? {
            tx.commit().await?;
            return Ok(Outcome::Skipped { detail });
        }
        let attached = attached_partitions(&mut tx, &self.schema).await?;
        let current = attached
            .iter()
            .find(|p| p.name == name || p.name == spec.retired_name())
            .cloned();
        let other_pending = attached
            .iter()
            .find(|p| p.detach_pending && Some(&p.name) != current.as_ref().map(|c| &c.name));
        if let (Some(partition), Some(pending)) = (&current, other_pending) {
            if !partition.detach_pending {
                // Postgres allows one pending detach per table; the plan finishes it first.
                tx.commit().await?;
                return Ok(Outcome::Skipped {
                    detail: format!(
                        "{} is pending detach; it is finalized first, this one next round",
                        pending.name
                    ),
                });
            }
        }
        let prior: Option<(String, DateTime<Utc>)> = sqlx::query_as(&format!(
            "SELECT state, retired_at FROM {schema_q}.partition_lifecycle WHERE partition_name = $1"
        ))
        .bind(&name)
        .fetch_optional(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "INSERT INTO {schema_q}.partition_lifecycle \
                 (partition_name, retired_name, range_from, range_to, state, retired_at) \
             VALUES ($1, $2, $3, $4, 'retiring', $5) \
             ON CONFLICT (partition_name) DO UPDATE SET \
                 retired_at = EXCLUDED.retired_at, \
                 state = 'retiring', range_from = EXCLUDED.range_from, \
                 range_to = EXCLUDED.range_to, dropped_at = NULL"
        ))
        .bind(&name)
        .bind(spec.retired_name())
        .bind(spec.from())
        .bind(spec.to())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;

        // Step 2: detach, outside any transaction block.
        if let Some(partition) = &current {
            let has_default = attached.iter().any(|p| p.is_default);
            if let Err(err) = self.detach(conn, partition, has_default).await {
                // A detach that never started leaves the partition attached as before: undo the
                // bookkeeping, so the next round decides afresh (holds included).
                let still_attached = attached_partitions(&mut *conn, &self.schema)
                    .await?
                    .into_iter()
                    .any(|p| p.name == partition.name && !p.detach_pending);
                if still_attached {
                    self.revert_retiring(conn, &name, prior).await?;
                }
                return Err(err);
            }
        }

        // Step 3: rename and mark retired.
        let mut tx = conn.begin().await?;
        let original_exists: bool = sqlx::query_scalar(
            "SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL",
        )
        .bind(&self.schema)
        .bind(&name)
        .fetch_one(&mut *tx)
        .await?;
        if original_exists {
            execute_ddl(
                &mut tx,
                &format!(
                    "ALTER TABLE {schema_q}.{} RENAME TO {}",
                    quote_ident(&name),
                    quote_ident(&spec.retired_name())
                ),
            )
            .await?;
        }
        sqlx::query(&format!(
            "UPDATE {schema_q}.partition_lifecycle SET state = 'retired' WHERE partition_name = $1"
        ))
        .bind(&name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Outcome::Retired)
    }

    /// Detaches `partition` from `events`: `FINALIZE` if an earlier detach was interrupted, else
    /// `CONCURRENTLY` (never inside a transaction block), else, only when Postgres refuses that
    /// because of a default partition, a plain `DETACH`.
    async fn detach(
        &self,
        conn: &mut PgConnection,
        partition: &Attached,
        has_default: bool,
    ) -> Result<(), PartitionError> {
        let schema_q = quote_ident(&self.schema);
        let table_q = quote_ident(&partition.name);
        let detach = format!("ALTER TABLE {schema_q}.events DETACH PARTITION {schema_q}.{table_q}");
        if partition.detach_pending {
            let mut tx = conn.begin().await?;
            execute_ddl(&mut tx, &format!("{detach} FINALIZE")).await?;
            tx.commit().await?;
            return Ok(());
        }
        let concurrently = execute_ddl(&mut *conn, &format!("{detach} CONCURRENTLY")).await;
        match concurrently {
            Ok(_) => Ok(()),
            // 55000 with a default partition present: "cannot detach partitions concurrently
            // when a default partition exists". The plain DETACH locks events exclusively for a
            // moment, bounded by lock_timeout.
            Err(err) if has_default && sqlstate(&err).as_deref() == Some("55000") => {
                let mut tx = conn.begin().await?;
                execute_ddl(&mut tx, &detach).await?;
                tx.commit().await?;
                Ok(())
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Puts a partition's lifecycle row back as it was before a retirement that did not start.
    async fn revert_retiring(
        &self,
        conn: &mut PgConnection,
        name: &str,
        prior: Option<(String, DateTime<Utc>)>,
    ) -> Result<(), PartitionError> {
        let schema_q = quote_ident(&self.schema);
        // A 'retiring' row before this attempt was just as stale as the one written now.
        match prior.filter(|(state, _)| state != "retiring") {
            None => {
                sqlx::query(&format!(
                    "DELETE FROM {schema_q}.partition_lifecycle WHERE partition_name = $1"
                ))
                .bind(name)
                .execute(&mut *conn)
                .await?;
            }
            Some((state, retired_at)) => {
                sqlx::query(&format!(
                    "UPDATE {schema_q}.partition_lifecycle SET state = $2, retired_at = $3 \
                     WHERE partition_name = $1"
                ))
                .bind(name)
                .bind(state)
                .bind(retired_at)
                .execute(&mut *conn)
                .await?;
            }
        }
        Ok(())
    }

    async fn apply_drop(
        &self,
        conn: &mut PgConnection,
        now: DateTime<Utc>,
        action: &Action,
        spec: &PartitionSpec,
    ) -> Result<Outcome, PartitionError> {
        let schema_q = quote_ident(&self.schema);
        let mut tx = conn.begin().await?;
        execute_ddl(
            &mut tx,
            &format!("LOCK TABLE {schema_q}.legal_holds IN SHARE MODE"),
        )
        .await?;
        sqlx::query(&format!(
            "SELECT 1 FROM {schema_q}.partition_lifecycle WHERE partition_name = $1 FOR UPDATE"
        ))
        .bind(spec.name())
        .execute(&mut *tx)
        .await?;
        if let Some(detail) = self.recheck(&mut tx, now, action).await? {
            tx.commit().await?;
            return Ok(Outcome::Skipped { detail });
        }
        execute_ddl(
            &mut tx,
            &format!(
                "DROP TABLE {schema_q}.{}",
                quote_ident(&spec.retired_name())
            ),
        )
        .await?;
        sqlx::query(&format!(
            "UPDATE {schema_q}.partition_lifecycle SET state = 'dropped', dropped_at = $2 \
             WHERE partition_name = $1"
        ))
        .bind(spec.name())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Outcome::Dropped)
    }

    /// Exports the partition gauges from what the catalog says now.
    async fn record_gauges(
        &self,
        conn: &mut PgConnection,
        now: DateTime<Utc>,
    ) -> Result<(), PartitionError> {
        let inventory = read_inventory(conn, &self.schema).await?;
        let attached = inventory.attached.iter().filter(|p| !p.is_default).count();
        let retired = inventory
            .lifecycle
            .values()
            .filter(|row| matches!(row.state.as_str(), "retiring" | "retired"))
            .count();
        metrics::gauge!("auditflow_partitions", "state" => "attached").set(attached as f64);
        metrics::gauge!("auditflow_partitions", "state" => "retired").set(retired as f64);
        let newest_end = inventory
            .attached
            .iter()
            .filter(|p| !p.is_default && !p.detach_pending)
            .filter_map(|p| p.to)
            .max();
        let ahead = newest_end.map_or(0.0, |end| (end - now).num_milliseconds() as f64 / 1000.0);
        metrics::gauge!("auditflow_partition_premake_ahead_seconds").set(ahead);
        Ok(())
    }
}

/// One maintenance round at `now`: if this replica gets the maintenance lock (without waiting),
/// plans, applies the plan and updates the gauges; otherwise [`MaintenanceRound::Skipped`].
/// Returns an error only when the database could not be used at all; refused or timed-out DDL
/// is reported per action.
pub async fn maintain_partitions_once(
    lifecycle: &PartitionLifecycle,
    now: DateTime<Utc>,
) -> Result<MaintenanceRound, PartitionError> {
    lifecycle
        .guarded(async {
            let Some(mut lock) = MaintenanceLock::try_acquire(
                &lifecycle.pool,
                &lifecycle.schema,
                lifecycle.config.lock_timeout(),
            )
            .await?
            else {
                tracing::debug!(schema = %lifecycle.schema, "partition maintenance is running on another replica; skipped");
                return Ok(MaintenanceRound::Skipped);
            };
            let round = async {
                let inventory = read_inventory(&mut lock.conn, &lifecycle.schema).await?;
                let plan = plan_from(&inventory, &lifecycle.schema, &lifecycle.config, now);
                let report = lifecycle.apply_on(&mut lock.conn, &plan).await?;
                lifecycle.record_gauges(&mut lock.conn, now).await?;
                Ok(MaintenanceRound::Done { plan, report })
            }
            .await;
            lock.release().await;
            round
        })
        .await
}

/// Runs [`maintain_partitions_once`] now and then every
/// `AUDITFLOW_PARTITION_MAINTENANCE_INTERVAL_MS` (±10%), sooner (within 30 s) after a round with
/// skipped or failed actions, until `shutdown`. A round in progress is finished, not abandoned:
/// each of its statements is bounded by the lock timeout.
pub async fn run_maintenance(lifecycle: PartitionLifecycle, shutdown: CancellationToken) {
    let interval = lifecycle.config.maintenance_interval();
    while !shutdown.is_cancelled() {
        let retry_soon = match maintain_partitions_once(&lifecycle, Utc::now()).await {
            Ok(MaintenanceRound::Skipped) => false,
            Ok(MaintenanceRound::Done { report, .. }) => {
                report.results.iter().any(|r| !r.outcome.is_done())
            }
            Err(err) => {
                tracing::warn!(schema = %lifecycle.schema, error = %err, "partition maintenance failed; retrying");
                true
            }
        };
        let delay = if retry_soon {
            interval.min(RETRY_SOON)
        } else {
            interval
        };
        let delay = delay.mul_f64(rand::rng().random_range(0.9..1.1));
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles only if the maintenance loop can be handed to `tokio::spawn`.
    #[allow(dead_code)]
    fn maintenance_can_be_spawned(lifecycle: PartitionLifecycle) {
        drop(tokio::spawn(run_maintenance(
            lifecycle,
            CancellationToken::new(),
        )));
    }

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    fn at(text: &str) -> DateTime<Utc> {
        parse_time(text).unwrap()
    }

    fn config(
        interval: PartitionInterval,
        premake: u32,
        retention: u32,
        grace: u32,
    ) -> PartitionConfig {
        PartitionConfig {
            partition_interval: interval,
            partition_premake: premake,
            partition_retention_days: retention,
            partition_retired_grace_days: grace,
            ..PartitionConfig::default()
        }
    }

    fn attached(spec: &PartitionSpec) -> Attached {
        Attached {
            name: spec.name(),
            from: Some(spec.from()),
            to: Some(spec.to()),
            is_default: false,
            detach_pending: false,
        }
    }

    fn inventory(specs: &[PartitionSpec]) -> Inventory {
        Inventory {
            attached: specs.iter().map(attached).collect(),
            tables: specs.iter().map(PartitionSpec::name).collect(),
            ..Inventory::default()
        }
    }

    fn daily(from: NaiveDate, count: i64) -> Vec<PartitionSpec> {
        (0..count)
            .map(|i| PartitionSpec::containing(PartitionInterval::Day, from + Duration::days(i)))
            .collect()
    }

    fn names(plan: &Plan, kind: ActionKind) -> Vec<String> {
        plan.actions
            .iter()
            .filter(|a| a.kind == kind)
            .map(|a| a.table.clone())
            .collect()
    }

    #[test]
    fn names_come_from_the_date_only() {
        let d = day(2026, 2, 3);
        assert_eq!(partition_name(d), "events_p20260203");
        assert_eq!(quote_ident("events_p20260203"), "\"events_p20260203\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        let week = PartitionSpec::containing(PartitionInterval::Week, d);
        assert_eq!(week.name(), "events_p2026w06");
        assert_eq!(
            (week.start(), week.end()),
            (day(2026, 2, 2), day(2026, 2, 9))
        );
        let month = PartitionSpec::containing(PartitionInterval::Month, d);
        assert_eq!(month.name(), "events_p202602");
        assert_eq!(
            (month.start(), month.end()),
            (day(2026, 2, 1), day(2026, 3, 1))
        );
        assert_eq!(
            PartitionSpec::containing(PartitionInterval::Month, day(2025, 12, 31)).end(),
            day(2026, 1, 1)
        );
        assert_eq!(month.retired_name(), "retired_events_p202602");
        assert_eq!(
            month.bounds_sql(),
            "FOR VALUES FROM ('2026-02-01 00:00:00+00') TO ('2026-03-01 00:00:00+00')"
        );
    }

    #[test]
    fn iso_weeks_take_the_iso_year() {
        // 2025-12-29 is the Monday of ISO week 1 of 2026.
        let spec = PartitionSpec::containing(PartitionInterval::Week, day(2026, 1, 1));
        assert_eq!(spec.start(), day(2025, 12, 29));
        assert_eq!(spec.name(), "events_p2026w01");
        assert_eq!(PartitionSpec::from_name("events_p2026w01"), Some(spec));
        assert_eq!(spec.next().name(), "events_p2026w02");
    }

    #[test]
    fn names_parse_back_only_when_they_round_trip() {
        for spec in [
            PartitionSpec::containing(PartitionInterval::Day, day(2026, 2, 3)),
            PartitionSpec::containing(PartitionInterval::Week, day(2026, 2, 3)),
            PartitionSpec::containing(PartitionInterval::Month, day(2026, 2, 3)),
        ] {
            assert_eq!(PartitionSpec::from_name(&spec.name()), Some(spec));
            assert_eq!(
                PartitionSpec::from_retired_name(&spec.retired_name()),
                Some(spec)
            );
        }
        for bad in [
            "events_p20260230",
            "events_p2026w54",
            "events_p202613",
            "events_p2026020",
            "events_p+0260203",
            "events_p2026020x",
            "events_x20260203",
            "events_p20260203; drop table events",
            "events_p2026w6",
            "retired_events_p20260203",
            "",
        ] {
            assert_eq!(PartitionSpec::from_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn times_parse_as_rfc3339_or_dates() {
        assert_eq!(at("2026-02-03"), at("2026-02-03T00:00:00Z"));
        assert_eq!(at("2026-02-03T01:00:00+01:00"), at("2026-02-03T00:00:00Z"));
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn premake_creates_the_current_and_the_next_intervals() {
        let plan = plan_from(
            &Inventory::default(),
            "audit",
            &config(PartitionInterval::Day, 2, 0, 30),
            at("2026-02-03T13:00:00Z"),
        );
        assert_eq!(
            names(&plan, ActionKind::Create),
            ["events_p20260203", "events_p20260204", "events_p20260205"]
        );
        assert!(plan.actions[0].reason.contains("current day"), "{plan}");
        let weekly = plan_from(
            &inventory(&[PartitionSpec::containing(
                PartitionInterval::Week,
                day(2026, 2, 3),
            )]),
            "audit",
            &config(PartitionInterval::Week, 2, 0, 30),
            at("2026-02-03T13:00:00Z"),
        );
        assert_eq!(
            names(&weekly, ActionKind::Create),
            ["events_p2026w07", "events_p2026w08"]
        );
        let monthly = plan_from(
            &Inventory::default(),
            "audit",
            &config(PartitionInterval::Month, 1, 0, 30),
            at("2026-12-31T23:59:59Z"),
        );
        assert_eq!(
            names(&monthly, ActionKind::Create),
            ["events_p202612", "events_p202701"]
        );
    }

    #[test]
    fn a_changed_interval_fills_partly_covered_ranges_with_days() {
        // Daily partitions up to Wednesday; the setting is now weekly.
        let existing = daily(day(2026, 2, 2), 3);
        let plan = plan_from(
            &inventory(&existing),
            "audit",
            &config(PartitionInterval::Week, 1, 0, 30),
            at("2026-02-03T13:00:00Z"),
        );
        assert_eq!(
            names(&plan, ActionKind::Create),
            [
                "events_p20260205",
                "events_p20260206",
                "events_p20260207",
                "events_p20260208",
                "events_p2026w07"
            ]
        );
        assert!(plan.actions[0].reason.contains("daily because"), "{plan}");
    }

    #[test]
    fn a_stray_table_with_the_name_is_a_warning_not_an_action() {
        let mut inv = Inventory::default();
        inv.tables.insert("events_p20260203".into());
        let plan = plan_from(
            &inv,
            "audit",
            &config(PartitionInterval::Day, 0, 0, 30),
            at("2026-02-03T13:00:00Z"),
        );
        assert!(plan.actions.is_empty(), "{plan}");
        assert_eq!(plan.warnings.len(), 1, "{plan}");
    }

    #[test]
    fn retention_retires_only_partitions_that_ended_before_the_cutoff() {
        let now = at("2026-02-10T12:00:00Z");
        let plan = plan_from(
            &inventory(&daily(day(2026, 1, 1), 45)),
            "audit",
            &config(PartitionInterval::Day, 0, 30, 7),
            now,
        );
        // The cutoff is 2026-01-11T12:00: partitions ending at or before it go.
        let retired = names(&plan, ActionKind::Retire);
        assert_eq!(
            retired.first().map(String::as_str),
            Some("events_p20260101")
        );
        assert_eq!(retired.last().map(String::as_str), Some("events_p20260110"));
        assert_eq!(retired.len(), 10);
        assert_eq!(
            plan.actions
                .iter()
                .filter(|a| a.kind == ActionKind::Create)
                .count(),
            0
        );
    }

    #[test]
    fn zero_retention_keeps_everything() {
        let plan = plan_from(
            &inventory(&daily(day(2000, 1, 1), 10)),
            "audit",
            &config(PartitionInterval::Day, 0, 0, 7),
            at("2026-02-10T12:00:00Z"),
        );
        assert!(names(&plan, ActionKind::Retire).is_empty(), "{plan}");
    }

    fn hold(id: i64, from: &str, to: &str) -> Hold {
        Hold {
            id,
            range_from: at(from),
            range_to: at(to),
            reason: format!("case {id}"),
            created_at: at("2026-01-01"),
            created_by: "postgres".into(),
        }
    }

    #[test]
    fn a_hold_keeps_the_partitions_it_overlaps_and_says_so() {
        let mut inv = inventory(&daily(day(2026, 1, 1), 5));
        inv.holds
            .push(hold(7, "2026-01-02T23:00:00Z", "2026-01-03T00:00:01Z"));
        let plan = plan_from(
            &inv,
            "audit",
            &config(PartitionInterval::Day, 0, 10, 7),
            at("2026-03-01"),
        );
        assert_eq!(
            names(&plan, ActionKind::Retire),
            ["events_p20260101", "events_p20260104", "events_p20260105"]
        );
        let kept: Vec<&str> = plan.kept.iter().map(|k| k.table.as_str()).collect();
        assert_eq!(kept, ["events_p20260102", "events_p20260103"]);
        assert!(plan.kept.iter().all(|k| k.holds == [7]));
        assert!(plan.kept[0].reason.contains("legal hold 7"), "{plan}");
    }

    fn retired_row(spec: &PartitionSpec, state: &str, retired_at: &str) -> LifecycleRow {
        LifecycleRow {
            partition_name: spec.name(),
            state: state.into(),
            range_from: spec.from(),
            range_to: spec.to(),
            retired_at: at(retired_at),
            restored_at: None,
            dropped_at: None,
        }
    }

    #[test]
    fn retired_partitions_are_dropped_after_the_grace_period_unless_held() {
        let old = daily(day(2025, 1, 1), 3);
        let mut inv = Inventory::default();
        for spec in &old {
            inv.tables.insert(spec.retired_name());
            inv.lifecycle.insert(
                spec.name(),
                retired_row(spec, "retired", "2026-02-01T00:00:00Z"),
            );
        }
        let cfg = config(PartitionInterval::Day, 0, 30, 7);
        let early = plan_from(&inv, "audit", &cfg, at("2026-02-07T23:59:59Z"));
        assert!(names(&early, ActionKind::Drop).is_empty(), "{early}");
        assert_eq!(early.kept.len(), 3);
        assert!(
            early.kept[0].reason.contains("dropped from 2026-02-08"),
            "{early}"
        );

        inv.holds.push(hold(1, "2025-01-02", "2025-01-03"));
        let late = plan_from(&inv, "audit", &cfg, at("2026-02-08T00:00:00Z"));
        assert_eq!(
            names(&late, ActionKind::Drop),
            ["retired_events_p20250101", "retired_events_p20250103"]
        );
        assert_eq!(late.kept.len(), 1);
        assert!(late.kept[0].reason.contains("legal hold 1"), "{late}");
    }

    #[test]
    fn interrupted_retirements_are_finished_first_even_under_a_hold() {
        let specs = daily(day(2025, 1, 1), 2);
        let mut inv = inventory(&specs);
        inv.attached[1].detach_pending = true;
        inv.lifecycle.insert(
            specs[1].name(),
            retired_row(&specs[1], "retiring", "2026-01-01"),
        );
        inv.holds.push(hold(1, "2025-01-01", "2025-01-03"));
        let plan = plan_from(
            &inv,
            "audit",
            &config(PartitionInterval::Day, 0, 30, 7),
            at("2026-02-01"),
        );
        assert_eq!(names(&plan, ActionKind::Retire), ["events_p20250102"]);
        let retire = plan
            .actions
            .iter()
            .find(|a| a.kind == ActionKind::Retire)
            .unwrap();
        assert!(retire.reason.contains("finishing"), "{plan}");
        assert_eq!(plan.kept.len(), 1, "{plan}");
    }

    #[test]
    fn a_restored_partition_is_left_attached_for_the_grace_period() {
        let specs = daily(day(2025, 1, 1), 1);
        let mut inv = inventory(&specs);
        let mut row = retired_row(&specs[0], "restored", "2026-01-01");
        row.restored_at = Some(at("2026-02-01"));
        inv.lifecycle.insert(specs[0].name(), row);
        let cfg = config(PartitionInterval::Day, 0, 30, 7);
        let during = plan_from(&inv, "audit", &cfg, at("2026-02-07T23:00:00Z"));
        assert!(names(&during, ActionKind::Retire).is_empty(), "{during}");
        assert!(during.kept[0].reason.contains("restored"), "{during}");
        let after = plan_from(&inv, "audit", &cfg, at("2026-02-08T00:00:00Z"));
        assert_eq!(names(&after, ActionKind::Retire), ["events_p20250101"]);
    }

    #[test]
    fn a_pending_detach_maintenance_does_not_own_is_a_warning() {
        let specs = daily(day(2026, 1, 20), 1);
        let mut inv = inventory(&specs);
        inv.attached[0].detach_pending = true;
        let plan = plan_from(
            &inv,
            "audit",
            &config(PartitionInterval::Day, 0, 30, 7),
            at("2026-01-25"),
        );
        assert!(names(&plan, ActionKind::Retire).is_empty(), "{plan}");
        assert_eq!(plan.warnings.len(), 1, "{plan}");
        assert!(plan.warnings[0].contains("FINALIZE"), "{plan}");
    }

    #[test]
    fn partitions_not_named_by_auditflow_are_left_alone() {
        let mut inv = Inventory::default();
        inv.attached.push(Attached {
            name: "events_archive".into(),
            from: None,
            to: Some(at("2020-01-01")),
            is_default: false,
            detach_pending: false,
        });
        // Named like a daily partition but bounded like something else.
        inv.attached.push(Attached {
            name: "events_p20200101".into(),
            from: Some(at("2020-01-01")),
            to: Some(at("2020-01-03")),
            is_default: false,
            detach_pending: false,
        });
        let plan = plan_from(
            &inv,
            "audit",
            &config(PartitionInterval::Day, 0, 30, 7),
            at("2026-02-01"),
        );
        assert!(names(&plan, ActionKind::Retire).is_empty(), "{plan}");
        assert_eq!(plan.kept.len(), 2, "{plan}");
    }

    #[test]
    fn actions_from_a_tampered_plan_do_not_validate() {
        let spec = PartitionSpec::containing(PartitionInterval::Day, day(2026, 2, 3));
        let good = Action::new(ActionKind::Drop, &spec, "x".into());
        assert_eq!(good.spec(), Some(spec));
        let mut renamed = good.clone();
        renamed.table = "events; drop table x".into();
        assert_eq!(renamed.spec(), None);
        let mut widened = good.clone();
        widened.to = at("2026-02-05");
        assert_eq!(widened.spec(), None);
    }

    #[test]
    fn plans_and_results_round_trip_through_json() {
        let plan = plan_from(
            &inventory(&daily(day(2025, 1, 1), 2)),
            "audit",
            &config(PartitionInterval::Day, 1, 30, 7),
            at("2026-02-01"),
        );
        let text = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<Plan>(&text).unwrap(), plan);
        let result = ActionResult {
            action: plan.actions[0].clone(),
            outcome: Outcome::Skipped {
                detail: "busy".into(),
            },
        };
        let value = serde_json::to_value(&result).unwrap();
        assert_eq!(value["kind"], "create");
        assert_eq!(value["outcome"], "skipped");
        assert_eq!(value["detail"], "busy");
        assert_eq!(
            serde_json::from_value::<ActionResult>(value).unwrap(),
            result
        );
    }
}
