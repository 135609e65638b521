//! The partitions of the `events` table as the database sees them: their names, their ranges, and
//! creating one on demand (ingest and maintenance both do).
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

use std::fmt;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, Utc, Weekday};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};

use super::quote_ident;
use super::retry::sqlstate;

/// Prefix of a retired partition's name.
pub const RETIRED_PREFIX: &str = "retired_";

/// Lock timeout of the ingest path's partition creation: it must succeed for the batch to be
/// written, and `ATTACH PARTITION` conflicts only with other DDL on `events`.
const INGEST_LOCK_TIMEOUT: StdDuration = StdDuration::from_secs(10);

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
    pub(crate) interval: PartitionInterval,
    pub(crate) start: NaiveDate,
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
        // Byte offsets below: a name with any non-ASCII character is not one of ours (and
        // slicing it could cut a character in half).
        if !rest.is_ascii() {
            return None;
        }
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

    pub(crate) fn days(&self) -> impl Iterator<Item = NaiveDate> {
        let end = self.end();
        self.start.iter_days().take_while(move |day| *day < end)
    }

    /// `FOR VALUES FROM (...) TO (...)`, from dates only.
    pub(crate) fn bounds_sql(&self) -> String {
        format!(
            "FOR VALUES FROM ('{} 00:00:00+00') TO ('{} 00:00:00+00')",
            self.start.format("%Y-%m-%d"),
            self.end().format("%Y-%m-%d")
        )
    }
}

pub(crate) fn midnight(day: NaiveDate) -> DateTime<Utc> {
    day.and_time(NaiveTime::MIN).and_utc()
}

/// The partition's table name for a day (daily interval).
pub fn partition_name(day: NaiveDate) -> String {
    PartitionSpec::containing(PartitionInterval::Day, day).name()
}

/// Runs one unparameterised statement (DDL, `SET`, `LOCK`) without preparing it: the names in it
/// change from call to call, so a cached prepared statement would never be reused.
pub(crate) async fn execute_ddl(conn: &mut PgConnection, sql: &str) -> Result<(), sqlx::Error> {
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

pub(crate) async fn lock_ddl(conn: &mut PgConnection, schema: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(ddl_lock_key(schema))
        .execute(conn)
        .await?;
    Ok(())
}

/// Creates the spec's table like `events` and attaches it. Indexes are created by the attach
/// (with the same names `PARTITION OF` would give them).
///
/// Through `auditflow_create_partition` (migration 0007) when the schema has it: the function
/// runs with its owner's rights, so a writer role that owns nothing can create the partitions
/// ingest needs, and only ever from a date and an interval word.
pub(crate) async fn create_and_attach(
    conn: &mut PgConnection,
    schema: &str,
    spec: &PartitionSpec,
) -> Result<(), sqlx::Error> {
    let schema_q = quote_ident(schema);
    if has_function(&mut *conn, schema, "auditflow_create_partition").await? {
        let name: String = sqlx::query_scalar(&format!(
            "SELECT {schema_q}.auditflow_create_partition($1, $2)"
        ))
        .bind(spec.start())
        .bind(spec.interval().as_str())
        .fetch_one(&mut *conn)
        .await?;
        if name != spec.name() {
            // The function and PartitionSpec name partitions the same way; a difference is a
            // bug, and must not go unnoticed.
            return Err(sqlx::Error::Protocol(format!(
                "auditflow_create_partition created {name}, expected {}",
                spec.name()
            )));
        }
        return Ok(());
    }
    let name_q = quote_ident(&spec.name());
    execute_ddl(
        &mut *conn,
        &format!(
        "CREATE TABLE {schema_q}.{name_q} (LIKE {schema_q}.events INCLUDING ALL EXCLUDING INDEXES)"
    ),
    )
    .await?;
    refuse_truncate(&mut *conn, schema, &spec.name()).await?;
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

/// Append-only (migration 0006): the parent's row triggers reach a partition when it is
/// attached, its TRUNCATE trigger does not, so each partition gets its own before its attach
/// (a new one, or a retired one restored). Nothing to do on a schema older than 0006.
pub(crate) async fn refuse_truncate(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<(), sqlx::Error> {
    if has_function(&mut *conn, schema, "auditflow_refuse_change").await? {
        let schema_q = quote_ident(schema);
        execute_ddl(
            conn,
            &format!(
                "CREATE OR REPLACE TRIGGER auditflow_no_truncate BEFORE TRUNCATE ON \
                 {schema_q}.{} FOR EACH STATEMENT EXECUTE FUNCTION \
                 {schema_q}.auditflow_refuse_change()",
                quote_ident(table)
            ),
        )
        .await?;
    }
    Ok(())
}

/// Whether `schema` has a function of this name (installed by a migration).
async fn has_function(
    conn: &mut PgConnection,
    schema: &str,
    name: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = $1 AND p.proname = $2)",
    )
    .bind(schema)
    .bind(name)
    .fetch_one(conn)
    .await
}

/// A range whose ends may be unbounded (`None`: MINVALUE / MAXVALUE).
pub(crate) type Bounds = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// An attached partition as the catalog shows it (any name, possibly not auditflow's).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct Attached {
    pub(crate) name: String,
    /// `None`: MINVALUE.
    #[sqlx(rename = "range_from")]
    pub(crate) from: Option<DateTime<Utc>>,
    /// `None`: MAXVALUE.
    #[sqlx(rename = "range_to")]
    pub(crate) to: Option<DateTime<Utc>>,
    pub(crate) is_default: bool,
    /// An interrupted `DETACH ... CONCURRENTLY` left it half detached (`FINALIZE` finishes it).
    pub(crate) detach_pending: bool,
}

