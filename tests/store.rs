//! The storage layer against the real Postgres: partitions, COPY encoding, deduplication.

mod common;

use std::sync::Arc;

use auditflow::breaker::{Breaker, BreakerConfig};
use auditflow::config::Config;
use auditflow::db::partition::{self, Creation};
use auditflow::event::{Actor, ActorType, AuditEvent, Outcome, Resource};
use auditflow::ingest::store::{self, Store};
use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

struct TestDb {
    schema: String,
    store: Store,
}

impl TestDb {
    async fn new() -> Self {
        let schema = format!("audit_store_{}", common::suffix());
        let config = Config::from_vars([
            ("AUDITFLOW_DB_SCHEMA".to_string(), schema.clone()),
            ("AUDITFLOW_DB_MAX_CONNECTIONS".to_string(), "10".to_string()),
        ])
        .unwrap();
        let pool = store::connect(&config.database, &common::database_url())
            .await
            .unwrap();
        auditflow::db::migrate(&pool, &schema).await.unwrap();
        TestDb {
            store: Store::new(
                pool,
                schema.clone(),
                Arc::new(Breaker::new("postgres", BreakerConfig::INGEST)),
            ),
            schema,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        common::drop_schema_blocking(&self.schema);
    }
}

fn event(id: u128, tenant: &str) -> AuditEvent {
    AuditEvent {
        event_id: Uuid::from_u128(id),
        occurred_at: Utc::now() - chrono::Duration::hours(1),
        tenant_id: tenant.into(),
        actor: Actor {
            id: "user-1".into(),
            actor_type: ActorType::User,
            ip: Some("10.0.0.1".into()),
            user_agent: None,
        },
        action: "order.update".into(),
        resource: Resource {
            resource_type: "order".into(),
            id: "o-1".into(),
        },
        outcome: Outcome::Success,
        reason: None,
        trace_id: None,
        details: Some(r#"{"k":"v"}"#.into()),
        session_id: None,
    }
}

#[tokio::test]
async fn eight_concurrent_creations_of_one_partition_report_one_created() {
    let db = TestDb::new().await;
    let day = NaiveDate::from_ymd_opt(2031, 5, 17).unwrap();
    let attempts = (0..8).map(|_| partition::ensure_day(db.store.pool(), &db.schema, day));
    let results = futures::future::join_all(attempts).await;
    let created = results
        .iter()
        .filter(|r| matches!(r, Ok(Creation::Created)))
        .count();
    let existed = results
        .iter()
        .filter(|r| matches!(r, Ok(Creation::AlreadyExisted)))
        .count();
    assert_eq!((created, existed), (1, 7), "{results:?}");
}

#[tokio::test]
async fn text_with_copy_separators_and_unicode_is_stored_exactly() {
    let db = TestDb::new().await;
    let mut tricky = event(1, "tenant\twith\ttabs");
    tricky.reason = Some("line one\nline two\r\\back\\slash ünïcødé 🚀".into());
    tricky.details = Some(r#"{"path":"C:\\temp","quote":"\"x\"","nested":{"a":[1,2]}}"#.into());
    tricky.actor.user_agent = Some("\\N".into());
    let outcome = db
        .store
        .write(&common::copy_rows(std::slice::from_ref(&tricky)), 0..1)
        .await
        .unwrap();
    assert_eq!(outcome.stored, 1);
    let (tenant, reason, details, agent): (String, String, serde_json::Value, String) =
        sqlx::query_as(&format!(
            "SELECT tenant_id, reason, details, actor_user_agent FROM \"{}\".events",
            db.schema
        ))
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    assert_eq!(tenant, tricky.tenant_id);
    assert_eq!(Some(reason), tricky.reason);
    assert_eq!(agent, "\\N", "a literal backslash-N is text, not NULL");
    let expected: serde_json::Value =
        serde_json::from_str(tricky.details.as_deref().unwrap()).unwrap();
    assert_eq!(details, expected);
}

#[tokio::test]
async fn rows_carry_their_kafka_coordinates_and_land_in_daily_partitions() {
    let db = TestDb::new().await;
    let mut old = event(1, "t");
    old.occurred_at = DateTime::parse_from_rfc3339("2030-01-02T23:59:59.999999Z")
        .unwrap()
        .to_utc();
    let mut new = event(2, "t");
    new.occurred_at = DateTime::parse_from_rfc3339("2030-01-03T00:00:00Z")
        .unwrap()
        .to_utc();
    db.store
        .write(&common::copy_rows(&[old, new]), 0..2)
        .await
        .unwrap();
    let placed: Vec<(String, String, i32, i64)> = sqlx::query_as(&format!(
        "SELECT tableoid::regclass::text, kafka_topic, kafka_partition, kafka_offset FROM \"{}\".events ORDER BY kafka_offset",
        db.schema
    ))
    .fetch_all(db.store.pool())
    .await
    .unwrap();
    assert_eq!(placed.len(), 2);
    assert!(placed[0].0.ends_with("events_p20300102"), "{placed:?}");
    assert!(placed[1].0.ends_with("events_p20300103"), "{placed:?}");
    assert_eq!(
        (placed[1].1.as_str(), placed[1].2, placed[1].3),
        ("audit-events", 1, 1)
    );
}

#[tokio::test]
async fn repeated_batches_are_skipped_and_reused_ids_with_other_content_are_reported() {
    let db = TestDb::new().await;
    let events: Vec<AuditEvent> = (0..100).map(|i| event(i, "t")).collect();
    let first = db
        .store
        .write(&common::copy_rows(&events), 0..100)
        .await
        .unwrap();
    assert_eq!((first.stored, first.duplicates), (100, 0));
    // The same rows again, on the optimistic path too (after a clean batch).
    let second = db
        .store
        .write(&common::copy_rows(&events), 0..100)
        .await
        .unwrap();
    assert_eq!(
        (second.stored, second.duplicates, second.conflicts),
        (0, 100, 0)
    );
    let third = db
        .store
        .write(&common::copy_rows(&events), 0..100)
        .await
        .unwrap();
    assert_eq!((third.stored, third.duplicates), (0, 100));

    let mut mixed: Vec<AuditEvent> = (100..110).map(|i| event(i, "t")).collect();
    let mut reused = events[5].clone();
    reused.tenant_id = "someone-else".into();
    mixed.push(reused);
    let fourth = db
        .store
        .write(&common::copy_rows(&mixed), 0..11)
        .await
        .unwrap();
    // The reused id is not a duplicate: it comes back for the dead-letter topic (class
    // `conflict`), with where the stored row is.
    assert_eq!(
        (fourth.stored, fourth.duplicates, fourth.conflicts),
        (10, 0, 1)
    );
    let conflict = &fourth.conflicting[0];
    assert_eq!(
        (conflict.event_id, conflict.partition, conflict.offset),
        (events[5].event_id, 1, 10)
    );
    assert_eq!(
        conflict.stored_content_hash,
        auditflow::event::content_hash(&events[5]).to_vec()
    );
    assert_eq!(conflict.stored_link.map(|(_, seq)| seq), Some(1));
    assert!(conflict
        .message()
        .contains("already stored with different content"));
    let tenant: String = sqlx::query_scalar(&format!(
        "SELECT tenant_id FROM \"{}\".events WHERE event_id = $1",
        db.schema
    ))
    .bind(events[5].event_id)
    .fetch_one(db.store.pool())
    .await
    .unwrap();
    assert_eq!(tenant, "t", "the stored row is kept, not merged");
    let count: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\".events", db.schema))
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    assert_eq!(count, 110);
}

#[tokio::test]
async fn migrating_twice_is_harmless() {
    let db = TestDb::new().await;
    auditflow::db::migrate(db.store.pool(), &db.schema)
        .await
        .unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = 'events'",
    )
    .bind(&db.schema)
    .fetch_one(db.store.pool())
    .await
    .unwrap();
    assert_eq!(tables, 1);
}

