//! `auditflow bench-serve`: the read side measured, in one run on one machine (see
//! BENCHMARKS.md).
//!
//! 1. A scratch schema gets N rows (default 5,000,000) over D daily partitions, generated
//!    server-side (`INSERT ... SELECT generate_series`), a quarter of them for `tenant-0`, the
//!    rest spread over 19 tenants; then `ANALYZE`.
//! 2. `auditflow serve` runs as a child process (so its RSS is its own), reached through a TCP
//!    proxy in front of Redis that the benchmark can cut.
//! 3. Latency: distinct tenant-and-day queries (newest 100) cold (database), then the same
//!    ones warm (L1).
//! 4. Staleness: the sink's store and notifier commit and announce a batch every 100 ms (the
//!    ingest path after Kafka) while a reader polls a cached query every 5 ms; per batch, the
//!    time from commit to the first answer that shows it. Three phases: normal; the pub/sub
//!    connection killed mid-phase; and a fifth of the messages dropped (a publisher losing
//!    them), which only reconciliation catches.
//! 5. RSS under a key-churning load: thousands of distinct queries, far more result bytes than
//!    the cache bound.
//! 6. Database queries per second under 200 concurrent clients over 20 hot keys, with Redis up
//!    and with Redis down (a second serve instance whose Redis is unreachable).
//! 7. A 1,000,000-row export, RSS sampled while it streams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::breaker::{Breaker, BreakerConfig};
use crate::config::{Config, Secret};
use crate::db::quote_ident;
use crate::event::{Actor, ActorType, AuditEvent, Outcome, Resource};
use crate::ingest::notify::{self, Invalidation, NotifyConfig};
use crate::ingest::store::{self, CopyRows, RowMeta, Store};

/// Benchmark parameters.
#[derive(Debug, Clone)]
pub struct BenchServeOptions {
    /// Rows generated.
    pub rows: u64,
    /// Daily partitions they spread over.
    pub days: u32,
    /// Seconds each staleness phase runs.
    pub staleness_seconds: u64,
    /// `AUDITFLOW_SERVE_RECONCILE_INTERVAL_MS` of the instance measured.
    pub reconcile_interval_ms: u64,
    /// `AUDITFLOW_SERVE_CACHE_BYTES` of the instance measured.
    pub cache_bytes: u64,
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

fn latency(mut samples: Vec<f64>) -> Latency {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if samples.is_empty() {
            return 0.0;
        }
        let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[index]
    };
    Latency {
        count: samples.len(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: samples.last().copied().unwrap_or_default(),
    }
}

/// The JSON line `bench-serve` prints.
#[derive(Debug, Clone, Serialize)]
pub struct BenchServeReport {
    /// Rows in the table.
    pub rows: u64,
    /// Seconds to generate them.
    pub generate_s: f64,
    /// Tenant-and-day queries answered by the database.
    pub cold: Latency,
    /// The same answered by L1.
    pub warm: Latency,
    /// Commit to visible, normal operation.
    pub staleness: Latency,
    /// Commit to visible, with the pub/sub connection killed mid-phase.
    pub staleness_connection_killed: Latency,
    /// Commit to visible, with a fifth of the messages dropped.
    pub staleness_messages_dropped: Latency,
    /// The reconciliation interval used.
    pub reconcile_interval_ms: u64,
    /// The L1 bound used.
    pub cache_bytes: u64,
    /// RSS of serve before the churn, MiB.
    pub churn_rss_before_mib: f64,
    /// Peak RSS of serve during the churn, MiB.
    pub churn_rss_peak_mib: f64,
    /// Result bytes the churn loaded, MiB.
    pub churn_result_mib: f64,
    /// Distinct keys of the churn.
    pub churn_keys: u64,
    /// Requests/s with Redis up, 200 clients.
    pub redis_up_requests_per_s: f64,
    /// Database queries/s with Redis up.
    pub redis_up_db_queries_per_s: f64,
    /// Requests/s with Redis down.
    pub redis_down_requests_per_s: f64,
    /// Database queries/s with Redis down.
    pub redis_down_db_queries_per_s: f64,
    /// Rows exported.
    pub export_rows: u64,
    /// Bytes exported, MiB.
    pub export_mib: f64,
    /// Export throughput, rows/s.
    pub export_rows_per_s: f64,
    /// RSS before the export, MiB.
    pub export_rss_before_mib: f64,
    /// Peak RSS during the export, MiB.
    pub export_rss_peak_mib: f64,
}

/// Runs the benchmark.
pub async fn run(config: Config, options: &BenchServeOptions) -> anyhow::Result<BenchServeReport> {
    let database_url = config
        .database
        .database_url
        .clone()
        .unwrap_or_else(|| Secret::new(crate::tools::demo::DEFAULT_DATABASE_URL));
    let suffix: u32 = rand::random();
    let schema = format!("auditflow_bench_serve_{suffix:08x}");
    let result = run_in(&config, &database_url, &schema, options, suffix).await;
    if let Ok(pool) = sqlx::PgPool::connect(database_url.expose()).await {
        let _ = sqlx::query(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quote_ident(&schema)
        ))
        .execute(&pool)
        .await;
    }
    result
}

