//! Least privilege against the real PostgreSQL: an owner role migrates and grants, a writer role
//! runs the sink, and neither can change the trail.

mod common;

use std::time::Duration;

use common::{wait_exit, TestEnv};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// An owner and a writer role of this test's own (roles are cluster-wide: random names, dropped
/// with everything they own at the end).
struct Roles {
    owner: String,
    writer: String,
    admin: PgPool,
}

impl Roles {
    async fn create() -> Self {
        let id = common::suffix().to_lowercase();
        let admin = PgPoolOptions::new()
            .max_connections(2)
            .connect(&common::database_url())
            .await
            .unwrap();
        let owner = format!("af_owner_{id}");
        let writer = format!("af_writer_{id}");
        for sql in [
            format!("CREATE ROLE {owner} LOGIN"),
            format!("CREATE ROLE {writer} LOGIN"),
            // The owner creates the schema; the writer gets nothing here but what PUBLIC has.
            format!("GRANT CREATE ON DATABASE test TO {owner}"),
        ] {
            sqlx::query(&sql).execute(&admin).await.unwrap();
        }
        Roles {
            owner,
            writer,
            admin,
        }
    }

    /// The test database's URL with `role` as the user.
    fn url(role: &str) -> String {
        let mut url = reqwest::Url::parse(&common::database_url()).unwrap();
        url.set_username(role).unwrap();
        url.set_password(None).unwrap();
        url.to_string()
    }

    async fn pool(role: &str) -> PgPool {
        PgPoolOptions::new()
            .max_connections(2)
            .connect(&Self::url(role))
            .await
            .unwrap()
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        let (owner, writer) = (&self.owner, &self.writer);
        common::run_sql_blocking(&format!(
            "DROP OWNED BY {writer} CASCADE; DROP ROLE IF EXISTS {writer}; \
             DROP OWNED BY {owner} CASCADE; REVOKE CREATE ON DATABASE test FROM {owner}; \
             DROP ROLE IF EXISTS {owner}"
        ));
    }
}

