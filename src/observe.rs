//! What auditflow tells the outside while it runs: one HTTP server on `AUDITFLOW_METRICS_ADDR`.
//!
//! | path | for | answer |
//! |---|---|---|
//! | `/metrics` | Prometheus | the exposition text of every `auditflow_*` metric |
//! | `/healthz` | liveness probes | `200 ok` while the process serves requests |
//! | `/readyz` | readiness probes | `200` once the consumer joined its group and the `postgres` breaker is closed, else `503`; a JSON body says which is missing |
//! | `/status` | a person | a self-contained HTML page polling `/status.json` every second |
//! | `/status.json` | scripts, the page | totals, throughput, lag per partition, breakers, recent dead-letter classes, pool |
//!
//! The sink reports into a [`StatusBoard`]: the page's numbers and the Prometheus counters come
//! from the same calls ([`StatusBoard::add_stored`] increments both), so they always agree.
//! Updates are atomics or a short uncontended lock, never an await, so the hot path may call
//! them per message.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::extract::State as AxumState;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Json, Redirect, Response};
use axum::routing::get;
use axum::Router;
use metrics::Unit;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::breaker::{Breaker, State as BreakerState};

/// The breaker that decides readiness: without the database nothing can be stored.
pub const DATABASE_DEPENDENCY: &str = "postgres";

/// How far back "recent" dead letters reach on the status page (to the minute).
pub const RECENT_DEAD_LETTERS: Duration = Duration::from_secs(15 * 60);

/// The span over which throughput is averaged.
pub const THROUGHPUT_WINDOW: Duration = Duration::from_secs(10);

/// How often the server samples counters (throughput) and the pool.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// How often the Prometheus recorder's upkeep runs (it drains histogram samples).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Counter names shared with the sink's documentation and the dashboard.
const CONSUMED_METRIC: &str = "auditflow_events_consumed_total";
const STORED_METRIC: &str = "auditflow_events_stored_total";
const DUPLICATES_METRIC: &str = "auditflow_duplicates_skipped_total";
const DEAD_LETTERED_METRIC: &str = "auditflow_events_dead_lettered_total";
const LAG_METRIC: &str = "auditflow_consumer_lag_messages";
const POOL_METRIC: &str = "auditflow_db_pool_connections";

/// Live state of one replica, shared by the sink (writer) and the HTTP server (reader).
///
/// Counters only grow; lag, pool and membership are last-value. Every method is cheap and
/// synchronous: atomics, or a std mutex held for a map update.
#[derive(Debug)]
pub struct StatusBoard {
    instance: String,
    started_at: Instant,
    joined: AtomicBool,
    consumed: AtomicU64,
    stored: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
    pool_in_use: AtomicU32,
    pool_idle: AtomicU32,
    /// One per dependency name; registering the same name again replaces it.
    breakers: Mutex<Vec<Arc<Breaker>>>,
    /// Sampled by [`StatusBoard::sample`] when registered.
    pool: Mutex<Option<sqlx::PgPool>>,
    /// topic -> partition -> lag (`None`: unknown to librdkafka yet).
    lags: Mutex<BTreeMap<String, BTreeMap<i32, Option<i64>>>>,
    dead_letters: Mutex<BTreeMap<String, ClassLog>>,
    /// Counter samples, oldest first, no older than [`THROUGHPUT_WINDOW`] (plus the one just
    /// before it, so the window is always spanned once it has passed).
    samples: Mutex<VecDeque<Sample>>,
}

/// Dead letters of one error class.
#[derive(Debug, Default)]
struct ClassLog {
    total: u64,
    last_at: Option<Instant>,
    /// (minute since the board started, count), oldest first, pruned to the recent window.
    per_minute: VecDeque<(u64, u64)>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    consumed: u64,
    stored: u64,
}

impl StatusBoard {
    /// Creates an empty board for the replica named `instance` (shown on the status page).
    pub fn new(instance: impl Into<String>) -> Self {
        let started_at = Instant::now();
        StatusBoard {
            instance: instance.into(),
            started_at,
            joined: AtomicBool::new(false),
            consumed: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            pool_in_use: AtomicU32::new(0),
            pool_idle: AtomicU32::new(0),
            breakers: Mutex::new(Vec::new()),
            pool: Mutex::new(None),
            lags: Mutex::new(BTreeMap::new()),
            dead_letters: Mutex::new(BTreeMap::new()),
            samples: Mutex::new(VecDeque::from([Sample {
                at: started_at,
                consumed: 0,
                stored: 0,
            }])),
        }
    }

