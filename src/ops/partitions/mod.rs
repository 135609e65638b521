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
//! Names, ranges and creation are [`crate::db::partition`]'s; this module plans and applies the
//! lifecycle: `inventory` reads the catalog and bookkeeping, `plan` decides (pure), `apply`
//! carries a plan out, `guard` is the protected window no retire or drop crosses.
//!
//! What it must never do: retire or drop a partition overlapping the protected window around the
//! real time ([`Guard`], computed from the real clock inside the retire and drop steps, whatever
//! `now` the plan was made for), or act on a table that is not auditflow's (a name that does not
//! parse back into a spec reproducing it and its bounds is [`Foreign`]: listed, compared,
//! printed, never put in DDL). A catalog name is never sliced or indexed.
//!
//! Lifecycle: [`PartitionLifecycle::plan`] reads the catalog, the `partition_lifecycle`
//! bookkeeping table and the active `legal_holds` and decides, for a given `now`, what to create,
//! retire and drop, and why other partitions are kept. [`PartitionLifecycle::apply`] executes a
//! plan's actions in order and re-checks each one at the moment it runs (by planning again for
//! that partition under the relevant locks): an action whose precondition no longer holds is
//! skipped with the reason. [`maintain_partitions_once`] does both under a session advisory lock,
//! so one replica at a time maintains, and [`run_maintenance`] repeats it on an interval,
//! surviving any failure (error or panic) of one round. `auditflow partitions apply`
//! ([`PartitionLifecycle::plan_and_apply`]) waits, bounded, for the same lock instead of
//! skipping, so concurrent applies run one after the other.
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

mod apply;
mod guard;
mod inventory;
mod plan;
#[cfg(test)]
mod tests;

pub use apply::{ActionResult, ApplyReport, Outcome, Restored};
pub use guard::{check_simulated_now, Guard, NOW_TOLERANCE};
pub use inventory::Hold;
pub use plan::{Action, ActionKind, Foreign, Kept, Plan};

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use futures::FutureExt as _;
use rand::Rng;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio_util::sync::CancellationToken;

use crate::breaker::{Breaker, BreakerError};
use crate::config::PartitionConfig;
use crate::db::partition::execute_ddl;
use crate::db::partition::{midnight, PartitionSpec};
use crate::db::quote_ident;
use crate::db::retry::{classify, sqlstate, Retry};
use inventory::{hold_columns, read_inventory};
use plan::{plan_from, timestamp};

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
    metrics::describe_counter!(
        "auditflow_partition_maintenance_failures_total",
        "maintenance rounds of `run` that failed (cause: error or panic); the loop retries"
    );
    metrics::describe_gauge!(
        "auditflow_partition_premake_ahead_seconds",
        "upper bound of the newest attached partition minus now; alert when below premake"
    );
}

/// Parses a time given on the command line: RFC 3339, or a date meaning midnight UTC, in the
/// years 1000 to 9998 (those `auditflow_create_partition` accepts; interval arithmetic on them
/// stays far inside chrono's range).
pub fn parse_time(value: &str) -> Result<DateTime<Utc>, String> {
    let time = match DateTime::parse_from_rfc3339(value) {
        Ok(time) => time.to_utc(),
        Err(_) => NaiveDate::parse_from_str(value, "%Y-%m-%d")
            .map(midnight)
            .map_err(|_| {
                format!("expected an RFC 3339 time or a YYYY-MM-DD date, got {value:?}")
            })?,
    };
    if !(1000..=9998).contains(&time.year()) {
        return Err(format!(
            "{value:?} is out of range: years 1000 to 9998 only"
        ));
    }
    Ok(time)
}

/// After a round with skipped or failed actions, the next round comes at most this much later.
const RETRY_SOON: StdDuration = StdDuration::from_secs(30);

/// The session advisory lock key that lets one replica at a time maintain `schema`'s partitions
/// (`pg_try_advisory_lock(hashtextextended(key, 0))`). Public for operators' tooling and tests.
pub fn maintenance_lock_key(schema: &str) -> String {
    format!("auditflow.partition-maintenance.{schema}")
}

/// True when the connection or the server is the problem (not this statement): such errors end a
/// maintenance round instead of being reported per action.
pub(super) fn is_connection_problem(err: &sqlx::Error) -> bool {
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
    #[error(transparent)]
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
    /// True when the role lacks a privilege (SQLSTATE 42501): a configuration fault.
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, PartitionError::Database(err) if sqlstate(err).as_deref() == Some("42501"))
    }

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
pub(super) fn is_lock_conflict(err: &PartitionError) -> bool {
    matches!(err, PartitionError::Database(db)
        if matches!(sqlstate(db).as_deref(), Some("55P03" | "40P01")))
}

/// What one maintenance round did.
// One value per round, never stored in bulk: boxing the plan would buy nothing.
#[allow(clippy::large_enum_variant)]
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
    pub(super) pool: PgPool,
    pub(super) schema: String,
    pub(super) config: PartitionConfig,
    pub(super) breaker: Option<Arc<Breaker>>,
}

