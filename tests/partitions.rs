//! The partition lifecycle against the real Postgres: concurrent creation, plan/apply agreement
//! over a simulated timeline, retire and restore, legal holds, lock timeouts, maintenance under
//! full-speed ingestion, and the `auditflow partitions` command.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use auditflow::breaker::{Breaker, BreakerConfig};
use auditflow::config::{Config, PartitionConfig};
use auditflow::db::partition::{self, Creation, PartitionInterval, PartitionSpec};
use auditflow::event::{Actor, ActorType, AuditEvent, Outcome as EventOutcome, Resource};
use auditflow::ingest::store::{self, Store};
use auditflow::ops::partitions::{
    self, maintain_partitions_once, ActionKind, MaintenanceRound, Outcome, PartitionError,
    PartitionLifecycle, Plan,
};
use chrono::{DateTime, Duration, NaiveDate, Utc};
use sqlx::PgPool;
use uuid::Uuid;

struct TestDb {
    schema: String,
    pool: PgPool,
}

impl TestDb {
    async fn new() -> Self {
        Self::with_connections(10).await
    }

    async fn with_connections(max_connections: u32) -> Self {
        let schema = format!("audit_parts_{}", common::suffix());
        let pool = Self::pool_for(&schema, max_connections).await;
        auditflow::db::migrate(&pool, &schema).await.unwrap();
        TestDb { schema, pool }
    }

    /// Another replica's pool on the same schema.
    async fn pool_for(schema: &str, max_connections: u32) -> PgPool {
        let config = Config::from_vars([
            ("AUDITFLOW_DB_SCHEMA".to_string(), schema.to_string()),
            (
                "AUDITFLOW_DB_MAX_CONNECTIONS".to_string(),
                max_connections.to_string(),
            ),
        ])
        .unwrap();
        store::connect(&config.database, &common::database_url())
            .await
            .unwrap()
    }

    fn lifecycle(&self, config: PartitionConfig) -> PartitionLifecycle {
        PartitionLifecycle::new(self.pool.clone(), self.schema.clone(), config)
    }

    fn store(&self) -> Store {
        Store::new(
            self.pool.clone(),
            self.schema.clone(),
            Arc::new(Breaker::new("postgres", BreakerConfig::INGEST)),
        )
    }

    /// Attached partitions, by lower bound.
    async fn attached(&self) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = to_regclass(format('%I.events', $1::text)) \
             ORDER BY c.relname",
        )
        .bind(&self.schema)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Everything that plan must not change: tables, attachments, bookkeeping, holds.
    async fn snapshot(&self) -> Vec<String> {
        sqlx::query_scalar(&format!(
            "SELECT c.relname::text || ' ' || coalesce(i.inhparent::regclass::text, '-') \
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
               LEFT JOIN pg_inherits i ON i.inhrelid = c.oid \
              WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') \
             UNION ALL SELECT partition_name || ' ' || state || ' ' || retired_at::text \
               FROM \"{0}\".partition_lifecycle \
             UNION ALL SELECT id::text || ' ' || coalesce(released_at::text, 'active') \
               FROM \"{0}\".legal_holds \
             ORDER BY 1",
            self.schema
        ))
        .bind(&self.schema)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{}\".\"{table}\"",
            self.schema
        ))
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// Row count and a digest of every row's identity and content in `[from, to)` of `events`.
    async fn fingerprint(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> (i64, String) {
        sqlx::query_as(&format!(
            "SELECT count(*), coalesce(md5(string_agg(event_id::text || '/' || occurred_at::text \
                || '/' || encode(content_hash, 'hex') || '/' || tenant_id || '/' || kafka_offset, \
                ',' ORDER BY event_id, occurred_at)), '') \
             FROM \"{}\".events WHERE occurred_at >= $1 AND occurred_at < $2",
            self.schema
        ))
        .bind(from)
        .bind(to)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        common::drop_schema_blocking(&self.schema);
    }
}

fn settings(
    interval: PartitionInterval,
    premake: u32,
    retention_days: u32,
    grace_days: u32,
) -> PartitionConfig {
    PartitionConfig {
        partition_interval: interval,
        partition_premake: premake,
        partition_retention_days: retention_days,
        partition_retired_grace_days: grace_days,
        ..PartitionConfig::default()
    }
}

fn day(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap()
}

fn at(text: &str) -> DateTime<Utc> {
    partitions::parse_time(text).unwrap()
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).unwrap().and_utc()
}

