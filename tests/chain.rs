//! The hash chain against PostgreSQL: what the sink digests from the text a producer sent must
//! equal what `verify` digests from what the database gives back.

mod common;

use std::sync::Arc;

use auditflow::breaker::{Breaker, BreakerConfig};
use auditflow::chain::canonical_json;
use auditflow::config::Config;
use auditflow::event::{Actor, ActorType, AuditEvent, Outcome, Resource};
use auditflow::ingest::store::{self, CopyRows, Store};
use auditflow::ops::verify::{self, VerifyOptions, VerifyReport};
use chrono::Utc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

/// A random JSON text in a random but valid formatting: numbers in every notation, strings with
/// every kind of escape, repeated keys, nesting.
fn random_json(rng: &mut StdRng, depth: u32) -> String {
    let space = |rng: &mut StdRng| [" ", "", "\n", "\t "][rng.random_range(0..4)];
    match rng.random_range(0..if depth > 3 { 5 } else { 7 }) {
        0 => "null".into(),
        1 => ["true", "false"][rng.random_range(0..2)].into(),
        2 => {
            let forms = [
                format!("{}", rng.random_range(-1_000_000i64..1_000_000)),
                format!("{}e{}", rng.random_range(1..99), rng.random_range(0..25)),
                format!(
                    "{}.{:03}",
                    rng.random_range(-500..500),
                    rng.random_range(0..1000)
                ),
                format!("{}E-{}", rng.random_range(1..999), rng.random_range(1..9)),
                "-0".into(),
                "0.0".into(),
                format!("{}", rng.random::<u64>()),
                "123456789012345678901234567890".into(),
                "1.000000000000000000001".into(),
            ];
            forms[rng.random_range(0..forms.len())].clone()
        }
        3 | 4 => {
            let pieces = [
                "a",
                "Z",
                " ",
                "é",
                "中",
                "🦀",
                "\\n",
                "\\t",
                "\\\"",
                "\\\\",
                "\\/",
                "\\u00e9",
                "\\u4e2d",
                "\\ud83e\\udd80",
                "\\b",
                "\\f",
                "\\u0001",
            ];
            let text: String = (0..rng.random_range(0..8))
                .map(|_| pieces[rng.random_range(0..pieces.len())])
                .collect();
            format!("\"{text}\"")
        }
        5 => {
            let items: Vec<String> = (0..rng.random_range(0..4))
                .map(|_| random_json(rng, depth + 1))
                .collect();
            format!(
                "[{}{}]",
                space(rng),
                items.join(&format!(",{}", space(rng)))
            )
        }
        _ => {
            let keys = ["a", "b", "ab", "B", "é", "key", "k2", ""];
            let entries: Vec<String> = (0..rng.random_range(0..5))
                .map(|_| {
                    format!(
                        "\"{}\"{}:{}{}",
                        keys[rng.random_range(0..keys.len())],
                        space(rng),
                        space(rng),
                        random_json(rng, depth + 1)
                    )
                })
                .collect();
            format!("{{{}}}", entries.join(","))
        }
    }
}

#[tokio::test]
async fn details_canonicalise_the_same_from_the_producers_text_and_from_jsonb() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&common::database_url())
        .await
        .unwrap();
    let mut rng = StdRng::seed_from_u64(0x000d_e7a1);
    let mut checked = 0;
    for _ in 0..3_000 {
        let text = random_json(&mut rng, 0);
        let stored: Result<String, _> = sqlx::query_scalar("SELECT $1::jsonb::text")
            .bind(&text)
            .fetch_one(&pool)
            .await;
        let Ok(stored) = stored else {
            // PostgreSQL refused it (out of range numbers and the like): so does the decoder's
            // validation, which parses details with the same rules before anything is stored.
            continue;
        };
        let ours = canonical_json(&text).unwrap_or_else(|err| panic!("{text}: {err}"));
        let theirs = canonical_json(&stored).unwrap_or_else(|err| panic!("{stored}: {err}"));
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs),
            "sent {text}\nstored {stored}"
        );
        checked += 1;
    }
    assert!(checked > 2_500, "only {checked} documents were accepted");
}

/// A schema with the store of two replicas (two publishers) writing into it.
struct ChainDb {
    schema: String,
    pool: sqlx::PgPool,
    replicas: Vec<Store>,
}

impl ChainDb {
    async fn new(replicas: usize) -> Self {
        let schema = format!("audit_chain_{}", common::suffix());
        let config = Config::from_vars([
            ("AUDITFLOW_DB_SCHEMA".to_string(), schema.clone()),
            ("AUDITFLOW_DB_MAX_CONNECTIONS".to_string(), "6".to_string()),
        ])
        .unwrap();
        let pool = store::connect(&config.database, &common::database_url())
            .await
            .unwrap();
        auditflow::db::migrate(&pool, &schema).await.unwrap();
        let replicas = (0..replicas)
            .map(|index| {
                Store::new(
                    pool.clone(),
                    schema.clone(),
                    Arc::new(Breaker::new("postgres", BreakerConfig::INGEST)),
                )
                .with_instance(format!("replica-{index}"))
            })
            .collect();
        ChainDb {
            schema,
            pool,
            replicas,
        }
    }

