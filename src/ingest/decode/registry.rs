//! The client of a Confluent-compatible schema registry (Confluent Schema Registry, Karapace,
//! Apicurio's `/apis/ccompat/v7`, Redpanda): `GET /schemas/ids/{id}` for the sink, the subject
//! endpoints for `auditflow schemas check`, and registration for `auditflow produce`.
//!
//! One [`SchemaRegistry`] per process. Requests go to the configured base URLs in turn, starting
//! with the one that answered last; only a failure that says the registry is unavailable moves on
//! to the next. Every request carries the configured credentials (basic auth or a bearer token,
//! marked sensitive so they are never logged) and goes through the `schema_registry` circuit
//! breaker, so an unavailable registry is not hammered.
//!
//! At most one `GET /schemas/ids/{id}` per id is in flight: callers asking for the same id while
//! it is being fetched wait for that fetch and share its answer. Answers are not cached here;
//! [`SchemaRegistry::settle`] keeps the final ones in the [`RegistryCache`] the decoder reads.
//!
//! Failure semantics ([`Disposition`]):
//!
//! | answer | disposition | the records |
//! |---|---|---|
//! | 200, an Avro schema | - | compiled once; stored, or dead-lettered (`schema`) if it cannot be resolved into the reader schema |
//! | 200, not Avro (or with references) | permanent | dead-lettered, class `schema` |
//! | 404 with error code 40403 | permanent, remembered for the not-found TTL | dead-lettered, class `schema` |
//! | unreachable, timeout, 5xx, 408, 429, breaker open | transient | held; the consumer pauses; retried with jittered backoff |
//! | 401, 403 | configuration | held; paused; logged at error level once per [`FAULT_LOG_INTERVAL`]; `/readyz` not ready |
//! | anything else (a 404 without 40403, an unparsable body, a redirect) | configuration | as 401: the URL does not point at a registry's API |
//!
//! Never logs, returns or shows a credential: base URLs carry none (configuration refuses
//! them), and errors are built from status codes, the registry's own `message` and transport
//! errors.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use parking_lot::Mutex;
use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use tokio::sync::{watch, OnceCell, Semaphore};
use tokio_util::sync::CancellationToken;

use super::cache::{Known, RegistryCache};
use crate::breaker::{Breaker, BreakerConfig, BreakerError};
use crate::config::{RegistryConfig, Secret};
use crate::observe::{SchemaRegistryStatus, StatusBoard};

/// The breaker's dependency name, on `/status` and in `auditflow_breaker_*{dependency}`.
pub const DEPENDENCY: &str = "schema_registry";

/// How often a continuing failure is logged again (warn when unavailable, error when the
/// credentials or the URL are wrong).
pub const FAULT_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Schema fetches in flight at most (different ids); more wait for a slot.
pub const MAX_CONCURRENT_FETCHES: usize = 4;

/// The largest response body read; a schema is a few kilobytes.
const MAX_BODY_BYTES: usize = 4 << 20;

/// The media type the Confluent API speaks.
const REGISTRY_MEDIA_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Confluent's error code for "schema not found" (with HTTP 404).
pub const SCHEMA_NOT_FOUND: i64 = 40403;
/// Confluent's error code for "subject not found" (with HTTP 404).
pub const SUBJECT_NOT_FOUND: i64 = 40401;

/// Why the client could not be built; names the variable to fix.
#[derive(Debug, thiserror::Error)]
pub enum RegistryBuildError {
    /// No URL to ask.
    #[error("{0} lists no URL")]
    NoUrl(&'static str),
    /// A TLS file cannot be read or parsed.
    #[error("{variable}: {reason}")]
    Tls {
        /// The variable naming the file.
        variable: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client refused the settings.
    #[error("cannot build the schema registry client: {0}")]
    Client(String),
}

/// What a failure means for the records waiting on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The registry's final answer about this id: dead-letter the records (class `schema`).
    Permanent,
    /// The registry is unavailable: hold the records, pause, retry with backoff.
    Transient,
    /// auditflow is misconfigured (credentials, URL): hold, pause, report, retry slowly.
    Configuration,
}

/// How a registry request failed. `Clone`, because one fetch's answer goes to every caller
/// waiting for the same id.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// `GET /schemas/ids/{id}` answered 404 with error code 40403.
    #[error("schema id {0} is not registered (404, error code 40403)")]
    SchemaNotFound(u32),
    /// The subject has no versions (404, error code 40401).
    #[error("subject {0} is not registered (404, error code 40401)")]
    SubjectNotFound(String),
    /// 401 or 403: the credentials are missing, wrong or lack the permission.
    #[error("schema registry at {url} refused the request: HTTP {status} (check AUDITFLOW_SCHEMA_REGISTRY_USERNAME/_PASSWORD or _BEARER_TOKEN)")]
    Unauthorized {
        /// The base URL asked.
        url: String,
        /// 401 or 403.
        status: u16,
    },
    /// Unreachable, timed out, 5xx, 408 or 429, at every URL.
    #[error("schema registry at {url} is unavailable ({kind}): {detail}")]
    Unavailable {
        /// The base URL asked last.
        url: String,
        /// `unreachable`, `timeout`, `server_error`, `request_timeout` or `throttled`.
        kind: &'static str,
        /// The transport error or the status.
        detail: String,
    },
    /// The `schema_registry` breaker is open: nothing was asked.
    #[error("schema registry circuit breaker is open")]
    BreakerOpen,
    /// An answer that is not the Confluent API's (a 404 without its error code, a redirect, a
    /// body that is not its JSON): most likely a URL that does not point at the registry's API.
    #[error("unexpected answer from the schema registry at {url}: {detail}")]
    Unexpected {
        /// The base URL asked.
        url: String,
        /// What was unexpected.
        detail: String,
    },
    /// The registry refused a registration (409 incompatible, 422 invalid schema, ...).
    #[error("schema registry at {url} refused: HTTP {status}, error code {error_code}: {message}")]
    Refused {
        /// The base URL asked.
        url: String,
        /// The status.
        status: u16,
        /// The registry's error code (0 when it gave none).
        error_code: i64,
        /// The registry's message.
        message: String,
    },
}