/// A pooled connection holding the maintenance lock, with the maintenance `lock_timeout` set for
/// the session. It is closed rather than returned to the pool, so neither the lock nor the
/// setting can leak to another user of the pool, even if the holder is dropped mid-way.
struct MaintenanceLock {
    pub(super) conn: PoolConnection<Postgres>,
    pub(super) key: String,
}

impl MaintenanceLock {
    /// Takes the lock if it is free (`None` if another session holds it).
    pub(super) async fn try_acquire(
        pool: &PgPool,
        schema: &str,
        lock_timeout: StdDuration,
    ) -> Result<Option<Self>, sqlx::Error> {
        Ok(Self::acquire(pool, schema, lock_timeout, StdDuration::ZERO)
            .await?
            .0)
    }

    /// Takes the lock, waiting up to `wait` for its holder to release it (`None` if it still
    /// holds it then; a zero `wait` does not wait at all), and how long it waited. Waiters
    /// queue in Postgres's lock manager, so they get the lock one after the other, in order.
    pub(super) async fn acquire(
        pool: &PgPool,
        schema: &str,
        lock_timeout: StdDuration,
        wait: StdDuration,
    ) -> Result<(Option<Self>, StdDuration), sqlx::Error> {
        let mut conn = pool.acquire().await?;
        conn.close_on_drop();
        let key = maintenance_lock_key(schema);
        let started = std::time::Instant::now();
        let locked = if wait.is_zero() {
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                .bind(&key)
                .fetch_one(&mut *conn)
                .await?
        } else {
            // lock_timeout bounds the wait for an advisory lock as for any other (55P03).
            execute_ddl(
                &mut conn,
                &format!("SET lock_timeout = {}", wait.as_millis().max(1)),
            )
            .await?;
            match sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
                .bind(&key)
                .execute(&mut *conn)
                .await
            {
                Ok(_) => true,
                Err(err) if sqlstate(&err).as_deref() == Some("55P03") => false,
                Err(err) => return Err(err),
            }
        };
        let waited = started.elapsed();
        if !locked {
            return Ok((None, waited));
        }
        execute_ddl(
            &mut conn,
            &format!("SET lock_timeout = {}", lock_timeout.as_millis()),
        )
        .await?;
        Ok((Some(MaintenanceLock { conn, key }), waited))
    }

