//! Applying a plan: each action re-checked at the moment it runs, creation, retirement (detach
//! and rename), drop, and restoring a retired partition.

use std::fmt;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection};

use super::guard::Guard;
use super::inventory::read_inventory;
use super::inventory::Range;
use super::inventory::{lifecycle_columns, LifecycleRow};
use super::plan::timestamp;
use super::plan::{plan_from, Action, ActionKind, Plan};
use super::{is_connection_problem, is_lock_conflict, PartitionError, PartitionLifecycle};
use crate::db::partition::PartitionSpec;
use crate::db::partition::{
    attached_partitions, create_and_attach, execute_ddl, lock_ddl, Attached, PartitionInterval,
};
use crate::db::quote_ident;
use crate::db::retry::sqlstate;

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
    /// Not done: the partition overlaps the protected window around the real time (see
    /// [`Guard`]), whatever time the plan was made for. Shown as skipped, with the window.
    Protected {
        /// Why, with the window.
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
        !matches!(
            self,
            Outcome::Skipped { .. } | Outcome::Protected { .. } | Outcome::Failed { .. }
        )
    }

    /// True for the outcomes a round soon after may change (a busy table, a refused statement);
    /// a protected partition stays protected until the real time moves on.
    pub fn is_retried_soon(&self) -> bool {
        matches!(self, Outcome::Skipped { .. } | Outcome::Failed { .. })
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
            Outcome::Protected { detail } => write!(f, "skipped (protected): {detail}"),
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
    /// How long this run waited for maintenance running elsewhere to finish, in milliseconds.
    #[serde(default)]
    pub waited_ms: u64,
    /// Maintenance was still running elsewhere when the wait ended: nothing was done here (the
    /// other run does the same work).
    #[serde(default)]
    pub ran_elsewhere: bool,
}

impl ApplyReport {
    pub(super) fn running_elsewhere(schema: &str, now: DateTime<Utc>, waited: StdDuration) -> Self {
        ApplyReport {
            schema: schema.to_string(),
            now,
            results: Vec::new(),
            waited_ms: millis(waited),
            ran_elsewhere: true,
        }
    }

    pub(super) fn after_waiting(mut self, waited: StdDuration) -> Self {
        self.waited_ms = millis(waited);
        self
    }
}

fn millis(duration: StdDuration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let waited = self.waited_ms as f64 / 1000.0;
        if self.ran_elsewhere {
            return write!(
                f,
                "partition maintenance of {}.events is running elsewhere: waited {waited:.1} s \
                 for it to finish, nothing done here (the other run does the same work)",
                self.schema
            );
        }
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
        )?;
        if self.waited_ms > 0 {
            write!(
                f,
                " (after waiting {waited:.1} s for maintenance running elsewhere)"
            )?;
        }
        Ok(())
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

impl PartitionLifecycle {
    pub(super) async fn restore_on(
        &self,
        conn: &mut PgConnection,
        spec: &PartitionSpec,
        now: DateTime<Utc>,
    ) -> Result<Restored, PartitionError> {
        let schema_q = quote_ident(&self.schema);
        let mut tx = conn.begin().await?;
        lock_ddl(&mut tx, &self.schema).await?;
        let row: Option<LifecycleRow> = sqlx::query_as(&format!(
            "SELECT {} FROM {schema_q}.partition_lifecycle \
             WHERE partition_name = $1 FOR UPDATE",
            lifecycle_columns()
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
        crate::db::partition::refuse_truncate(&mut tx, &self.schema, &spec.retired_name()).await?;
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

    pub(super) async fn apply_on(
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
            waited_ms: 0,
            ran_elsewhere: false,
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

    /// The refusal of the retire and drop steps for a partition in the protected window, computed
    /// from the real clock when the step runs (never from the plan's `now`, which may be
    /// simulated).
    fn protected(&self, spec: &PartitionSpec) -> Option<Outcome> {
        let guard = Guard::from_real_clock(&self.config);
        guard
            .protects(spec.from(), spec.to())
            .then(|| Outcome::Protected {
                detail: format!(
                    "{} {} overlaps the protected window {guard}; it is never retired or dropped \
                 while it does",
                    spec.name(),
                    Range(Some(spec.from()), Some(spec.to()))
                ),
            })
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
        if let Some(protected) = self.protected(spec) {
            return Ok(protected);
        }
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
    pub(super) async fn detach(
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
        if let Some(protected) = self.protected(spec) {
            return Ok(protected);
        }
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
    pub(super) async fn record_gauges(
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