impl RegistryError {
    /// What the failure means for waiting records: matches the variant, never the text.
    pub fn disposition(&self) -> Disposition {
        match self {
            RegistryError::SchemaNotFound(_)
            | RegistryError::SubjectNotFound(_)
            | RegistryError::Refused { .. } => Disposition::Permanent,
            RegistryError::Unavailable { .. } | RegistryError::BreakerOpen => {
                Disposition::Transient
            }
            RegistryError::Unauthorized { .. } | RegistryError::Unexpected { .. } => {
                Disposition::Configuration
            }
        }
    }

    /// The `kind` label of `auditflow_schema_registry_fetch_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            RegistryError::SchemaNotFound(_) | RegistryError::SubjectNotFound(_) => "not_found",
            RegistryError::Unauthorized { .. } => "unauthorized",
            RegistryError::Unavailable { kind, .. } => kind,
            RegistryError::BreakerOpen => "breaker_open",
            RegistryError::Unexpected { .. } => "unexpected_response",
            RegistryError::Refused { .. } => "refused",
        }
    }
}

/// The registry as the sink last found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryState {
    /// It answered (or has not been needed yet).
    Ok,
    /// Unreachable, timing out, 5xx, 408, 429: records wait, consumption is paused.
    Unavailable,
    /// 401 or 403: records wait, consumption is paused, `/readyz` is not ready.
    Unauthorized,
    /// Answers that are not the registry API's: as unauthorized.
    Misconfigured,
}

impl RegistryState {
    /// The name on `/status` and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RegistryState::Ok => "ok",
            RegistryState::Unavailable => "unavailable",
            RegistryState::Unauthorized => "unauthorized",
            RegistryState::Misconfigured => "misconfigured",
        }
    }

    fn gauge(self) -> f64 {
        match self {
            RegistryState::Ok => 0.0,
            RegistryState::Unavailable => 1.0,
            RegistryState::Unauthorized => 2.0,
            RegistryState::Misconfigured => 3.0,
        }
    }
}

/// The registry's state and the last error that set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryHealth {
    /// The state.
    pub state: RegistryState,
    /// The error behind a state other than `Ok` (credential-free).
    pub last_error: Option<String>,
}

/// What `GET /schemas/ids/{id}` returned.
#[derive(Debug, Clone, Deserialize)]
pub struct RegistrySchema {
    /// The schema text.
    pub schema: String,
    /// `AVRO` (also when absent), `PROTOBUF` or `JSON`.
    #[serde(rename = "schemaType", default)]
    pub schema_type: Option<String>,
    /// Named types defined in other subjects.
    #[serde(default)]
    pub references: Vec<serde_json::Value>,
}

impl RegistrySchema {
    /// Why auditflow cannot use this schema whatever it says, if it cannot.
    pub fn unsupported(&self) -> Option<String> {
        match self.schema_type.as_deref() {
            None | Some("AVRO") => {}
            Some(other) => return Some(format!("it is a {other} schema; auditflow reads Avro")),
        }
        (!self.references.is_empty()).then(|| {
            "it uses schema references, which auditflow does not resolve; register it self-contained"
                .to_owned()
        })
    }
}

/// One version of a subject (`GET /subjects/{subject}/versions/{version}`).
#[derive(Debug, Clone, Deserialize)]
pub struct SubjectVersion {
    /// The subject.
    pub subject: String,
    /// The version within the subject.
    pub version: u32,
    /// The global schema id.
    pub id: u32,
    /// The schema text.
    pub schema: String,
    /// `AVRO` (also when absent), `PROTOBUF` or `JSON`.
    #[serde(rename = "schemaType", default)]
    pub schema_type: Option<String>,
    /// Named types defined in other subjects.
    #[serde(default)]
    pub references: Vec<serde_json::Value>,
}

impl SubjectVersion {
    /// The part that matters for reading it.
    pub fn as_schema(&self) -> RegistrySchema {
        RegistrySchema {
            schema: self.schema.clone(),
            schema_type: self.schema_type.clone(),
            references: self.references.clone(),
        }
    }
}

enum Auth {
    None,
    Basic { username: String, password: Secret },
    Bearer(Secret),
}