fn event(id: u128, occurred_at: DateTime<Utc>) -> AuditEvent {
    AuditEvent {
        event_id: Uuid::from_u128(id),
        occurred_at,
        tenant_id: format!("tenant-{}", id % 7),
        actor: Actor {
            id: format!("user-{}", id % 13),
            actor_type: ActorType::User,
            ip: Some("10.0.0.1".into()),
            user_agent: None,
        },
        action: "order.update".into(),
        resource: Resource {
            resource_type: "order".into(),
            id: format!("o-{id}"),
        },
        outcome: EventOutcome::Success,
        reason: None,
        trace_id: None,
        details: Some(format!(r#"{{"n":{id}}}"#)),
        session_id: None,
    }
}

/// Writes `per_day` events on each day of `days` (ids from `first_id`), spread over the day.
async fn write_days(store: &Store, days: &[NaiveDate], per_day: u128, first_id: u128) {
    let mut events = Vec::new();
    for (i, day) in days.iter().enumerate() {
        for n in 0..per_day {
            let id = first_id + i as u128 * per_day + n;
            let offset = Duration::seconds((86_399 * n / per_day.max(1)) as i64);
            events.push(event(id, midnight(*day) + offset));
        }
    }
    let batch = common::copy_rows(&events);
    store.write(&batch, 0..batch.len()).await.unwrap();
}

fn expected_outcome(kind: ActionKind) -> Outcome {
    match kind {
        ActionKind::Create => Outcome::Created,
        ActionKind::Retire => Outcome::Retired,
        ActionKind::Drop => Outcome::Dropped,
    }
}

#[tokio::test]
async fn eight_replicas_creating_one_partition_at_once_report_exactly_one_created() {
    let db = TestDb::new().await;
    // Day: all eight ask for the same day. Week and month: each asks for a different day of the
    // same week or month, which all map to one partition.
    // (interval, first day, days between two replicas' days, days in the interval)
    let cases = [
        (
            PartitionInterval::Day,
            day(2031, 5, 17),
            0,
            1,
            "events_p20310517",
        ),
        (
            PartitionInterval::Week,
            day(2031, 6, 2),
            1,
            7,
            "events_p2031w23",
        ),
        (
            PartitionInterval::Month,
            day(2031, 8, 1),
            3,
            31,
            "events_p203108",
        ),
    ];
    let mut replicas = Vec::new();
    for _ in 0..8 {
        let pool = TestDb::pool_for(&db.schema, 1).await;
        // Connect now, so the eight calls start together rather than staggered by connecting.
        sqlx::query("SELECT 1").execute(&pool).await.unwrap();
        replicas.push(pool);
    }
    for (interval, first_day, stride, span, name) in cases {
        let attempts = replicas.iter().enumerate().map(|(i, pool)| {
            let day = first_day + Duration::days((stride * i as i64) % span);
            partition::ensure_partition(pool, &db.schema, interval, day)
        });
        let results = futures::future::join_all(attempts).await;
        let created = results
            .iter()
            .filter(|r| matches!(r, Ok(Creation::Created)))
            .count();
        let existed = results
            .iter()
            .filter(|r| matches!(r, Ok(Creation::AlreadyExisted)))
            .count();
        assert_eq!((created, existed), (1, 7), "{interval}: {results:?}");
        assert!(db.attached().await.contains(&name.to_string()), "{name}");
    }
    assert_eq!(db.attached().await.len(), 3);
}

#[tokio::test]
async fn a_day_covered_by_a_partition_of_another_interval_already_exists() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let schema = &db.schema;
    // A weekly partition covers every day of its week, whatever interval is asked for.
    let wednesday = day(2031, 3, 5);
    assert_eq!(
        partition::ensure_partition(pool, schema, PartitionInterval::Week, wednesday)
            .await
            .unwrap(),
        Creation::Created
    );
    for (interval, day) in [
        (PartitionInterval::Day, day(2031, 3, 3)),
        (PartitionInterval::Day, day(2031, 3, 9)),
        (PartitionInterval::Month, day(2031, 3, 6)),
        (PartitionInterval::Week, day(2031, 3, 8)),
    ] {
        assert_eq!(
            partition::ensure_partition(pool, schema, interval, day)
                .await
                .unwrap(),
            Creation::AlreadyExisted,
            "{interval} {day}"
        );
    }
    // The week is covered but the rest of March is not: monthly gets daily partitions there.
    assert_eq!(
        partition::ensure_partition(pool, schema, PartitionInterval::Month, day(2031, 3, 20))
            .await
            .unwrap(),
        Creation::Created
    );
    // April is free: a whole monthly partition.
    partition::ensure_partition(pool, schema, PartitionInterval::Month, day(2031, 4, 20))
        .await
        .unwrap();
    assert_eq!(
        db.attached().await,
        ["events_p20310320", "events_p203104", "events_p2031w10"]
    );

    // The ingest path follows the configured interval.
    let store = db.store().with_partition_interval(PartitionInterval::Week);
    let batch = common::copy_rows(&[event(1, at("2031-05-07T10:00:00Z"))]);
    store.write(&batch, 0..1).await.unwrap();
    let placed: String = sqlx::query_scalar(&format!(
        "SELECT tableoid::regclass::text FROM \"{schema}\".events WHERE event_id = $1"
    ))
    .bind(Uuid::from_u128(1))
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(placed.ends_with("events_p2031w19"), "{placed}");
    // Partitions made by attaching carry the primary key: duplicates are still skipped.
    let again = store.write(&batch, 0..1).await.unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 1));
}

/// Applies `plan` and checks it did exactly what the plan said.
async fn apply_and_check(
    lifecycle: &PartitionLifecycle,
    plan: &Plan,
) -> BTreeMap<ActionKind, usize> {
    let report = lifecycle.apply(plan).await.unwrap();
    let applied: Vec<_> = report.results.iter().map(|r| &r.action).collect();
    let planned: Vec<_> = plan.actions.iter().collect();
    assert_eq!(
        applied, planned,
        "apply runs exactly the planned actions, in order"
    );
    let mut done = BTreeMap::new();
    for result in &report.results {
        assert_eq!(
            result.outcome,
            expected_outcome(result.action.kind),
            "{report}"
        );
        *done.entry(result.action.kind).or_insert(0) += 1;
    }
    done
}

async fn timeline(
    interval: PartitionInterval,
    config: PartitionConfig,
    start: DateTime<Utc>,
    step: Duration,
    steps: u32,
) {
    let db = TestDb::new().await;
    let lifecycle = db.lifecycle(config.clone());
    let store = db.store();
    let mut totals: BTreeMap<ActionKind, usize> = BTreeMap::new();
    let mut next_id = 0u128;
    for i in 0..steps {
        let now = start + step * i as i32;
        let before = db.snapshot().await;
        let plan = lifecycle.plan(now).await.unwrap();
        assert_eq!(db.snapshot().await, before, "plan changes nothing");
        let done = apply_and_check(&lifecycle, &plan).await;
        for (kind, count) in done {
            *totals.entry(kind).or_insert(0) += count;
        }
        let again = lifecycle.plan(now).await.unwrap();
        assert!(
            again.actions.is_empty(),
            "applied, nothing is left: {again}"
        );

        // What is attached is exactly the current interval and the premade ones, plus those
        // still inside retention.
        let current = PartitionSpec::containing(interval, now.date_naive());
        let mut last = current;
        for _ in 0..config.partition_premake {
            last = last.next();
        }
        let attached = db.attached().await;
        let cutoff = now - Duration::days(i64::from(config.partition_retention_days));
        for name in &attached {
            let spec = PartitionSpec::from_name(name).expect(name);
            assert!(spec.to() > cutoff, "{name} is past retention at {now}");
            assert!(
                spec <= last,
                "{name} is beyond the premake horizon at {now}"
            );
        }
        let mut spec = current;
        loop {
            assert!(
                attached.contains(&spec.name()),
                "{} missing at {now}",
                spec.name()
            );
            if spec == last {
                break;
            }
            spec = spec.next();
        }
        // Some rows in the current partition, so retiring and dropping move real data.
        write_days(&store, &[now.date_naive()], 3, next_id).await;
        next_id += 3;
    }
    for kind in [ActionKind::Create, ActionKind::Retire, ActionKind::Drop] {
        assert!(
            totals.get(&kind).copied().unwrap_or(0) > 0,
            "{interval}: the timeline exercises {kind:?}: {totals:?}"
        );
    }
}

#[tokio::test]
async fn plan_and_apply_agree_over_a_daily_timeline() {
    timeline(
        PartitionInterval::Day,
        settings(PartitionInterval::Day, 3, 10, 5),
        at("2030-01-01T13:00:00Z"),
        Duration::hours(22),
        40,
    )
    .await;
}

#[tokio::test]
async fn plan_and_apply_agree_over_weekly_and_monthly_timelines() {
    timeline(
        PartitionInterval::Week,
        settings(PartitionInterval::Week, 2, 30, 14),
        at("2030-01-01T06:00:00Z"),
        Duration::days(4),
        30,
    )
    .await;
    timeline(
        PartitionInterval::Month,
        settings(PartitionInterval::Month, 1, 62, 31),
        at("2030-01-15T00:00:00Z"),
        Duration::days(12),
        25,
    )
    .await;
}

