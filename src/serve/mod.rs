//! `auditflow serve`: the read side. A query API over the audit table, whose caches are never
//! stale for long and never stampede the database.
//!
//! ```text
//!  client ─▶ auth (tokens, tenant scope) ─▶ rate limit ─▶ L1 ─▶ L2 (Redis) ─▶ coalesced load
//!                                                                               │
//!                           gate: semaphore + breaker ─▶ EXPLAIN (cost guard) ─▶ query
//!  sink ─▶ Redis pub/sub ─▶ invalidate (gaps, epochs, reconciliation) ─▶ invalidation log
//! ```
//!
//! - [`api`]: the `/v1` handlers and the database gate; [`export`]: streamed exports;
//!   [`verify`]: the hash-chain check (a thin call until the chain exists).
//! - [`query`]: parameters to SQL, cursors, rows to JSON and CSV; [`guard`]: the cost guard.
//! - [`cache`]: L1, L2, coalescing and the invalidation log; [`invalidate`]: the subscriber and
//!   the reconciliation against the committed-batch log.
//! - [`auth`]: tokens and rate limits. The viewer page is `viewer.html` and `viewer.js` next to
//!   this file.
//!
//! Uses `config`, `db`, `observe`, `breaker` and `redis_client`; never anything of `ingest`.
//! Runs only SELECT and EXPLAIN, on sessions that are read-only by default: it never migrates.

pub mod api;
pub mod auth;
pub mod cache;
pub mod error;
pub mod export;
pub mod guard;
pub mod invalidate;
pub mod metrics;
pub mod query;
pub mod verify;

use std::net::SocketAddr;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::breaker::Breaker;
use crate::config::{Config, ConfigError};
use api::{AppState, DbGate, ServeState};
use auth::{RateLimiter, Tokens};
use cache::{CacheSettings, QueryCache, L2};

/// The viewer page.
const VIEWER_HTML: &str = include_str!("viewer.html");
/// The viewer's script (served separately, so the page's CSP needs no inline script).
const VIEWER_JS: &str = include_str!("viewer.js");

/// Opens the read pool: sessions read-only by default, `statement_timeout` set, custom plans
/// (so the plan the cost guard checks is pruned to the requested partitions), times in UTC.
pub async fn connect(url: &str, schema: &str, config: &Config) -> Result<PgPool, sqlx::Error> {
    let serve = &config.serve;
    let options = PgConnectOptions::from_str(url)?
        .application_name("auditflow-serve")
        .options([
            ("search_path", schema.to_owned()),
            (
                "statement_timeout",
                serve.serve_statement_timeout_ms.to_string(),
            ),
            ("plan_cache_mode", "force_custom_plan".to_owned()),
            ("default_transaction_read_only", "on".to_owned()),
            ("TimeZone", "UTC".to_owned()),
        ]);
    Ok(PgPoolOptions::new()
        .max_connections(serve.serve_max_concurrent_queries + 2)
        .min_connections(0)
        .acquire_timeout(serve.queue_timeout().max(Duration::from_secs(1)))
        .connect_lazy_with(options))
}