type Shared = Arc<OnceCell<Result<RegistrySchema, RegistryError>>>;

/// A Confluent-compatible schema registry.
pub struct SchemaRegistry {
    http: reqwest::Client,
    urls: Vec<String>,
    /// The URL that answered last: tried first.
    preferred: AtomicUsize,
    auth: Auth,
    breaker: Arc<Breaker>,
    in_flight: Mutex<HashMap<u32, Shared>>,
    fetch_slots: Semaphore,
    health: watch::Sender<RegistryHealth>,
    board: Option<Arc<StatusBoard>>,
    num_requests: AtomicU64,
    unavailable_log: LogEvery,
    fault_log: LogEvery,
}

impl fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The client config and the credentials stay out.
        f.debug_struct("SchemaRegistry")
            .field("urls", &self.urls)
            .finish_non_exhaustive()
    }
}

impl SchemaRegistry {
    /// A client for `AUDITFLOW_SCHEMA_REGISTRY_URL` with the section's credentials and TLS.
    pub fn new(
        config: &RegistryConfig,
        breaker: BreakerConfig,
    ) -> Result<Self, RegistryBuildError> {
        Self::with_urls(config, config.urls(), breaker)
    }

    /// A client for `urls` (e.g. `produce --schema-registry`) with the section's credentials and
    /// TLS.
    pub fn with_urls(
        config: &RegistryConfig,
        urls: Vec<String>,
        breaker: BreakerConfig,
    ) -> Result<Self, RegistryBuildError> {
        if urls.is_empty() {
            return Err(RegistryBuildError::NoUrl("AUDITFLOW_SCHEMA_REGISTRY_URL"));
        }
        let mut builder = reqwest::Client::builder()
            .tls_backend_native()
            .timeout(config.timeout())
            .connect_timeout(config.timeout())
            // A redirect is not part of the API, and must not carry the credentials elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("auditflow/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &config.schema_registry_ca_file {
            let variable = "AUDITFLOW_SCHEMA_REGISTRY_CA_FILE";
            let pem = read_file(variable, path)?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|err| tls_error(variable, format!("not PEM certificates: {err}")))?;
            if certificates.is_empty() {
                return Err(tls_error(variable, "holds no PEM certificate".into()));
            }
            builder = builder.tls_certs_merge(certificates);
        }
        if let (Some(cert_path), Some(key_path)) = (
            &config.schema_registry_cert_file,
            &config.schema_registry_key_file,
        ) {
            let cert = read_file("AUDITFLOW_SCHEMA_REGISTRY_CERT_FILE", cert_path)?;
            let key = pkcs8_pem(&read_file("AUDITFLOW_SCHEMA_REGISTRY_KEY_FILE", key_path)?)?;
            let identity = reqwest::Identity::from_pkcs8_pem(&cert, &key).map_err(|err| {
                tls_error(
                    "AUDITFLOW_SCHEMA_REGISTRY_CERT_FILE",
                    format!("not a PEM certificate matching the key: {err}"),
                )
            })?;
            builder = builder.identity(identity);
        }
        let http = builder
            .build()
            .map_err(|err| RegistryBuildError::Client(error_chain(&err)))?;
        let auth = match (
            &config.schema_registry_username,
            &config.schema_registry_password,
            &config.schema_registry_bearer_token,
        ) {
            (Some(username), Some(password), _) => Auth::Basic {
                username: username.clone(),
                password: password.clone(),
            },
            (_, _, Some(token)) => Auth::Bearer(token.clone()),
            _ => Auth::None,
        };
        metrics::gauge!("auditflow_schema_registry_state").set(RegistryState::Ok.gauge());
        Ok(SchemaRegistry {
            http,
            urls,
            preferred: AtomicUsize::new(0),
            auth,
            breaker: Arc::new(Breaker::new(DEPENDENCY, breaker)),
            in_flight: Mutex::new(HashMap::new()),
            fetch_slots: Semaphore::new(MAX_CONCURRENT_FETCHES),
            health: watch::Sender::new(RegistryHealth {
                state: RegistryState::Ok,
                last_error: None,
            }),
            board: None,
            num_requests: AtomicU64::new(0),
            unavailable_log: LogEvery::new(FAULT_LOG_INTERVAL),
            fault_log: LogEvery::new(FAULT_LOG_INTERVAL),
        })
    }

    /// Reports the registry's state, cache size and paused flag on `board` (`/status`,
    /// `/readyz`), and shows its breaker there.
    pub fn with_board(mut self, board: Arc<StatusBoard>) -> Self {
        board.register_breaker(Arc::clone(&self.breaker));
        self.board = Some(board);
        self
    }

    /// The base URLs, in the order configured.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The `schema_registry` circuit breaker.
    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }

    /// Follows the registry's state (the sink pauses while it is not `Ok`).
    pub fn subscribe(&self) -> watch::Receiver<RegistryHealth> {
        self.health.subscribe()
    }

    /// The state now.
    pub fn health(&self) -> RegistryHealth {
        self.health.borrow().clone()
    }

    /// HTTP requests sent so far (each URL tried counts).
    pub fn num_requests(&self) -> u64 {
        self.num_requests.load(Ordering::Relaxed)
    }

    /// `GET /schemas/ids/{id}`. Concurrent calls for one id share one request.
    pub async fn schema_by_id(&self, id: u32) -> Result<RegistrySchema, RegistryError> {
        let cell = Arc::clone(self.in_flight.lock().entry(id).or_default());
        let result = cell
            .get_or_init(|| async {
                // Different ids share a few slots; the same id shares the cell above.
                let _slot = self.fetch_slots.acquire().await;
                self.fetch_schema(id).await
            })
            .await
            .clone();
        let mut in_flight = self.in_flight.lock();
        if in_flight
            .get(&id)
            .is_some_and(|current| Arc::ptr_eq(current, &cell))
        {
            // Failures are not kept: the next caller asks again.
            in_flight.remove(&id);
        }
        result
    }

    async fn fetch_schema(&self, id: u32) -> Result<RegistrySchema, RegistryError> {
        let path = format!("/schemas/ids/{id}");
        let (url, body) = self
            .call(Method::GET, &path, None)
            .await
            .map_err(|err| match err {
                Failure::Status {
                    status: StatusCode::NOT_FOUND,
                    error_code: Some(SCHEMA_NOT_FOUND),
                    ..
                } => RegistryError::SchemaNotFound(id),
                // Only "schema not found" is a verdict on the id; any other refusal of a plain
                // GET says something about auditflow's set-up, not about the records.
                Failure::Status {
                    url,
                    status,
                    error_code,
                    message,
                } => RegistryError::Unexpected {
                    url,
                    detail: format!(
                        "HTTP {status} (error code {}) for schema id {id}: {message}",
                        error_code.map_or_else(|| "none".to_owned(), |code| code.to_string())
                    ),
                },
                other => other.into_error(),
            })?;
        parse_json(&url, &body)
    }

    /// `GET /subjects/{subject}/versions`: the subject's versions, ascending.
    pub async fn subject_versions(&self, subject: &str) -> Result<Vec<u32>, RegistryError> {
        let path = format!("/subjects/{}/versions", encode_path_segment(subject));
        let (url, body) = self
            .call(Method::GET, &path, None)
            .await
            .map_err(|err| subject_error(err, subject))?;
        let mut versions: Vec<u32> = parse_json(&url, &body)?;
        versions.sort_unstable();
        Ok(versions)
    }

    /// `GET /subjects/{subject}/versions/{version}`.
    pub async fn subject_version(
        &self,
        subject: &str,
        version: u32,
    ) -> Result<SubjectVersion, RegistryError> {
        let path = format!(
            "/subjects/{}/versions/{version}",
            encode_path_segment(subject)
        );
        let (url, body) = self
            .call(Method::GET, &path, None)
            .await
            .map_err(|err| subject_error(err, subject))?;
        parse_json(&url, &body)
    }

    /// `POST /subjects/{subject}/versions`: registers an Avro schema (or finds it registered)
    /// and returns its global id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        #[derive(Deserialize)]
        struct Registered {
            id: u32,
        }
        let path = format!("/subjects/{}/versions", encode_path_segment(subject));
        let body = serde_json::json!({ "schema": schema, "schemaType": "AVRO" }).to_string();
        let (url, answer) = self
            .call(Method::POST, &path, Some(body))
            .await
            .map_err(Failure::into_error)?;
        let registered: Registered = parse_json(&url, &answer)?;
        Ok(registered.id)
    }

    /// Asks for `id` until the registry gives a final answer, and keeps it in `cache`: the
    /// compiled schema, the reason it cannot be used, or a 404 for the not-found TTL. Transient
    /// failures and configuration faults are retried with jittered backoff (100 ms doubling to
    /// 5 s) while the registry's state says why. Returns what `cache` then knows, or `None` when
    /// `cancel` fired first.
    pub async fn settle(
        &self,
        id: u32,
        cache: &RegistryCache,
        cancel: &CancellationToken,
    ) -> Option<Known> {
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            let known = cache.known(id);
            if known != Known::Unknown {
                return Some(known);
            }
            let result = tokio::select! {
                biased;
                _ = cancel.cancelled() => return None,
                result = self.schema_by_id(id) => result,
            };
            let error = match result {
                Ok(fetched) => {
                    self.answered();
                    let verdict = match fetched.unsupported() {
                        Some(reason) => {
                            cache.install_unusable(id, &reason);
                            Err(reason)
                        }
                        None => cache.install(id, &fetched.schema),
                    };
                    if let Err(reason) = verdict {
                        metrics::counter!("auditflow_schema_registry_fetch_errors_total", "kind" => "unusable")
                            .increment(1);
                        tracing::warn!(
                            schema_id = id, reason = %reason,
                            "registry schema cannot be read with the reader schema; its records are dead-lettered"
                        );
                    }
                    self.publish(Some(cache));
                    return Some(cache.known(id));
                }
                Err(err) => err,
            };
            metrics::counter!("auditflow_schema_registry_fetch_errors_total", "kind" => error.kind())
                .increment(1);
            match error.disposition() {
                Disposition::Permanent => {
                    self.answered();
                    tracing::debug!(
                        schema_id = id,
                        "schema id not registered; its records are dead-lettered"
                    );
                    cache.remember_not_found(id);
                    self.publish(Some(cache));
                    return Some(cache.known(id));
                }
                Disposition::Transient => self.failed(RegistryState::Unavailable, &error, id),
                Disposition::Configuration => {
                    let state = match error {
                        RegistryError::Unauthorized { .. } => RegistryState::Unauthorized,
                        _ => RegistryState::Misconfigured,
                    };
                    self.failed(state, &error, id);
                }
            }
            self.publish(Some(cache));
            let delay = delays.next().unwrap_or(Duration::from_secs(5));
            let wait = delay.max(self.breaker.retry_after());
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Publishes the state and cache size to the board and the gauges every `every` until
    /// `shutdown` (the cache also changes on its own: evictions, expired 404s).
    pub async fn report_until(
        &self,
        cache: &RegistryCache,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.publish(Some(cache)),
            }
        }
    }

    /// Sends the state, the cache's size and its counters to the board and the metrics.
    pub fn publish(&self, cache: Option<&RegistryCache>) {
        let health = self.health();
        if let Some(cache) = cache {
            metrics::gauge!("auditflow_schema_registry_cached_ids").set(cache.num_cached() as f64);
            metrics::counter!("auditflow_schema_registry_lookups_total")
                .absolute(cache.num_lookups());
            metrics::counter!("auditflow_schema_registry_cache_hits_total")
                .absolute(cache.num_lookups().saturating_sub(cache.num_misses()));
        }
        let Some(board) = &self.board else {
            return;
        };
        board.set_schema_registry(SchemaRegistryStatus {
            state: health.state.as_str(),
            urls: self.urls.clone(),
            cached_ids: cache.map_or(0, RegistryCache::num_cached),
            cache_capacity: cache.map_or(0, RegistryCache::capacity),
            not_found_ids: cache.map_or(0, RegistryCache::num_not_found),
            last_error: health.last_error,
            paused: board.schema_registry().is_some_and(|status| status.paused),
        });
    }

    /// The registry gave an answer: it is reachable and accepts us.
    fn answered(&self) {
        let was = self.health.borrow().state;
        if was != RegistryState::Ok {
            tracing::info!(previous = was.as_str(), "schema registry answers again");
            self.unavailable_log.reset();
            self.fault_log.reset();
            self.set_health(RegistryState::Ok, None);
        }
    }

    fn failed(&self, state: RegistryState, error: &RegistryError, id: u32) {
        match state {
            RegistryState::Unavailable => {
                if self.unavailable_log.ready() {
                    tracing::warn!(
                        error = %error, schema_id = id,
                        "schema registry unavailable; pausing consumption and retrying, nothing is dead-lettered"
                    );
                }
            }
            _ => {
                if self.fault_log.ready() {
                    tracing::error!(
                        error = %error, schema_id = id, state = state.as_str(),
                        "schema registry refuses auditflow; pausing consumption until it is fixed, nothing is dead-lettered"
                    );
                }
            }
        }
        self.set_health(state, Some(error.to_string()));
    }

    fn set_health(&self, state: RegistryState, last_error: Option<String>) {
        metrics::gauge!("auditflow_schema_registry_state").set(state.gauge());
        self.health.send_if_modified(|health| {
            let changed = health.state != state;
            health.state = state;
            if last_error.is_some() || state == RegistryState::Ok {
                health.last_error = last_error;
            }
            changed
        });
    }

    /// One request through the breaker, trying the URLs in turn while they are unavailable.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(String, Vec<u8>), Failure> {
        self.breaker
            .call(
                self.call_unguarded(method, path, body),
                Failure::is_transient,
            )
            .await
            .map_err(|err| match err {
                BreakerError::Inner(failure) => failure,
                BreakerError::Open { .. } | BreakerError::ProbeTimeout { .. } => {
                    Failure::BreakerOpen
                }
            })
    }

    async fn call_unguarded(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(String, Vec<u8>), Failure> {
        let first = self.preferred.load(Ordering::Relaxed) % self.urls.len();
        let mut last_failure = None;
        for offset in 0..self.urls.len() {
            let index = (first + offset) % self.urls.len();
            let base = &self.urls[index];
            match self.send(base, method.clone(), path, body.clone()).await {
                Ok(answer) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok((base.clone(), answer));
                }
                Err(failure) if failure.is_transient() => last_failure = Some(failure),
                Err(failure) => {
                    // It answered, if unhelpfully: that URL is up.
                    self.preferred.store(index, Ordering::Relaxed);
                    return Err(failure);
                }
            }
        }
        Err(last_failure.unwrap_or(Failure::BreakerOpen))
    }

    async fn send(
        &self,
        base: &str,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Vec<u8>, Failure> {
        self.num_requests.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("auditflow_schema_registry_requests_total").increment(1);
        let mut request = self.http.request(method, format!("{base}{path}")).header(
            ACCEPT,
            HeaderValue::from_static(
                "application/vnd.schemaregistry.v1+json, application/json;q=0.9",
            ),
        );
        if let Some(body) = body {
            request = request
                .header(CONTENT_TYPE, HeaderValue::from_static(REGISTRY_MEDIA_TYPE))
                .body(body);
        }
        // Both mark the header sensitive: it never shows in logs or Debug output.
        request = match &self.auth {
            Auth::None => request,
            Auth::Basic { username, password } => {
                request.basic_auth(username, Some(password.expose()))
            }
            Auth::Bearer(token) => request.bearer_auth(token.expose()),
        };
        let unavailable = |kind, detail| Failure::Unavailable {
            url: base.to_owned(),
            kind,
            detail,
        };
        let mut response = request.send().await.map_err(|err| {
            let kind = if err.is_timeout() {
                "timeout"
            } else {
                "unreachable"
            };
            unavailable(kind, error_chain(&err.without_url()))
        })?;
        let status = response.status();
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_BODY_BYTES {
                        return Err(Failure::Unexpected {
                            url: base.to_owned(),
                            detail: format!(
                                "HTTP {status} with a body over {MAX_BODY_BYTES} bytes"
                            ),
                        });
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(err) => {
                    let kind = if err.is_timeout() {
                        "timeout"
                    } else {
                        "unreachable"
                    };
                    return Err(unavailable(kind, error_chain(&err.without_url())));
                }
            }
        }
        if status.is_success() {
            return Ok(body);
        }
        Err(classify_status(base, status, &body))
    }
}