    async fn verify(&self, expect_head: Option<String>) -> VerifyReport {
        verify::verify(
            &self.pool,
            &self.schema,
            &VerifyOptions {
                expect_head,
                ..VerifyOptions::default()
            },
        )
        .await
        .unwrap()
    }

    /// Runs `sql` as a superuser past the append-only triggers (the deliberate way around them:
    /// session_replication_role = replica), `{s}` standing for the schema.
    async fn exec(&self, sql: &str) {
        let sql = sql.replace("{s}", &format!("\"{}\"", self.schema));
        sqlx::raw_sql(&format!(
            "BEGIN; SET LOCAL session_replication_role = replica; {sql}; COMMIT"
        ))
        .execute(&self.pool)
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"));
    }

    /// Runs `sql` as an ordinary session (the triggers apply); returns the error.
    async fn refused(&self, sql: &str) -> String {
        let sql = sql.replace("{s}", &format!("\"{}\"", self.schema));
        match sqlx::raw_sql(&sql).execute(&self.pool).await {
            Ok(_) => panic!("{sql} must be refused"),
            Err(err) => err.to_string(),
        }
    }

    /// `auditflow verify` as an operator runs it.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_auditflow"));
        command.arg("verify").args(args).env_clear();
        if let Ok(path) = std::env::var("PATH") {
            command.env("PATH", path);
        }
        command
            .env("RUST_LOG", "warn")
            .env("AUDITFLOW_DATABASE_URL", common::database_url())
            .env("AUDITFLOW_DB_SCHEMA", &self.schema)
            .output()
            .expect("run auditflow verify")
    }
}

impl Drop for ChainDb {
    fn drop(&mut self) {
        common::drop_schema_blocking(&self.schema);
    }
}

/// The time the test's events are relative to: the same for every call, so a redelivery is one.
static BASE: std::sync::LazyLock<chrono::DateTime<Utc>> = std::sync::LazyLock::new(Utc::now);

/// Event `id`, over three days, with `details` in the producers' own formatting.
fn event(id: u128) -> AuditEvent {
    let details = [
        r#"{"amount": 12.50, "currency":"EUR"}"#,
        r#"{ "n" : 1e3 , "nested": {"b": [1, 2.0, -0], "a": "\u00e9\n"} }"#,
        r#"{"k":"v","k":"last wins"}"#,
    ];
    AuditEvent {
        event_id: Uuid::from_u128(id),
        occurred_at: *BASE - chrono::Duration::hours(1 + 24 * (id % 3) as i64)
            + chrono::Duration::microseconds(id as i64),
        tenant_id: format!("tenant-{}", id % 4),
        actor: Actor {
            id: format!("user-{}", id % 7),
            actor_type: ActorType::User,
            ip: id.is_multiple_of(2).then(|| "10.0.0.1".into()),
            user_agent: None,
        },
        action: "order.update".into(),
        resource: Resource {
            resource_type: "order".into(),
            id: format!("o-{id}"),
        },
        outcome: Outcome::Success,
        reason: None,
        trace_id: id.is_multiple_of(3).then(|| format!("trace-{id}")),
        details: (!id.is_multiple_of(5)).then(|| details[(id % 3) as usize].into()),
        session_id: None,
    }
}

/// Events `ids` as one batch's rows: partition 0, each at the offset of its id.
fn rows(ids: std::ops::Range<u128>) -> CopyRows {
    let first = ids.start as i64;
    let events: Vec<AuditEvent> = ids.map(event).collect();
    common::copy_rows_at(&events, 0, first)
}