    /// Records whether the consumer holds a group assignment: true after an assignment, false
    /// after a revoke or when it leaves the group. Part of readiness.
    pub fn set_joined(&self, joined: bool) {
        self.joined.store(joined, Ordering::Relaxed);
    }

    /// Shows `breaker` on the page; the one named [`DATABASE_DEPENDENCY`] also decides
    /// readiness. Its state is read when asked, so later transitions need no call.
    pub fn register_breaker(&self, breaker: Arc<Breaker>) {
        let mut breakers = lock(&self.breakers);
        breakers.retain(|known| known.dependency() != breaker.dependency());
        breakers.push(breaker);
    }

    /// Samples `pool` (connections in use and idle) every [`SAMPLE_EVERY`] while the server
    /// runs, instead of [`StatusBoard::set_pool`] calls.
    pub fn register_pool(&self, pool: sqlx::PgPool) {
        *lock(&self.pool) = Some(pool);
    }

    /// Adds `n` messages received from Kafka (`auditflow_events_consumed_total`).
    pub fn add_consumed(&self, n: u64) {
        self.consumed.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(CONSUMED_METRIC).increment(n);
    }

    /// Adds `n` rows committed to Postgres (`auditflow_events_stored_total`).
    pub fn add_stored(&self, n: u64) {
        self.stored.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(STORED_METRIC).increment(n);
    }

    /// Adds `n` events skipped as already stored (`auditflow_duplicates_skipped_total`).
    pub fn add_duplicates(&self, n: u64) {
        self.duplicates.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(DUPLICATES_METRIC).increment(n);
    }

    /// Records one record acknowledged by the dead-letter topic with error `class`
    /// (`auditflow_events_dead_lettered_total{class}`).
    pub fn record_dead_letter(&self, class: &str) {
        self.record_dead_letters(class, 1);
    }

    /// Records `n` dead letters of error `class`.
    pub fn record_dead_letters(&self, class: &str, n: u64) {
        if n == 0 {
            return;
        }
        self.record_dead_letters_at(class, n, Instant::now());
        metrics::counter!(DEAD_LETTERED_METRIC, "class" => class.to_owned()).increment(n);
    }

    fn record_dead_letters_at(&self, class: &str, n: u64, now: Instant) {
        self.dead_lettered.fetch_add(n, Ordering::Relaxed);
        let minute = self.minute_of(now);
        let mut classes = lock(&self.dead_letters);
        let log = match classes.get_mut(class) {
            Some(log) => log,
            None => classes.entry(class.to_owned()).or_default(),
        };
        log.total += n;
        log.last_at = Some(now);
        match log.per_minute.back_mut() {
            Some((last, count)) if *last == minute => *count += n,
            _ => log.per_minute.push_back((minute, n)),
        }
        prune_minutes(&mut log.per_minute, minute);
    }

    /// Records the lag of one assigned partition: messages between the committed (or consumed)
    /// position and the high watermark (`auditflow_consumer_lag_messages{topic,partition}`).
    /// A negative `lag` (librdkafka's -1) means not known yet: shown as unknown, gauge untouched.
    pub fn set_partition_lag(&self, topic: &str, partition: i32, lag: i64) {
        let lag = (lag >= 0).then_some(lag);
        {
            let mut lags = lock(&self.lags);
            let partitions = match lags.get_mut(topic) {
                Some(partitions) => partitions,
                None => lags.entry(topic.to_owned()).or_default(),
            };
            partitions.insert(partition, lag);
        }
        if let Some(lag) = lag {
            metrics::gauge!(LAG_METRIC, "topic" => topic.to_owned(), "partition" => partition.to_string())
                .set(lag as f64);
        }
    }

    /// Forgets a partition this replica no longer owns (after a revoke). Its gauge drops to 0:
    /// the new owner reports the real lag, and a sum over replicas stays right.
    pub fn remove_partition(&self, topic: &str, partition: i32) {
        let removed = {
            let mut lags = lock(&self.lags);
            let removed = lags
                .get_mut(topic)
                .and_then(|partitions| partitions.remove(&partition));
            if lags.get(topic).is_some_and(BTreeMap::is_empty) {
                lags.remove(topic);
            }
            removed
        };
        if removed.is_some() {
            metrics::gauge!(LAG_METRIC, "topic" => topic.to_owned(), "partition" => partition.to_string())
                .set(0.0);
        }
    }