/// A failed request before the endpoint gives it meaning.
#[derive(Debug)]
enum Failure {
    Unavailable {
        url: String,
        kind: &'static str,
        detail: String,
    },
    BreakerOpen,
    Unauthorized {
        url: String,
        status: u16,
    },
    Status {
        url: String,
        status: StatusCode,
        error_code: Option<i64>,
        message: String,
    },
    Unexpected {
        url: String,
        detail: String,
    },
}

impl Failure {
    /// Says something about the registry's availability: counts for the breaker and moves on
    /// to the next URL.
    fn is_transient(&self) -> bool {
        matches!(self, Failure::Unavailable { .. } | Failure::BreakerOpen)
    }

    /// The meaning for an endpoint with no special statuses: a 4xx with the registry's error
    /// code is a refusal, a 404 without one is not the registry's API.
    fn into_error(self) -> RegistryError {
        match self {
            Failure::Unavailable { url, kind, detail } => {
                RegistryError::Unavailable { url, kind, detail }
            }
            Failure::BreakerOpen => RegistryError::BreakerOpen,
            Failure::Unauthorized { url, status } => RegistryError::Unauthorized { url, status },
            Failure::Status {
                url,
                status,
                error_code: Some(error_code),
                message,
            } => RegistryError::Refused {
                url,
                status: status.as_u16(),
                error_code,
                message,
            },
            Failure::Status {
                url,
                status,
                error_code: None,
                message,
            } => RegistryError::Unexpected {
                url,
                detail: format!("HTTP {status} without a registry error code: {message}"),
            },
            Failure::Unexpected { url, detail } => RegistryError::Unexpected { url, detail },
        }
    }
}

