//! Set-up for the `auditflow serve` tests: a migrated schema of the test's own, events written
//! through the sink's real store (so the committed-batch log is filled as in production) and
//! announced through the real notifier (or deliberately not, to simulate a lost message), a
//! serve instance in process on a free port, and a plain HTTP client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use auditflow::breaker::{Breaker, BreakerConfig};
use auditflow::config::Config;
use auditflow::event::{Actor, ActorType, AuditEvent, Outcome, Resource};
use auditflow::ingest::notify::{self, Invalidation, Notifier, NotifyConfig, Resources};
use auditflow::ingest::store::{self, CommittedBatch, CopyRows, RowMeta, Store};
use auditflow::serve::api::AppState;
use auditflow::serve::Serve;
use chrono::{DateTime, Utc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[path = "../common/db.rs"]
mod db;

#[allow(unused_imports)]
pub use db::{database_url, redis_url};

pub fn suffix() -> String {
    Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// A day at midnight UTC, `days` from 2030-01-01 (partitions far from any other test's).
pub fn day(days: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
        + chrono::Duration::days(days)
}

/// An event with varied fields, deterministic in `n`.
pub fn event(n: u64, tenant: &str, occurred_at: DateTime<Utc>) -> AuditEvent {
    let actions = ["order.create", "order.update", "user.login", "invoice.pay"];
    let outcomes = [Outcome::Success, Outcome::Failure, Outcome::Denied];
    AuditEvent {
        event_id: Uuid::new_v4(),
        occurred_at,
        tenant_id: tenant.into(),
        actor: Actor {
            id: format!("user-{}", n % 7),
            actor_type: if n.is_multiple_of(5) {
                ActorType::Service
            } else {
                ActorType::User
            },
            ip: Some("10.0.0.1".into()),
            user_agent: None,
        },
        action: actions[(n % 4) as usize].into(),
        resource: Resource {
            resource_type: "order".into(),
            id: format!("o-{}", n % 11),
        },
        outcome: outcomes[(n % 3) as usize],
        reason: None,
        trace_id: Some(format!("trace-{}", n % 13)),
        details: Some(format!(r#"{{"n":{n}}}"#)),
        session_id: None,
    }
}

/// Everything one serve test owns.
pub struct ServeEnv {
    pub schema: String,
    pub channel: String,
    pub pool: sqlx::PgPool,
    pub store: Store,
    pub notifier: Notifier,
    notifier_shutdown: CancellationToken,
    pub tokens_dir: tempfile::TempDir,
}

impl ServeEnv {
    pub async fn new() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("AUDITFLOW_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .with_test_writer()
            .try_init();
        let id = suffix();
        let schema = format!("audit_serve_{id}");
        let channel = format!("auditflow.serve.test.{id}");
        let config = Config::from_vars([
            ("AUDITFLOW_DB_SCHEMA".to_string(), schema.clone()),
            ("AUDITFLOW_DB_MAX_CONNECTIONS".to_string(), "4".to_string()),
        ])
        .unwrap();
        let pool = store::connect(&config.database, &database_url())
            .await
            .unwrap();
        auditflow::db::migrate(&pool, &schema).await.unwrap();
        let store = Store::new(
            pool.clone(),
            schema.clone(),
            Arc::new(Breaker::new("postgres", BreakerConfig::INGEST)),
        )
        .with_instance("serve-test");
        store.register_publisher().await.unwrap();
        let notifier_shutdown = CancellationToken::new();
        let (notifier, _task) = notify::spawn(
            NotifyConfig {
                redis_url: redis_url(),
                redis_ca_file: None,
                channel: channel.clone(),
                queue_capacity: 1024,
                queue_bytes: 16 * 1024 * 1024,
                publish_timeout: Duration::from_secs(2),
                breaker: BreakerConfig::INGEST,
            },
            notifier_shutdown.clone(),
        );
        ServeEnv {
            schema,
            channel,
            pool,
            store,
            notifier,
            notifier_shutdown,
            tokens_dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Stores `events` in one transaction (logged in `batches`); returns the log entry.
    pub async fn write(&self, events: &[AuditEvent]) -> CommittedBatch {
        let mut rows = CopyRows::new();
        for (offset, event) in events.iter().enumerate() {
            rows.push(
                event,
                RowMeta {
                    content_hash: auditflow::event::content_hash(event),
                    schema_version: Some(2),
                    writer_schema_id: Some(2),
                    topic: "audit-events",
                    partition: 0,
                    offset: offset as i64,
                    kafka_timestamp: Some(Utc::now()),
                },
            );
        }
        let (_, committed) = self
            .store
            .write_committed(&rows, 0..events.len())
            .await
            .unwrap();
        committed.expect("rows stored")
    }

    /// Announces a committed batch as the sink does.
    pub fn announce(&self, committed: &CommittedBatch) {
        self.notifier
            .publish(Invalidation::committed(committed, &Resources::default()));
    }

    /// Stores and announces.
    pub async fn write_and_announce(&self, events: &[AuditEvent]) -> CommittedBatch {
        let committed = self.write(events).await;
        self.announce(&committed);
        committed
    }

    /// Writes a tokens file line per `(token, tenants)`; returns its path.
    pub fn tokens_file(&self, tokens: &[(&str, &str)]) -> String {
        use sha2::Digest;
        let path = self.tokens_dir.path().join("tokens");
        let text: String = tokens
            .iter()
            .map(|(token, tenants)| {
                let digest: String = sha2::Sha256::digest(token.as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                format!("{digest} {tenants}\n")
            })
            .collect();
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    /// The variables a serve instance of this test runs with.
    pub fn vars(&self, overrides: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut vars: Vec<(String, String)> = [
            ("AUDITFLOW_DATABASE_URL", database_url()),
            ("AUDITFLOW_DB_SCHEMA", self.schema.clone()),
            ("AUDITFLOW_REDIS_URL", redis_url()),
            ("AUDITFLOW_INVALIDATION_CHANNEL", self.channel.clone()),
            ("AUDITFLOW_SERVE_ADDR", "127.0.0.1:0".into()),
            ("AUDITFLOW_SERVE_RECONCILE_INTERVAL_MS", "60000".into()),
            ("AUDITFLOW_SERVE_RATE_LIMIT", "10000".into()),
            ("AUDITFLOW_SERVE_RATE_BURST", "10000".into()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect();
        for (key, value) in overrides {
            vars.retain(|(k, _)| k != key);
            vars.push((key.to_string(), value.to_string()));
        }
        vars
    }

    /// Starts serve in process.
    pub async fn serve(&self, overrides: &[(&str, &str)]) -> RunningServe {
        let config = Config::from_vars(self.vars(overrides)).expect("serve config");
        let serve = Serve::build(&config).await.expect("serve builds");
        let addr = serve.local_addr();
        let state = serve.state();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve.run_until_stopped(shutdown.clone()));
        RunningServe {
            addr,
            state,
            shutdown,
            task: Some(task),
        }
    }
}

impl Drop for ServeEnv {
    fn drop(&mut self) {
        self.notifier_shutdown.cancel();
        db::drop_schema_blocking(&self.schema);
    }
}

/// A serve instance running in the test's runtime; stopped on drop.
pub struct RunningServe {
    pub addr: SocketAddr,
    pub state: AppState,
    pub shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl RunningServe {
    /// Waits until the cache is trusted (subscribed and reconciled), at most 15 s.
    pub async fn wait_trusted(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while !self.state.cache.trusted() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cache never became trusted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> HttpResponse {
        get(self.addr, path, token).await
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

impl Drop for RunningServe {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub struct HttpResponse {
    pub status: u16,
    /// Header lines, lowercased.
    pub headers: String,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|err| panic!("not json ({err}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        let prefix = format!("{}: ", name.to_lowercase());
        self.headers
            .lines()
            .find_map(|line| line.strip_prefix(&prefix).map(|v| v.trim().to_owned()))
    }
}

/// A plain HTTP/1.0 GET (close-delimited body, no chunking), so the tests need no client crate.
pub async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> HttpResponse {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let auth = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw))
        .await
        .expect("response within 60 s")
        .expect("read");
    let raw = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    HttpResponse {
        status,
        headers: head.to_lowercase(),
        body: body.to_owned(),
    }
}

/// Percent-encodes a query value.
pub fn enc(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// RFC 3339 with microseconds.
pub fn ts(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}