    /// Records the database pool's connections in use and idle
    /// (`auditflow_db_pool_connections{state}`).
    pub fn set_pool(&self, in_use: u32, idle: u32) {
        self.pool_in_use.store(in_use, Ordering::Relaxed);
        self.pool_idle.store(idle, Ordering::Relaxed);
        metrics::gauge!(POOL_METRIC, "state" => "in_use").set(f64::from(in_use));
        metrics::gauge!(POOL_METRIC, "state" => "idle").set(f64::from(idle));
    }

    /// Takes one throughput sample of the counters and reads the registered pool. The server
    /// calls it every [`SAMPLE_EVERY`]; tests call it directly.
    pub fn sample(&self) {
        let pool = lock(&self.pool).clone();
        if let Some(pool) = pool {
            let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX);
            self.set_pool(pool.size().saturating_sub(idle), idle);
        }
        self.sample_at(Instant::now());
    }

    fn sample_at(&self, now: Instant) {
        let sample = Sample {
            at: now,
            consumed: self.consumed.load(Ordering::Relaxed),
            stored: self.stored.load(Ordering::Relaxed),
        };
        let mut samples = lock(&self.samples);
        samples.push_back(sample);
        // Keep the newest sample at or beyond the window's start, and everything after it.
        while samples
            .get(1)
            .is_some_and(|second| now.duration_since(second.at) >= THROUGHPUT_WINDOW)
        {
            samples.pop_front();
        }
    }

    /// Whether orchestrators may route work here, and what is missing if not.
    pub fn readiness(&self) -> Readiness {
        let joined_group = self.joined.load(Ordering::Relaxed);
        let database_breaker = lock(&self.breakers)
            .iter()
            .find(|breaker| breaker.dependency() == DATABASE_DEPENDENCY)
            .map(|breaker| breaker.state().as_str());
        let mut missing = Vec::new();
        if !joined_group {
            missing.push("joined_group");
        }
        if database_breaker != Some(BreakerState::Closed.as_str()) {
            missing.push("database_breaker_closed");
        }
        Readiness {
            ready: missing.is_empty(),
            joined_group,
            database_breaker,
            missing,
        }
    }

    /// Everything the status page shows, as of now.
    pub fn snapshot(&self) -> StatusSnapshot {
        self.snapshot_at(Instant::now())
    }

    fn snapshot_at(&self, now: Instant) -> StatusSnapshot {
        let totals = Totals {
            consumed: self.consumed.load(Ordering::Relaxed),
            stored: self.stored.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
        };
        let throughput = {
            let samples = lock(&self.samples);
            let oldest = samples.front().copied();
            let span = oldest.map_or(Duration::ZERO, |oldest| now.duration_since(oldest.at));
            // Under half a second the rate is mostly noise: report none rather than a spike.
            let rate = |now_count: u64, then_count: u64| {
                (span >= Duration::from_millis(500))
                    .then(|| now_count.saturating_sub(then_count) as f64 / span.as_secs_f64())
            };
            Throughput {
                window_s: span.as_secs_f64(),
                consumed_per_s: oldest.and_then(|oldest| rate(totals.consumed, oldest.consumed)),
                stored_per_s: oldest.and_then(|oldest| rate(totals.stored, oldest.stored)),
            }
        };
        let partitions = lock(&self.lags)
            .iter()
            .flat_map(|(topic, partitions)| {
                partitions.iter().map(|(partition, lag)| PartitionLag {
                    topic: topic.clone(),
                    partition: *partition,
                    lag: *lag,
                })
            })
            .collect();
        let mut breakers: Vec<BreakerStatus> = lock(&self.breakers)
            .iter()
            .map(|breaker| BreakerStatus {
                dependency: breaker.dependency(),
                state: breaker.state().as_str(),
            })
            .collect();
        breakers.sort_by_key(|breaker| breaker.dependency);
        let minute = self.minute_of(now);
        let dead_letters = lock(&self.dead_letters)
            .iter_mut()
            .map(|(class, log)| {
                prune_minutes(&mut log.per_minute, minute);
                DeadLetterClass {
                    class: class.clone(),
                    recent: log.per_minute.iter().map(|(_, count)| count).sum(),
                    total: log.total,
                    last_seen_s_ago: log
                        .last_at
                        .map(|at| now.saturating_duration_since(at).as_secs_f64()),
                }
            })
            .collect();
        StatusSnapshot {
            instance: self.instance.clone(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: now.duration_since(self.started_at).as_secs_f64(),
            readiness: self.readiness(),
            totals,
            throughput,
            partitions,
            breakers,
            dead_letters: DeadLetters {
                recent_window_s: RECENT_DEAD_LETTERS.as_secs(),
                classes: dead_letters,
            },
            pool: Pool {
                in_use: self.pool_in_use.load(Ordering::Relaxed),
                idle: self.pool_idle.load(Ordering::Relaxed),
            },
        }
    }

    fn minute_of(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started_at).as_secs() / 60
    }
}

