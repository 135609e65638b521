//! What auditflow tells the outside while it runs: one HTTP server on `AUDITFLOW_METRICS_ADDR`.
//!
//! | path | for | answer |
//! |---|---|---|
//! | `/metrics` | Prometheus | the exposition text of every `auditflow_*` metric |
//! | `/healthz` | liveness probes | `200 ok` while the process serves requests |
//! | `/readyz` | readiness probes | `200` once the consumer joined its group, the `postgres` breaker is closed and the schema registry (if one is configured) answers and accepts auditflow, else `503`; a JSON body says which is missing |
//! | `/status` | a person | a self-contained HTML page polling `/status.json` every second |
//! | `/status.json` | scripts, the page | totals, throughput, lag per partition, breakers, recent dead-letter classes, pool, schema registry |
//!
//! The sink reports into a [`StatusBoard`]: the page's numbers and the Prometheus counters come
//! from the same calls ([`StatusBoard::add_stored`] increments both), so they always agree.
//! Updates are atomics or a short uncontended lock, never an await, so the hot path may call
//! them per message.
//!
//! `board` holds the live state; this module serves it. The page is `status.html`, next to
//! this file, compiled into the binary. Owns the metrics recorder and the HTTP listener; reads
//! what others report and never calls into the pipeline.

mod board;
pub mod http;

pub use board::{
    is_database_dependency, BreakerStatus, DeadLetterClass, DeadLetters, PartitionLag, Pool,
    Readiness, SchemaRegistryStatus, StatusBoard, StatusSnapshot, Throughput, Totals,
    DATABASE_DEPENDENCY, DATABASE_STREAM_DEPENDENCY_PREFIX, RECENT_DEAD_LETTERS, THROUGHPUT_WINDOW,
};

use board::{
    CONSUMED_METRIC, DEAD_LETTERED_METRIC, DUPLICATES_METRIC, LAG_METRIC, POOL_METRIC,
    REGISTRY_PAUSED_METRIC, STORED_METRIC,
};
use http::HttpLimits;

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::extract::State as AxumState;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Json, Redirect, Response};
use axum::routing::get;
use axum::Router;
use metrics::Unit;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often the server samples counters (throughput) and the pool.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// How often the Prometheus recorder's upkeep runs (it drains histogram samples).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static RECORDER: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Installs the process-wide Prometheus recorder (with [`crate::telemetry::prometheus_builder`]'s
/// buckets) and describes every metric, once; later calls return the same handle. Fails if
/// another recorder was installed first.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let mut installed = RECORDER.lock();
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
    describe_counter!(
        "auditflow_schema_registry_lookups_total",
        Unit::Count,
        "confluent schema ids looked up in the schema registry cache (one per message)"
    );
    describe_counter!(
        "auditflow_schema_registry_cache_hits_total",
        Unit::Count,
        "lookups the cache answered without asking the registry"
    );
    describe_counter!(
        "auditflow_schema_registry_requests_total",
        Unit::Count,
        "http requests sent to the schema registry"
    );
    describe_counter!(
        "auditflow_schema_registry_fetch_errors_total",
        Unit::Count,
        "schema fetches that failed, by kind (not_found, unusable, unreachable, timeout, server_error, request_timeout, throttled, unauthorized, unexpected_response, breaker_open)"
    );
    describe_counter!(
        "auditflow_schema_registry_cache_evictions_total",
        Unit::Count,
        "compiled writer schemas dropped because the cache was full"
    );
    describe_gauge!(
        "auditflow_schema_registry_cached_ids",
        Unit::Count,
        "writer schemas fetched from the registry and kept"
    );
    describe_gauge!(
        "auditflow_schema_registry_state",
        "schema registry state: 0 ok, 1 unavailable, 2 unauthorized, 3 misconfigured"
    );
    describe_gauge!(
        REGISTRY_PAUSED_METRIC,
        "1 while consumption is paused because of the schema registry, else 0"
    );
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
    spawn_with_limits(addr, board, handle, HttpLimits::default(), shutdown).await
}

/// Like [`spawn`], with the HTTP server's bounds given.
pub async fn spawn_with_limits(
    addr: SocketAddr,
    board: Arc<StatusBoard>,
    handle: PrometheusHandle,
    limits: HttpLimits,
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
    let app = http::harden(router(board, handle), &limits);
    let task = tokio::spawn(async move {
        let served = http::serve(listener, app, limits, shutdown)
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
        .route("/status.js", get(status_script))
        .route("/status.css", get(status_style))
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

/// The page may load its own script and style and call `/status.json`, nothing else; it cannot
/// be framed.
const STATUS_PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

async fn status_page() -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, STATUS_PAGE_POLICY),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(STATUS_PAGE),
    )
        .into_response()
}

async fn status_script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        STATUS_SCRIPT,
    )
        .into_response()
}

async fn status_style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STATUS_STYLE,
    )
        .into_response()
}

/// The `/status` page. Self-contained (no external assets: it must work on an isolated
/// network). Values arrive only through `/status.json`, and every one of them is written with
/// `textContent`, never as HTML, since topic and class names come from outside. Each value has
/// an id (`total-stored`, `lag-<topic>-<partition>`, `breaker-<dependency>`,
/// `dl-recent-<class>`, `dl-total-<class>`, ...) for tests and scripts.
const STATUS_PAGE: &str = include_str!("status.html");

/// The page's script (`/status.js`).
const STATUS_SCRIPT: &str = include_str!("status.js");

/// The page's style (`/status.css`).
const STATUS_STYLE: &str = include_str!("status.css");