fn subject_error(failure: Failure, subject: &str) -> RegistryError {
    match failure {
        Failure::Status {
            status: StatusCode::NOT_FOUND,
            error_code: Some(SUBJECT_NOT_FOUND),
            ..
        } => RegistryError::SubjectNotFound(subject.to_owned()),
        other => other.into_error(),
    }
}

/// The error body of the Confluent API.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error_code: Option<i64>,
    message: Option<String>,
}

/// Sorts a non-2xx answer: unavailable (5xx, 408, 429), unauthorized (401, 403), or a status
/// for the endpoint to interpret, with the registry's error code when the body has one.
fn classify_status(base: &str, status: StatusCode, body: &[u8]) -> Failure {
    let url = base.to_owned();
    let kind = match status {
        StatusCode::REQUEST_TIMEOUT => Some("request_timeout"),
        StatusCode::TOO_MANY_REQUESTS => Some("throttled"),
        _ if status.is_server_error() => Some("server_error"),
        _ => None,
    };
    if let Some(kind) = kind {
        return Failure::Unavailable {
            url,
            kind,
            detail: format!("HTTP {status}"),
        };
    }
    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        return Failure::Unauthorized {
            url,
            status: status.as_u16(),
        };
    }
    if status.is_redirection() {
        return Failure::Unexpected {
            url,
            detail: format!("HTTP {status}: a redirect (point the URL at the registry itself)"),
        };
    }
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let error_code = parsed.as_ref().and_then(|body| body.error_code);
    let message = parsed
        .and_then(|body| body.message)
        .unwrap_or_else(|| quote_body(body));
    Failure::Status {
        url,
        status,
        error_code,
        message,
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(url: &str, body: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(body).map_err(|err| RegistryError::Unexpected {
        url: url.to_owned(),
        detail: format!("not the registry's JSON ({err}): {}", quote_body(body)),
    })
}

/// The start of a body, for error messages.
fn quote_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(120)]);
    format!("{:?}", text.trim())
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode_path_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// An error and its sources, `: `-separated (reqwest's own message alone says little).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn read_file(
    variable: &'static str,
    path: &std::path::Path,
) -> Result<Vec<u8>, RegistryBuildError> {
    std::fs::read(path)
        .map_err(|err| tls_error(variable, format!("cannot read {}: {err}", path.display())))
}