/// Drops per-minute buckets older than the recent window, as seen at `minute`.
fn prune_minutes(per_minute: &mut VecDeque<(u64, u64)>, minute: u64) {
    let window_minutes = RECENT_DEAD_LETTERS.as_secs() / 60;
    while per_minute
        .front()
        .is_some_and(|(at, _)| at + window_minutes <= minute)
    {
        per_minute.pop_front();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `/readyz` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// Joined and the database breaker closed.
    pub ready: bool,
    /// The consumer holds a group assignment.
    pub joined_group: bool,
    /// The `postgres` breaker's state; `None` when none is registered.
    pub database_breaker: Option<&'static str>,
    /// What keeps it from being ready: `joined_group`, `database_breaker_closed`.
    pub missing: Vec<&'static str>,
}

/// The `/status.json` body.
#[derive(Debug, Clone, Serialize)]
pub struct StatusSnapshot {
    /// `AUDITFLOW_INSTANCE_ID` of the replica.
    pub instance: String,
    /// auditflow's version.
    pub version: &'static str,
    /// Seconds since the board was created.
    pub uptime_s: f64,
    /// As `/readyz` answers.
    pub readiness: Readiness,
    /// Counters since start; equal to the Prometheus counters of the same name.
    pub totals: Totals,
    /// Recent rates.
    pub throughput: Throughput,
    /// Lag of each assigned partition, by topic then partition.
    pub partitions: Vec<PartitionLag>,
    /// Each registered breaker, by dependency name.
    pub breakers: Vec<BreakerStatus>,
    /// Dead letters by error class.
    pub dead_letters: DeadLetters,
    /// Database pool connections.
    pub pool: Pool,
}

/// Counters since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// `auditflow_events_consumed_total`.
    pub consumed: u64,
    /// `auditflow_events_stored_total`.
    pub stored: u64,
    /// `auditflow_duplicates_skipped_total`.
    pub duplicates: u64,
    /// `auditflow_events_dead_lettered_total`, all classes.
    pub dead_lettered: u64,
}

/// Events per second over the last [`THROUGHPUT_WINDOW`], from sampled counters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Throughput {
    /// The span actually averaged over (shorter just after start).
    pub window_s: f64,
    /// Messages consumed per second; `None` until half a second has been sampled.
    pub consumed_per_s: Option<f64>,
    /// Rows stored per second.
    pub stored_per_s: Option<f64>,
}

/// One partition's lag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionLag {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Messages behind the high watermark; `None` while unknown.
    pub lag: Option<i64>,
}

/// One breaker's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BreakerStatus {
    /// `postgres`, `redis`, `dlq`, ...
    pub dependency: &'static str,
    /// `closed`, `half_open` or `open` (the gauge's 0, 1, 2).
    pub state: &'static str,
}

/// Dead letters by class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetters {
    /// What "recent" covers, seconds (to the minute).
    pub recent_window_s: u64,
    /// Classes seen since start, by name.
    pub classes: Vec<DeadLetterClass>,
}

/// Dead letters of one class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterClass {
    /// `decode`, `schema`, `validation`, `out_of_window`, `data`, `constraint`.
    pub class: String,
    /// Over the recent window.
    pub recent: u64,
    /// Since start; equals `auditflow_events_dead_lettered_total{class}`.
    pub total: u64,
    /// Seconds since the last one.
    pub last_seen_s_ago: Option<f64>,
}

/// Database pool connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Pool {
    /// Checked out by a write.
    pub in_use: u32,
    /// Open and waiting.
    pub idle: u32,
}

static RECORDER: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Installs the process-wide Prometheus recorder (with [`crate::telemetry::prometheus_builder`]'s
/// buckets) and describes every metric, once; later calls return the same handle. Fails if
/// another recorder was installed first.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let mut installed = lock(&RECORDER);
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let handle = crate::telemetry::prometheus_builder()?
        .install_recorder()
        .context("installing the Prometheus recorder")?;
    describe_metrics();
    *installed = Some(handle.clone());
    Ok(handle)
}

