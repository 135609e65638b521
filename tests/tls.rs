//! TLS to PostgreSQL and Redis, against servers of the test's own whose certificates a CA made
//! by the test signed: verified connections work, and a server signed by another CA is refused
//! with a message that says so.

mod common;

use std::time::Duration;

use auditflow::breaker::BreakerConfig;
use auditflow::ingest::notify::{self, Invalidation, NotifyConfig};
use common::servers::{PgCluster, RedisTls, TestCa, PASSWORD};
use tokio_util::sync::CancellationToken;

fn start_cluster(ca: &TestCa) -> Option<PgCluster> {
    match PgCluster::start(ca) {
        Ok(cluster) => Some(cluster),
        Err(why) => {
            eprintln!("skipped: cannot start a test PostgreSQL cluster: {why}");
            None
        }
    }
}

fn auditflow(vars: &[(&str, String)], args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_auditflow"));
    command.args(args).env_clear();
    if let Ok(path) = std::env::var("PATH") {
        command.env("PATH", path);
    }
    for (key, value) in vars {
        command.env(key, value);
    }
    command.output().expect("run auditflow")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_with_verify_full_and_a_wrong_ca_stops_start_up_clearly() {
    let ca = TestCa::new("auditflow test ca");
    let Some(cluster) = start_cluster(&ca) else {
        return;
    };
    let verified = format!("sslmode=verify-full&sslrootcert={}", ca.cert_file.display());
    let url = cluster.url(PASSWORD, &verified);
    let schema = format!("audit_tls_{}", common::suffix());
    let migrated = auditflow(
        &[
            ("AUDITFLOW_DATABASE_URL", url.clone()),
            ("AUDITFLOW_DB_SCHEMA", schema.clone()),
        ],
        &["migrate"],
    );
    assert!(
        migrated.status.success(),
        "migrate over verify-full: {}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    // The session really is encrypted.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("connect over TLS");
    let encrypted: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(encrypted, "pg_stat_ssl says the session is not encrypted");
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = 'events'",
    )
    .bind(&schema)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 1, "the migration ran over TLS");

    // A server whose certificate another CA signed is refused, and the message says why.
    let other = TestCa::new("someone else's ca");
    let wrong = cluster.url(
        PASSWORD,
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            other.cert_file.display()
        ),
    );
    let refused = auditflow(
        &[
            ("AUDITFLOW_DATABASE_URL", wrong),
            ("AUDITFLOW_DB_SCHEMA", schema.clone()),
        ],
        &["migrate"],
    );
    assert!(!refused.status.success(), "a wrong CA must stop start-up");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("certificate verify failed"),
        "the reason is named: {stderr}"
    );
    assert!(
        !stderr.contains(PASSWORD),
        "no password in the error: {stderr}"
    );
    eprintln!("a wrong CA stops start-up with: {}", stderr.trim());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_ca_file_carries_invalidations() {
    let ca = TestCa::new("auditflow test ca");
    let redis = match RedisTls::start(&ca) {
        Ok(redis) => redis,
        Err(why) => {
            eprintln!("skipped: cannot start a TLS Redis: {why}");
            return;
        }
    };
    let channel = format!("auditflow.tls.{}", common::suffix());
    let client = auditflow::redis_client::open(&redis.url(PASSWORD), Some(&ca.cert_file)).unwrap();
    let mut subscriber = client.get_async_pubsub().await.expect("subscribe over TLS");
    subscriber.subscribe(&channel).await.unwrap();

    let shutdown = CancellationToken::new();
    let (notifier, task) = notify::spawn(
        NotifyConfig {
            redis_url: redis.url(PASSWORD),
            redis_ca_file: Some(ca.cert_file.clone()),
            channel: channel.clone(),
            queue_capacity: 16,
            queue_bytes: 1024 * 1024,
            publish_timeout: Duration::from_secs(2),
            breaker: BreakerConfig::INGEST,
        },
        shutdown.clone(),
    );
    let mut invalidation = Invalidation::new(1);
    invalidation.add("acme", "order", "42");
    notifier.publish(invalidation);
    let mut messages = subscriber.on_message();
    let message = tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::next(&mut messages),
    )
    .await
    .expect("the invalidation arrives over TLS")
    .expect("a message");
    let payload: String = message.get_payload().unwrap();
    assert!(payload.contains("\"acme\""), "{payload}");
    drop(messages);
    shutdown.cancel();
    let _ = task.await;

    // Another CA's certificate is refused: nothing is published, the failure is counted.
    let other = TestCa::new("someone else's ca");
    let wrong =
        auditflow::redis_client::open(&redis.url(PASSWORD), Some(&other.cert_file)).unwrap();
    let err = wrong
        .get_multiplexed_async_connection()
        .await
        .expect_err("an untrusted server certificate is refused");
    let message = err.to_string();
    assert!(!message.contains(PASSWORD), "{message}");
}

#[test]
fn a_ca_file_for_a_plain_redis_url_stops_start_up_naming_the_variables() {
    let ca = TestCa::new("auditflow test ca");
    let err = auditflow::Config::from_vars([
        (
            "AUDITFLOW_REDIS_URL".to_owned(),
            "redis://127.0.0.1:6379".to_owned(),
        ),
        (
            "AUDITFLOW_REDIS_CA_FILE".to_owned(),
            ca.cert_file.display().to_string(),
        ),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("AUDITFLOW_REDIS_CA_FILE") && err.contains("AUDITFLOW_REDIS_URL"),
        "{err}"
    );
    let err = auditflow::Config::from_vars([
        (
            "AUDITFLOW_REDIS_URL".to_owned(),
            "rediss://127.0.0.1:6379".to_owned(),
        ),
        (
            "AUDITFLOW_REDIS_CA_FILE".to_owned(),
            "/nonexistent/ca.pem".to_owned(),
        ),
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("AUDITFLOW_REDIS_CA_FILE"), "{err}");
}