impl Attached {
    pub(crate) fn overlaps(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> bool {
        !self.is_default && self.from.is_none_or(|f| f < to) && self.to.is_none_or(|t| from < t)
    }

    pub(crate) fn overlaps_spec(&self, spec: &PartitionSpec) -> bool {
        self.overlaps(spec.from(), spec.to())
    }
}

pub(crate) async fn attached_partitions(
    conn: &mut PgConnection,
    schema: &str,
) -> Result<Vec<Attached>, sqlx::Error> {
    // Bounds are printed by pg_get_expr in the session's time zone and DateStyle and cast back in
    // the same session, so the round trip is exact. MINVALUE/MAXVALUE do not match and are NULL.
    // So are bounds a hand-made partition may have that chrono cannot hold ('infinity', years
    // past 200000; decoding them would panic): for coverage they mean the same as unbounded.
    sqlx::query_as(
        r#"SELECT c.relname::text AS name,
                  b.bound = 'DEFAULT' AS is_default,
                  CASE WHEN t.range_from BETWEEN '0001-01-01 00:00:00+00' AND '200000-01-01 00:00:00+00'
                       THEN t.range_from END AS range_from,
                  CASE WHEN t.range_to BETWEEN '0001-01-01 00:00:00+00' AND '200000-01-01 00:00:00+00'
                       THEN t.range_to END AS range_to,
                  i.inhdetachpending AS detach_pending
           FROM pg_catalog.pg_inherits i
           JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
           CROSS JOIN LATERAL (SELECT pg_catalog.pg_get_expr(c.relpartbound, c.oid) AS bound) b
           CROSS JOIN LATERAL (
               SELECT (regexp_match(b.bound, 'FROM \(''([^'']*)''\)'))[1]::timestamptz AS range_from,
                      (regexp_match(b.bound, 'TO \(''([^'']*)''\)'))[1]::timestamptz AS range_to
           ) t
           WHERE i.inhparent = to_regclass(format('%I.events', $1::text))
           ORDER BY 3 NULLS FIRST, name"#,
    )
    .bind(schema)
    .fetch_all(conn)
    .await
}