/// Registers the help text and unit of every auditflow metric with the installed recorder.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        CONSUMED_METRIC,
        Unit::Count,
        "messages received from the source topic"
    );
    describe_counter!(
        STORED_METRIC,
        Unit::Count,
        "rows committed to the events table"
    );
    describe_counter!(
        DUPLICATES_METRIC,
        Unit::Count,
        "events skipped because the same (event_id, occurred_at) was already stored or repeated in the batch"
    );
    describe_counter!(
        "auditflow_duplicate_conflicts_total",
        Unit::Count,
        "skipped duplicates whose content differed from the stored event (kept the first)"
    );
    describe_counter!(
        DEAD_LETTERED_METRIC,
        Unit::Count,
        "records acknowledged by the dead-letter topic, by error class"
    );
    describe_histogram!(
        "auditflow_batch_size_events",
        Unit::Count,
        "messages per completed batch"
    );
    describe_histogram!(
        "auditflow_batch_flush_duration_seconds",
        Unit::Seconds,
        "time to make one batch durable: database write, dead letters acknowledged, offsets stored"
    );
    describe_histogram!(
        "auditflow_end_to_end_latency_seconds",
        Unit::Seconds,
        "from the event's kafka timestamp to its commit in postgres"
    );
    describe_counter!(
        "auditflow_store_retries_total",
        Unit::Count,
        "batch writes retried after a transient database failure"
    );
    describe_counter!(
        "auditflow_offsets_unassigned_total",
        Unit::Count,
        "offsets not stored because their partition had been revoked (re-read by the new owner)"
    );
    describe_counter!(
        "auditflow_dlq_produce_retries_total",
        Unit::Count,
        "dead-letter produces retried"
    );
    describe_gauge!(
        LAG_METRIC,
        Unit::Count,
        "messages between this replica's position and the high watermark, per assigned partition"
    );
    describe_gauge!(
        "auditflow_breaker_state",
        "circuit breaker state per dependency: 0 closed, 1 half-open, 2 open"
    );
    describe_counter!(
        "auditflow_breaker_transitions_total",
        Unit::Count,
        "circuit breaker state changes, by dependency and new state"
    );
    describe_counter!(
        "auditflow_breaker_rejected_total",
        Unit::Count,
        "calls rejected by an open circuit breaker without reaching the dependency"
    );
    describe_gauge!(
        POOL_METRIC,
        Unit::Count,
        "database pool connections, by state (in_use, idle)"
    );
    crate::ingest::notify::describe_metrics();
    crate::ops::partitions::describe_metrics();
}

/// A running observability server.
#[derive(Debug)]
pub struct ObserveServer {
    local_addr: SocketAddr,
    task: JoinHandle<anyhow::Result<()>>,
}

impl ObserveServer {
    /// The address it listens on (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits until the server has stopped (after its shutdown token fired).
    pub async fn stopped(self) -> anyhow::Result<()> {
        self.task.await.context("observability server task")?
    }
}

/// Starts the server as `AUDITFLOW_METRICS_ADDR` says: `None` when it is `off`, else it
/// installs the recorder and serves on that address until `shutdown` fires.
pub async fn start(
    metrics_addr: &str,
    board: Arc<StatusBoard>,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<ObserveServer>> {
    if metrics_addr == crate::config::METRICS_OFF {
        return Ok(None);
    }
    let addr: SocketAddr = metrics_addr
        .parse()
        .with_context(|| format!("AUDITFLOW_METRICS_ADDR {metrics_addr:?} is not host:port"))?;
    let handle = install_recorder()?;
    spawn(addr, board, handle, shutdown).await.map(Some)
}

/// Binds `addr` and serves the endpoints on a background task until `shutdown` fires; also
/// samples the board every [`SAMPLE_EVERY`] and runs the recorder's upkeep.
pub async fn spawn(
    addr: SocketAddr,
    board: Arc<StatusBoard>,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) -> anyhow::Result<ObserveServer> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics and status endpoint on {addr}"))?;
    let local_addr = listener.local_addr()?;
    tracing::info!(addr = %local_addr, "serving /metrics, /healthz, /readyz and /status");
    let sampler = tokio::spawn(sample_until(
        Arc::clone(&board),
        handle.clone(),
        shutdown.clone(),
    ));
    let app = router(board, handle);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .context("serving the metrics and status endpoint");
        sampler.abort();
        served
    });
    Ok(ObserveServer { local_addr, task })
}

/// Serves on `addr` until `shutdown` fires.
pub async fn serve(
    addr: SocketAddr,
    board: Arc<StatusBoard>,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    spawn(addr, board, handle, shutdown).await?.stopped().await
}