#[tokio::test]
async fn a_partition_dropped_out_of_band_is_recreated_and_nothing_is_refused() {
    let db = TestDb::new().await;
    let mut first = event(1, "t");
    first.occurred_at = DateTime::parse_from_rfc3339("2030-02-01T10:00:00Z")
        .unwrap()
        .to_utc();
    db.store
        .write(&common::copy_rows(&[first]), 0..1)
        .await
        .unwrap();
    sqlx::query(&format!("DROP TABLE \"{}\".events_p20300201", db.schema))
        .execute(db.store.pool())
        .await
        .unwrap();

    let mut second = event(2, "t");
    second.occurred_at = DateTime::parse_from_rfc3339("2030-02-01T11:00:00Z")
        .unwrap()
        .to_utc();
    let rows = common::copy_rows(&[second]);
    // The store still believes the day exists: the first attempt meets the missing partition.
    let err = db.store.write(&rows, 0..1).await.unwrap_err();
    assert_eq!(
        err.retry(),
        auditflow::db::retry::Retry::Transient,
        "infrastructure, not the row's fault: {err}"
    );
    // The retry recreates the partition and stores the row.
    let outcome = db.store.write(&rows, 0..1).await.unwrap();
    assert_eq!(outcome.stored, 1);
    let count: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\".events_p20300201",
        db.schema
    ))
    .fetch_one(db.store.pool())
    .await
    .unwrap();
    assert_eq!(count, 1, "the recreated partition holds the new row");
}