fn tls_error(variable: &'static str, reason: String) -> RegistryBuildError {
    RegistryBuildError::Tls { variable, reason }
}

/// The key as PKCS#8 PEM, which the native TLS identity needs; PKCS#1 RSA and SEC1 EC keys
/// are converted with OpenSSL.
fn pkcs8_pem(key: &[u8]) -> Result<Vec<u8>, RegistryBuildError> {
    const VARIABLE: &str = "AUDITFLOW_SCHEMA_REGISTRY_KEY_FILE";
    if key.starts_with(b"-----BEGIN PRIVATE KEY-----") {
        return Ok(key.to_vec());
    }
    let parsed = openssl::pkey::PKey::private_key_from_pem(key).map_err(|err| {
        tls_error(
            VARIABLE,
            format!("not an unencrypted PEM private key: {err}"),
        )
    })?;
    parsed
        .private_key_to_pem_pkcs8()
        .map_err(|err| tls_error(VARIABLE, format!("cannot convert the key to PKCS#8: {err}")))
}

/// Lets a repeating message through once per interval.
#[derive(Debug)]
struct LogEvery {
    interval: Duration,
    last: Mutex<Option<Instant>>,
}

impl LogEvery {
    fn new(interval: Duration) -> Self {
        LogEvery {
            interval,
            last: Mutex::new(None),
        }
    }