async fn sample_until(
    board: Arc<StatusBoard>,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_upkeep = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        board.sample();
        if last_upkeep.elapsed() >= UPKEEP_EVERY {
            handle.run_upkeep();
            last_upkeep = Instant::now();
        }
    }
}

#[derive(Clone)]
struct AppState {
    board: Arc<StatusBoard>,
    handle: PrometheusHandle,
}

fn router(board: Arc<StatusBoard>, handle: PrometheusHandle) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::temporary("/status") }))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status_page))
        .route("/status.json", get(status_json))
        .with_state(AppState { board, handle })
}

async fn metrics_text(AxumState(state): AxumState<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.handle.render(),
    )
        .into_response()
}

async fn readyz(AxumState(state): AxumState<AppState>) -> Response {
    let readiness = state.board.readiness();
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Json(readiness),
    )
        .into_response()
}

async fn status_json(AxumState(state): AxumState<AppState>) -> Response {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(state.board.snapshot()),
    )
        .into_response()
}

async fn status_page() -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Html(STATUS_PAGE)).into_response()
}

/// The `/status` page. Self-contained (no external assets: it must work on an isolated
/// network). Values arrive only through `/status.json`, and every one of them is written with
/// `textContent`, never as HTML, since topic and class names come from outside. Each value has
/// an id (`total-stored`, `lag-<topic>-<partition>`, `breaker-<dependency>`,
/// `dl-recent-<class>`, `dl-total-<class>`, ...) for tests and scripts.
const STATUS_PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>auditflow status</title>
<style>
  :root { --bg:#f6f7f9; --card:#fff; --ink:#1d2330; --muted:#667085; --line:#e4e7ec;
          --ok:#1a7f37; --ok-bg:#dafbe1; --warn:#9a6700; --warn-bg:#fff8c5; --bad:#cf222e; --bad-bg:#ffebe9; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
         background:var(--bg); color:var(--ink); }
  header { display:flex; flex-wrap:wrap; align-items:baseline; gap:.4rem 1rem; padding:14px 24px;
           background:var(--ink); color:#fff; }
  header h1 { font-size:18px; margin:0; }
  header .meta { color:#c4c9d4; font-size:13px; }
  header .right { margin-left:auto; font-size:13px; color:#c4c9d4; }
  main { display:grid; grid-template-columns:repeat(auto-fit,minmax(340px,1fr)); gap:16px; padding:20px 24px; }
  section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:14px 16px; }
  h2 { font-size:13px; text-transform:uppercase; letter-spacing:.06em; color:var(--muted); margin:0 0 10px; }
  .stats { display:grid; grid-template-columns:repeat(2,1fr); gap:10px 16px; }
  .stat .label { color:var(--muted); font-size:12px; }
  .stat .value { font-size:26px; font-weight:600; font-variant-numeric:tabular-nums; }
  table { width:100%; border-collapse:collapse; font-variant-numeric:tabular-nums; }
  th, td { text-align:left; padding:5px 6px; border-bottom:1px solid var(--line); }
  th { font-size:12px; color:var(--muted); font-weight:500; }
  td.num, th.num { text-align:right; }
  tfoot td { font-weight:600; border-bottom:none; }
  .empty { color:var(--muted); font-style:italic; }
  .pill { display:inline-block; padding:1px 9px; border-radius:999px; font-size:12px; font-weight:600; }
  .state-closed, .pill.yes { color:var(--ok); background:var(--ok-bg); }
  .state-half_open { color:var(--warn); background:var(--warn-bg); }
  .state-open, .pill.no { color:var(--bad); background:var(--bad-bg); }
  .badges { display:flex; gap:8px; flex-wrap:wrap; align-items:center; }
  #conn.down { color:#ffb3ad; }
  .hint { color:var(--muted); font-size:12px; margin-top:8px; }
</style>
</head>
<body>
<header>
  <h1>auditflow</h1>
  <span class="meta">instance <span id="instance">…</span> · v<span id="version">…</span> · up <span id="uptime">…</span></span>
  <span class="badges">
    <span class="pill" id="ready">ready?</span>
    <span class="pill" id="joined">group?</span>
  </span>
  <span class="right"><span id="conn">connecting…</span> · updated <span id="updated">never</span></span>
</header>
<main>
  <section>
    <h2>Throughput <span id="rate-window"></span></h2>
    <div class="stats">
      <div class="stat"><div class="label">consumed, events/s</div><div class="value" id="rate-consumed">—</div></div>
      <div class="stat"><div class="label">stored, events/s</div><div class="value" id="rate-stored">—</div></div>
    </div>
  </section>
  <section>
    <h2>Totals since start</h2>
    <div class="stats">
      <div class="stat"><div class="label">consumed</div><div class="value" id="total-consumed">—</div></div>
      <div class="stat"><div class="label">stored</div><div class="value" id="total-stored">—</div></div>
      <div class="stat"><div class="label">duplicates skipped</div><div class="value" id="total-duplicates">—</div></div>
      <div class="stat"><div class="label">dead-lettered</div><div class="value" id="total-dead-lettered">—</div></div>
    </div>
  </section>
  <section>
    <h2>Circuit breakers</h2>
    <table><thead><tr><th>dependency</th><th>state</th></tr></thead>
      <tbody id="breakers"><tr><td colspan="2" class="empty">none registered</td></tr></tbody></table>
    <h2 style="margin-top:16px">Database pool</h2>
    <div class="stats">
      <div class="stat"><div class="label">in use</div><div class="value" id="pool-in-use">—</div></div>
      <div class="stat"><div class="label">idle</div><div class="value" id="pool-idle">—</div></div>
    </div>
  </section>
  <section>
    <h2>Consumer lag</h2>
    <table><thead><tr><th>topic</th><th class="num">partition</th><th class="num">lag (messages)</th></tr></thead>
      <tbody id="lags"><tr><td colspan="3" class="empty">no partitions assigned</td></tr></tbody>
      <tfoot><tr><td>total</td><td></td><td class="num" id="lag-total">—</td></tr></tfoot></table>
  </section>
  <section>
    <h2>Dead letters by class</h2>
    <table><thead><tr><th>class</th><th class="num">last <span id="dl-window">15 min</span></th><th class="num">since start</th><th class="num">last seen</th></tr></thead>
      <tbody id="dead-letters"><tr><td colspan="4" class="empty">none</td></tr></tbody></table>
    <div class="hint">Replay with <code>auditflow replay --error-class CLASS</code>.</div>
  </section>
</main>
<script>
"use strict";
const grouped = new Intl.NumberFormat("en-US");
const rate = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });
const $ = (id) => document.getElementById(id);
const setText = (id, text) => { const el = $(id); if (el) el.textContent = text; };
const count = (n) => (n === null || n === undefined ? "—" : grouped.format(n));
const duration = (s) => {
  if (s === null || s === undefined) return "—";
  if (s < 60) return Math.floor(s) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + Math.floor(s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
  return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
};
function cell(text, id, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (id) td.id = id;
  if (cls) td.className = cls;
  return td;
}
function row(cells) {
  const tr = document.createElement("tr");
  tr.append(...cells);
  return tr;
}
function fill(tbodyId, rows, emptyText, columns) {
  const body = $(tbodyId);
  if (rows.length === 0) {
    const td = cell(emptyText, null, "empty");
    td.colSpan = columns;
    body.replaceChildren(row([td]));
  } else {
    body.replaceChildren(...rows);
  }
}
function pill(id, ok, yes, no) {
  const el = $(id);
  el.textContent = ok ? yes : no;
  el.className = "pill " + (ok ? "yes" : "no");
}
function render(s) {
  setText("instance", s.instance);
  setText("version", s.version);
  setText("uptime", duration(s.uptime_s));
  const why = s.readiness.missing.map((m) => m === "joined_group" ? "not in group"
    : "database breaker " + (s.readiness.database_breaker || "missing").replace("_", "-"));
  pill("ready", s.readiness.ready, "ready", "not ready: " + why.join(", "));
  pill("joined", s.readiness.joined_group, "in consumer group", "not in consumer group");

  setText("rate-window", "(last " + Math.round(s.throughput.window_s) + " s)");
  const perSecond = (v) => (v === null ? "—" : rate.format(v));
  setText("rate-consumed", perSecond(s.throughput.consumed_per_s));
  setText("rate-stored", perSecond(s.throughput.stored_per_s));
  setText("total-consumed", count(s.totals.consumed));
  setText("total-stored", count(s.totals.stored));
  setText("total-duplicates", count(s.totals.duplicates));
  setText("total-dead-lettered", count(s.totals.dead_lettered));
  setText("pool-in-use", count(s.pool.in_use));
  setText("pool-idle", count(s.pool.idle));

  fill("breakers", s.breakers.map((b) => {
    const state = document.createElement("span");
    state.id = "breaker-" + b.dependency;
    state.className = "pill state-" + b.state;
    state.textContent = b.state.replace("_", "-");
    const td = document.createElement("td");
    td.append(state);
    return row([cell(b.dependency), td]);
  }), "none registered", 2);

  let lagTotal = 0, lagKnown = false;
  fill("lags", s.partitions.map((p) => {
    if (p.lag !== null) { lagTotal += p.lag; lagKnown = true; }
    return row([cell(p.topic), cell(String(p.partition), null, "num"),
                cell(p.lag === null ? "unknown" : count(p.lag), "lag-" + p.topic + "-" + p.partition, "num")]);
  }), "no partitions assigned", 3);
  setText("lag-total", lagKnown ? count(lagTotal) : "—");

  setText("dl-window", duration(s.dead_letters.recent_window_s).replace(" 0s", ""));
  fill("dead-letters", s.dead_letters.classes.map((c) => row([
    cell(c.class),
    cell(count(c.recent), "dl-recent-" + c.class, "num"),
    cell(count(c.total), "dl-total-" + c.class, "num"),
    cell(c.last_seen_s_ago === null ? "—" : duration(c.last_seen_s_ago) + " ago", null, "num"),
  ])), "none", 4);
}
async function refresh() {
  try {
    const response = await fetch("status.json", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    setText("updated", new Date().toLocaleTimeString());
    setText("conn", "live");
    $("conn").className = "";
  } catch (err) {
    setText("conn", "disconnected (" + err.message + ")");
    $("conn").className = "down";
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"##;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::BreakerConfig;

    #[test]
    fn throughput_is_averaged_over_the_sampled_window() {
        let board = StatusBoard::new("test");
        let start = board.started_at;
        assert_eq!(
            board.snapshot_at(start).throughput.consumed_per_s,
            None,
            "no rate before half a second"
        );
        for second in 1..=20u64 {
            board.consumed.fetch_add(100, Ordering::Relaxed);
            board.stored.fetch_add(50, Ordering::Relaxed);
            board.sample_at(start + Duration::from_secs(second));
        }
        let throughput = board
            .snapshot_at(start + Duration::from_secs(20))
            .throughput;
        assert_eq!(throughput.window_s, 10.0);
        assert_eq!(throughput.consumed_per_s, Some(100.0));
        assert_eq!(throughput.stored_per_s, Some(50.0));
        assert!(lock(&board.samples).len() <= 11, "samples are pruned");
    }

    #[test]
    fn recent_dead_letters_age_out_but_totals_stay() {
        let board = StatusBoard::new("test");
        let start = board.started_at;
        board.record_dead_letters_at("decode", 3, start);
        board.record_dead_letters_at("decode", 2, start + Duration::from_secs(10 * 60));
        board.record_dead_letters_at("schema", 1, start + Duration::from_secs(60));
        let at = |minutes: u64| board.snapshot_at(start + Duration::from_secs(minutes * 60));
        let classes = at(14).dead_letters.classes;
        assert_eq!(
            (
                classes[0].class.as_str(),
                classes[0].recent,
                classes[0].total
            ),
            ("decode", 5, 5)
        );
        let classes = at(16).dead_letters.classes;
        assert_eq!((classes[0].recent, classes[0].total), (2, 5));
        assert_eq!((classes[1].recent, classes[1].total), (0, 1));
        assert_eq!(at(16).totals.dead_lettered, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_needs_the_group_and_a_closed_database_breaker() {
        let board = StatusBoard::new("test");
        assert_eq!(
            board.readiness().missing,
            vec!["joined_group", "database_breaker_closed"]
        );
        board.set_joined(true);
        let config = BreakerConfig {
            consecutive_failures: 1,
            ..BreakerConfig::INGEST
        };
        let breaker = Arc::new(Breaker::new("postgres", config));
        board.register_breaker(Arc::new(Breaker::new("redis", config)));
        board.register_breaker(Arc::clone(&breaker));
        assert!(board.readiness().ready);
        let permit = breaker.try_acquire().expect("closed");
        breaker.record(permit, true);
        let readiness = board.readiness();
        assert_eq!(readiness.database_breaker, Some("open"));
        assert_eq!(readiness.missing, vec!["database_breaker_closed"]);
    }

    #[test]
    fn unknown_and_revoked_partitions() {
        let board = StatusBoard::new("test");
        board.set_partition_lag("t", 1, 7);
        board.set_partition_lag("t", 0, -1);
        let partitions = board.snapshot().partitions;
        assert_eq!(
            partitions
                .iter()
                .map(|p| (p.partition, p.lag))
                .collect::<Vec<_>>(),
            vec![(0, None), (1, Some(7))]
        );
        board.remove_partition("t", 0);
        board.remove_partition("t", 1);
        assert!(board.snapshot().partitions.is_empty());
    }
}