/// A serve child process.
struct ServeChild {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl ServeChild {
    async fn start(env: &[(String, String)]) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        command.arg("serve").env_clear().kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        command.env("AUDITFLOW_SERVE_ADDR", addr.to_string());
        command.env("AUDITFLOW_LOG_LEVEL", "warn");
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting auditflow serve")?;
        let started = Instant::now();
        while TcpStream::connect(addr).await.is_err() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "serve never listened"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(ServeChild { child, addr })
    }

    fn rss_mib(&self) -> f64 {
        let Some(pid) = self.child.id() else {
            return 0.0;
        };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| {
                status.lines().find_map(|line| {
                    line.strip_prefix("VmRSS:").and_then(|rest| {
                        rest.trim()
                            .trim_end_matches("kB")
                            .trim()
                            .parse::<f64>()
                            .ok()
                    })
                })
            })
            .map_or(0.0, |kib| kib / 1024.0)
    }

    async fn wait_trusted(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let (_, body) = get(self.addr, "/readyz").await?;
            if body.contains("\"cache_trusted\":true") {
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "cache never trusted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn db_queries(&self) -> anyhow::Result<f64> {
        let (_, text) = get(self.addr, "/metrics").await?;
        Ok(text
            .lines()
            .filter(|line| line.starts_with("auditflow_serve_db_queries_total"))
            .filter_map(|line| {
                line.rsplit_once(' ')
                    .and_then(|(_, v)| v.parse::<f64>().ok())
            })
            .sum())
    }
}

/// HTTP/1.0 GET: status and body.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw)).await??;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").context("no header end")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("no status")?;
    Ok((status, body.to_owned()))
}

fn ts(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        .replace('+', "%2B")
}

/// A TCP proxy in front of Redis that can be cut: every connection closed, new ones refused.
struct Proxy {
    port: u16,
    upstream: String,
    task: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Proxy {
    async fn start(upstream: String) -> anyhow::Result<Arc<Self>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy = Arc::new(Proxy {
            port: listener.local_addr()?.port(),
            upstream,
            task: parking_lot::Mutex::new(None),
        });
        proxy.serve(listener);
        Ok(proxy)
    }

