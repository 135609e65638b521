//! What maintenance plans from: the attached partitions in the catalog, the bookkeeping of
//! retired ones in `partition_lifecycle`, and the active `legal_holds`.

use std::fmt;

use chrono::{DateTime, NaiveTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

use super::PartitionError;
use crate::db::partition::{attached_partitions, Attached};
use crate::db::quote_ident;
use std::collections::{BTreeMap, BTreeSet};

/// A row of `partition_lifecycle`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(super) struct LifecycleRow {
    pub(super) partition_name: String,
    pub(super) state: String,
    pub(super) range_from: DateTime<Utc>,
    pub(super) range_to: DateTime<Utc>,
    pub(super) retired_at: DateTime<Utc>,
    pub(super) restored_at: Option<DateTime<Utc>>,
    pub(super) dropped_at: Option<DateTime<Utc>>,
}

/// `column` (a timestamptz) as a time chrono can hold: '-infinity', 'infinity' or a year past
/// 200000 typed in by hand would make decoding panic, so it is clamped (NULL stays NULL).
fn clamped(column: &str) -> String {
    format!(
        "CASE WHEN {column} IS NOT NULL THEN least(greatest({column}, \
         '0001-01-01 00:00:00+00'), '200000-01-01 00:00:00+00') END AS {column}"
    )
}

/// The columns of a [`LifecycleRow`], times clamped: a row edited to 'infinity' no longer
/// matches its name's range and is reported, not acted on.
pub(super) fn lifecycle_columns() -> String {
    format!(
        "partition_name, state, {}",
        [
            "range_from",
            "range_to",
            "retired_at",
            "restored_at",
            "dropped_at"
        ]
        .map(clamped)
        .join(", ")
    )
}

/// The columns of a [`Hold`], times clamped: a hold typed in by hand reaching 'infinity' (no
/// end) covers the same partitions once clamped.
pub(super) fn hold_columns() -> String {
    format!(
        "id, {}, {}, reason, {}, created_by",
        clamped("range_from"),
        clamped("range_to"),
        clamped("created_at")
    )
}

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
    pub(super) fn overlaps(&self, from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> bool {
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
pub(super) struct Inventory {
    pub(super) attached: Vec<Attached>,
    /// Every table in the schema (attached or not).
    pub(super) tables: BTreeSet<String>,
    /// Lifecycle rows not yet dropped, by partition name.
    pub(super) lifecycle: BTreeMap<String, LifecycleRow>,
    pub(super) holds: Vec<Hold>,
}

async fn events_exists(conn: &mut PgConnection, schema: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT to_regclass(format('%I.events', $1::text)) IS NOT NULL")
        .bind(schema)
        .fetch_one(conn)
        .await
}

pub(super) async fn read_inventory(
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
        "SELECT {} FROM {schema_q}.partition_lifecycle WHERE state <> 'dropped'",
        lifecycle_columns()
    ))
    .fetch_all(&mut *conn)
    .await?;
    let holds: Vec<Hold> = sqlx::query_as(&format!(
        "SELECT {} FROM {schema_q}.legal_holds WHERE released_at IS NULL ORDER BY id",
        hold_columns()
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

/// Formats `[from, to)`, as dates when both are midnight UTC.
pub(super) struct Range(
    pub(super) Option<DateTime<Utc>>,
    pub(super) Option<DateTime<Utc>>,
);

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
