//! The `/v1` handlers and the gate every database query passes: a semaphore bounding the
//! queries in flight per instance and the interactive circuit breaker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use super::auth::{Principal, RateLimiter, Scope as TokenScope, Tokens};
use super::cache::{QueryCache, Scope, Source};
use super::error::ApiError;
use super::guard::{self, CostLimits};
use super::metrics as m;
use super::query::{self, EventRow, PageQuery, ParseLimits};
use crate::breaker::{Breaker, State as BreakerState};
use crate::config::ServeConfig;
use crate::db::retry::{classify, Retry};

/// Bounds the database work of one instance: at most `permits` queries at once, callers wait
/// up to the queue timeout, and nothing reaches the database while its breaker is open.
pub struct DbGate {
    semaphore: Arc<Semaphore>,
    breaker: Arc<Breaker>,
    queue_timeout: Duration,
    num_queries: AtomicU64,
}

impl DbGate {
    /// `permits` concurrent queries behind `breaker`.
    pub fn new(permits: usize, breaker: Arc<Breaker>, queue_timeout: Duration) -> Self {
        DbGate {
            semaphore: Arc::new(Semaphore::new(permits)),
            breaker,
            queue_timeout,
            num_queries: AtomicU64::new(0),
        }
    }

    /// The breaker.
    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }

    /// Queries run so far (each plan check and run counts once).
    pub fn num_queries(&self) -> u64 {
        self.num_queries.load(Ordering::Relaxed)
    }

    /// Waits for a query slot: 503 at once while the breaker is open, 503 after the queue
    /// timeout when the instance is saturated.
    pub async fn permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if self.breaker.state() == BreakerState::Open {
            return Err(ApiError::unavailable(
                "database_unavailable",
                "the database is unavailable (circuit breaker open); retry later",
            ));
        }
        let acquire = Arc::clone(&self.semaphore).acquire_owned();
        match tokio::time::timeout(self.queue_timeout, acquire).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(ApiError::unavailable(
                "database_busy",
                "every query slot of this instance stayed busy (AUDITFLOW_SERVE_MAX_CONCURRENT_QUERIES); retry later",
            )),
        }
    }

    /// Runs `work` through the breaker: infrastructure failures count against it, refusals
    /// and timeouts of the query itself do not.
    pub async fn run<T, F>(&self, kind: &'static str, work: F) -> Result<T, ApiError>
    where
        F: std::future::Future<Output = Result<T, QueryError>>,
    {
        let Some(breaker_permit) = self.breaker.try_acquire() else {
            return Err(ApiError::unavailable(
                "database_unavailable",
                "the database is unavailable (circuit breaker open); retry later",
            ));
        };
        self.num_queries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::DB_QUERIES, "kind" => kind).increment(1);
        let started = Instant::now();
        let result = work.await;
        metrics::histogram!(m::QUERY_DURATION, "kind" => kind)
            .record(started.elapsed().as_secs_f64());
        let failed =
            matches!(&result, Err(QueryError::Database(err)) if classify(err) == Retry::Transient);
        self.breaker.record(breaker_permit, failed);
        result.map_err(|err| match err {
            QueryError::Database(err) => ApiError::from_database(&err),
            QueryError::Api(err) => err,
        })
    }
}

/// A failure inside a gated query.
#[derive(Debug)]
pub enum QueryError {
    /// The database failed (classified for the breaker).
    Database(sqlx::Error),
    /// The request was refused (cost guard) or answered otherwise.
    Api(ApiError),
}

impl From<sqlx::Error> for QueryError {
    fn from(err: sqlx::Error) -> Self {
        QueryError::Database(err)
    }
}

impl From<ApiError> for QueryError {
    fn from(err: ApiError) -> Self {
        QueryError::Api(err)
    }
}

/// Everything the handlers share.
pub struct ServeState {
    /// The read-only pool.
    pub pool: PgPool,
    /// `AUDITFLOW_DB_SCHEMA`.
    pub schema: String,
    /// The settings.
    pub config: ServeConfig,
    /// Tokens in force.
    pub tokens: Arc<Tokens>,
    /// Per-token rate limit.
    pub limiter: RateLimiter,
    /// The caches.
    pub cache: Arc<QueryCache>,
    /// The database gate.
    pub gate: DbGate,
}

impl ServeState {
    fn parse_limits(&self) -> ParseLimits {
        ParseLimits {
            max_span: self.config.max_span(),
            default_limit: self.config.serve_default_limit,
            max_limit: self.config.serve_max_limit,
        }
    }

    /// The limits of page queries and lookups.
    pub fn page_limits(&self) -> CostLimits {
        CostLimits {
            max_cost: self.config.serve_max_cost,
            max_rows: self.config.serve_max_rows,
            seq_scan_max_rows: self.config.serve_seq_scan_max_rows,
        }
    }

    /// Authenticates and rate-limits a request.
    pub fn admit(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        let principal = self.tokens.authenticate(headers)?;
        self.limiter
            .check(&principal.id)
            .map_err(ApiError::rate_limited)?;
        Ok(principal)
    }
}

/// Shared state handle.
pub type AppState = Arc<ServeState>;

/// Runs a page query: plan check, then the query, on one pooled connection.
async fn load_rows(
    state: &ServeState,
    kind: &'static str,
    query: &PageQuery,
) -> Result<Vec<EventRow>, ApiError> {
    let _permit = state.gate.permit().await?;
    let sql = query.sql(&state.schema);
    let limits = state.page_limits();
    state
        .gate
        .run(kind, async {
            let mut conn = state.pool.acquire().await?;
            guard::check(&mut conn, &state.schema, &sql, &limits, "this query").await?;
            let rows = sqlx::query_as_with::<_, EventRow, _>(&sql.text, sql.arguments()?)
                .fetch_all(&mut *conn)
                .await?;
            Ok(rows)
        })
        .await
}