fn broken_link(report: &VerifyReport) -> (Option<Uuid>, Option<u64>, String) {
    let broken = report
        .broken
        .as_ref()
        .unwrap_or_else(|| panic!("the change must be found: {report}"));
    (broken.publisher, broken.batch_seq, broken.reason.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_chains_verify_and_each_kind_of_tampering_names_its_link() {
    let db = ChainDb::new(2).await;
    // Two replicas append at the same time, 12 batches each of 50 new events over three days;
    // replica 1 also redelivers: a batch of only duplicates (no link) and half-new batches (the
    // staging path: the link covers only what the transaction inserted).
    let (a, b) = (&db.replicas[0], &db.replicas[1]);
    let write_a = async {
        let mut heads = Vec::new();
        for batch in 0..12u128 {
            let rows = rows(1 + batch * 50..1 + (batch + 1) * 50);
            let (outcome, committed) = a.write_committed(&rows, 0..rows.len()).await.unwrap();
            assert_eq!(outcome.stored, 50);
            heads.push(committed.expect("a link").digest);
        }
        heads
    };
    let write_b = async {
        let mut links = 0;
        for batch in 0..12u128 {
            let start = 10_000 + batch * 50;
            let rows = rows(start - 25..start + 50);
            let (_, committed) = b.write_committed(&rows, 0..rows.len()).await.unwrap();
            links += usize::from(committed.is_some());
        }
        let again = rows(10_000..10_100);
        let (outcome, committed) = b.write_committed(&again, 0..again.len()).await.unwrap();
        assert_eq!(
            (outcome.stored, committed),
            (0, None),
            "nothing new, no link"
        );
        links
    };
    let (heads_a, links_b) = tokio::join!(write_a, write_b);
    let head_a = auditflow::chain::to_hex(heads_a.last().unwrap());
    let report = db.verify(Some(head_a.clone())).await;
    assert!(report.is_intact(), "{report}");
    assert_eq!(report.chains, 2);
    assert_eq!(report.links, 12 + links_b as u64);
    let stored: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\".events", db.schema))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(report.rows as i64, stored, "every row recomputed");
    assert_eq!(report.expected_head_found, Some(true));
    let ok = db.cli(&["--expect-head", &head_a]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    println!("{}", String::from_utf8_lossy(&ok.stdout).trim_end());

    // A head kept outside that the chain no longer has: refused.
    let unknown = "ab".repeat(32);
    assert!(!db.verify(Some(unknown.clone())).await.is_intact());
    assert_eq!(db.cli(&["--expect-head", &unknown]).status.code(), Some(1));

    let pub_a = a.publisher();
    let id_77 = Uuid::from_u128(77);
    let seq_of_77: i64 = sqlx::query_scalar(&format!(
        "SELECT batch_seq FROM \"{}\".events WHERE event_id = $1",
        db.schema
    ))
    .bind(id_77)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let seq_of_77 = seq_of_77 as u64;
    assert_eq!(seq_of_77, 2, "event 77 is in replica 0's second batch");

    // 0. Append-only: UPDATE, DELETE and TRUNCATE are refused to every role, the owner and
    // this superuser included, on the table, its partitions and the chain's tables.
    let partition: String = sqlx::query_scalar(&format!(
        "SELECT tableoid::regclass::text FROM \"{}\".events LIMIT 1",
        db.schema
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    for sql in [
        "UPDATE {s}.events SET action = 'x'".to_owned(),
        "DELETE FROM {s}.events".to_owned(),
        "TRUNCATE {s}.events".to_owned(),
        format!("TRUNCATE {partition}"),
        format!("DELETE FROM {partition}"),
        "UPDATE {s}.batches SET row_count = 0".to_owned(),
        "DELETE FROM {s}.batches".to_owned(),
        "TRUNCATE {s}.batches CASCADE".to_owned(),
        "DELETE FROM {s}.publishers".to_owned(),
    ] {
        let err = db.refused(&sql).await;
        assert!(err.contains("append-only"), "{sql}: {err}");
    }
    // The owner can switch the triggers off, deliberately; verify says so while they are.
    db.exec("ALTER TABLE {s}.batches DISABLE TRIGGER auditflow_append_only")
        .await;
    let report = db.verify(None).await;
    assert_eq!(report.append_only_disabled, vec!["batches".to_owned()]);
    assert!(!report.is_intact());
    db.exec("ALTER TABLE {s}.batches ENABLE TRIGGER auditflow_append_only")
        .await;
    assert!(db.verify(None).await.is_intact());

    // 1. A superuser edits a row's details (a value, not only its formatting).
    db.exec(&format!(
        "UPDATE {{s}}.events SET details = details || '{{\"amount\": 13}}' WHERE event_id = '{id_77}'"
    ))
    .await;
    let report = db.verify(None).await;
    let (publisher, seq, reason) = broken_link(&report);
    assert_eq!((publisher, seq), (Some(pub_a), Some(seq_of_77)), "{reason}");
    let cli = db.cli(&[]);
    assert_eq!(cli.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(
        stderr.contains(&format!("link {seq_of_77} of chain {pub_a}")),
        "{stderr}"
    );
    // Put back (jsonb keeps the value, here {"k":"v","k":"last wins"}): intact again.
    db.exec(&format!(
        "UPDATE {{s}}.events SET details = '{{\"k\": \"last wins\"}}' WHERE event_id = '{id_77}'"
    ))
    .await;
    assert!(db.verify(None).await.is_intact(), "restored");

    // 2. A row deleted (saved first, so it can be put back).
    db.exec(&format!(
        "CREATE TABLE {{s}}.saved AS SELECT * FROM {{s}}.events WHERE event_id = '{id_77}'"
    ))
    .await;
    db.exec(&format!(
        "DELETE FROM {{s}}.events WHERE event_id = '{id_77}'"
    ))
    .await;
    let (publisher, seq, reason) = broken_link(&db.verify(None).await);
    assert_eq!((publisher, seq), (Some(pub_a), Some(seq_of_77)), "{reason}");
    db.exec("INSERT INTO {s}.events SELECT * FROM {s}.saved")
        .await;
    assert!(db.verify(None).await.is_intact(), "put back");

    // 3. A row inserted out of band into a link (a copy under a new id), then one in no link.
    db.exec(
        "UPDATE {s}.saved SET event_id = gen_random_uuid(); \
         INSERT INTO {s}.events SELECT * FROM {s}.saved",
    )
    .await;
    let (publisher, seq, reason) = broken_link(&db.verify(None).await);
    assert_eq!((publisher, seq), (Some(pub_a), Some(seq_of_77)), "{reason}");
    db.exec("DELETE FROM {s}.events WHERE event_id = (SELECT event_id FROM {s}.saved)")
        .await;
    assert!(db.verify(None).await.is_intact(), "removed again");
    db.exec(
        "UPDATE {s}.saved SET publisher_id = NULL, batch_seq = NULL; \
         INSERT INTO {s}.events SELECT * FROM {s}.saved",
    )
    .await;
    let report = db.verify(None).await;
    assert!(!report.is_intact(), "a row in no link is found: {report}");
    db.exec("DELETE FROM {s}.events WHERE event_id = (SELECT event_id FROM {s}.saved)")
        .await;
    assert!(db.verify(None).await.is_intact(), "removed again");

    // 4. A whole link removed from the middle of a chain, with its rows: the sequence breaks.
    db.exec(&format!(
        "DELETE FROM {{s}}.events e USING {{s}}.publishers p \
         WHERE p.publisher_id = e.publisher_id AND p.publisher = '{pub_a}' AND e.batch_seq = 5; \
         DELETE FROM {{s}}.batches b USING {{s}}.publishers p \
         WHERE p.publisher_id = b.publisher_id AND p.publisher = '{pub_a}' AND b.batch_seq = 5"
    ))
    .await;
    let (publisher, seq, reason) = broken_link(&db.verify(None).await);
    assert_eq!(publisher, Some(pub_a), "{reason}");
    assert!(matches!(seq, Some(5) | Some(6)), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_chain_verifiable_from_what_the_links_recorded() {
    use auditflow::config::PartitionConfig;
    use auditflow::ops::partitions::{maintain_partitions_once, PartitionLifecycle};

    let db = ChainDb::new(1).await;
    let store = &db.replicas[0];
    // Three batches, each over three days: 70 and 69 days ago (old enough to be dropped at a
    // 40-day retention) and today.
    let old = |id: u128, days: i64| AuditEvent {
        occurred_at: Utc::now() - chrono::Duration::days(days),
        ..event(id)
    };
    for batch in 0..3u128 {
        let events: Vec<AuditEvent> = (0..30u128)
            .map(|n| {
                let id = 100_000 + batch * 100 + n;
                match n % 3 {
                    0 => old(id, 70),
                    1 => old(id, 69),
                    _ => old(id, 0),
                }
            })
            .collect();
        let rows = common::copy_rows_at(&events, 0, (batch * 100) as i64);
        store.write(&rows, 0..rows.len()).await.unwrap();
    }
    assert!(db.verify(None).await.is_intact());

    // Retention at the real time: the old days are retired (still read by verify), then dropped
    // (their rows gone; verify takes those days from the links and says so).
    let lifecycle = PartitionLifecycle::new(
        db.pool.clone(),
        db.schema.clone(),
        PartitionConfig {
            partition_retention_days: 40,
            partition_retired_grace_days: 0,
            partition_premake: 1,
            ..PartitionConfig::default()
        },
    );
    maintain_partitions_once(&lifecycle, Utc::now())
        .await
        .unwrap();
    let retired = db.verify(None).await;
    assert!(retired.is_intact(), "{retired}");
    assert_eq!(
        retired.rows, 90,
        "retired partitions are still read: {retired}"
    );
    maintain_partitions_once(&lifecycle, Utc::now())
        .await
        .unwrap();
    let dropped = db.verify(None).await;
    assert!(dropped.is_intact(), "{dropped}");
    assert_eq!(dropped.rows, 30, "only today's rows remain: {dropped}");
    assert_eq!(dropped.dropped_days.len(), 2, "{dropped}");
    assert_eq!(dropped.links, 3);

    // A row deleted from a day that retention did not drop is still found.
    db.exec("DELETE FROM {s}.events WHERE event_id = (SELECT event_id FROM {s}.events LIMIT 1)")
        .await;
    assert!(!db.verify(None).await.is_intact());
}