/// Rows whose writer schema came from a registry carry its id, whatever its size, and no file
/// version; rows from local files carry both.
#[tokio::test]
async fn writer_schema_ids_past_smallint_are_stored_and_file_versions_kept() {
    let db = TestDb::new().await;
    let events: Vec<AuditEvent> = (1..=4).map(|id| event(id, "tenant-wide")).collect();
    let writers = [
        (Some(2), Some(2)),
        (None, Some(32_768)),
        (None, Some(100_023)),
        (None, Some(i32::MAX as u32)),
    ];
    let mut rows = store::CopyRows::new();
    for (offset, (event, (schema_version, writer_schema_id))) in
        events.iter().zip(writers).enumerate()
    {
        rows.push(
            event,
            store::RowMeta {
                content_hash: auditflow::event::content_hash(event),
                schema_version,
                writer_schema_id,
                topic: "audit-events",
                partition: 0,
                offset: offset as i64,
                kafka_timestamp: None,
            },
        );
    }
    assert_eq!(db.store.write(&rows, 0..4).await.unwrap().stored, 4);
    // The staging (duplicate-tolerant) path carries the column too.
    assert_eq!(db.store.write(&rows, 0..4).await.unwrap().duplicates, 4);
    let stored: Vec<(Option<i16>, Option<i64>)> = sqlx::query_as(&format!(
        "SELECT schema_version, writer_schema_id FROM \"{}\".events ORDER BY event_id",
        db.schema
    ))
    .fetch_all(db.store.pool())
    .await
    .unwrap();
    assert_eq!(
        stored,
        vec![
            (Some(2), Some(2)),
            (None, Some(32_768)),
            (None, Some(100_023)),
            (None, Some(2_147_483_647)),
        ]
    );
}