fn json_response(body: Bytes, source: Source) -> Response {
    metrics::counter!(m::RESPONSES, "source" => source.as_str()).increment(1);
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        Body::from(body),
    )
        .into_response();
    response.headers_mut().insert(
        "x-auditflow-cache",
        HeaderValue::from_static(source.as_str()),
    );
    response
}

fn forbid_unless(principal: &Principal, tenant: &str) -> Result<(), ApiError> {
    if principal.scope.allows(tenant) {
        Ok(())
    } else {
        Err(ApiError::forbidden())
    }
}

/// `GET /v1/events`.
pub async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    events_page(state, headers, params)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn events_page(
    state: AppState,
    headers: HeaderMap,
    params: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    let principal = state.admit(&headers)?;
    let query = query::parse_page(&params, &state.parse_limits())?;
    forbid_unless(&principal, &query.filters.tenant)?;
    let scope = Scope {
        tenant: query.filters.tenant.clone(),
        from: query.filters.from,
        to: query.filters.to,
    };
    let key = query.cache_key("page");
    let loader_state = Arc::clone(&state);
    let (body, source) = state
        .cache
        .get_or_load(key, scope, move || async move {
            let rows = load_rows(&loader_state, "page", &query).await?;
            Ok(Bytes::from(query::render_page(&rows, &query)))
        })
        .await?;
    Ok(json_response(body, source))
}

/// `GET /v1/events/{event_id}`: `tenant` and either `at` (its exact `occurred_at`) or a
/// `from`/`to` window within the span cap.
pub async fn event_by_id(
    State(state): State<AppState>,
    Path(event_id): Path<String>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    event_lookup(state, event_id, headers, params)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn event_lookup(
    state: AppState,
    event_id: String,
    headers: HeaderMap,
    mut params: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    let principal = state.admit(&headers)?;
    let event_id = Uuid::parse_str(&event_id)
        .map_err(|_| ApiError::bad_request(format!("{event_id:?} is not a UUID")))?;
    if let Some(index) = params.iter().position(|(name, _)| name == "at") {
        let (_, at) = params.remove(index);
        let at = query::parse_time("at", &at)?;
        params.retain(|(name, _)| name != "from" && name != "to");
        params.push(("from".into(), query::format_time(at)));
        params.push((
            "to".into(),
            query::format_time(at + chrono::Duration::microseconds(1)),
        ));
    } else if !params.iter().any(|(name, _)| name == "from") {
        return Err(ApiError::bad_request(
            "give the event's time as at=<occurred_at>, or a search window with from and to",
        ));
    }
    let mut filters = query::parse_filters(&params, &state.parse_limits(), &[])?;
    forbid_unless(&principal, &filters.tenant)?;
    filters.event_id = Some(event_id);
    let query = PageQuery {
        filters,
        order: query::Order::Desc,
        limit: 1,
        cursor: None,
    };
    let scope = Scope {
        tenant: query.filters.tenant.clone(),
        from: query.filters.from,
        to: query.filters.to,
    };
    let key = query.cache_key("event");
    let loader_state = Arc::clone(&state);
    let (body, source) = state
        .cache
        .get_or_load(key, scope, move || async move {
            let rows = load_rows(&loader_state, "event", &query).await?;
            let Some(row) = rows.first() else {
                return Err(ApiError::not_found(
                    "no event with this id in this tenant and time range",
                ));
            };
            let mut body = Vec::new();
            row.write_json(&mut body);
            body.shrink_to_fit();
            Ok(Bytes::from(body))
        })
        .await?;
    Ok(json_response(body, source))
}

/// `GET /v1/verify?from=&to=`: the hash-chain verification of a range. Needs a `*` token
/// (the chain spans every tenant).
pub async fn verify(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    verify_range(state, headers, params)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn verify_range(
    state: AppState,
    headers: HeaderMap,
    params: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    let principal = state.admit(&headers)?;
    if principal.scope != TokenScope::All {
        return Err(ApiError::forbidden());
    }
    let get = |name: &str| {
        params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
            .ok_or_else(|| ApiError::bad_request(format!("{name} is required")))
    };
    let from = query::parse_time("from", get("from")?)?;
    let to = query::parse_time("to", get("to")?)?;
    match super::verify::verify_range(&state.pool, &state.schema, from, to).await {
        super::verify::Verification::NoChain => Err(ApiError::not_found(
            "hash-chain verification is not available: this database has no hash chain (run \
             auditflow migrate); nothing was verified",
        )),
        super::verify::Verification::Report(report) => {
            let mut body = serde_json::to_value(&*report).map_err(|_| ApiError::internal())?;
            if let Some(object) = body.as_object_mut() {
                object.insert("intact".into(), report.is_intact().into());
            }
            Ok((StatusCode::OK, axum::Json(body)).into_response())
        }
        super::verify::Verification::Failed(err) => {
            tracing::warn!(error = %err, "hash-chain verification failed");
            Err(ApiError::unavailable(
                "database_unavailable",
                "the database failed during verification; try again",
            ))
        }
    }
}

/// `GET /readyz`: ready while the database breaker is not open.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let breaker = state.gate.breaker().state();
    let ready = breaker != BreakerState::Open;
    let body = serde_json::json!({
        "ready": ready,
        "database_breaker": breaker.as_str(),
        "cache_trusted": state.cache.trusted(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}
