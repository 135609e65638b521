//! No secret in any output. One test plants a password for every dependency (database, Redis,
//! Kafka SASL, schema registry), drives every error path it can reach through the binary, runs a
//! sink at the most verbose log level, and greps everything captured: stdout and stderr of every
//! run, `/status`, `/status.json`, `/metrics`, and the dead-letter topic's records and headers.

mod common;

use std::time::Duration;

use common::servers::{PgCluster, RedisTls, TestCa};
use common::{http_get, signal, wait_exit, TestEnv};
use rdkafka::message::{Headers, Message};

/// Each planted secret, recognisable wherever it lands.
const DB_PASSWORD: &str = common::servers::PASSWORD;
const WRONG_DB_PASSWORD: &str = "db-Wr0ng-pl4nted-61f3";
const REDIS_PASSWORD: &str = common::servers::PASSWORD;
const WRONG_REDIS_PASSWORD: &str = "redis-Wr0ng-pl4nted-7a2c";
const SASL_PASSWORD: &str = "sasl-Pl4nted-5b4a9e";
const REGISTRY_PASSWORD: &str = "registry-Pl4nted-3c2d";
const SECRETS: &[&str] = &[
    DB_PASSWORD,
    WRONG_DB_PASSWORD,
    WRONG_REDIS_PASSWORD,
    SASL_PASSWORD,
    REGISTRY_PASSWORD,
];

/// Everything captured, and from where, for the final grep.
#[derive(Default)]
struct Captured(Vec<(String, String)>);

impl Captured {
    fn add(&mut self, source: impl Into<String>, text: impl Into<String>) {
        self.0.push((source.into(), text.into()));
    }

    fn assert_clean(&self) {
        let mut leaks = Vec::new();
        for (source, text) in &self.0 {
            for secret in SECRETS {
                if text.contains(secret) {
                    leaks.push(format!("{source} contains {secret}"));
                }
            }
        }
        let bytes: usize = self.0.iter().map(|(_, text)| text.len()).sum();
        eprintln!(
            "grepped {} outputs, {bytes} bytes, for {} planted secrets",
            self.0.len(),
            SECRETS.len()
        );
        assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    }
}