/// A built serve instance, listening.
pub struct Serve {
    state: AppState,
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    subscriber: invalidate::SubscriberSettings,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl Serve {
    /// Validates the exposure rule, reads the tokens, opens the pool and binds the address.
    /// Configuration faults come back as [`ConfigError`] (exit code 2).
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let addr = config.serve.check_exposure()?;
        let url = config.require_database_url()?;
        let tokens = match &config.serve.serve_tokens_file {
            Some(path) => Tokens::load(path).map_err(|err| ConfigError::new(err.to_string()))?,
            None => Tokens::open(),
        };
        let schema = config.database.db_schema.clone();
        let pool = connect(url.expose(), &schema, config)
            .await
            .context("opening the serve database pool")?;
        let redis = crate::redis_client::open(
            config.redis.redis_url.expose(),
            config.redis.redis_ca_file.as_deref(),
        )
        .context("AUDITFLOW_REDIS_URL")?;
        let serve = &config.serve;
        let l2 = serve.serve_l2_cache.then(|| {
            L2::new(
                redis.clone(),
                Arc::new(Breaker::new("redis", config.breakers.interactive())),
                &schema,
                serve.cache_ttl(),
            )
        });
        let cache = Arc::new(QueryCache::new(
            &CacheSettings {
                max_bytes: serve.serve_cache_bytes,
                ttl: serve.cache_ttl(),
                reconcile_interval: serve.reconcile_interval(),
            },
            l2,
        ));
        let gate = DbGate::new(
            serve.serve_max_concurrent_queries as usize,
            Arc::new(Breaker::new("postgres", config.breakers.interactive())),
            serve.queue_timeout(),
        );
        let prometheus = crate::observe::install_recorder().ok();
        metrics::describe();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding AUDITFLOW_SERVE_ADDR {addr}"))?;
        let local_addr = listener.local_addr()?;
        let subscriber = invalidate::SubscriberSettings {
            client: redis,
            channel: config.redis.invalidation_channel.clone(),
            schema: schema.clone(),
            reconcile_interval: serve.reconcile_interval(),
            window: serve.cache_ttl()
                + serve.reconcile_interval() * 2
                + Duration::from_millis(cache::CLOCK_SKEW_MS as u64)
                + Duration::from_secs(60),
        };
        let state = Arc::new(ServeState {
            pool,
            schema,
            limiter: RateLimiter::new(serve.serve_rate_limit, serve.serve_rate_burst),
            config: config.serve.clone(),
            tokens: Arc::new(tokens),
            cache,
            gate,
        });
        Ok(Serve {
            state,
            listener,
            local_addr,
            subscriber,
            prometheus,
        })
    }

    /// The bound address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The shared state (tests read the cache and the gate's counters).
    pub fn state(&self) -> AppState {
        Arc::clone(&self.state)
    }

    /// Serves until `shutdown`: the API, the invalidation subscriber and reconciliation, token
    /// reloads on SIGHUP, and cache housekeeping.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Serve {
            state,
            listener,
            local_addr,
            subscriber,
            prometheus,
        } = self;
        tracing::info!(
            addr = %local_addr,
            tokens_required = state.tokens.required(),
            "serving the audit query api"
        );
        let tasks_shutdown = shutdown.child_token();
        let subscriber_task = tokio::spawn(invalidate::run(
            Arc::clone(&state.cache),
            state.pool.clone(),
            subscriber,
            tasks_shutdown.clone(),
        ));
        let reload_task = auth::reload_on_sighup(Arc::clone(&state.tokens), tasks_shutdown.clone());
        let housekeeping = {
            let cache = Arc::clone(&state.cache);
            let shutdown = tasks_shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tick.tick() => cache.maintain().await,
                    }
                }
            })
        };
        let app = router(state, prometheus);
        // Small answers must not wait for Nagle's algorithm and the client's delayed ACK.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(error = %err, "cannot set TCP_NODELAY");
            }
        });
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .context("serving the query api");
        tasks_shutdown.cancel();
        let _ = subscriber_task.await;
        let _ = reload_task.await;
        let _ = housekeeping.await;
        served
    }
}

/// The routes.
pub fn router(
    state: AppState,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Router {
    Router::new()
        .route("/", get(viewer_page))
        .route("/viewer.js", get(viewer_script))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(api::readyz))
        .route(
            "/metrics",
            get(move || {
                let prometheus = prometheus.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        prometheus.map(|handle| handle.render()).unwrap_or_default(),
                    )
                }
            }),
        )
        .route("/v1/events", get(api::events))
        .route("/v1/events/{event_id}", get(api::event_by_id))
        .route("/v1/export", get(export::export))
        .route("/v1/verify", get(api::verify))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

async fn viewer_page() -> Response {
    let mut response = Html(VIEWER_HTML).into_response();
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    response
}

async fn viewer_script() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/javascript; charset=utf-8"),
        )],
        VIEWER_JS,
    )
        .into_response()
}

/// Headers on every answer: no sniffing, no framing, no referrer, and audit data is never
/// stored by browsers or proxies.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}