#[tokio::test]
async fn retire_then_restore_keeps_every_row() {
    let db = TestDb::new().await;
    let config = settings(PartitionInterval::Day, 0, 5, 3);
    let lifecycle = db.lifecycle(config);
    let store = db.store();
    let days: Vec<NaiveDate> = (1..=4).map(|d| day(2030, 3, d)).collect();
    write_days(&store, &days, 250, 0).await;
    let (from, to) = (midnight(days[0]), midnight(day(2030, 3, 5)));
    let original = db.fingerprint(from, to).await;
    assert_eq!(original.0, 1000);

    let now = at("2030-03-15T12:00:00Z");
    let plan = lifecycle.plan(now).await.unwrap();
    let retire: Vec<&str> = plan
        .actions
        .iter()
        .filter(|a| a.kind == ActionKind::Retire)
        .map(|a| a.partition.as_str())
        .collect();
    assert_eq!(
        retire,
        [
            "events_p20300301",
            "events_p20300302",
            "events_p20300303",
            "events_p20300304"
        ]
    );
    apply_and_check(&lifecycle, &plan).await;
    assert_eq!(
        db.fingerprint(from, to).await.0,
        0,
        "retired rows leave events"
    );
    for day in &days {
        let spec = PartitionSpec::containing(PartitionInterval::Day, *day);
        assert_eq!(
            db.count(&spec.retired_name()).await,
            250,
            "rows stay, by name"
        );
    }

    // Restore by either name.
    let first = lifecycle
        .restore("retired_events_p20300301", now)
        .await
        .unwrap();
    assert!(first.past_retention);
    assert_eq!(first.retire_again_from, now + Duration::days(3));
    for name in [
        "events_p20300302",
        "retired_events_p20300303",
        "events_p20300304",
    ] {
        lifecycle.restore(name, now).await.unwrap();
    }
    assert_eq!(
        db.fingerprint(from, to).await,
        original,
        "every row is back"
    );
    let err = lifecycle
        .restore("events_p20300301", now)
        .await
        .unwrap_err();
    assert!(matches!(err, PartitionError::Invalid(_)), "{err}");

    // Restored partitions stay attached for the grace period, and the plan says why.
    let plan = lifecycle.plan(now + Duration::days(2)).await.unwrap();
    assert!(
        plan.actions.iter().all(|a| a.kind != ActionKind::Retire),
        "{plan}"
    );
    assert_eq!(plan.kept.len(), 4, "{plan}");
    assert!(plan.kept[0].reason.contains("restored"), "{plan}");

    // Then the lifecycle resumes: retired again, and dropped after the grace period.
    let later = now + Duration::days(3);
    let plan = lifecycle.plan(later).await.unwrap();
    assert_eq!(
        apply_and_check(&lifecycle, &plan).await[&ActionKind::Retire],
        4
    );
    let plan = lifecycle.plan(later + Duration::days(3)).await.unwrap();
    assert_eq!(
        apply_and_check(&lifecycle, &plan).await[&ActionKind::Drop],
        4
    );
    let err = lifecycle
        .restore("retired_events_p20300302", later + Duration::days(3))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("dropped"), "{err}");
    let attached = db.attached().await;
    for day in &days {
        let spec = PartitionSpec::containing(PartitionInterval::Day, *day);
        assert!(!attached.contains(&spec.name()), "{attached:?}");
    }
}

#[tokio::test]
async fn a_legal_hold_blocks_retirement_and_drop() {
    let db = TestDb::new().await;
    let lifecycle = db.lifecycle(settings(PartitionInterval::Day, 0, 5, 3));
    let store = db.store();
    let days: Vec<NaiveDate> = (1..=4).map(|d| day(2030, 6, d)).collect();
    write_days(&store, &days, 10, 0).await;

    // A hold over a few hours either side of midnight covers two days.
    let hold = lifecycle
        .hold(
            at("2030-06-02T20:00:00Z"),
            at("2030-06-03T02:00:00Z"),
            "case 42",
        )
        .await
        .unwrap();
    let now = at("2030-06-20T00:00:00Z");
    let plan = lifecycle.plan(now).await.unwrap();
    let retire: Vec<&str> = plan
        .actions
        .iter()
        .filter(|a| a.kind == ActionKind::Retire)
        .map(|a| a.partition.as_str())
        .collect();
    assert_eq!(retire, ["events_p20300601", "events_p20300604"]);
    let kept: Vec<&str> = plan.kept.iter().map(|k| k.table.as_str()).collect();
    assert_eq!(kept, ["events_p20300602", "events_p20300603"]);
    for kept in &plan.kept {
        assert_eq!(kept.holds, [hold]);
        assert!(
            kept.reason.contains(&format!("legal hold {hold}")),
            "{plan}"
        );
        assert!(kept.reason.contains("case 42"), "{plan}");
    }
    assert!(plan.to_string().contains("legal hold"), "{plan}");
    apply_and_check(&lifecycle, &plan).await;
    assert_eq!(
        db.attached().await,
        ["events_p20300602", "events_p20300603", "events_p20300620"]
    );

    // A hold placed between plan and apply wins: the action is skipped, with the reason.
    lifecycle.release(hold).await.unwrap();
    let plan = lifecycle.plan(now).await.unwrap();
    assert_eq!(
        plan.actions
            .iter()
            .filter(|a| a.kind == ActionKind::Retire)
            .count(),
        2
    );
    let late_hold = lifecycle
        .hold(
            at("2030-06-03T00:00:00Z"),
            at("2030-06-03T00:00:01Z"),
            "late request",
        )
        .await
        .unwrap();
    let report = lifecycle.apply(&plan).await.unwrap();
    let outcomes: Vec<String> = report
        .results
        .iter()
        .map(|r| r.outcome.to_string())
        .collect();
    assert_eq!(outcomes[0], "retired", "{report}");
    assert!(
        outcomes[1].starts_with("skipped")
            && outcomes[1].contains(&format!("legal hold {late_hold}")),
        "{report}"
    );
    assert_eq!(db.count("events_p20300603").await, 10);

    // A hold on retired data blocks the drop after the grace period, until released.
    let drop_time = now + Duration::days(10);
    let plan = lifecycle.plan(drop_time).await.unwrap();
    let drops: Vec<&str> = plan
        .actions
        .iter()
        .filter(|a| a.kind == ActionKind::Drop)
        .map(|a| a.table.as_str())
        .collect();
    assert_eq!(
        drops,
        [
            "retired_events_p20300601",
            "retired_events_p20300602",
            "retired_events_p20300604"
        ]
    );
    let third_hold = lifecycle
        .hold(at("2030-06-01"), at("2030-06-02"), "regulator")
        .await
        .unwrap();
    let plan = lifecycle.plan(drop_time).await.unwrap();
    let kept: Vec<&str> = plan.kept.iter().map(|k| k.table.as_str()).collect();
    assert!(kept.contains(&"retired_events_p20300601"), "{plan}");
    assert!(kept.contains(&"events_p20300603"), "{plan}");
    apply_and_check(&lifecycle, &plan).await;
    assert_eq!(db.count("retired_events_p20300601").await, 10);

    let active: Vec<i64> = lifecycle
        .holds()
        .await
        .unwrap()
        .iter()
        .map(|h| h.id)
        .collect();
    assert_eq!(active, [late_hold, third_hold]);
    for id in active {
        lifecycle.release(id).await.unwrap();
    }
    let err = lifecycle.release(third_hold).await.unwrap_err();
    assert!(err.to_string().contains("already released"), "{err}");
    assert!(lifecycle.release(999_999).await.is_err());
    assert!(lifecycle
        .hold(at("2030-01-02"), at("2030-01-01"), "x")
        .await
        .is_err());
    assert!(lifecycle
        .hold(at("2030-01-01"), at("2030-01-02"), "  ")
        .await
        .is_err());

    let plan = lifecycle.plan(drop_time).await.unwrap();
    let done = apply_and_check(&lifecycle, &plan).await;
    assert_eq!(done.get(&ActionKind::Drop), Some(&1), "{plan}");
    assert_eq!(done.get(&ActionKind::Retire), Some(&1), "{plan}");
}