/// A partition retired (detached) before migration 0003 missed its `ALTER TABLE events`; the
/// migration gives it the column, so restoring it still works and its rows read NULL.
#[tokio::test]
async fn a_partition_retired_before_migration_0003_can_be_restored_after_it() {
    use auditflow::config::PartitionConfig;
    use auditflow::ops::partitions::PartitionLifecycle;
    use std::borrow::Cow;

    let schema = format!("audit_store_{}", common::suffix());
    let _cleanup = SchemaGuard(schema.clone());
    let config = Config::from_vars([("AUDITFLOW_DB_SCHEMA".to_string(), schema.clone())]).unwrap();
    let pool = store::connect(&config.database, &common::database_url())
        .await
        .unwrap();
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
        .execute(&pool)
        .await
        .unwrap();
    // The schema as a release before 0003 left it.
    let before_0003 = sqlx::migrate::Migrator {
        migrations: Cow::Owned(
            auditflow::db::MIGRATOR
                .migrations
                .iter()
                .filter(|migration| migration.version < 3)
                .cloned()
                .collect(),
        ),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    before_0003.run(&pool).await.unwrap();
    let day = NaiveDate::from_ymd_opt(2030, 6, 1).unwrap();
    partition::ensure_day(&pool, &schema, day).await.unwrap();
    sqlx::query(
        "INSERT INTO events (event_id, occurred_at, tenant_id, actor_id, actor_type, action, \
         resource_type, resource_id, outcome, content_hash, schema_version, kafka_topic, \
         kafka_partition, kafka_offset) VALUES (gen_random_uuid(), '2030-06-01 12:00:00+00', \
         't', 'a', 'USER', 'x.y', 'order', 'o-1', 'SUCCESS', '\\x00', 1, 'audit-events', 0, 7)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let partitions = PartitionConfig {
        partition_retention_days: 31,
        partition_premake: 0,
        ..PartitionConfig::default()
    };
    let lifecycle = PartitionLifecycle::new(pool.clone(), schema.clone(), partitions);
    let later: DateTime<Utc> = "2030-08-01T00:00:00Z".parse().unwrap();
    let plan = lifecycle.plan(later).await.unwrap();
    let report = lifecycle.apply(&plan).await.unwrap();
    assert!(
        report.to_string().contains("retired_events_p20300601"),
        "{report}"
    );

    auditflow::db::migrate(&pool, &schema).await.unwrap();
    lifecycle
        .restore("retired_events_p20300601", later)
        .await
        .unwrap();
    let restored: Vec<(Option<i16>, Option<i64>)> =
        sqlx::query_as("SELECT schema_version, writer_schema_id FROM events")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(restored, vec![(Some(1), None)]);
}

struct SchemaGuard(String);

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        common::drop_schema_blocking(&self.0);
    }
}

fn event_at(id: u128, tenant: &str, occurred_at: DateTime<Utc>) -> AuditEvent {
    AuditEvent {
        occurred_at,
        ..event(id, tenant)
    }
}

#[tokio::test]
async fn each_transaction_that_stores_rows_logs_one_gapless_batch_with_its_exact_summary() {
    let db = TestDb::new().await;
    // Microseconds: the precision of timestamptz.
    let base = DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
        - chrono::Duration::hours(2);
    let at = |seconds: i64| base + chrono::Duration::seconds(seconds);
    let first: Vec<AuditEvent> = vec![
        event_at(1, "acme", at(10)),
        event_at(2, "acme", at(5)),
        event_at(3, "globex", at(7)),
    ];
    // Fast path (after a clean staging batch the store copies straight in), then an
    // all-duplicate batch (takes no number), then a staging batch that stores part of its rows.
    let (outcome, committed) = db
        .store
        .write_committed(&common::copy_rows(&first), 0..3)
        .await
        .unwrap();
    assert_eq!(outcome.stored, 3);
    let committed = committed.expect("a batch that stored rows is logged");
    assert_eq!(committed.batch_seq, 1);
    assert_eq!(committed.publisher, db.store.publisher());
    let acme = committed.summary.tenants["acme"];
    assert_eq!((acme.from, acme.to, acme.count), (at(5), at(10), 2));
    assert_eq!(committed.summary.tenants["globex"].count, 1);

    let (outcome, committed) = db
        .store
        .write_committed(&common::copy_rows(&first), 0..3)
        .await
        .unwrap();
    assert_eq!((outcome.stored, outcome.duplicates), (0, 3));
    assert!(committed.is_none(), "stored nothing, takes no number");

    let mut mixed = first.clone();
    mixed.push(event_at(4, "initech", at(1)));
    mixed.push(event_at(5, "acme", at(20)));
    let (outcome, committed) = db
        .store
        .write_committed(&common::copy_rows(&mixed), 0..5)
        .await
        .unwrap();
    assert_eq!((outcome.stored, outcome.duplicates), (2, 3));
    let committed = committed.expect("logged");
    assert_eq!(
        committed.batch_seq, 2,
        "gapless: the duplicate batch took no number"
    );
    assert_eq!(
        committed.summary.tenants.keys().collect::<Vec<_>>(),
        ["acme", "initech"],
        "only what this transaction stored"
    );
    let acme = committed.summary.tenants["acme"];
    assert_eq!((acme.from, acme.to, acme.count), (at(20), at(20), 1));

    let logged: Vec<(Uuid, i64, i32, String)> = sqlx::query_as(&format!(
        "SELECT p.publisher, b.batch_seq, b.row_count, b.summary::text \
         FROM \"{0}\".batches b JOIN \"{0}\".publishers p USING (publisher_id) \
         ORDER BY b.batch_seq",
        db.schema
    ))
    .fetch_all(db.store.pool())
    .await
    .unwrap();
    assert_eq!(logged.len(), 2);
    assert_eq!((logged[0].1, logged[0].2), (1, 3));
    assert_eq!((logged[1].1, logged[1].2), (2, 2));
    assert!(logged.iter().all(|row| row.0 == db.store.publisher()));
    let summary: serde_json::Value = serde_json::from_str(&logged[1].3).unwrap();
    assert_eq!(summary["tenants"]["initech"]["count"], 1);
    assert_eq!(summary["truncated"], false);
}