/// `auditflow migrate [--grant-writer ROLE]` as `role`.
fn migrate(env: &TestEnv, role: &str, grant: Option<&str>) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_auditflow"));
    command.arg("migrate").env_clear();
    if let Some(grant) = grant {
        command.args(["--grant-writer", grant]);
    }
    if let Ok(path) = std::env::var("PATH") {
        command.env("PATH", path);
    }
    command
        .env("RUST_LOG", "warn")
        .env("AUDITFLOW_DATABASE_URL", Roles::url(role))
        .env("AUDITFLOW_DB_SCHEMA", &env.schema)
        .output()
        .expect("run auditflow migrate")
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_stores_everything_and_can_change_nothing() {
    let env = TestEnv::new(2).await;
    let roles = Roles::create().await;

    // The owner migrates and grants, twice (idempotent).
    for _ in 0..2 {
        let out = migrate(&env, &roles.owner, Some(&roles.writer));
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // A mistaken argument changes nothing and says why.
    let missing = migrate(&env, &roles.owner, Some("no_such_role_af"));
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("does not exist"),
        "{}",
        stderr(&missing)
    );
    let superuser = migrate(&env, &roles.owner, Some("postgres"));
    assert!(!superuser.status.success());
    assert!(
        stderr(&superuser).contains("superuser"),
        "{}",
        stderr(&superuser)
    );

    // The writer owns nothing in the schema.
    let owned: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_roles r ON r.oid = c.relowner WHERE n.nspname = $1 AND r.rolname = $2",
    )
    .bind(&env.schema)
    .bind(&roles.writer)
    .fetch_one(&roles.admin)
    .await
    .unwrap();
    assert_eq!(owned, 0);

    // A full run as the writer: it checks the schema's version instead of migrating, creates
    // the partitions it needs through the function, and stores every event once.
    let produced = env.produce(3_000, 0.1, 0.0, 5).await;
    let writer_url = Roles::url(&roles.writer);
    let (mut sink, log) = env.spawn_sink_captured(
        &["run", "--until-idle", "3"],
        &[("AUDITFLOW_DATABASE_URL", &writer_url)],
    );
    let status = wait_exit(&mut sink, Duration::from_secs(120)).await;
    assert!(status.success(), "{}", log.lock().unwrap());
    assert_eq!(env.count_rows().await, produced.distinct_valid as i64);
    assert_eq!(
        env.count_distinct_ids().await,
        produced.distinct_valid as i64
    );
    assert!(
        log.lock()
            .unwrap()
            .contains("partition retention is not configured"),
        "{}",
        log.lock().unwrap()
    );
    env.assert_chain_intact().await;
    let partitions_by_writer: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         JOIN pg_roles r ON r.oid = c.relowner \
         WHERE i.inhparent = (quote_ident($1) || '.events')::regclass AND r.rolname = $2",
    )
    .bind(&env.schema)
    .bind(&roles.owner)
    .fetch_one(&roles.admin)
    .await
    .unwrap();
    assert!(
        partitions_by_writer > 0,
        "partitions exist, owned by the owner"
    );

    // What the writer cannot do: change, remove or restructure anything.
    let writer = Roles::pool(&roles.writer).await;
    let s = format!("\"{}\"", env.schema);
    for sql in [
        format!("UPDATE {s}.events SET action = 'x'"),
        format!("DELETE FROM {s}.events"),
        format!("TRUNCATE {s}.events"),
        format!("ALTER TABLE {s}.events ADD COLUMN x int"),
        format!("DROP TABLE {s}.events"),
        format!("UPDATE {s}.batches SET row_count = 0"),
        format!("DELETE FROM {s}.batches"),
        format!("CREATE TABLE {s}.mine (x int)"),
        format!("ALTER TABLE {s}.events DISABLE TRIGGER auditflow_append_only"),
    ] {
        let err = sqlx::raw_sql(&sql)
            .execute(&writer)
            .await
            .expect_err(&sql)
            .to_string();
        assert!(
            err.contains("permission denied")
                || err.contains("must be owner")
                || err.contains("append-only"),
            "{sql}: {err}"
        );
    }
    // The partition function takes a date and an interval word, nothing else.
    let err = sqlx::query(&format!(
        "SELECT {s}.auditflow_create_partition('2026-01-01', 'day; DROP TABLE events')"
    ))
    .execute(&writer)
    .await
    .expect_err("a bad step")
    .to_string();
    assert!(err.contains("step must be day, week or month"), "{err}");

    // Not even the owner can edit or delete rows: the triggers refuse it.
    let owner = Roles::pool(&roles.owner).await;
    for sql in [
        format!("UPDATE {s}.events SET action = 'x'"),
        format!("DELETE FROM {s}.events"),
    ] {
        let err = sqlx::raw_sql(&sql)
            .execute(&owner)
            .await
            .expect_err(&sql)
            .to_string();
        assert!(err.contains("append-only"), "{sql}: {err}");
    }

    // A permission the writer lost mid-run pauses ingestion, says so, dead-letters nothing, and
    // the run goes on once it is granted again.
    sqlx::query(&format!(
        "REVOKE INSERT ON {s}.events FROM {}",
        roles.writer
    ))
    .execute(&roles.admin)
    .await
    .unwrap();
    let more = env.produce(500, 0.0, 0.0, 6).await;
    let (mut sink, log) = env.spawn_sink_captured(
        &["run", "--until-idle", "3"],
        &[("AUDITFLOW_DATABASE_URL", &writer_url)],
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !log
        .lock()
        .unwrap()
        .contains("permission denied: a configuration fault")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(env.count_rows().await, produced.distinct_valid as i64);
    let out = migrate(&env, &roles.owner, Some(&roles.writer));
    assert!(out.status.success(), "{}", stderr(&out));
    let status = wait_exit(&mut sink, Duration::from_secs(120)).await;
    assert!(status.success(), "{}", log.lock().unwrap());
    assert_eq!(
        env.count_rows().await,
        (produced.distinct_valid + more.distinct_valid) as i64
    );
    let dead = env.read_dlq(1, Duration::from_secs(3)).await;
    assert!(dead.is_empty(), "nothing dead-lettered");
    env.assert_chain_intact().await;

    // A schema behind this binary: the writer stops at start naming `auditflow migrate` (exit 2).
    sqlx::query(&format!(
        "DELETE FROM {s}._sqlx_migrations WHERE version = (SELECT max(version) FROM {s}._sqlx_migrations)"
    ))
    .execute(&roles.admin)
    .await
    .unwrap();
    let (mut sink, log) =
        env.spawn_sink_captured(&["run"], &[("AUDITFLOW_DATABASE_URL", &writer_url)]);
    let status = wait_exit(&mut sink, Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(2), "{}", log.lock().unwrap());
    assert!(
        log.lock().unwrap().contains("run `auditflow migrate`"),
        "{}",
        log.lock().unwrap()
    );
    drop(writer);
    drop(owner);
    // The schema (owned by the owner role) goes with DROP OWNED in Roles' drop; TestEnv drops it
    // first as the superuser.
}