#[tokio::test]
async fn only_one_replica_maintains_at_a_time() {
    let db = TestDb::new().await;
    let config = settings(PartitionInterval::Day, 5, 0, 30);
    let now = at("2032-01-01T10:00:00Z");

    // Someone else holds the maintenance lock: rounds skip at once, apply refuses.
    let mut holder = db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
        .bind(partitions::maintenance_lock_key(&db.schema))
        .execute(&mut *holder)
        .await
        .unwrap();
    let lifecycle = db.lifecycle(config.clone());
    let started = Instant::now();
    assert_eq!(
        maintain_partitions_once(&lifecycle, now).await.unwrap(),
        MaintenanceRound::Skipped
    );
    let plan = lifecycle.plan(now).await.unwrap();
    assert!(matches!(
        lifecycle.apply(&plan).await,
        Err(PartitionError::Busy)
    ));
    assert!(started.elapsed() < StdDuration::from_secs(2));
    assert!(db.attached().await.is_empty());
    sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
        .bind(partitions::maintenance_lock_key(&db.schema))
        .execute(&mut *holder)
        .await
        .unwrap();
    drop(holder);

    // Eight replicas at once: every partition is created once, and nobody errs.
    let mut replicas = Vec::new();
    for _ in 0..8 {
        let pool = TestDb::pool_for(&db.schema, 1).await;
        sqlx::query("SELECT 1").execute(&pool).await.unwrap();
        replicas.push(PartitionLifecycle::new(
            pool,
            db.schema.clone(),
            config.clone(),
        ));
    }
    let rounds =
        futures::future::join_all(replicas.iter().map(|r| maintain_partitions_once(r, now))).await;
    let mut created = Vec::new();
    for round in rounds {
        if let MaintenanceRound::Done { report, .. } = round.unwrap() {
            for result in report.results {
                assert_eq!(result.outcome, Outcome::Created);
                created.push(result.action.partition);
            }
        }
    }
    created.sort();
    assert_eq!(created, db.attached().await);
    assert_eq!(created.len(), 6);
}

#[tokio::test]
async fn ddl_that_hits_the_lock_timeout_is_skipped_and_retried() {
    let db = TestDb::new().await;
    // The sink accepts events up to a day old: the partitions 20 days old are outside the
    // protected window around the real time.
    let config = PartitionConfig {
        partition_lock_timeout_ms: 100,
        accept_past_days: 1,
        ..settings(PartitionInterval::Day, 2, 5, 0)
    };
    let lifecycle = db.lifecycle(config);
    let store = db.store();
    let now = Utc::now();
    let old: Vec<NaiveDate> = (20..23)
        .map(|d| now.date_naive() - Duration::days(d))
        .collect();
    write_days(&store, &old, 5, 0).await;

    // Other DDL on events (here an explicit lock of the kind ATTACH needs) holds creation off.
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query(&format!(
        "LOCK TABLE \"{}\".events IN SHARE UPDATE EXCLUSIVE MODE",
        db.schema
    ))
    .execute(&mut *blocker)
    .await
    .unwrap();
    let started = Instant::now();
    let MaintenanceRound::Done { report, .. } =
        maintain_partitions_once(&lifecycle, now).await.unwrap()
    else {
        panic!("nobody else maintains");
    };
    assert!(
        started.elapsed() < StdDuration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(!report.results.is_empty());
    for result in &report.results {
        assert!(
            matches!(&result.outcome, Outcome::Skipped { detail } if detail.contains("lock_timeout")),
            "{report}"
        );
    }
    blocker.rollback().await.unwrap();
    // The detaches never started: no bookkeeping is left claiming they did.
    let recorded: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\".partition_lifecycle",
        db.schema
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(recorded, 0);

    // A long reader of events lets the detach start but not finish: the partition is left
    // pending detach, and the next rounds finish the retirement once the reader is gone.
    let mut reader = db.pool.begin().await.unwrap();
    let total: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\".events", db.schema))
        .fetch_one(&mut *reader)
        .await
        .unwrap();
    assert_eq!(total, 15);
    let MaintenanceRound::Done { report, .. } =
        maintain_partitions_once(&lifecycle, now).await.unwrap()
    else {
        panic!("nobody else maintains");
    };
    let creates = report
        .results
        .iter()
        .filter(|r| r.action.kind == ActionKind::Create)
        .collect::<Vec<_>>();
    assert!(
        creates.iter().all(|r| r.outcome == Outcome::Created),
        "{report}"
    );
    assert!(
        report
            .results
            .iter()
            .any(|r| r.action.kind == ActionKind::Retire && !r.outcome.is_done()),
        "{report}"
    );
    // Ingest is not held up meanwhile.
    write_days(&store, &[now.date_naive()], 5, 1000).await;
    let plan = lifecycle.plan(now).await.unwrap();
    assert!(
        plan.actions
            .iter()
            .any(|a| a.kind == ActionKind::Retire && a.reason.contains("finishing")),
        "{plan}"
    );
    reader.commit().await.unwrap();
    for _ in 0..3 {
        maintain_partitions_once(&lifecycle, now).await.unwrap();
    }
    let plan = lifecycle.plan(now).await.unwrap();
    assert!(plan.actions.is_empty(), "{plan}");
    for day in &old {
        let spec = PartitionSpec::containing(PartitionInterval::Day, *day);
        assert!(!db.attached().await.contains(&spec.name()));
    }
    // Grace 0: retired partitions are gone too, and nothing else was touched.
    assert_eq!(
        db.fingerprint(now - Duration::days(2), now + Duration::days(2))
            .await
            .0,
        5
    );
}