    /// True at most once per interval.
    fn ready(&self) -> bool {
        let mut last = self.last.lock();
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < self.interval) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// The next message goes through at once.
    fn reset(&self) {
        *self.last.lock() = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(status: u16, body: &str) -> Failure {
        classify_status(
            "http://sr:8081",
            StatusCode::from_u16(status).unwrap(),
            body.as_bytes(),
        )
    }

    #[test]
    fn unavailable_statuses_are_transient_and_named() {
        for (status, kind) in [
            (500, "server_error"),
            (502, "server_error"),
            (503, "server_error"),
            (408, "request_timeout"),
            (429, "throttled"),
        ] {
            let failure = status_of(status, "");
            assert!(failure.is_transient(), "{status}");
            let error = failure.into_error();
            assert_eq!(error.kind(), kind);
            assert_eq!(error.disposition(), Disposition::Transient);
        }
    }

    #[test]
    fn auth_failures_and_foreign_answers_are_configuration_faults() {
        for status in [401, 403] {
            let error = status_of(status, r#"{"message":"Unauthorized"}"#).into_error();
            assert!(
                matches!(error, RegistryError::Unauthorized { .. }),
                "{error:?}"
            );
            assert_eq!(error.disposition(), Disposition::Configuration);
            assert_eq!(error.kind(), "unauthorized");
        }
        // A 404 from something that is not the registry's API (a wrong path) must not
        // dead-letter every record.
        let error = status_of(404, "<html>Not Found</html>").into_error();
        assert_eq!(error.disposition(), Disposition::Configuration, "{error:?}");
        let error = status_of(302, "").into_error();
        assert_eq!(error.disposition(), Disposition::Configuration, "{error:?}");
    }

    #[test]
    fn only_a_404_with_its_error_code_means_not_found() {
        let failure = status_of(404, r#"{"error_code":40403,"message":"Schema not found"}"#);
        match failure {
            Failure::Status {
                status: StatusCode::NOT_FOUND,
                error_code: Some(SCHEMA_NOT_FOUND),
                ref message,
                ..
            } => assert_eq!(message, "Schema not found"),
            other => panic!("{other:?}"),
        }
        let subject = subject_error(
            status_of(404, r#"{"error_code":40401,"message":"Subject not found"}"#),
            "t-value",
        );
        assert!(matches!(subject, RegistryError::SubjectNotFound(ref s) if s == "t-value"));
        assert_eq!(subject.disposition(), Disposition::Permanent);
        let refused = status_of(409, r#"{"error_code":409,"message":"incompatible"}"#).into_error();
        assert!(matches!(
            refused,
            RegistryError::Refused {
                error_code: 409,
                ..
            }
        ));
    }

    #[test]
    fn non_avro_and_referencing_schemas_are_unsupported() {
        let schema = |schema_type: Option<&str>, references| RegistrySchema {
            schema: "{}".into(),
            schema_type: schema_type.map(str::to_owned),
            references,
        };
        assert_eq!(schema(None, vec![]).unsupported(), None);
        assert_eq!(schema(Some("AVRO"), vec![]).unsupported(), None);
        let reason = schema(Some("PROTOBUF"), vec![]).unsupported().unwrap();
        assert!(reason.contains("PROTOBUF"), "{reason}");
        let reason = schema(None, vec![serde_json::json!({"name": "x"})])
            .unsupported()
            .unwrap();
        assert!(reason.contains("references"), "{reason}");
    }

    #[test]
    fn subjects_are_percent_encoded() {
        assert_eq!(
            encode_path_segment("audit-events.v2_x~"),
            "audit-events.v2_x~"
        );
        assert_eq!(encode_path_segment("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn a_repeating_message_passes_once_per_interval() {
        let log = LogEvery::new(Duration::from_secs(3600));
        assert!(log.ready());
        assert!(!log.ready());
        log.reset();
        assert!(log.ready());
    }

    #[test]
    fn rsa_and_ec_keys_are_converted_to_pkcs8() {
        use openssl::ec::{EcGroup, EcKey};
        use openssl::nid::Nid;
        use openssl::pkey::PKey;
        use openssl::rsa::Rsa;
        let rsa = Rsa::generate(2048).unwrap();
        let pkcs1 = rsa.private_key_to_pem().unwrap();
        assert!(pkcs1.starts_with(b"-----BEGIN RSA PRIVATE KEY-----"));
        let converted = pkcs8_pem(&pkcs1).unwrap();
        assert!(converted.starts_with(b"-----BEGIN PRIVATE KEY-----"));
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let sec1 = EcKey::generate(&group)
            .unwrap()
            .private_key_to_pem()
            .unwrap();
        assert!(pkcs8_pem(&sec1)
            .unwrap()
            .starts_with(b"-----BEGIN PRIVATE KEY-----"));
        let pkcs8 = PKey::from_rsa(rsa)
            .unwrap()
            .private_key_to_pem_pkcs8()
            .unwrap();
        assert_eq!(pkcs8_pem(&pkcs8).unwrap(), pkcs8);
        let err = pkcs8_pem(b"not a key").unwrap_err().to_string();
        assert!(err.contains("AUDITFLOW_SCHEMA_REGISTRY_KEY_FILE"), "{err}");
    }

    #[test]
    fn tls_files_load_and_bad_ones_name_their_variable() {
        use openssl::asn1::Asn1Time;
        use openssl::hash::MessageDigest;
        use openssl::pkey::PKey;
        use openssl::rsa::Rsa;
        use openssl::x509::{X509NameBuilder, X509};
        let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "auditflow client").unwrap();
        let name = name.build();
        let mut builder = X509::builder().unwrap();
        builder.set_version(2).unwrap();
        builder.set_subject_name(&name).unwrap();
        builder.set_issuer_name(&name).unwrap();
        builder.set_pubkey(&key).unwrap();
        builder
            .set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        builder
            .set_not_after(&Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        builder.sign(&key, MessageDigest::sha256()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path.display().to_string()
        };
        let cert = write("client.pem", &builder.build().to_pem().unwrap());
        // A traditional (PKCS#1) RSA key: converted for native-tls.
        let rsa_key = write(
            "client.key",
            &key.rsa().unwrap().private_key_to_pem().unwrap(),
        );
        let garbage = write("garbage.pem", b"not pem at all");
        let build = |pairs: &[(&str, &str)]| {
            let mut vars = vec![(
                "AUDITFLOW_SCHEMA_REGISTRY_URL".to_owned(),
                "https://sr:8081".to_owned(),
            )];
            vars.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            let config = crate::Config::from_vars(vars).unwrap();
            SchemaRegistry::new(&config.registry, BreakerConfig::INGEST)
        };
        build(&[
            ("AUDITFLOW_SCHEMA_REGISTRY_CA_FILE", &cert),
            ("AUDITFLOW_SCHEMA_REGISTRY_CERT_FILE", &cert),
            ("AUDITFLOW_SCHEMA_REGISTRY_KEY_FILE", &rsa_key),
        ])
        .unwrap();
        for (pairs, variable) in [
            (
                vec![("AUDITFLOW_SCHEMA_REGISTRY_CA_FILE", garbage.as_str())],
                "AUDITFLOW_SCHEMA_REGISTRY_CA_FILE",
            ),
            (
                vec![
                    ("AUDITFLOW_SCHEMA_REGISTRY_CERT_FILE", cert.as_str()),
                    ("AUDITFLOW_SCHEMA_REGISTRY_KEY_FILE", garbage.as_str()),
                ],
                "AUDITFLOW_SCHEMA_REGISTRY_KEY_FILE",
            ),
            (
                vec![
                    ("AUDITFLOW_SCHEMA_REGISTRY_CERT_FILE", garbage.as_str()),
                    ("AUDITFLOW_SCHEMA_REGISTRY_KEY_FILE", rsa_key.as_str()),
                ],
                "AUDITFLOW_SCHEMA_REGISTRY_CERT_FILE",
            ),
        ] {
            let err = build(&pairs).unwrap_err().to_string();
            assert!(err.contains(variable), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn credentials_stay_out_of_debug_output() {
        let config = crate::Config::from_vars([
            (
                "AUDITFLOW_SCHEMA_REGISTRY_URL".to_owned(),
                "http://sr:8081".to_owned(),
            ),
            (
                "AUDITFLOW_SCHEMA_REGISTRY_USERNAME".to_owned(),
                "auditflow".to_owned(),
            ),
            (
                "AUDITFLOW_SCHEMA_REGISTRY_PASSWORD".to_owned(),
                "hunter2".to_owned(),
            ),
        ])
        .unwrap();
        let registry = SchemaRegistry::new(&config.registry, BreakerConfig::INGEST).unwrap();
        let printed = format!("{registry:?}");
        assert!(printed.contains("http://sr:8081"), "{printed}");
        assert!(!printed.contains("hunter2"), "{printed}");
    }
}
