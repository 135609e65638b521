//! Daily partitions of the `events` table.
//!
//! A partition is named `events_pYYYYMMDD` and covers `[day 00:00 UTC, next day 00:00 UTC)`.
//! Names and bounds are built from a [`NaiveDate`] only and always quoted, so no event content can
//! reach DDL. Creation is serialized across replicas by a transaction-scoped advisory lock on the
//! table, and reports the truth: exactly one caller sees [`Creation::Created`] for a day.

use chrono::{Duration, NaiveDate};
use sqlx::PgPool;

/// What [`ensure_day`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creation {
    /// This call created the partition.
    Created,
    /// The partition was already there.
    AlreadyExisted,
}

/// The partition's table name for a day.
pub fn partition_name(day: NaiveDate) -> String {
    format!("events_p{}", day.format("%Y%m%d"))
}

/// A double-quoted identifier. Callers pass names built from dates and validated schema names.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The advisory lock key serializing DDL on one schema's `events` table.
fn ddl_lock_key(schema: &str) -> String {
    format!("auditflow.partitions.{schema}")
}

/// Creates the partition for `day` unless it exists.
///
/// Safe to call from many replicas at once: the advisory lock makes the existence check and the
/// `CREATE` atomic with respect to other auditflow processes, and `IF NOT EXISTS` covers anyone
/// else. `lock_timeout` keeps it from queueing behind long transactions on the parent table.
pub async fn ensure_day(
    pool: &PgPool,
    schema: &str,
    day: NaiveDate,
) -> Result<Creation, sqlx::Error> {
    let name = partition_name(day);
    let next = day + Duration::days(1);
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '10s'")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(ddl_lock_key(schema))
        .execute(&mut *tx)
        .await?;
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = $1 AND tablename = $2)",
    )
    .bind(schema)
    .bind(&name)
    .fetch_one(&mut *tx)
    .await?;
    if exists {
        tx.commit().await?;
        return Ok(Creation::AlreadyExisted);
    }
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS {schema_q}.{name_q} PARTITION OF {schema_q}.events \
         FOR VALUES FROM ('{day} 00:00:00+00') TO ('{next} 00:00:00+00')",
        schema_q = quote_ident(schema),
        name_q = quote_ident(&name),
        day = day.format("%Y-%m-%d"),
        next = next.format("%Y-%m-%d"),
    );
    sqlx::query(&ddl).execute(&mut *tx).await?;
    tx.commit().await?;
    tracing::info!(schema, partition = %name, "created partition");
    metrics::counter!("auditflow_partitions_created_total").increment(1);
    Ok(Creation::Created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_date_only() {
        let day = NaiveDate::from_ymd_opt(2026, 2, 3).unwrap();
        assert_eq!(partition_name(day), "events_p20260203");
        assert_eq!(quote_ident("events_p20260203"), "\"events_p20260203\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}