#[tokio::test]
async fn maintenance_while_ingesting_at_full_speed_causes_no_ingest_errors() {
    let db = TestDb::with_connections(12).await;
    let store = Arc::new(db.store());
    let today = Utc::now().date_naive();
    // Old partitions with rows, for the timeline to retire and drop.
    let old: Vec<NaiveDate> = (31..=60).map(|d| today - Duration::days(d)).collect();
    write_days(&store, &old, 20, 1 << 64).await;
    // The simulated clock walks through the last 40 days: the sink accepts events up to a day
    // old, so only today's partitions are in the protected window.
    let config = PartitionConfig {
        partition_lock_timeout_ms: 200,
        accept_past_days: 1,
        ..settings(PartitionInterval::Day, 3, 5, 0)
    };
    let lifecycle = db.lifecycle(config);

    let stop = Arc::new(AtomicBool::new(false));
    let num_written = Arc::new(AtomicU64::new(0));
    let slowest_write_ms = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for writer in 0..4u128 {
        let store = Arc::clone(&store);
        let stop = Arc::clone(&stop);
        let num_written = Arc::clone(&num_written);
        let slowest_write_ms = Arc::clone(&slowest_write_ms);
        writers.push(tokio::spawn(async move {
            let mut batches = 0u128;
            while !stop.load(Ordering::Relaxed) || batches < 20 {
                let now = Utc::now();
                let events: Vec<AuditEvent> = (0..500u128)
                    .map(|n| {
                        let id = (writer << 96) | (batches << 32) | n;
                        event(id, now - Duration::seconds((n * 7) as i64))
                    })
                    .collect();
                let batch = common::copy_rows(&events);
                let started = Instant::now();
                let outcome = store.write(&batch, 0..batch.len()).await?;
                slowest_write_ms.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                assert_eq!(outcome.stored, 500);
                num_written.fetch_add(500, Ordering::Relaxed);
                batches += 1;
            }
            Ok::<u128, store::StoreError>(batches)
        }));
    }

    // The simulated clock walks through the old days: premake creates, retention retires,
    // grace 0 drops, all while the writers insert into today's partition.
    let mut totals: BTreeMap<String, usize> = BTreeMap::new();
    let start = Utc::now() - Duration::days(40);
    for step in 0..=25 {
        let now = start + Duration::days(step);
        for _attempt in 0..5 {
            let round = maintain_partitions_once(&lifecycle, now).await.unwrap();
            let MaintenanceRound::Done { report, .. } = round else {
                panic!("nobody else maintains");
            };
            for result in &report.results {
                assert!(
                    !matches!(result.outcome, Outcome::Failed { .. }),
                    "{report}"
                );
                let key = match result.outcome {
                    Outcome::Skipped { .. } => "skipped".to_string(),
                    ref done => done.to_string(),
                };
                *totals.entry(key).or_insert(0) += 1;
            }
            if report.results.iter().all(|r| r.outcome.is_done()) {
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        let batches = writer.await.unwrap().expect("every ingest write succeeded");
        assert!(batches >= 20);
    }
    for kind in ["created", "retired", "dropped"] {
        assert!(totals.get(kind).copied().unwrap_or(0) > 0, "{totals:?}");
    }
    let recent = db
        .fingerprint(
            Utc::now() - Duration::days(2),
            Utc::now() + Duration::days(1),
        )
        .await;
    assert_eq!(recent.0 as u64, num_written.load(Ordering::Relaxed));
    // With grace 0, partitions retired in the last round are dropped in the next one.
    let end = start + Duration::days(25);
    maintain_partitions_once(&lifecycle, end).await.unwrap();
    let final_plan = lifecycle.plan(end).await.unwrap();
    assert!(final_plan.actions.is_empty(), "{final_plan}");
    eprintln!(
        "ingested {} rows while maintaining ({totals:?}); slowest batch write {} ms",
        num_written.load(Ordering::Relaxed),
        slowest_write_ms.load(Ordering::Relaxed)
    );
}

/// Runs `auditflow partitions ARGS` against the test's schema.
fn cli(db: &TestDb, args: &[&str]) -> std::process::Output {
    cli_command(db, args).output().expect("run auditflow")
}

/// `auditflow partitions ARGS` against the test's schema, to run.
fn cli_command(db: &TestDb, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_auditflow"));
    command.arg("partitions").args(args).env_clear();
    if let Ok(path) = std::env::var("PATH") {
        command.env("PATH", path);
    }
    command
        .env("RUST_LOG", "warn")
        .env("AUDITFLOW_DATABASE_URL", common::database_url())
        .env("AUDITFLOW_DB_SCHEMA", &db.schema)
        .env("AUDITFLOW_PARTITION_PREMAKE", "2")
        .env("AUDITFLOW_PARTITION_RETENTION_DAYS", "40")
        .env("AUDITFLOW_PARTITION_RETIRED_GRACE_DAYS", "10");
    command
}

fn stdout(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[tokio::test]
async fn the_partitions_command_plans_applies_holds_and_restores() {
    let db = TestDb::new().await;
    let store = db.store();
    write_days(&store, &[day(2033, 1, 1), day(2033, 1, 2)], 5, 0).await;
    let now = "2033-02-20T08:00:00Z";

    let plan: Plan =
        serde_json::from_str(&stdout(&cli(&db, &["plan", "--json", "--now", now]))).unwrap();
    assert_eq!(plan.actions.len(), 3 + 2, "{plan}");
    let text = stdout(&cli(&db, &["plan", "--now", now]));
    assert!(text.contains("retire  events_p20330101"), "{text}");

    // apply --plan FILE does what the saved plan says.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_string(&plan).unwrap()).unwrap();
    let report: serde_json::Value = serde_json::from_str(&stdout(&cli(
        &db,
        &[
            "apply",
            "--json",
            "--scratch-schema",
            "--plan",
            file.path().to_str().unwrap(),
        ],
    )))
    .unwrap();
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), plan.actions.len());
    for (result, action) in results.iter().zip(&plan.actions) {
        assert_eq!(result["partition"], action.partition.as_str());
        assert_eq!(
            result["outcome"],
            match action.kind {
                ActionKind::Create => "created",
                ActionKind::Retire => "retired",
                ActionKind::Drop => "dropped",
            }
        );
    }
    let again: Plan =
        serde_json::from_str(&stdout(&cli(&db, &["plan", "--json", "--now", now]))).unwrap();
    assert!(again.actions.is_empty(), "{again}");

    let id = stdout(&cli(
        &db,
        &[
            "hold",
            "--from",
            "2033-01-01",
            "--to",
            "2033-01-02",
            "--reason",
            "case 7",
        ],
    ));
    let id: i64 = id.trim().parse().unwrap();
    let holds = stdout(&cli(&db, &["holds"]));
    assert!(
        holds.contains(&format!("hold {id}")) && holds.contains("case 7"),
        "{holds}"
    );
    let later = "2033-03-10T00:00:00Z";
    let text = stdout(&cli(&db, &["plan", "--now", later]));
    assert!(text.contains("drop    retired_events_p20330102"), "{text}");
    assert!(text.contains("keep    retired_events_p20330101"), "{text}");
    assert!(text.contains(&format!("legal hold {id}")), "{text}");
    stdout(&cli(&db, &["release", &id.to_string()]));
    let again = cli(&db, &["release", &id.to_string()]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already released"),
        "{again:?}"
    );

    let restored = stdout(&cli(&db, &["restore", "retired_events_p20330101"]));
    assert!(restored.contains("restored events_p20330101"), "{restored}");
    assert_eq!(db.count("events_p20330101").await, 5);
    let bad = cli(&db, &["restore", "events; drop table x"]);
    assert!(!bad.status.success());
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn apply_a_year_ahead_changes_nothing_and_exits_non_zero() {
    let db = TestDb::new().await;
    let store = db.store();
    let today = Utc::now().date_naive();
    write_days(&store, &[today - Duration::days(1), today], 5, 0).await;
    stdout(&cli(&db, &["apply"]));
    let attached = db.attached().await;
    assert!(attached.len() >= 4, "{attached:?}");
    let before = db.snapshot().await;
    let rows = db.count("events").await;
    assert_eq!(rows, 10);
    let year_ahead = (Utc::now() + Duration::days(365)).to_rfc3339();

    // Refused before anything is done, saying why and what to use instead.
    let refused = cli(&db, &["apply", "--now", &year_ahead]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    let message = stderr(&refused);
    assert!(
        message.contains("partitions plan --now") && message.contains("--scratch-schema"),
        "{message}"
    );
    // Planning for that time stays allowed, and says what apply would refuse.
    let plan_json = stdout(&cli(&db, &["plan", "--json", "--now", &year_ahead]));
    let plan: Plan = serde_json::from_str(&plan_json).unwrap();
    assert!(
        plan.actions.iter().any(|a| a.kind == ActionKind::Retire),
        "{plan}"
    );
    assert!(
        plan.warnings.iter().any(|w| w.contains("protected window")),
        "{plan}"
    );
    // A plan saved for that time is refused the same way.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &plan_json).unwrap();
    let refused = cli(&db, &["apply", "--plan", file.path().to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert_eq!(db.snapshot().await, before, "nothing changed");
    assert_eq!(db.count("events").await, rows);

    // On a scratch schema the rehearsal runs, but nothing around the real time is retired: the
    // command says so and exits non-zero.
    let rehearsal = cli(
        &db,
        &["apply", "--json", "--scratch-schema", "--now", &year_ahead],
    );
    assert_eq!(rehearsal.status.code(), Some(1), "{}", stderr(&rehearsal));
    assert!(
        stderr(&rehearsal).contains("refused"),
        "{}",
        stderr(&rehearsal)
    );
    let report: serde_json::Value = serde_json::from_slice(&rehearsal.stdout).unwrap();
    let retires: Vec<&serde_json::Value> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "retire")
        .collect();
    assert_eq!(retires.len(), attached.len(), "{report}");
    for retire in retires {
        assert_eq!(retire["outcome"], "protected", "{report}");
        assert!(
            retire["detail"]
                .as_str()
                .is_some_and(|d| d.contains("protected window")),
            "{report}"
        );
    }
    assert_eq!(db.count("events").await, rows);
    let after = db.attached().await;
    assert!(
        attached.iter().all(|name| after.contains(name)),
        "{after:?}"
    );
    let recorded: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\".partition_lifecycle",
        db.schema
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(recorded, 0, "no retirement was even started");
}

#[tokio::test]
async fn a_simulated_clock_never_retires_or_drops_the_protected_window() {
    let db = TestDb::new().await;
    let store = db.store();
    let today = Utc::now().date_naive();
    let days = [today - Duration::days(2), today - Duration::days(1), today];
    write_days(&store, &days, 4, 0).await;
    let names: Vec<String> = days.iter().map(|d| partition::partition_name(*d)).collect();
    let year_ahead = Utc::now() + Duration::days(365);

    // Maintenance a year ahead, with the sink accepting events 30 days old: nothing around the
    // real time is retired, whatever the simulated clock says.
    let lifecycle = db.lifecycle(settings(PartitionInterval::Day, 1, 40, 0));
    let MaintenanceRound::Done { report, .. } = maintain_partitions_once(&lifecycle, year_ahead)
        .await
        .unwrap()
    else {
        panic!("nobody else maintains");
    };
    let retires: Vec<_> = report
        .results
        .iter()
        .filter(|r| r.action.kind == ActionKind::Retire)
        .collect();
    assert_eq!(retires.len(), 3, "{report}");
    for retire in &retires {
        assert!(
            matches!(&retire.outcome, Outcome::Protected { detail } if detail.contains("protected window")),
            "{report}"
        );
        assert!(!retire.outcome.is_done());
    }
    assert!(
        report.to_string().contains("skipped (protected)"),
        "{report}"
    );
    let attached = db.attached().await;
    assert!(names.iter().all(|n| attached.contains(n)), "{attached:?}");

    // A sink accepting events only a day old lets the partition of two days ago retire ...
    let narrow = db.lifecycle(PartitionConfig {
        accept_past_days: 1,
        ..settings(PartitionInterval::Day, 1, 40, 0)
    });
    maintain_partitions_once(&narrow, year_ahead).await.unwrap();
    assert!(!db.attached().await.contains(&names[0]));
    assert!(db.attached().await.contains(&names[1]));
    // ... but with 30 days, its drop (grace 0, due a year ahead) is refused.
    let plan = lifecycle.plan(year_ahead).await.unwrap();
    let drop_action = plan
        .actions
        .iter()
        .find(|a| a.kind == ActionKind::Drop)
        .unwrap_or_else(|| panic!("{plan}"));
    assert_eq!(drop_action.table, format!("retired_{}", names[0]));
    let report = lifecycle.apply(&plan).await.unwrap();
    let dropped = report
        .results
        .iter()
        .find(|r| r.action.kind == ActionKind::Drop)
        .unwrap();
    assert!(
        matches!(dropped.outcome, Outcome::Protected { .. }),
        "{report}"
    );
    assert_eq!(db.count(&format!("retired_{}", names[0])).await, 4);
    assert_eq!(db.count("events").await, 8);
}

#[tokio::test]
async fn foreign_partitions_are_listed_left_alone_and_never_panic() {
    let db = TestDb::new().await;
    let schema = &db.schema;
    // Made by hand: a partition named events_p123é567 with some range, one bounded by
    // 'infinity', a detached table of such a name, and a hold without end.
    for sql in [
        format!(
            r#"CREATE TABLE "{schema}"."events_p123é567" (LIKE "{schema}".events INCLUDING ALL EXCLUDING INDEXES)"#
        ),
        format!(
            r#"ALTER TABLE "{schema}".events ATTACH PARTITION "{schema}"."events_p123é567"
               FOR VALUES FROM ('2031-03-01 00:00:00+00') TO ('2031-03-04 00:00:00+00')"#
        ),
        format!(
            r#"CREATE TABLE "{schema}".events_after (LIKE "{schema}".events INCLUDING ALL EXCLUDING INDEXES)"#
        ),
        format!(
            r#"ALTER TABLE "{schema}".events ATTACH PARTITION "{schema}".events_after
               FOR VALUES FROM ('2040-01-01 00:00:00+00') TO ('infinity')"#
        ),
        format!(
            r#"CREATE TABLE "{schema}"."retired_events_p123é567" (LIKE "{schema}".events INCLUDING ALL EXCLUDING INDEXES)"#
        ),
        format!(
            r#"INSERT INTO "{schema}".legal_holds (range_from, range_to, reason)
               VALUES ('2035-01-01', 'infinity', 'indefinite')"#
        ),
    ] {
        sqlx::raw_sql(&sql).execute(&db.pool).await.unwrap();
    }
    let store = db.store();
    // Rows land in the hand-made partition (it covers their day) and in one of auditflow's.
    write_days(&store, &[day(2031, 3, 2), day(2031, 3, 10)], 3, 0).await;
    assert_eq!(db.count("events_p123é567").await, 3);

    let lifecycle = db.lifecycle(settings(PartitionInterval::Day, 1, 30, 10));
    let now = at("2031-05-01T00:00:00Z");
    let plan = lifecycle.plan(now).await.unwrap();
    let foreign: Vec<(&str, bool)> = plan
        .foreign
        .iter()
        .map(|f| (f.table.as_str(), f.attached))
        .collect();
    assert_eq!(
        foreign,
        [
            ("events_p123é567", true),
            ("events_after", true),
            ("retired_events_p123é567", false),
        ],
        "{plan}"
    );
    assert_eq!(plan.foreign[1].to, None, "'infinity' is unbounded: {plan}");
    assert_eq!(
        plan.actions
            .iter()
            .map(|a| (a.kind, a.table.as_str()))
            .collect::<Vec<_>>(),
        [
            (ActionKind::Create, "events_p20310501"),
            (ActionKind::Create, "events_p20310502"),
            (ActionKind::Retire, "events_p20310310"),
        ],
        "only auditflow's partitions are acted on: {plan}"
    );
    let holds = lifecycle.holds().await.unwrap();
    assert_eq!(holds.len(), 1);
    assert!(
        holds[0].range_to > Utc::now() + Duration::days(1000 * 365),
        "a hold to 'infinity' still reaches far ahead: {}",
        holds[0]
    );

    // A maintenance round goes through, and leaves them as they were.
    let MaintenanceRound::Done { report, .. } =
        maintain_partitions_once(&lifecycle, now).await.unwrap()
    else {
        panic!("nobody else maintains");
    };
    assert!(
        report.results.iter().all(|r| r.outcome.is_done()),
        "{report}"
    );
    let attached = db.attached().await;
    assert!(
        attached.contains(&"events_p123é567".to_string()),
        "{attached:?}"
    );
    assert!(
        attached.contains(&"events_after".to_string()),
        "{attached:?}"
    );
    assert_eq!(db.count("events_p123é567").await, 3);
    assert_eq!(db.count("retired_events_p20310310").await, 3);

    // The command: listed as foreign, restore refuses them with a clear message, no panic.
    let text = stdout(&cli(&db, &["plan", "--now", "2031-05-01"]));
    assert!(
        text.contains("foreign events_p123é567  [2031-03-01, 2031-03-04)"),
        "{text}"
    );
    assert!(
        text.contains("foreign retired_events_p123é567  (detached)"),
        "{text}"
    );
    let plan: Plan = serde_json::from_str(&stdout(&cli(&db, &["plan", "--json"]))).unwrap();
    assert_eq!(plan.foreign.len(), 3, "{plan}");
    stdout(&cli(&db, &["apply"]));
    for name in [
        "events_p123é567",
        "retired_events_p123é567",
        "events_p12é4567",
    ] {
        let refused = cli(&db, &["restore", name]);
        assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
        let message = stderr(&refused);
        assert!(
            message.contains(&format!(
                "\"{name}\" is not the name of a partition auditflow made"
            )),
            "{message}"
        );
        assert!(!message.contains("panicked"), "{message}");
    }
    assert!(db.attached().await.contains(&"events_p123é567".to_string()));
    assert_eq!(db.count("retired_events_p123é567").await, 0);
}

/// A login role of this test's own that owns a schema it migrated, so a privilege can be revoked
/// from it (the tests' usual role is a superuser). Dropped with its schema at the end.
struct OwnRole {
    role: String,
    schema: String,
    admin: PgPool,
}

impl OwnRole {
    async fn create() -> (Self, PgPool) {
        let id = common::suffix();
        let role = format!("af_maint_{id}");
        let schema = format!("audit_parts_{id}");
        let admin = TestDb::pool_for(&schema, 2).await;
        for sql in [
            format!("CREATE ROLE {role} LOGIN"),
            format!("GRANT CREATE ON DATABASE test TO {role}"),
        ] {
            sqlx::query(&sql).execute(&admin).await.unwrap();
        }
        let mut url = reqwest::Url::parse(&common::database_url()).unwrap();
        url.set_username(&role).unwrap();
        url.set_password(None).unwrap();
        let config =
            Config::from_vars([("AUDITFLOW_DB_SCHEMA".to_string(), schema.clone())]).unwrap();
        let pool = store::connect(&config.database, url.as_str())
            .await
            .unwrap();
        auditflow::db::migrate(&pool, &schema).await.unwrap();
        (
            OwnRole {
                role,
                schema,
                admin,
            },
            pool,
        )
    }
}

impl Drop for OwnRole {
    fn drop(&mut self) {
        common::drop_schema_blocking(&self.schema);
        let role = &self.role;
        common::run_sql_blocking(&format!(
            "DROP OWNED BY {role} CASCADE; REVOKE CREATE ON DATABASE test FROM {role}; \
             DROP ROLE IF EXISTS {role}"
        ));
    }
}

#[tokio::test]
async fn the_maintenance_loop_survives_failing_rounds_and_recovers_once_the_cause_is_gone() {
    let (owner, pool) = OwnRole::create().await;
    let schema = owner.schema.clone();
    let attached = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = to_regclass(format('%I.events', $1::text)) ORDER BY 1",
        )
        .bind(&schema)
        .fetch_all(&owner.admin)
        .await
        .unwrap()
    };
    // A hand-made partition with a foreign name is there all along, and the maintenance role has
    // lost a privilege every round needs: rounds fail.
    for sql in [
        format!(
            r#"CREATE TABLE "{schema}"."events_p123é567"
               (LIKE "{schema}".events INCLUDING ALL EXCLUDING INDEXES)"#
        ),
        format!(
            r#"ALTER TABLE "{schema}".events ATTACH PARTITION "{schema}"."events_p123é567"
               FOR VALUES FROM ('2020-01-01 00:00:00+00') TO ('2020-01-04 00:00:00+00')"#
        ),
        format!(
            r#"REVOKE SELECT ON "{schema}".legal_holds FROM {}"#,
            owner.role
        ),
    ] {
        sqlx::raw_sql(&sql).execute(&owner.admin).await.unwrap();
    }
    let lifecycle = PartitionLifecycle::new(
        pool,
        schema.clone(),
        PartitionConfig {
            partition_maintenance_interval_ms: 100,
            ..settings(PartitionInterval::Day, 2, 30, 30)
        },
    );
    let round = maintain_partitions_once(&lifecycle, Utc::now()).await;
    assert!(
        matches!(&round, Err(err) if err.is_permission_denied()),
        "{round:?}"
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let maintenance = tokio::spawn(partitions::run_maintenance(lifecycle, shutdown.clone()));
    tokio::time::sleep(StdDuration::from_millis(800)).await;
    assert!(!maintenance.is_finished(), "the loop goes on");
    assert_eq!(attached().await, ["events_p123é567"]);

    // The cause removed, the next round premakes.
    sqlx::raw_sql(&format!(
        r#"GRANT SELECT ON "{schema}".legal_holds TO {}"#,
        owner.role
    ))
    .execute(&owner.admin)
    .await
    .unwrap();
    let deadline = Instant::now() + StdDuration::from_secs(15);
    while attached().await.len() < 4 {
        assert!(Instant::now() < deadline, "{:?}", attached().await);
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
    shutdown.cancel();
    let summary = maintenance.await.expect("the loop ends only when stopped");
    assert!(summary.num_failed_rounds >= 2, "{summary:?}");
    assert!(
        summary.num_rounds > summary.num_failed_rounds,
        "{summary:?}"
    );
    let today = Utc::now().date_naive();
    let names = attached().await;
    for d in 0..=2 {
        let name = partition::partition_name(today + Duration::days(d));
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    assert!(names.contains(&"events_p123é567".to_string()));
    eprintln!("maintenance loop: {summary:?}");
}

/// Runs `auditflow partitions ARGS` eight times at once, each from a thread of its own.
fn eight_at_once(db: &TestDb, args: &[&str]) -> Vec<std::thread::JoinHandle<TimedOutput>> {
    let started = Instant::now();
    (0..8)
        .map(|_| {
            let mut command = cli_command(db, args);
            std::thread::spawn(move || {
                let output = command.output().expect("run auditflow");
                (started.elapsed(), output)
            })
        })
        .collect()
}

type TimedOutput = (StdDuration, std::process::Output);

/// Checks that each of `runs` (`apply --json`) exited 0 and ran here; returns the partitions
/// they created, in one sorted list, and how many waited for the lock.
fn created_by(runs: Vec<std::thread::JoinHandle<TimedOutput>>) -> (Vec<String>, usize) {
    let mut created = Vec::new();
    let mut num_waited = 0;
    for run in runs {
        let (elapsed, output) = run.join().unwrap();
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(report["ran_elsewhere"], false, "{report}");
        let results = report["results"].as_array().unwrap();
        for result in results {
            assert_eq!(result["outcome"], "created", "{report}");
            created.push(result["partition"].as_str().unwrap().to_string());
        }
        if report["waited_ms"].as_u64().unwrap() > 0 {
            num_waited += 1;
        }
        eprintln!(
            "apply exited 0 after {} ms: waited {} ms, {} created",
            elapsed.as_millis(),
            report["waited_ms"],
            results.len()
        );
    }
    created.sort();
    (created, num_waited)
}

#[tokio::test]
async fn eight_concurrent_apply_commands_all_exit_0_and_create_each_partition_once() {
    // As a cron on every node starts them.
    let db = TestDb::new().await;
    let (created, _) = created_by(eight_at_once(&db, &["apply", "--json"]));
    assert_eq!(
        created,
        db.attached().await,
        "each partition created exactly once"
    );
    assert_eq!(created.len(), 3, "today and two premade: {created:?}");

    // A replica's round holds the maintenance lock while the eight start: they all find
    // maintenance running elsewhere and wait for it.
    let db = TestDb::new().await;
    let key = partitions::maintenance_lock_key(&db.schema);
    let mut holder = db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
        .bind(&key)
        .execute(&mut *holder)
        .await
        .unwrap();
    let started = Instant::now();
    let runs = eight_at_once(&db, &["apply", "--json"]);
    // Released once all eight are queued on the lock.
    let deadline = Instant::now() + StdDuration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks l, (SELECT hashtextextended($1, 0) AS h) k \
             WHERE l.locktype = 'advisory' AND NOT l.granted AND l.objsubid = 1 \
               AND l.classid = ((k.h >> 32) & 4294967295)::oid \
               AND l.objid = (k.h & 4294967295)::oid",
        )
        .bind(&key)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if waiting == 8 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} of 8 waiting for the lock"
        );
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
    eprintln!(
        "all eight waiting for the lock {} ms after they started",
        started.elapsed().as_millis()
    );
    sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
        .bind(&key)
        .execute(&mut *holder)
        .await
        .unwrap();
    let (created, num_waited) = created_by(runs);
    assert_eq!(
        created,
        db.attached().await,
        "each partition created exactly once"
    );
    assert_eq!(created.len(), 3, "today and two premade: {created:?}");
    assert_eq!(num_waited, 8, "each says it waited for the lock holder");

    // Held longer than --wait: the run says maintenance is running elsewhere, does nothing and
    // exits 0.
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
        .bind(&key)
        .execute(&mut *holder)
        .await
        .unwrap();
    let before = db.snapshot().await;
    let started = Instant::now();
    let output = cli(
        &db,
        &[
            "apply",
            "--json",
            "--wait",
            "1",
            "--now",
            &Utc::now().to_rfc3339(),
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(started.elapsed() >= StdDuration::from_secs(1));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["ran_elsewhere"], true, "{report}");
    assert_eq!(report["results"], serde_json::json!([]), "{report}");
    let text = stdout(&cli(&db, &["apply", "--wait", "1"]));
    assert!(text.contains("running elsewhere"), "{text}");
    assert_eq!(db.snapshot().await, before);
}