    pub(super) async fn release(mut self) {
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

/// What [`run_maintenance`] did until it was stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaintenanceSummary {
    /// Rounds attempted.
    pub num_rounds: u64,
    /// Rounds that ended in an error or a panic; the loop went on after each.
    pub num_failed_rounds: u64,
}

/// Runs [`maintain_partitions_once`] now and then every
/// `AUDITFLOW_PARTITION_MAINTENANCE_INTERVAL_MS` (±10%), sooner (within 30 s) after a round with
/// skipped or failed actions, until `shutdown`. A round in progress is finished, not abandoned:
/// each of its statements is bounded by the lock timeout.
///
/// No failure of one round ends the loop: an error or a panic is logged, counted in
/// `auditflow_partition_maintenance_failures_total` and retried (a missing privilege, 42501,
/// at the normal interval: it is a configuration fault that only an operator fixes).
pub async fn run_maintenance(
    lifecycle: PartitionLifecycle,
    shutdown: CancellationToken,
) -> MaintenanceSummary {
    maintenance_loop(
        &lifecycle.schema,
        lifecycle.config.maintenance_interval(),
        &shutdown,
        || maintain_partitions_once(&lifecycle, Utc::now()),
    )
    .await
}

/// The loop of [`run_maintenance`], over any `round` (tests pass rounds that fail).
pub(super) async fn maintenance_loop<F, Fut>(
    schema: &str,
    interval: StdDuration,
    shutdown: &CancellationToken,
    mut round: F,
) -> MaintenanceSummary
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<MaintenanceRound, PartitionError>>,
{
    let mut summary = MaintenanceSummary::default();
    while !shutdown.is_cancelled() {
        summary.num_rounds += 1;
        // A panic in a round (a bug, or catalog contents nobody foresaw) must not end maintenance
        // for the rest of the process's life: it is caught like an error. Nothing outlives the
        // round: the maintenance lock's connection is closed when the unwind drops it.
        let outcome = AssertUnwindSafe(round()).catch_unwind().await;
        let retry_soon = match outcome {
            Ok(Ok(MaintenanceRound::Skipped)) => false,
            Ok(Ok(MaintenanceRound::Done { report, .. })) => report
                .results
                .iter()
                .any(|result| result.outcome.is_retried_soon()),
            Ok(Err(err)) => {
                summary.num_failed_rounds += 1;
                metrics::counter!("auditflow_partition_maintenance_failures_total", "cause" => "error")
                    .increment(1);
                if err.is_permission_denied() {
                    tracing::error!(
                        schema,
                        error = %err,
                        "partition maintenance is not permitted: a configuration fault (grant the \
                         privilege, or give AUDITFLOW_MAINTENANCE_DATABASE_URL the owner's role); \
                         retrying at the normal interval"
                    );
                    false
                } else {
                    tracing::error!(schema, error = %err, "partition maintenance round failed; retrying");
                    true
                }
            }
            Err(panic) => {
                summary.num_failed_rounds += 1;
                metrics::counter!("auditflow_partition_maintenance_failures_total", "cause" => "panic")
                    .increment(1);
                tracing::error!(
                    schema,
                    panic = panic_message(panic.as_ref()),
                    "partition maintenance round panicked; retrying"
                );
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
    summary
}

/// The message a panic carried, if it was a string.
fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
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

    pub(super) async fn guarded<T>(
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
    /// would do at `now`, with a warning for the retirements and drops `apply` would refuse
    /// because they overlap the protected window around the real time. Changes nothing.
    pub async fn plan(&self, now: DateTime<Utc>) -> Result<Plan, PartitionError> {
        self.guarded(async {
            let mut conn = self.pool.acquire().await?;
            let inventory = read_inventory(&mut conn, &self.schema).await?;
            let mut plan = plan_from(&inventory, &self.schema, &self.config, now);
            guard::warn_protected(&mut plan, &Guard::from_real_clock(&self.config));
            Ok(plan)
        })
        .await
    }

    /// Carries out `plan`'s actions in order, under the maintenance lock
    /// ([`PartitionError::Busy`] if another replica holds it), each re-checked when it runs.
    pub async fn apply(&self, plan: &Plan) -> Result<ApplyReport, PartitionError> {
        self.check_plan_schema(plan)?;
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

    /// What `auditflow partitions apply` does: takes the maintenance lock, waiting up to `wait`
    /// for maintenance running elsewhere (a replica's round, another `apply`) to finish, then
    /// plans at `now` and applies that plan, like one maintenance round. Concurrent calls (a cron
    /// on every node) thus run one after the other, and each partition is created by one of them
    /// only; the later ones find nothing left to do. If the lock is still held after `wait`,
    /// changes nothing and reports [`ApplyReport::ran_elsewhere`].
    pub async fn plan_and_apply(
        &self,
        now: DateTime<Utc>,
        wait: StdDuration,
    ) -> Result<ApplyReport, PartitionError> {
        self.under_lock_waiting(now, wait, async |conn| {
            let inventory = read_inventory(conn, &self.schema).await?;
            let plan = plan_from(&inventory, &self.schema, &self.config, now);
            self.apply_on(conn, &plan).await
        })
        .await
    }

    /// Carries out `plan`'s actions like [`PartitionLifecycle::apply`], but waits up to `wait`
    /// for maintenance running elsewhere to finish instead of failing with
    /// [`PartitionError::Busy`]; if it is still running then, changes nothing and reports
    /// [`ApplyReport::ran_elsewhere`]. Actions done meanwhile by the other are re-checked, and
    /// come out as `already existed` or skipped.
    pub async fn apply_waiting(
        &self,
        plan: &Plan,
        wait: StdDuration,
    ) -> Result<ApplyReport, PartitionError> {
        self.check_plan_schema(plan)?;
        self.under_lock_waiting(plan.now, wait, async |conn| self.apply_on(conn, plan).await)
            .await
    }

    /// Runs `work` on the maintenance lock's connection, waiting up to `wait` for maintenance
    /// running elsewhere to finish; if it is still running then, runs nothing and reports
    /// [`ApplyReport::ran_elsewhere`] at `now`.
    async fn under_lock_waiting(
        &self,
        now: DateTime<Utc>,
        wait: StdDuration,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<ApplyReport, PartitionError>,
    ) -> Result<ApplyReport, PartitionError> {
        self.guarded(async {
            let (lock, waited) = MaintenanceLock::acquire(
                &self.pool,
                &self.schema,
                self.config.lock_timeout(),
                wait,
            )
            .await?;
            let Some(mut lock) = lock else {
                return Ok(ApplyReport::running_elsewhere(&self.schema, now, waited));
            };
            let report = work(&mut lock.conn).await;
            lock.release().await;
            report.map(|report| report.after_waiting(waited))
        })
        .await
    }

    /// Refuses a plan made for another schema than this lifecycle's.
    fn check_plan_schema(&self, plan: &Plan) -> Result<(), PartitionError> {
        if plan.schema == self.schema {
            return Ok(());
        }
        Err(PartitionError::Invalid(format!(
            "the plan is for schema {:?}, not {:?}",
            plan.schema, self.schema
        )))
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
                "SELECT {} FROM {}.legal_holds WHERE released_at IS NULL ORDER BY id",
                hold_columns(),
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
                    "{name:?} is not the name of a partition auditflow made (events_pYYYYMMDD, \
                     events_pIYYYwIW or events_pYYYYMM, or retired_ and one of those): auditflow \
                     restores only partitions it retired, and leaves other tables alone"
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
}