#[tokio::test]
async fn a_failed_transaction_leaves_no_batch_and_no_hole_in_the_sequence() {
    let db = TestDb::new().await;
    let good = vec![event(10, "acme")];
    db.store
        .write_committed(&common::copy_rows(&good), 0..1)
        .await
        .unwrap();
    // A row the database refuses (a details value that is not an object) rolls back its
    // transaction, the batches row with it.
    let mut bad = event(11, "acme");
    bad.details = Some("[1,2]".into());
    assert!(db
        .store
        .write_committed(&common::copy_rows(&[bad]), 0..1)
        .await
        .is_err());
    let (_, committed) = db
        .store
        .write_committed(&common::copy_rows(&[event(12, "acme")]), 0..1)
        .await
        .unwrap();
    assert_eq!(committed.expect("logged").batch_seq, 2);
    let seqs: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT batch_seq FROM \"{}\".batches ORDER BY batch_seq",
        db.schema
    ))
    .fetch_all(db.store.pool())
    .await
    .unwrap();
    assert_eq!(seqs, [1, 2]);
}

/// Binary COPY stores every value exactly, on both paths: NULLs and empty strings apart, text at
/// the size limits, unicode, nested JSON, timestamps before 2000 and before 1970 (the decoder's
/// window would refuse those; the encoding must not care), the numbers at their column limits.
#[tokio::test]
async fn every_type_edge_round_trips_through_binary_copy_on_both_paths() {
    use auditflow::ingest::decode::SizeLimits;
    let db = TestDb::new().await;
    let limits = SizeLimits::default();
    let edges = |first_id: u128| {
        let mut nulls = event(first_id, "");
        nulls.actor.ip = None;
        nulls.details = None;
        let mut empties = event(first_id + 1, "t");
        empties.actor.ip = Some(String::new());
        empties.actor.user_agent = Some(String::new());
        empties.reason = Some(String::new());
        empties.trace_id = Some(String::new());
        empties.session_id = Some(String::new());
        empties.details = Some("{}".into());
        let mut longest = event(first_id + 2, &"k".repeat(limits.key_field_bytes));
        longest.reason = Some("é".repeat(limits.text_field_bytes / 2));
        let padding = limits.details_bytes - r#"{"pad":""}"#.len();
        longest.details = Some(format!(r#"{{"pad":"{}"}}"#, "x".repeat(padding)));
        let mut old = event(first_id + 3, "Zoë 東京 🚀");
        old.occurred_at = DateTime::parse_from_rfc3339("1999-12-31T23:59:59.999999Z")
            .unwrap()
            .to_utc();
        old.details = Some(r#"{"a":{"b":[1,{"c":null,"d":"e\"f\\g\n"}]},"k":[],"ü":"🚀"}"#.into());
        let mut older = event(first_id + 4, "t");
        older.occurred_at = DateTime::parse_from_rfc3339("1969-07-20T20:17:40.5Z")
            .unwrap()
            .to_utc();
        vec![nulls, empties, longest, old, older]
    };
    type Stored = (
        Uuid,
        DateTime<Utc>,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<serde_json::Value>,
        Vec<u8>,
        Option<i16>,
        Option<i64>,
        i32,
        i64,
        Option<DateTime<Utc>>,
    );
    for (path, first_id) in [("staging", 100u128), ("fast", 200)] {
        let events = edges(first_id);
        let mut rows = store::CopyRows::new();
        for (index, event) in events.iter().enumerate() {
            rows.push(
                event,
                store::RowMeta {
                    content_hash: auditflow::event::content_hash(event),
                    schema_version: [None, Some(0), Some(i16::MAX as u32), Some(1), Some(2)][index],
                    writer_schema_id: [None, Some(0), Some(u32::MAX), Some(1), Some(2)][index],
                    topic: "audit-events",
                    partition: [0, 1, i32::MAX, 3, 4][index],
                    // Up to the largest offset there is (unique per path: the staging path
                    // matches inserted rows by partition and offset).
                    offset: if index == 2 {
                        i64::MAX - first_id as i64
                    } else {
                        first_id as i64 + index as i64
                    },
                    kafka_timestamp: [
                        None,
                        Some(DateTime::UNIX_EPOCH),
                        Some(event.occurred_at),
                        Some(event.occurred_at),
                        Some(event.occurred_at),
                    ][index],
                },
            );
        }
        let outcome = db.store.write(&rows, 0..rows.len()).await.unwrap();
        assert_eq!(outcome.stored, 5, "{path} path");
        let stored: Vec<Stored> = sqlx::query_as(&format!(
            "SELECT event_id, occurred_at, tenant_id, actor_ip, actor_user_agent, reason, \
               trace_id, session_id, details, content_hash, schema_version, writer_schema_id, \
               kafka_partition, kafka_offset, kafka_timestamp \
             FROM \"{}\".events WHERE event_id >= $1 AND event_id < $2 ORDER BY event_id",
            db.schema
        ))
        .bind(Uuid::from_u128(first_id))
        .bind(Uuid::from_u128(first_id + 100))
        .fetch_all(db.store.pool())
        .await
        .unwrap();
        assert_eq!(stored.len(), 5, "{path} path");
        for (index, (event, row)) in events.iter().zip(&stored).enumerate() {
            let context = format!("{path} path, row {index}");
            assert_eq!(row.0, event.event_id, "{context}");
            // Microseconds, truncated (the column's precision).
            assert_eq!(
                row.1.timestamp_micros(),
                event.occurred_at.timestamp_micros(),
                "{context}"
            );
            assert_eq!(row.2, event.tenant_id, "{context}");
            assert_eq!(row.3, event.actor.ip, "{context}");
            assert_eq!(row.4, event.actor.user_agent, "{context}");
            assert_eq!(row.5, event.reason, "{context}");
            assert_eq!(row.6, event.trace_id, "{context}");
            assert_eq!(row.7, event.session_id, "{context}");
            let details = event
                .details
                .as_deref()
                .map(|text| serde_json::from_str::<serde_json::Value>(text).unwrap());
            assert_eq!(row.8, details, "{context}");
            assert_eq!(row.9, auditflow::event::content_hash(event), "{context}");
            assert_eq!(
                (row.10, row.11, row.12),
                [
                    (None, None, 0),
                    (Some(0), Some(0), 1),
                    (Some(i16::MAX), Some(i64::from(u32::MAX)), i32::MAX),
                    (Some(1), Some(1), 3),
                    (Some(2), Some(2), 4),
                ][index],
                "{context}"
            );
        }
        assert_eq!(stored[2].13, i64::MAX - first_id as i64, "{path} path");
        assert_eq!(stored[0].14, None);
        assert_eq!(stored[1].14, Some(DateTime::UNIX_EPOCH));
        assert_eq!(stored[4].14, Some(events[4].occurred_at));
        // Empty strings stay empty strings, never NULL.
        assert_eq!(stored[1].3.as_deref(), Some(""));
        assert_eq!(stored[0].2, "");
    }
}

/// A file version past smallint is refused by the server for that row, as COPY text refused it,
/// and the refusal is permanent (the row is dead-lettered by isolation, never stored as NULL).
#[tokio::test]
async fn a_schema_version_past_smallint_is_refused_not_stored_as_null() {
    let db = TestDb::new().await;
    let event = event(1, "t");
    let mut rows = store::CopyRows::new();
    rows.push(
        &event,
        store::RowMeta {
            content_hash: auditflow::event::content_hash(&event),
            schema_version: Some(40_000),
            writer_schema_id: Some(40_000),
            topic: "audit-events",
            partition: 0,
            offset: 0,
            kafka_timestamp: None,
        },
    );
    let err = db.store.write(&rows, 0..1).await.unwrap_err();
    assert_eq!(err.sqlstate().as_deref(), Some("22P03"), "{err}");
    assert_eq!(err.retry(), auditflow::db::retry::Retry::Permanent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_writing_the_same_keys_at_once_store_them_once_and_never_refuse_a_row() {
    let db = TestDb::new().await;
    // A second store stream on the same pool, as AUDITFLOW_STORE_CONCURRENCY makes them.
    let other = Store::new(
        db.store.pool().clone(),
        db.schema.clone(),
        Arc::new(Breaker::new("postgres", BreakerConfig::INGEST)),
    );
    // A clean batch each puts both on the fast path (COPY straight into events).
    for (store, base) in [(&db.store, 50_000u128), (&other, 60_000u128)] {
        let warm: Vec<AuditEvent> = (base..base + 10).map(|i| event(i, "warm")).collect();
        store
            .write(&common::copy_rows(&warm), 0..warm.len())
            .await
            .unwrap();
    }
    // The same 2,000 events, one stream ascending, the other descending.
    let events: Vec<AuditEvent> = (0..2_000).map(|i| event(i, "t")).collect();
    let backward: Vec<AuditEvent> = events.iter().rev().cloned().collect();
    let (forward_rows, backward_rows) = (
        common::copy_rows(&events),
        common::copy_rows_at(&backward, 2, 0),
    );
    // Both COPYs queue behind a lock and start together when it goes, so each meets the keys
    // the other has inserted and not yet committed.
    let mut gate = db.store.pool().begin().await.unwrap();
    sqlx::query(&format!(
        "LOCK TABLE \"{}\".events IN ACCESS EXCLUSIVE MODE",
        db.schema
    ))
    .execute(&mut *gate)
    .await
    .unwrap();
    let both = async {
        tokio::join!(
            write_retrying_transient(&db.store, &forward_rows),
            write_retrying_transient(&other, &backward_rows)
        )
    };
    let release = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        gate.commit().await.unwrap();
    };
    let (((forward, forward_errors), (backward, backward_errors)), ()) =
        tokio::join!(both, release);
    println!(
        "forward stored {} ({} duplicates, errors {forward_errors:?}); backward stored {} ({} duplicates, errors {backward_errors:?})",
        forward.stored, forward.duplicates, backward.stored, backward.duplicates
    );
    assert_eq!(forward.stored + backward.stored, 2_000, "each event once");
    assert_eq!(forward.conflicts + backward.conflicts, 0);
    let met = forward.duplicates + backward.duplicates;
    assert_eq!(met, 2_000, "every key was met by both streams");
    for code in forward_errors.iter().chain(&backward_errors) {
        assert_eq!(code, "40P01", "only a deadlock is retried here");
    }
    let count: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\".events WHERE tenant_id = 't'",
        db.schema
    ))
    .fetch_one(db.store.pool())
    .await
    .unwrap();
    assert_eq!(count, 2_000);
}

/// The sink's retry loop, reduced to what a test needs: transient errors are retried (their
/// SQLSTATEs returned), a permanent one fails the test.
async fn write_retrying_transient(
    store: &Store,
    rows: &auditflow::ingest::store::CopyRows,
) -> (auditflow::ingest::store::WriteOutcome, Vec<String>) {
    let mut transient = Vec::new();
    loop {
        match store.write(rows, 0..rows.len()).await {
            Ok(outcome) => return (outcome, transient),
            Err(err) => {
                assert_eq!(
                    err.retry(),
                    auditflow::db::retry::Retry::Transient,
                    "never refused: {err}"
                );
                transient.push(err.sqlstate().unwrap_or_default());
            }
        }
    }
}

/// The conflict check of a batch with repeats probes the primary key per staged row: it never
/// reads the table. While partitions fill, their statistics are missing or stale, and a plain
/// join of the staged rows with `events` was planned as a merge join over every stored row
/// (0.6 s per batch at 200,000 rows, growing with the table).
#[tokio::test]
async fn the_conflict_check_of_a_batch_probes_the_key_and_never_reads_the_table() {
    let db = TestDb::new().await;
    const STORED: usize = 20_000;
    let events: Vec<AuditEvent> = (0..STORED as u128).map(|i| event(i, "t")).collect();
    let written = db
        .store
        .write(&common::copy_rows(&events), 0..STORED)
        .await
        .unwrap();
    assert_eq!(written.stored, STORED as u64);
    // A batch's staged rows, as the staging path holds them when repeats are in it (every
    // connection of the store's pool has the staging table).
    let mut conn = db.store.pool().acquire().await.unwrap();
    let columns = store::COLUMNS;
    for statement in [
        "BEGIN".to_string(),
        format!(
            "INSERT INTO pg_temp.auditflow_staging ({columns}) \
             SELECT {columns} FROM \"{}\".events LIMIT 1000",
            db.schema
        ),
    ] {
        sqlx::query(&statement).execute(&mut *conn).await.unwrap();
    }
    let plan: serde_json::Value = sqlx::query_scalar(&format!(
        "EXPLAIN (ANALYZE, FORMAT JSON) {}",
        store::conflicts_query(&db.schema)
    ))
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    // Rows read by sequential scans of the events partitions, over every loop.
    fn scanned(node: &serde_json::Value) -> f64 {
        let own = if node["Node Type"] == "Seq Scan"
            && node["Relation Name"]
                .as_str()
                .is_some_and(|name| name.starts_with("events"))
        {
            node["Actual Rows"].as_f64().unwrap_or(0.0)
                * node["Actual Loops"].as_f64().unwrap_or(1.0)
        } else {
            0.0
        };
        own + node["Plans"]
            .as_array()
            .map_or(0.0, |plans| plans.iter().map(scanned).sum())
    }
    let root = &plan[0]["Plan"];
    assert_eq!(scanned(root), 0.0, "the check read stored rows: {plan:#}");
    assert!(
        plan.to_string().contains("Index Scan"),
        "the check probes the key: {plan:#}"
    );
}

/// What a batch with repeats costs as the table grows: 60 batches of 5,000 rows, each with 50
/// rows of the batch before it (producer retries), so every batch takes the staging path.
/// Prints the mean time of the first and the last ten batches; with a check that reads the
/// table, the last ones cost more than the first, in proportion to the rows stored. Run:
/// `cargo test --release --test store staging_path_benchmark -- --ignored --nocapture`
#[tokio::test]
#[ignore = "benchmark; run it in release"]
async fn staging_path_benchmark() {
    let db = TestDb::new().await;
    const BATCHES: usize = 60;
    const ROWS: usize = 5_000;
    const REPEATS: usize = 50;
    let at = Utc::now() - chrono::Duration::hours(1);
    let mut millis = Vec::with_capacity(BATCHES);
    let mut stored = 0;
    for batch in 0..BATCHES {
        let first = (batch * ROWS) as u128;
        let repeated = first.saturating_sub(REPEATS as u128);
        let events: Vec<AuditEvent> = (repeated..first + ROWS as u128)
            .map(|i| event_at(i, "t", at))
            .collect();
        let rows = common::copy_rows_at(&events, 1, repeated as i64);
        let started = std::time::Instant::now();
        let outcome = db.store.write(&rows, 0..events.len()).await.unwrap();
        millis.push(started.elapsed().as_secs_f64() * 1e3);
        stored += outcome.stored;
    }
    assert_eq!(stored, (BATCHES * ROWS) as u64, "every new row stored once");
    let mean = |part: &[f64]| part.iter().sum::<f64>() / part.len() as f64;
    eprintln!(
        "staging path: {BATCHES} batches of {ROWS} rows with {REPEATS} repeats; \
         ms per batch: first ten {:.1}, last ten {:.1}, all {:.1}",
        mean(&millis[..10]),
        mean(&millis[BATCHES - 10..]),
        mean(&millis)
    );
}