    fn serve(&self, listener: TcpListener) {
        let upstream = self.upstream.clone();
        *self.task.lock() = Some(tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        // Without it, Nagle's algorithm adds ~40 ms to small replies.
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    async fn cut(&self) {
        let task = self.task.lock().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    async fn restore(&self) {
        loop {
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", self.port)).await {
                self.serve(listener);
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn generate_rows(
    pool: &sqlx::PgPool,
    schema: &str,
    first_day: NaiveDate,
    options: &BenchServeOptions,
) -> anyhow::Result<()> {
    for offset in 0..=i64::from(options.days) {
        crate::db::partition::ensure_day(pool, schema, first_day + chrono::Duration::days(offset))
            .await?;
    }
    let start = first_day
        .and_hms_opt(0, 0, 0)
        .context("midnight")?
        .and_utc();
    let spacing_s = f64::from(options.days) * 86_400.0 / options.rows as f64;
    let chunk = 500_000u64;
    let mut first = 0u64;
    while first < options.rows {
        let last = (first + chunk).min(options.rows) - 1;
        sqlx::query(&format!(
            "INSERT INTO {}.events (event_id, occurred_at, tenant_id, actor_id, actor_type, action, \
               resource_type, resource_id, outcome, details, content_hash, kafka_topic, \
               kafka_partition, kafka_offset) \
             SELECT gen_random_uuid(), $1::timestamptz + (g * $2::float8) * interval '1 second', \
               CASE WHEN g % 4 = 0 THEN 'tenant-0' ELSE 'tenant-' || (1 + g % 19) END, \
               'user-' || (g % 500), 'USER', \
               (ARRAY['order.create','order.update','user.login','invoice.pay'])[1 + (g / 4) % 4], \
               'order', 'o-' || (g % 100000), (ARRAY['SUCCESS','FAILURE','DENIED'])[1 + g % 3], \
               jsonb_build_object('n', g, 'note', 'benchmark row', 'ip', '10.1.2.3'), \
               '\\x00'::bytea, 'bench', 0, g \
             FROM generate_series($3::int8, $4::int8) g",
            quote_ident(schema)
        ))
        .bind(start)
        .bind(spacing_s)
        .bind(i64::try_from(first)?)
        .bind(i64::try_from(last)?)
        .execute(pool)
        .await?;
        first = last + 1;
        tracing::info!(rows = first, "rows generated");
    }
    sqlx::query(&format!("ANALYZE {}.events", quote_ident(schema)))
        .execute(pool)
        .await?;
    Ok(())
}

fn probe_event(n: u64) -> AuditEvent {
    AuditEvent {
        event_id: uuid::Uuid::new_v4(),
        occurred_at: Utc::now(),
        tenant_id: "probe".into(),
        actor: Actor {
            id: format!("user-{}", n % 10),
            actor_type: ActorType::User,
            ip: None,
            user_agent: None,
        },
        action: "order.update".into(),
        resource: Resource {
            resource_type: "order".into(),
            id: n.to_string(),
        },
        outcome: Outcome::Success,
        reason: None,
        trace_id: None,
        details: None,
        session_id: None,
    }
}

/// A probe batch: its event ids, and when its commit returned.
type CommittedProbe = (Vec<String>, Instant);

/// What a staleness phase does to the messages.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    KillConnection,
    DropMessages,
}

/// Commits and announces a batch every 100 ms while a reader polls a cached query; returns,
/// per batch, commit-to-visible in ms.
#[allow(clippy::too_many_arguments)]
async fn staleness_phase(
    serve: &ServeChild,
    store: &Store,
    notifier: &notify::Notifier,
    proxy: &Proxy,
    duration: Duration,
    fault: Fault,
    counter: &AtomicU64,
) -> anyhow::Result<Latency> {
    let from = Utc::now() - chrono::Duration::hours(1);
    let to = Utc::now() + chrono::Duration::hours(2);
    let path = format!(
        "/v1/events?tenant=probe&from={}&to={}&limit=1",
        ts(from),
        ts(to)
    );
    // Per batch, in commit order: its event ids and when its commit returned. The reader
    // records, in time order, which event each answer showed newest. A batch is visible from
    // the first answer showing it *or any later batch* (later batches commit after it, so an
    // answer showing one shows it too): a batch hidden by the next one is not left out.
    let committed: Arc<parking_lot::Mutex<Vec<CommittedProbe>>> = Arc::default();
    let observed: Arc<parking_lot::Mutex<Vec<(Instant, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, observed) = (Arc::clone(&stop), Arc::clone(&observed));
        let (addr, path) = (serve.addr, path.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let asked = Instant::now();
                if let Ok((200, body)) = get(addr, &path).await {
                    if let Some(at) = body.find("\"event_id\":\"") {
                        let id = body[at + 12..at + 48].to_owned();
                        let answered = Instant::now();
                        if answered.duration_since(asked) > Duration::from_millis(50) {
                            tracing::debug!(
                                ms = answered.duration_since(asked).as_millis() as u64,
                                "slow probe request"
                            );
                        }
                        observed.lock().push((answered, id));
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let started = Instant::now();
    let mut batch_index = 0u64;
    let (mut cut, mut restored) = (false, false);
    while started.elapsed() < duration {
        let events: Vec<AuditEvent> = (0..50)
            .map(|_| probe_event(counter.fetch_add(1, Ordering::Relaxed)))
            .collect();
        // Every id of the batch: which one is newest is PostgreSQL's call (it rounds times to
        // microseconds, then orders ties by uuid).
        let ids: Vec<String> = events
            .iter()
            .map(|event| event.event_id.to_string())
            .collect();
        let mut rows = CopyRows::new();
        for (offset, event) in events.iter().enumerate() {
            rows.push(
                event,
                RowMeta {
                    content_hash: crate::event::content_hash(event),
                    schema_version: Some(2),
                    writer_schema_id: Some(2),
                    topic: "bench",
                    partition: 0,
                    offset: offset as i64,
                    kafka_timestamp: Some(Utc::now()),
                },
            );
        }
        let (_, batch) = store.write_committed(&rows, 0..rows.len()).await?;
        committed.lock().push((ids, Instant::now()));
        let dropped = fault == Fault::DropMessages && batch_index % 5 == 2;
        if let (Some(batch), false) = (batch, dropped) {
            notifier.publish(Invalidation::committed(&batch, &Default::default()));
        }
        // The connection is killed for the middle third of the phase.
        if fault == Fault::KillConnection && !cut && started.elapsed() >= duration / 3 {
            proxy.cut().await;
            cut = true;
        }
        if fault == Fault::KillConnection
            && cut
            && !restored
            && started.elapsed() >= duration * 2 / 3
        {
            proxy.restore().await;
            restored = true;
        }
        batch_index += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if cut && !restored {
        proxy.restore().await;
    }
    // Give the last batches the reconciliation interval to show up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = reader.await;
    let committed = committed.lock();
    let index_of: HashMap<&str, usize> = committed
        .iter()
        .enumerate()
        .flat_map(|(index, (ids, _))| ids.iter().map(move |id| (id.as_str(), index)))
        .collect();
    let observed: Vec<(Instant, usize)> = observed
        .lock()
        .iter()
        .filter_map(|(at, id)| index_of.get(id.as_str()).map(|index| (*at, *index)))
        .collect();
    let mut samples = Vec::new();
    for (index, (_, committed_at)) in committed.iter().enumerate() {
        if let Some((seen_at, _)) = observed.iter().find(|(_, shown)| *shown >= index) {
            samples.push(
                seen_at
                    .saturating_duration_since(*committed_at)
                    .as_secs_f64()
                    * 1000.0,
            );
        }
    }
    tracing::info!(
        batches = committed.len(),
        seen = samples.len(),
        "staleness phase done"
    );
    anyhow::ensure!(
        samples.len() == committed.len(),
        "{} of {} batches never became visible",
        committed.len() - samples.len(),
        committed.len()
    );
    Ok(latency(samples))
}

/// 200 clients looping over 20 hot keys for `duration`: requests/s and database queries/s.
async fn hot_keys_load(
    serve: &ServeChild,
    duration: Duration,
    first_day: NaiveDate,
) -> anyhow::Result<(f64, f64)> {
    let paths: Arc<Vec<String>> = Arc::new(
        (0..20)
            .map(|key| {
                let day = first_day + chrono::Duration::days(key % 5);
                let from = day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
                format!(
                    "/v1/events?tenant=tenant-{}&from={}&to={}&limit=50",
                    1 + key % 4,
                    ts(from),
                    ts(from + chrono::Duration::days(1))
                )
            })
            .collect(),
    );
    let queries_before = serve.db_queries().await?;
    let requests = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut clients = JoinSet::new();
    for client in 0..200usize {
        let (paths, requests, addr) = (Arc::clone(&paths), Arc::clone(&requests), serve.addr);
        clients.spawn(async move {
            let mut index = client;
            while started.elapsed() < duration {
                if let Ok((200, _)) = get(addr, &paths[index % paths.len()]).await {
                    requests.fetch_add(1, Ordering::Relaxed);
                }
                index += 1;
            }
        });
    }
    while clients.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let queries = serve.db_queries().await? - queries_before;
    Ok((
        requests.load(Ordering::Relaxed) as f64 / elapsed,
        queries / elapsed,
    ))
}

async fn run_in(
    config: &Config,
    database_url: &Secret,
    schema: &str,
    options: &BenchServeOptions,
    suffix: u32,
) -> anyhow::Result<BenchServeReport> {
    let mut database = config.database.clone();
    database.db_schema = schema.to_owned();
    let pool = store::connect(&database, database_url.expose()).await?;
    crate::db::migrate(&pool, schema).await?;
    let today = Utc::now().date_naive();
    let first_day = today - chrono::Duration::days(i64::from(options.days) + 1);
    let generate_started = Instant::now();
    generate_rows(&pool, schema, first_day, options).await?;
    let generate_s = generate_started.elapsed().as_secs_f64();
    for offset in 0..=1 {
        crate::db::partition::ensure_day(&pool, schema, today + chrono::Duration::days(offset))
            .await?;
    }

    let redis_url = config.redis.redis_url.expose().to_owned();
    let upstream = crate::redis_client::open(&redis_url, None)?
        .get_connection_info()
        .addr
        .to_string();
    let proxy = Proxy::start(upstream).await?;
    let channel = format!("auditflow.bench.serve.{suffix:08x}");
    let base_env: Vec<(String, String)> = [
        ("AUDITFLOW_DATABASE_URL", database_url.expose().to_owned()),
        ("AUDITFLOW_DB_SCHEMA", schema.to_owned()),
        ("AUDITFLOW_INVALIDATION_CHANNEL", channel.clone()),
        ("AUDITFLOW_SERVE_RATE_LIMIT", "1000000000".to_owned()),
        ("AUDITFLOW_SERVE_RATE_BURST", "1000000".to_owned()),
        (
            "AUDITFLOW_SERVE_CACHE_BYTES",
            options.cache_bytes.to_string(),
        ),
        (
            "AUDITFLOW_SERVE_RECONCILE_INTERVAL_MS",
            options.reconcile_interval_ms.to_string(),
        ),
        ("AUDITFLOW_SERVE_SEQ_SCAN_MAX_ROWS", "100000000".to_owned()),
        ("AUDITFLOW_SERVE_QUEUE_TIMEOUT_MS", "30000".to_owned()),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value))
    .collect();
    let mut env = base_env.clone();
    env.push((
        "AUDITFLOW_REDIS_URL".into(),
        format!("redis://127.0.0.1:{}", proxy.port),
    ));
    let serve = ServeChild::start(&env).await?;
    serve.wait_trusted().await?;

    // Latency: distinct tenant-and-day queries, cold then warm.
    let queries: Vec<String> = (0..400u32)
        .map(|index| {
            let day = first_day + chrono::Duration::days(i64::from(index % options.days));
            let from = day
                .and_hms_opt(index % 12, 0, 0)
                .unwrap_or_default()
                .and_utc();
            format!(
                "/v1/events?tenant=tenant-{}&from={}&to={}&limit=100",
                1 + index % 19,
                ts(from),
                ts(from + chrono::Duration::hours(12))
            )
        })
        .collect();
    let measure = |round: &'static str| {
        let queries = queries.clone();
        let addr = serve.addr;
        async move {
            let mut samples = Vec::new();
            for path in &queries {
                let started = Instant::now();
                let (status, body) = get(addr, path).await?;
                anyhow::ensure!(status == 200, "{round}: {status} {body}");
                samples.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, anyhow::Error>(latency(samples))
        }
    };
    let cold = measure("cold").await?;
    let warm = measure("warm").await?;
    tracing::info!(?cold, ?warm, "latency measured");

    // Staleness.
    let store = Store::new(
        pool.clone(),
        schema,
        Arc::new(Breaker::new("postgres", BreakerConfig::INGEST)),
    )
    .with_instance("bench-serve");
    store.register_publisher().await?;
    let notifier_shutdown = tokio_util::sync::CancellationToken::new();
    let (notifier, _notifier_task) = notify::spawn(
        NotifyConfig {
            redis_url: redis_url.clone(),
            redis_ca_file: None,
            channel: channel.clone(),
            queue_capacity: 1024,
            queue_bytes: 16 * 1024 * 1024,
            publish_timeout: Duration::from_secs(2),
            breaker: BreakerConfig::INGEST,
        },
        notifier_shutdown.clone(),
    );
    let counter = AtomicU64::new(0);
    let phase = Duration::from_secs(options.staleness_seconds);
    let staleness = staleness_phase(
        &serve,
        &store,
        &notifier,
        &proxy,
        phase,
        Fault::None,
        &counter,
    )
    .await?;
    let staleness_connection_killed = staleness_phase(
        &serve,
        &store,
        &notifier,
        &proxy,
        phase,
        Fault::KillConnection,
        &counter,
    )
    .await?;
    serve.wait_trusted().await?;
    let staleness_messages_dropped = staleness_phase(
        &serve,
        &store,
        &notifier,
        &proxy,
        phase,
        Fault::DropMessages,
        &counter,
    )
    .await?;
    notifier_shutdown.cancel();
    tracing::info!(
        ?staleness,
        ?staleness_connection_killed,
        ?staleness_messages_dropped,
        "staleness measured"
    );

    // Key churn: distinct queries of ~200 events each.
    let churn_rss_before_mib = serve.rss_mib();
    let mut churn_rss_peak_mib = churn_rss_before_mib;
    let churn_keys = 4_000u64;
    let churn_bytes = Arc::new(AtomicU64::new(0));
    let mut next_key = 0u64;
    while next_key < churn_keys {
        let mut batch = JoinSet::new();
        for key in next_key..(next_key + 8).min(churn_keys) {
            let day = first_day + chrono::Duration::days((key % u64::from(options.days)) as i64);
            let from = day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc()
                + chrono::Duration::seconds((key * 7) as i64 % 80_000);
            let path = format!(
                "/v1/events?tenant=tenant-{}&from={}&to={}&limit=200",
                1 + key % 19,
                ts(from),
                ts(from + chrono::Duration::hours(4))
            );
            let (addr, churn_bytes) = (serve.addr, Arc::clone(&churn_bytes));
            batch.spawn(async move {
                if let Ok((_, body)) = get(addr, &path).await {
                    churn_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                }
            });
        }
        while batch.join_next().await.is_some() {}
        next_key += 8;
        churn_rss_peak_mib = churn_rss_peak_mib.max(serve.rss_mib());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    churn_rss_peak_mib = churn_rss_peak_mib.max(serve.rss_mib());

    // 200 clients, hot keys, Redis up (this instance) and down (another one).
    let (redis_up_requests_per_s, redis_up_db_queries_per_s) =
        hot_keys_load(&serve, Duration::from_secs(10), first_day).await?;
    let mut down_env = base_env.clone();
    down_env.push(("AUDITFLOW_REDIS_URL".into(), "redis://127.0.0.1:1".into()));
    let serve_down = ServeChild::start(&down_env).await?;
    let (redis_down_requests_per_s, redis_down_db_queries_per_s) =
        hot_keys_load(&serve_down, Duration::from_secs(10), first_day).await?;
    drop(serve_down);

    // A 1,000,000-row export: tenant-0 holds every fourth row, evenly spread in time.
    let export_from = first_day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
    let export_seconds = (4_000_000.0 / options.rows as f64 * f64::from(options.days) * 86_400.0)
        .min(f64::from(options.days) * 86_400.0);
    let export_to = export_from + chrono::Duration::seconds(export_seconds as i64);
    let export_rss_before_mib = serve.rss_mib();
    let mut export_rss_peak_mib = export_rss_before_mib;
    let mut stream = TcpStream::connect(serve.addr).await?;
    let path = format!(
        "/v1/export?tenant=tenant-0&from={}&to={}",
        ts(export_from),
        ts(export_to)
    );
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut buffer = vec![0u8; 256 * 1024];
    let (mut export_bytes, mut export_rows) = (0u64, 0u64);
    let export_started = Instant::now();
    let mut last_sample = Instant::now();
    let mut head = Vec::new();
    let mut in_body = false;
    loop {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        let mut body = &buffer[..read];
        if !in_body {
            head.extend_from_slice(body);
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            anyhow::ensure!(
                head.starts_with(b"HTTP/1.0 200") || head.starts_with(b"HTTP/1.1 200"),
                "export refused: {}",
                String::from_utf8_lossy(&head)
            );
            let already = head.len() - (end + 4);
            body = &buffer[read - already..read];
            in_body = true;
        }
        export_bytes += body.len() as u64;
        export_rows += body.iter().filter(|b| **b == b'\n').count() as u64;
        if last_sample.elapsed() > Duration::from_millis(50) {
            export_rss_peak_mib = export_rss_peak_mib.max(serve.rss_mib());
            last_sample = Instant::now();
        }
    }
    let export_s = export_started.elapsed().as_secs_f64();
    Ok(BenchServeReport {
        rows: options.rows,
        generate_s,
        cold,
        warm,
        staleness,
        staleness_connection_killed,
        staleness_messages_dropped,
        reconcile_interval_ms: options.reconcile_interval_ms,
        cache_bytes: options.cache_bytes,
        churn_rss_before_mib,
        churn_rss_peak_mib,
        churn_result_mib: churn_bytes.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0),
        churn_keys,
        redis_up_requests_per_s,
        redis_up_db_queries_per_s,
        redis_down_requests_per_s,
        redis_down_db_queries_per_s,
        export_rows,
        export_mib: export_bytes as f64 / (1024.0 * 1024.0),
        export_rows_per_s: export_rows as f64 / export_s.max(1e-9),
        export_rss_before_mib,
        export_rss_peak_mib,
    })
}