/// Runs the binary to completion with `vars` only (nothing inherited but PATH).
fn run(vars: &[(&str, String)], args: &[&str]) -> std::process::Output {
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

fn record(captured: &mut Captured, what: &str, output: &std::process::Output) {
    captured.add(
        format!("{what} stdout"),
        String::from_utf8_lossy(&output.stdout),
    );
    captured.add(
        format!("{what} stderr"),
        String::from_utf8_lossy(&output.stderr),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_secrets_appear_in_no_output_on_any_path() {
    let ca = TestCa::new("auditflow secrets test ca");
    let cluster = match PgCluster::start(&ca) {
        Ok(cluster) => cluster,
        Err(why) => {
            eprintln!("skipped: cannot start a password-protected PostgreSQL cluster: {why}");
            return;
        }
    };
    let redis = match RedisTls::start(&ca) {
        Ok(redis) => redis,
        Err(why) => {
            eprintln!("skipped: cannot start a password-protected Redis: {why}");
            return;
        }
    };
    let env = TestEnv::new(1).await;
    let tls = format!("sslmode=verify-full&sslrootcert={}", ca.cert_file.display());
    let database_url = cluster.url(DB_PASSWORD, &tls);
    let redis_url = redis.url(REDIS_PASSWORD);
    let ca_file = ca.cert_file.display().to_string();
    // Every dependency's secret, in every run.
    let planted = |extra: &[(&'static str, String)]| -> Vec<(&'static str, String)> {
        let mut vars: Vec<(&'static str, String)> = vec![
            ("AUDITFLOW_KAFKA_BROKERS", env.kafka.brokers()),
            ("AUDITFLOW_KAFKA_TOPIC", env.topic.clone()),
            ("AUDITFLOW_DLQ_TOPIC", env.dlq_topic.clone()),
            ("AUDITFLOW_KAFKA_GROUP_ID", env.group.clone()),
            ("AUDITFLOW_DATABASE_URL", database_url.clone()),
            ("AUDITFLOW_MAINTENANCE_DATABASE_URL", database_url.clone()),
            ("AUDITFLOW_DB_SCHEMA", env.schema.clone()),
            ("AUDITFLOW_REDIS_URL", redis_url.clone()),
            ("AUDITFLOW_REDIS_CA_FILE", ca_file.clone()),
            ("AUDITFLOW_INVALIDATION_CHANNEL", env.channel.clone()),
            ("AUDITFLOW_KAFKA_OPT_SASL_USERNAME", "auditflow".into()),
            ("AUDITFLOW_KAFKA_OPT_SASL_PASSWORD", SASL_PASSWORD.into()),
            ("AUDITFLOW_SCHEMA_REGISTRY_USERNAME", "auditflow".into()),
            (
                "AUDITFLOW_SCHEMA_REGISTRY_PASSWORD",
                REGISTRY_PASSWORD.into(),
            ),
            ("AUDITFLOW_METRICS_ADDR", "off".into()),
            ("AUDITFLOW_LOG_LEVEL", "trace".into()),
            (
                "AUDITFLOW_SCHEMA_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/schemas").into(),
            ),
        ];
        for (key, value) in extra {
            vars.retain(|(k, _)| k != key);
            vars.push((key, value.clone()));
        }
        vars
    };
    let mut captured = Captured::default();

    // Configuration errors: a misspelt property holding a password, a password where a keyword
    // belongs, a malformed configuration file line.
    let misspelt = run(
        &planted(&[("AUDITFLOW_KAFKA_OPT_SASL_PASSWD", SASL_PASSWORD.into())]),
        &["run"],
    );
    assert_eq!(misspelt.status.code(), Some(2));
    record(&mut captured, "misspelt kafka property", &misspelt);
    let invalid = run(
        &planted(&[(
            "AUDITFLOW_KAFKA_OPT_SECURITY_PROTOCOL",
            SASL_PASSWORD.into(),
        )]),
        &["run"],
    );
    assert_eq!(invalid.status.code(), Some(2));
    record(&mut captured, "invalid kafka property value", &invalid);
    let dir = tempfile::tempdir().unwrap();
    let broken_file = dir.path().join("broken.env");
    std::fs::write(
        &broken_file,
        format!("AUDITFLOW_DATABASE_URL=\"postgres://postgres:{WRONG_DB_PASSWORD}@db/x\n"),
    )
    .unwrap();
    let broken = run(
        &planted(&[("AUDITFLOW_CONFIG_FILE", broken_file.display().to_string())]),
        &["migrate"],
    );
    assert_eq!(broken.status.code(), Some(2));
    record(&mut captured, "malformed config file", &broken);

    // The database: unreachable, then reachable with the wrong password.
    let unreachable = run(
        &planted(&[(
            "AUDITFLOW_DATABASE_URL",
            format!("postgres://postgres:{WRONG_DB_PASSWORD}@127.0.0.1:1/x"),
        )]),
        &["migrate"],
    );
    assert!(!unreachable.status.success());
    assert!(
        String::from_utf8_lossy(&unreachable.stderr).contains("Connection refused"),
        "the failure is the connection's"
    );
    record(&mut captured, "unreachable database", &unreachable);
    let refused = run(
        &planted(&[(
            "AUDITFLOW_DATABASE_URL",
            cluster.url(WRONG_DB_PASSWORD, &tls),
        )]),
        &["migrate"],
    );
    assert!(!refused.status.success());
    let refused_text = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        refused_text.contains("password authentication failed"),
        "the failure is the password's: {refused_text}"
    );
    record(&mut captured, "wrong database password", &refused);
    let partitions = run(
        &planted(&[(
            "AUDITFLOW_DATABASE_URL",
            cluster.url(WRONG_DB_PASSWORD, &tls),
        )]),
        &["partitions", "plan"],
    );
    record(
        &mut captured,
        "partitions with a wrong password",
        &partitions,
    );

    // The migration that works, so the running sink below has its schema.
    let migrated = run(&planted(&[]), &["migrate"]);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    record(&mut captured, "migrate", &migrated);

    // Kafka with SASL against a broker that does not speak it, for a few seconds.
    let (mut sasl, sasl_log) = env.spawn_sink_captured(
        &["run"],
        &planted(&[
            (
                "AUDITFLOW_KAFKA_OPT_SECURITY_PROTOCOL",
                "SASL_PLAINTEXT".into(),
            ),
            (
                "AUDITFLOW_KAFKA_OPT_SASL_MECHANISMS",
                "SCRAM-SHA-256".into(),
            ),
        ])
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect::<Vec<_>>(),
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    signal(&sasl, "TERM");
    wait_exit(&mut sasl, Duration::from_secs(30)).await;
    let sasl_text = sasl_log.lock().unwrap().clone();
    assert!(
        sasl_text.to_lowercase().contains("sasl"),
        "the SASL failure is reported: {sasl_text}"
    );
    captured.add("sasl handshake failure", sasl_text);

    // Redis with the wrong password, while the sink runs.
    let (mut bad_redis, bad_redis_log) = env.spawn_sink_captured(
        &["run"],
        &planted(&[("AUDITFLOW_REDIS_URL", redis.url(WRONG_REDIS_PASSWORD))])
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect::<Vec<_>>(),
    );
    env.produce(50, 0.0, 0.0, 1).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    signal(&bad_redis, "TERM");
    wait_exit(&mut bad_redis, Duration::from_secs(30)).await;
    let bad_redis_text = bad_redis_log.lock().unwrap().clone();
    assert!(
        bad_redis_text.to_lowercase().contains("redis"),
        "the redis failure is reported"
    );
    captured.add("wrong redis password", bad_redis_text);

    // A healthy sink at trace level with every secret configured: its endpoints, a SIGHUP with
    // a broken file, and a dead letter.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config_file = dir.path().join("live.env");
    std::fs::write(&config_file, "AUDITFLOW_BATCH_MAX_EVENTS=100\n").unwrap();
    let live_vars = planted(&[
        ("AUDITFLOW_METRICS_ADDR", format!("127.0.0.1:{port}")),
        ("AUDITFLOW_CONFIG_FILE", config_file.display().to_string()),
    ]);
    let (mut live, live_log) = env.spawn_sink_captured(
        &["run"],
        &live_vars
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect::<Vec<_>>(),
    );
    env.produce(200, 0.0, 0.1, 2).await;
    env.produce_garbage_with_headers().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&database_url)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let rows: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\".events", env.schema))
                .fetch_one(&pool)
                .await
                .unwrap_or(0);
        if rows >= 250 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the live sink stored {rows} of 250"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for path in [
        "/status",
        "/status.json",
        "/metrics",
        "/readyz",
        "/status.js",
    ] {
        let (_, body) = http_get(port, path).await.expect("endpoint answers");
        captured.add(format!("GET {path}"), body);
    }
    std::fs::write(
        &config_file,
        format!("AUDITFLOW_BATCH_MAX_EVENTS=50\nAUDITFLOW_DATABASE_URL='postgres://x:{WRONG_DB_PASSWORD}@h/d\n"),
    )
    .unwrap();
    signal(&live, "HUP");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dead = env.read_dlq(1, Duration::from_secs(30)).await;
    assert!(!dead.is_empty(), "the garbage record was dead-lettered");
    for letter in &dead {
        let mut text = String::from_utf8_lossy(letter.payload().unwrap_or_default()).into_owned();
        if let Some(headers) = letter.headers() {
            for header in headers.iter() {
                text.push_str(header.key);
                text.push_str(&String::from_utf8_lossy(header.value.unwrap_or_default()));
            }
        }
        captured.add("dead letter", text);
    }
    signal(&live, "TERM");
    wait_exit(&mut live, Duration::from_secs(30)).await;
    let live_text = live_log.lock().unwrap().clone();
    assert!(
        live_text.contains("reload rejected"),
        "the broken reload was reported"
    );
    assert!(
        live_text.contains("TRACE"),
        "the sink logged at trace level"
    );
    captured.add("live sink at trace level", live_text);

    captured.assert_clean();
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", env.schema))
        .execute(&pool)
        .await
        .unwrap();
}
