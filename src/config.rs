//! Configuration, loaded from `AUDITFLOW_*` environment variables.
//!
//! Each concern has its own struct, deserialized by `envy` from the same prefixed variables, so a
//! field `kafka_topic` is the variable `AUDITFLOW_KAFKA_TOPIC`. [`Config::validate`] checks the
//! cross-field rules; every error names the variable to fix. librdkafka properties pass through
//! as `AUDITFLOW_KAFKA_OPT_<PROPERTY>` (dots as underscores), e.g. `AUDITFLOW_KAFKA_OPT_SASL_MECHANISMS`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::breaker::BreakerConfig;
use crate::db::partition::PartitionInterval;
use crate::db::PoolSettings;

mod serve;

pub use serve::ServeConfig;

/// Every variable auditflow reads starts with this.
pub const ENV_PREFIX: &str = "AUDITFLOW_";

/// librdkafka pass-through properties start with this (after [`ENV_PREFIX`] is included).
pub const KAFKA_OPT_PREFIX: &str = "AUDITFLOW_KAFKA_OPT_";

/// The value of `AUDITFLOW_METRICS_ADDR` that disables the Prometheus endpoint.
pub const METRICS_OFF: &str = "off";

/// A configuration problem found at start-up; the message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    /// A problem to report; `message` must name the variable (or flag) to fix.
    pub fn new(message: impl Into<String>) -> Self {
        ConfigError(message.into())
    }
}

/// A value that must never appear in logs or `Debug` output (passwords, URLs with credentials).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// Returns the secret itself; call only where it is handed to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"[redacted]\"")
    }
}

/// Where events come from and where the ones that cannot be stored go.
#[derive(Debug, Clone, Deserialize)]
pub struct KafkaConfig {
    /// `AUDITFLOW_KAFKA_BROKERS`: bootstrap servers, `host:port[,host:port]`. Required for `run`,
    /// `produce` and `replay`; `demo` starts an in-process mock cluster when it is unset.
    pub kafka_brokers: Option<String>,
    /// `AUDITFLOW_KAFKA_TOPIC`: the topic producers write audit events to. It must exist.
    #[serde(default = "default_topic")]
    pub kafka_topic: String,
    /// `AUDITFLOW_KAFKA_GROUP_ID`: consumer group shared by all replicas. Changing it restarts
    /// consumption from `auto.offset.reset` (earliest): everything is re-read and deduplicated.
    #[serde(default = "default_group_id")]
    pub kafka_group_id: String,
    /// `AUDITFLOW_DLQ_TOPIC`: the dead-letter topic for records that cannot be stored.
    #[serde(default = "default_dlq_topic")]
    pub dlq_topic: String,
    /// `AUDITFLOW_KAFKA_OPT_*`: librdkafka properties passed through verbatim (SASL, TLS, timeouts).
    /// Values are treated as secrets and never logged.
    #[serde(skip)]
    pub properties: BTreeMap<String, Secret>,
}

/// The PostgreSQL side.
#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseConfig {
    /// `AUDITFLOW_DATABASE_URL`: `postgres://user:password@host:port/db`. Never logged.
    pub database_url: Option<Secret>,
    /// `AUDITFLOW_MAINTENANCE_DATABASE_URL`: the schema owner's URL, for partition retention
    /// (detach, rename, drop) inside `auditflow run`. Without it, a writer that does not own
    /// `events` only premakes partitions (through `auditflow_create_partition`) and retention is
    /// left to `auditflow partitions apply` run as the owner. Never logged.
    pub maintenance_database_url: Option<Secret>,
    /// `AUDITFLOW_DB_SCHEMA`: the schema holding the `events` table and the migration history.
    /// Tests give each run its own schema.
    #[serde(default = "default_db_schema")]
    pub db_schema: String,
    /// `AUDITFLOW_DB_MAX_CONNECTIONS`: pool size. The sink writes one batch at a time, so a few are
    /// enough; more only add load on Postgres.
    #[serde(default = "default_db_max_connections")]
    pub db_max_connections: u32,
    /// `AUDITFLOW_STORE_CONCURRENCY`: store streams writing each batch's rows in parallel, each
    /// its own transaction on its own connection, circuit breaker and hash chain; a Kafka
    /// partition always goes to the same stream (partition mod streams), so a producer's retries,
    /// which share a key and so a partition, never race each other. Default 2 (see BENCHMARKS.md);
    /// 1 writes one transaction at a time. At most 16; a pool smaller than this
    /// (AUDITFLOW_DB_MAX_CONNECTIONS) caps it, with a warning.
    #[serde(default = "default_store_concurrency")]
    pub store_concurrency: u32,
    /// `AUDITFLOW_DB_ACQUIRE_TIMEOUT_MS`: how long a batch waits for a pooled connection before the
    /// attempt counts as failed and is retried.
    #[serde(default = "default_db_acquire_timeout_ms")]
    pub db_acquire_timeout_ms: u64,
}

/// Redis pub/sub for cache invalidation.
#[derive(Debug, Clone, Deserialize)]
pub struct RedisConfig {
    /// `AUDITFLOW_REDIS_URL`: where invalidations are published. Never logged (may hold a password).
    #[serde(default = "default_redis_url")]
    pub redis_url: Secret,
    /// `AUDITFLOW_REDIS_CA_FILE`: PEM file of the CA that signed a `rediss://` server's
    /// certificate; without it the system's roots are used.
    pub redis_ca_file: Option<PathBuf>,
    /// `AUDITFLOW_INVALIDATION_CHANNEL`: the pub/sub channel readers of the audit table subscribe to.
    #[serde(default = "default_invalidation_channel")]
    pub invalidation_channel: String,
    /// `AUDITFLOW_INVALIDATION_QUEUE`: invalidations waiting for Redis; beyond it they are dropped
    /// and counted, so a Redis outage never slows ingestion.
    #[serde(default = "default_invalidation_queue")]
    pub invalidation_queue: usize,
    /// `AUDITFLOW_INVALIDATION_QUEUE_BYTES`: encoded bytes of invalidations waiting for Redis
    /// (default 16 MiB, at least 262144, the largest message); beyond it they are dropped and
    /// counted, whatever the count bound says.
    #[serde(default = "default_invalidation_queue_bytes")]
    pub invalidation_queue_bytes: usize,
}

/// When a batch is flushed: whichever limit is reached first.
#[derive(Debug, Clone, Deserialize)]
pub struct BatchConfig {
    /// `AUDITFLOW_BATCH_MAX_EVENTS`: events per batch (one Postgres transaction).
    #[serde(default = "default_batch_max_events")]
    pub batch_max_events: usize,
    /// `AUDITFLOW_BATCH_MAX_BYTES`: payload bytes per batch; bounds memory per batch.
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// `AUDITFLOW_BATCH_MAX_WAIT_MS`: the longest an event waits in an open batch; bounds latency
    /// when traffic is low.
    #[serde(default = "default_batch_max_wait_ms")]
    pub batch_max_wait_ms: u64,
}

/// Everything else the sink needs to run.
#[derive(Debug, Clone, Deserialize)]
pub struct SinkConfig {
    /// `AUDITFLOW_ACCEPT_PAST_DAYS`: events older than this are dead-lettered as `out_of_window`
    /// rather than creating partitions nobody maintains.
    #[serde(default = "default_accept_past_days")]
    pub accept_past_days: u32,
    /// `AUDITFLOW_ACCEPT_FUTURE_DAYS`: events further ahead than this (clock skew) are dead-lettered.
    #[serde(default = "default_accept_future_days")]
    pub accept_future_days: u32,
    /// `AUDITFLOW_MAX_EVENT_BYTES`: the largest payload accepted (default 1000000, librdkafka's
    /// own `message.max.bytes`). A larger record is dead-lettered as `validation` with its size,
    /// without being decoded.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// `AUDITFLOW_MAX_KEY_FIELD_BYTES`: the longest tenant id, actor id, action, resource type or
    /// resource id (default 512); these are indexed, so they stay short.
    #[serde(default = "default_max_key_field_bytes")]
    pub max_key_field_bytes: usize,
    /// `AUDITFLOW_MAX_TEXT_FIELD_BYTES`: the longest actor ip, user agent, reason, trace id or
    /// session id (default 8192).
    #[serde(default = "default_max_text_field_bytes")]
    pub max_text_field_bytes: usize,
    /// `AUDITFLOW_MAX_DETAILS_BYTES`: the longest `details` JSON text (default 65536).
    #[serde(default = "default_max_details_bytes")]
    pub max_details_bytes: usize,
    /// `AUDITFLOW_DRAIN_TIMEOUT_MS`: on SIGTERM, the open batch must be stored and committed within
    /// this; what is not stays uncommitted and is redelivered (never lost).
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// `AUDITFLOW_SCHEMA_DIR`: directory of `audit_event.vN.avsc` writer schemas; the built-in
    /// v1 and v2 are always known.
    #[serde(default = "default_schema_dir")]
    pub schema_dir: PathBuf,
    /// `AUDITFLOW_METRICS_ADDR`: the address of `/metrics`, `/healthz`, `/readyz` and `/status`
    /// (`host:port`); `off` disables it. Default `127.0.0.1:9000`: on a bare host nothing outside
    /// the machine sees the status page unless the operator says so. In a container (the image
    /// sets `0.0.0.0:9000`) the pod's own network namespace is the boundary, and Prometheus and
    /// the kubelet's probes must reach it. Each replica on one host needs its own port.
    #[serde(default = "default_metrics_addr")]
    pub metrics_addr: String,
    /// `AUDITFLOW_INSTANCE_ID`: this replica's name in logs and dead-letter headers
    /// (default: host name and process id).
    pub instance_id: Option<String>,
    /// `AUDITFLOW_LOG_FORMAT`: `text` (default) or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// `AUDITFLOW_LOG_LEVEL`: tracing filter directives, e.g. `info` or
    /// `auditflow=debug,librdkafka=warn` (default: `RUST_LOG`, else `info`). Changes live on
    /// SIGHUP.
    pub log_level: Option<String>,
    /// `AUDITFLOW_CONFIG_FILE`: an environment file (`KEY=VALUE` lines) read at start-up over the
    /// process environment and again on SIGHUP, when its live settings take effect.
    pub config_file: Option<PathBuf>,
    /// `AUDITFLOW_REPLAY_RATE`: records per second `replay` writes when `--rate` is not given;
    /// changes live on SIGHUP.
    pub replay_rate: Option<f64>,
}

/// Where Confluent-framed schema ids are looked up: a Confluent-compatible schema registry
/// (Confluent Schema Registry, Karapace, Apicurio's `/apis/ccompat/v7`, Redpanda). Unset URL:
/// schema id `N` is the local file `audit_event.vN.avsc`, as without this section.
#[derive(Debug, Clone, Deserialize)]
pub struct RegistryConfig {
    /// `AUDITFLOW_SCHEMA_REGISTRY_URL`: one or more base URLs (`http(s)://host:port[/path]`),
    /// comma-separated, tried in turn when one is unreachable. Credentials do not belong in the
    /// URL (it is logged and shown on `/status`): use the username, password or token variables.
    pub schema_registry_url: Option<String>,
    /// `AUDITFLOW_SCHEMA_REGISTRY_USERNAME`: HTTP basic-auth user; needs the password too.
    pub schema_registry_username: Option<String>,
    /// `AUDITFLOW_SCHEMA_REGISTRY_PASSWORD`: HTTP basic-auth password. Never logged or shown.
    pub schema_registry_password: Option<Secret>,
    /// `AUDITFLOW_SCHEMA_REGISTRY_BEARER_TOKEN`: sent as `Authorization: Bearer`; instead of basic
    /// auth, not with it. Never logged or shown.
    pub schema_registry_bearer_token: Option<Secret>,
    /// `AUDITFLOW_SCHEMA_REGISTRY_CA_FILE`: PEM certificate(s) trusted for `https` URLs, on top of
    /// the system's roots (OpenSSL, the TLS stack librdkafka also uses).
    pub schema_registry_ca_file: Option<PathBuf>,
    /// `AUDITFLOW_SCHEMA_REGISTRY_CERT_FILE`: PEM client certificate (chain) for mutual TLS; needs
    /// the key file too.
    pub schema_registry_cert_file: Option<PathBuf>,
    /// `AUDITFLOW_SCHEMA_REGISTRY_KEY_FILE`: PEM private key of the client certificate (PKCS#8,
    /// PKCS#1 RSA or SEC1 EC), unencrypted.
    pub schema_registry_key_file: Option<PathBuf>,
    /// `AUDITFLOW_SCHEMA_REGISTRY_TIMEOUT_MS`: the longest one request may take, connecting
    /// included (default 5000). A timeout counts as the registry being unavailable: the
    /// consumer pauses and retries, nothing is dead-lettered.
    #[serde(default = "default_schema_registry_timeout_ms")]
    pub schema_registry_timeout_ms: u64,
    /// `AUDITFLOW_SCHEMA_REGISTRY_NOT_FOUND_TTL_MS`: how long an id the registry does not know
    /// (404, error code 40403) is remembered (default 30000). Records with it are dead-lettered
    /// as `schema` without asking again, so a burst of them costs one request; after this an id
    /// registered late is looked up afresh.
    #[serde(default = "default_schema_registry_not_found_ttl_ms")]
    pub schema_registry_not_found_ttl_ms: u64,
    /// `AUDITFLOW_SCHEMA_REGISTRY_CACHE_CAPACITY`: writer schemas kept compiled, by id (default
    /// 1000). An id's schema never changes, so each is fetched once; past the bound the schema
    /// fetched longest ago is dropped (counted in
    /// `auditflow_schema_registry_cache_evictions_total`) and fetched again if it shows up again.
    #[serde(default = "default_schema_registry_cache_capacity")]
    pub schema_registry_cache_capacity: usize,
}

impl RegistryConfig {
    /// The base URLs, in the order they are tried, without trailing slashes; empty when
    /// `AUDITFLOW_SCHEMA_REGISTRY_URL` is unset.
    pub fn urls(&self) -> Vec<String> {
        self.schema_registry_url
            .as_deref()
            .map(parse_registry_urls)
            .unwrap_or_default()
    }

    /// True when a registry is configured.
    pub fn is_enabled(&self) -> bool {
        !self.urls().is_empty()
    }

    /// The longest one request may take.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.schema_registry_timeout_ms)
    }

    /// How long an unknown id is remembered.
    pub fn not_found_ttl(&self) -> Duration {
        Duration::from_millis(self.schema_registry_not_found_ttl_ms)
    }

    /// Checks the section; also used by `produce --schema-registry`, which names its URLs on
    /// the command line (`urls` then replaces `AUDITFLOW_SCHEMA_REGISTRY_URL`).
    pub fn validate_with_urls(&self, urls: &[String], variable: &str) -> Result<(), ConfigError> {
        for url in urls {
            let Some(rest) = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"))
            else {
                return Err(ConfigError(format!(
                    "{variable} must list http:// or https:// URLs, comma-separated"
                )));
            };
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            // The value is not echoed: it might be a URL with a password in it.
            if authority.contains('@') {
                return Err(ConfigError(format!(
                    "{variable} must not carry credentials; use AUDITFLOW_SCHEMA_REGISTRY_USERNAME \
                     and AUDITFLOW_SCHEMA_REGISTRY_PASSWORD, or AUDITFLOW_SCHEMA_REGISTRY_BEARER_TOKEN"
                )));
            }
            if authority.is_empty() || url.contains(['?', '#', ' ']) {
                return Err(ConfigError(format!(
                    "{variable} must list base URLs (scheme, host, port, optional path), \
                     without query or fragment"
                )));
            }
        }
        match (
            &self.schema_registry_username,
            &self.schema_registry_password,
            &self.schema_registry_bearer_token,
        ) {
            (Some(_), None, _) => {
                return Err(ConfigError(
                    "AUDITFLOW_SCHEMA_REGISTRY_USERNAME needs AUDITFLOW_SCHEMA_REGISTRY_PASSWORD"
                        .into(),
                ))
            }
            (None, Some(_), _) => {
                return Err(ConfigError(
                    "AUDITFLOW_SCHEMA_REGISTRY_PASSWORD needs AUDITFLOW_SCHEMA_REGISTRY_USERNAME"
                        .into(),
                ))
            }
            (Some(_), Some(_), Some(_)) => return Err(ConfigError(
                "AUDITFLOW_SCHEMA_REGISTRY_BEARER_TOKEN and AUDITFLOW_SCHEMA_REGISTRY_USERNAME \
                     exclude each other: set one way to authenticate"
                    .into(),
            )),
            _ => {}
        }
        match (
            &self.schema_registry_cert_file,
            &self.schema_registry_key_file,
        ) {
            (Some(_), None) => {
                return Err(ConfigError(
                    "AUDITFLOW_SCHEMA_REGISTRY_CERT_FILE needs AUDITFLOW_SCHEMA_REGISTRY_KEY_FILE"
                        .into(),
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError(
                    "AUDITFLOW_SCHEMA_REGISTRY_KEY_FILE needs AUDITFLOW_SCHEMA_REGISTRY_CERT_FILE"
                        .into(),
                ))
            }
            _ => {}
        }
        for (variable, path) in [
            (
                "AUDITFLOW_SCHEMA_REGISTRY_CA_FILE",
                &self.schema_registry_ca_file,
            ),
            (
                "AUDITFLOW_SCHEMA_REGISTRY_CERT_FILE",
                &self.schema_registry_cert_file,
            ),
            (
                "AUDITFLOW_SCHEMA_REGISTRY_KEY_FILE",
                &self.schema_registry_key_file,
            ),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    return Err(ConfigError(format!(
                        "{variable} names {}, which is not a readable file",
                        path.display()
                    )));
                }
            }
        }
        for (variable, value, max) in [
            (
                "AUDITFLOW_SCHEMA_REGISTRY_TIMEOUT_MS",
                self.schema_registry_timeout_ms,
                300_000,
            ),
            (
                "AUDITFLOW_SCHEMA_REGISTRY_NOT_FOUND_TTL_MS",
                self.schema_registry_not_found_ttl_ms,
                86_400_000,
            ),
            (
                "AUDITFLOW_SCHEMA_REGISTRY_CACHE_CAPACITY",
                self.schema_registry_cache_capacity as u64,
                1_000_000,
            ),
        ] {
            if value == 0 || value > max {
                return Err(ConfigError(format!(
                    "{variable} must be between 1 and {max}, got {value}"
                )));
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.schema_registry_url.is_some() && !self.is_enabled() {
            return Err(ConfigError(
                "AUDITFLOW_SCHEMA_REGISTRY_URL lists no URL".into(),
            ));
        }
        self.validate_with_urls(&self.urls(), "AUDITFLOW_SCHEMA_REGISTRY_URL")
    }
}

/// Splits a comma-separated URL list, dropping blanks and trailing slashes.
pub fn parse_registry_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(|url| url.trim().trim_end_matches('/').to_owned())
        .filter(|url| !url.is_empty())
        .collect()
}

/// The lifecycle of the `events` table's partitions (see `auditflow partitions plan`).
#[derive(Debug, Clone, Deserialize)]
pub struct PartitionConfig {
    /// `AUDITFLOW_PARTITION_INTERVAL`: `day` (default), `week` (ISO weeks, Monday 00:00 UTC) or
    /// `month`: the time one partition covers. Changing it on a live table is safe: existing
    /// partitions stay as they are, new ones use the new interval, and a day whose interval is
    /// partly covered by partitions of the old one gets a daily partition.
    #[serde(default, deserialize_with = "deserialize_partition_interval")]
    pub partition_interval: PartitionInterval,
    /// `AUDITFLOW_PARTITION_PREMAKE`: intervals created ahead of the current one (default 7).
    /// The sink also creates a missing partition on demand, but that DDL runs on the ingest path;
    /// premade partitions keep it off.
    #[serde(default = "default_partition_premake")]
    pub partition_premake: u32,
    /// `AUDITFLOW_PARTITION_RETENTION_DAYS`: a partition whose whole range ended more than this
    /// many days ago is retired (detached and renamed, rows kept) unless a legal hold covers it
    /// (default 400; 0 keeps everything forever). Must exceed `AUDITFLOW_ACCEPT_PAST_DAYS`, so no
    /// partition the sink may still write to is ever retired.
    #[serde(default = "default_partition_retention_days")]
    pub partition_retention_days: u32,
    /// `AUDITFLOW_PARTITION_RETIRED_GRACE_DAYS`: how long a retired partition is kept before it is
    /// dropped for good (default 30); also how long a restored partition stays attached before it
    /// may be retired again. The drop is irreversible: a legal hold is the way to keep data longer.
    #[serde(default = "default_partition_retired_grace_days")]
    pub partition_retired_grace_days: u32,
    /// `AUDITFLOW_PARTITION_MAINTENANCE_INTERVAL_MS`: how often `run` attempts maintenance
    /// (default 600000, ±10% jitter; within 30 s after a round that had to skip something). Only
    /// the replica holding the maintenance advisory lock does the work; the others skip.
    #[serde(default = "default_partition_maintenance_interval_ms")]
    pub partition_maintenance_interval_ms: u64,
    /// `AUDITFLOW_PARTITION_LOCK_TIMEOUT_MS`: `lock_timeout` of maintenance DDL (default 2000). A
    /// statement that would wait longer behind application traffic is cancelled and retried next
    /// round, so maintenance never holds up ingestion for longer than this.
    #[serde(default = "default_partition_lock_timeout_ms")]
    pub partition_lock_timeout_ms: u64,
    /// `AUDITFLOW_ACCEPT_PAST_DAYS`, the sink's setting, read here too: it sets how far back
    /// from the real time the protected window reaches. Whatever time a plan is made for, no
    /// partition overlapping `[real now - this, real now + premake]` is retired or dropped (the
    /// sink may still write to it).
    #[serde(default = "default_accept_past_days")]
    pub accept_past_days: u32,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        PartitionConfig {
            partition_interval: PartitionInterval::default(),
            partition_premake: default_partition_premake(),
            partition_retention_days: default_partition_retention_days(),
            partition_retired_grace_days: default_partition_retired_grace_days(),
            partition_maintenance_interval_ms: default_partition_maintenance_interval_ms(),
            partition_lock_timeout_ms: default_partition_lock_timeout_ms(),
            accept_past_days: default_accept_past_days(),
        }
    }
}

impl PartitionConfig {
    /// How often maintenance runs.
    pub fn maintenance_interval(&self) -> Duration {
        Duration::from_millis(self.partition_maintenance_interval_ms)
    }

    /// `lock_timeout` of maintenance DDL.
    pub fn lock_timeout(&self) -> Duration {
        Duration::from_millis(self.partition_lock_timeout_ms)
    }

    /// The retention, or `None` to keep forever.
    pub fn retention(&self) -> Option<chrono::Duration> {
        (self.partition_retention_days > 0)
            .then(|| chrono::Duration::days(i64::from(self.partition_retention_days)))
    }

    /// How long retired partitions are kept.
    pub fn retired_grace(&self) -> chrono::Duration {
        chrono::Duration::days(i64::from(self.partition_retired_grace_days))
    }

    fn validate(&self, sink: &SinkConfig) -> Result<(), ConfigError> {
        if self.partition_premake > 366 {
            return Err(ConfigError(format!(
                "AUDITFLOW_PARTITION_PREMAKE must be at most 366, got {}",
                self.partition_premake
            )));
        }
        let retention = self.partition_retention_days;
        if retention != 0 && retention <= sink.accept_past_days {
            return Err(ConfigError(format!(
                "AUDITFLOW_PARTITION_RETENTION_DAYS must be 0 (keep forever) or greater than \
                 AUDITFLOW_ACCEPT_PAST_DAYS ({}), got {retention}",
                sink.accept_past_days
            )));
        }
        for (variable, days) in [
            ("AUDITFLOW_PARTITION_RETENTION_DAYS", retention),
            (
                "AUDITFLOW_PARTITION_RETIRED_GRACE_DAYS",
                self.partition_retired_grace_days,
            ),
        ] {
            if days > 36_500 {
                return Err(ConfigError(format!(
                    "{variable} must be at most 36500, got {days}"
                )));
            }
        }
        for (variable, value) in [
            (
                "AUDITFLOW_PARTITION_MAINTENANCE_INTERVAL_MS",
                self.partition_maintenance_interval_ms,
            ),
            (
                "AUDITFLOW_PARTITION_LOCK_TIMEOUT_MS",
                self.partition_lock_timeout_ms,
            ),
        ] {
            // lock_timeout = 0 would mean "wait forever": exactly what must not happen.
            if value == 0 {
                return Err(ConfigError(format!("{variable} must be greater than zero")));
            }
            if value > 86_400_000 {
                return Err(ConfigError(format!(
                    "{variable} must be at most 86400000 (a day), got {value}"
                )));
            }
        }
        Ok(())
    }
}

fn deserialize_partition_interval<'de, D>(deserializer: D) -> Result<PartitionInterval, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let value = String::deserialize(deserializer)?;
    value.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "AUDITFLOW_PARTITION_INTERVAL must be day, week or month, got {value:?}"
        ))
    })
}

/// Circuit-breaker thresholds as set by the operator; unset fields take the defaults of
/// [`BreakerConfig::INGEST`] and [`BreakerConfig::INTERACTIVE`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct BreakerEnv {
    /// `AUDITFLOW_BREAKER_CONSECUTIVE_FAILURES`: transient failures in a row that open a breaker
    /// on the ingest path (default 5).
    pub breaker_consecutive_failures: Option<u32>,
    /// `AUDITFLOW_BREAKER_FAILURE_RATE`: failure rate (0..1] over the window that opens it (0.5).
    pub breaker_failure_rate: Option<f64>,
    /// `AUDITFLOW_BREAKER_MIN_CALLS`: calls in the window before the rate counts (20).
    pub breaker_min_calls: Option<u32>,
    /// `AUDITFLOW_BREAKER_WINDOW_MS`: the failure-rate window (30000).
    pub breaker_window_ms: Option<u64>,
    /// `AUDITFLOW_BREAKER_OPEN_MS`: how long it stays open before a probe, jittered ±20% (5000).
    pub breaker_open_ms: Option<u64>,
    /// `AUDITFLOW_BREAKER_PROBE_TIMEOUT_MS`: the longest a half-open probe may take (10000).
    pub breaker_probe_timeout_ms: Option<u64>,
    /// `AUDITFLOW_INTERACTIVE_BREAKER_CONSECUTIVE_FAILURES`: the same for interactive commands
    /// (`partitions` commands, `replay` retries), default 3.
    pub interactive_breaker_consecutive_failures: Option<u32>,
    /// `AUDITFLOW_INTERACTIVE_BREAKER_FAILURE_RATE` (default 0.5).
    pub interactive_breaker_failure_rate: Option<f64>,
    /// `AUDITFLOW_INTERACTIVE_BREAKER_MIN_CALLS` (default 10).
    pub interactive_breaker_min_calls: Option<u32>,
    /// `AUDITFLOW_INTERACTIVE_BREAKER_WINDOW_MS` (default 10000).
    pub interactive_breaker_window_ms: Option<u64>,
    /// `AUDITFLOW_INTERACTIVE_BREAKER_OPEN_MS` (default 2000).
    pub interactive_breaker_open_ms: Option<u64>,
    /// `AUDITFLOW_INTERACTIVE_BREAKER_PROBE_TIMEOUT_MS` (default 5000).
    pub interactive_breaker_probe_timeout_ms: Option<u64>,
}

impl BreakerEnv {
    /// The ingest-path thresholds.
    pub fn ingest(&self) -> BreakerConfig {
        merge(
            BreakerConfig::INGEST,
            [
                self.breaker_consecutive_failures.map(u64::from),
                self.breaker_min_calls.map(u64::from),
                self.breaker_window_ms,
                self.breaker_open_ms,
                self.breaker_probe_timeout_ms,
            ],
            self.breaker_failure_rate,
        )
    }

    /// The thresholds for interactive commands.
    pub fn interactive(&self) -> BreakerConfig {
        merge(
            BreakerConfig::INTERACTIVE,
            [
                self.interactive_breaker_consecutive_failures.map(u64::from),
                self.interactive_breaker_min_calls.map(u64::from),
                self.interactive_breaker_window_ms,
                self.interactive_breaker_open_ms,
                self.interactive_breaker_probe_timeout_ms,
            ],
            self.interactive_breaker_failure_rate,
        )
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (prefix, config) in [
            ("AUDITFLOW_BREAKER_", self.ingest()),
            ("AUDITFLOW_INTERACTIVE_BREAKER_", self.interactive()),
        ] {
            if !(config.failure_rate > 0.0 && config.failure_rate <= 1.0) {
                return Err(ConfigError(format!(
                    "{prefix}FAILURE_RATE must be in (0, 1], got {}",
                    config.failure_rate
                )));
            }
            for (name, zero) in [
                ("CONSECUTIVE_FAILURES", config.consecutive_failures == 0),
                ("MIN_CALLS", config.min_calls == 0),
                ("WINDOW_MS", config.window.is_zero()),
                ("OPEN_MS", config.open_for.is_zero()),
                ("PROBE_TIMEOUT_MS", config.probe_timeout.is_zero()),
            ] {
                if zero {
                    return Err(ConfigError(format!(
                        "{prefix}{name} must be greater than zero"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Applies the set fields (consecutive failures, min calls, window, open, probe timeout in ms).
fn merge(
    base: BreakerConfig,
    values: [Option<u64>; 5],
    failure_rate: Option<f64>,
) -> BreakerConfig {
    let [consecutive, min_calls, window_ms, open_ms, probe_ms] = values;
    let count = |value: Option<u64>, default: u32| {
        value.map_or(default, |v| u32::try_from(v).unwrap_or(u32::MAX))
    };
    let millis =
        |value: Option<u64>, default: Duration| value.map_or(default, Duration::from_millis);
    BreakerConfig {
        consecutive_failures: count(consecutive, base.consecutive_failures),
        failure_rate: failure_rate.unwrap_or(base.failure_rate),
        min_calls: count(min_calls, base.min_calls),
        window: millis(window_ms, base.window),
        open_for: millis(open_ms, base.open_for),
        probe_timeout: millis(probe_ms, base.probe_timeout),
    }
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Kafka side.
    pub kafka: KafkaConfig,
    /// Postgres side.
    pub database: DatabaseConfig,
    /// Redis side.
    pub redis: RedisConfig,
    /// Batch limits.
    pub batch: BatchConfig,
    /// The rest.
    pub sink: SinkConfig,
    /// Circuit-breaker thresholds.
    pub breakers: BreakerEnv,
    /// Partition lifecycle.
    pub partitions: PartitionConfig,
    /// The schema registry, when Confluent ids are looked up there.
    pub registry: RegistryConfig,
    /// The read side (`auditflow serve`).
    pub serve: ServeConfig,
}

fn default_topic() -> String {
    "audit-events".into()
}
fn default_group_id() -> String {
    "auditflow".into()
}
fn default_dlq_topic() -> String {
    "audit-events.dlq".into()
}
fn default_db_schema() -> String {
    "audit".into()
}
fn default_db_max_connections() -> u32 {
    4
}
fn default_store_concurrency() -> u32 {
    2
}
fn default_db_acquire_timeout_ms() -> u64 {
    5_000
}
fn default_redis_url() -> Secret {
    Secret::new("redis://127.0.0.1:6379")
}
fn default_invalidation_channel() -> String {
    "auditflow.invalidations".into()
}
fn default_invalidation_queue() -> usize {
    1_024
}
fn default_invalidation_queue_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_batch_max_events() -> usize {
    5_000
}
fn default_batch_max_bytes() -> usize {
    8 * 1024 * 1024
}
fn default_batch_max_wait_ms() -> u64 {
    250
}
fn default_accept_past_days() -> u32 {
    30
}
fn default_accept_future_days() -> u32 {
    1
}
fn default_max_event_bytes() -> usize {
    1_000_000
}
fn default_max_key_field_bytes() -> usize {
    512
}
fn default_max_text_field_bytes() -> usize {
    8_192
}
fn default_max_details_bytes() -> usize {
    65_536
}
fn default_drain_timeout_ms() -> u64 {
    30_000
}
fn default_schema_dir() -> PathBuf {
    PathBuf::from("schemas")
}
fn default_metrics_addr() -> String {
    "127.0.0.1:9000".into()
}
fn default_log_format() -> String {
    "text".into()
}
fn default_partition_premake() -> u32 {
    7
}
fn default_partition_retention_days() -> u32 {
    400
}
fn default_partition_retired_grace_days() -> u32 {
    30
}
fn default_partition_maintenance_interval_ms() -> u64 {
    600_000
}
fn default_partition_lock_timeout_ms() -> u64 {
    2_000
}
fn default_schema_registry_timeout_ms() -> u64 {
    5_000
}
fn default_schema_registry_not_found_ttl_ms() -> u64 {
    30_000
}
fn default_schema_registry_cache_capacity() -> usize {
    1_000
}

impl Config {
    /// Loads the configuration from the process environment and validates it.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Loads the configuration from the given variables (tests pass their own) and validates it.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        // Empty values count as unset, as in most orchestrators' templating.
        let vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(key, value)| key.starts_with(ENV_PREFIX) && !value.is_empty())
            .collect();
        let mut kafka: KafkaConfig = load(&vars)?;
        kafka.properties = vars
            .iter()
            .filter_map(|(key, value)| {
                let name = key.strip_prefix(KAFKA_OPT_PREFIX)?;
                Some((kafka_property_name(name), Secret::new(value.clone())))
            })
            .collect();
        let config = Config {
            kafka,
            database: load(&vars)?,
            redis: load(&vars)?,
            batch: load(&vars)?,
            sink: load(&vars)?,
            breakers: load(&vars)?,
            partitions: load(&vars)?,
            registry: load(&vars)?,
            serve: load(&vars)?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the rules a single field's type cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let schema = &self.database.db_schema;
        if !is_plain_identifier(schema) {
            return Err(ConfigError(format!(
                "AUDITFLOW_DB_SCHEMA must be a lowercase identifier ([a-z_][a-z0-9_]*, at most 63 bytes), got {schema:?}"
            )));
        }
        for (variable, value) in [
            ("AUDITFLOW_KAFKA_TOPIC", &self.kafka.kafka_topic),
            ("AUDITFLOW_DLQ_TOPIC", &self.kafka.dlq_topic),
            ("AUDITFLOW_KAFKA_GROUP_ID", &self.kafka.kafka_group_id),
            (
                "AUDITFLOW_INVALIDATION_CHANNEL",
                &self.redis.invalidation_channel,
            ),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError(format!("{variable} must not be empty")));
            }
        }
        if self.kafka.kafka_topic == self.kafka.dlq_topic {
            return Err(ConfigError(
                "AUDITFLOW_DLQ_TOPIC must differ from AUDITFLOW_KAFKA_TOPIC".into(),
            ));
        }
        for (variable, value) in [
            (
                "AUDITFLOW_BATCH_MAX_EVENTS",
                self.batch.batch_max_events as u64,
            ),
            (
                "AUDITFLOW_BATCH_MAX_BYTES",
                self.batch.batch_max_bytes as u64,
            ),
            ("AUDITFLOW_BATCH_MAX_WAIT_MS", self.batch.batch_max_wait_ms),
            (
                "AUDITFLOW_DB_MAX_CONNECTIONS",
                u64::from(self.database.db_max_connections),
            ),
            (
                "AUDITFLOW_STORE_CONCURRENCY",
                u64::from(self.database.store_concurrency),
            ),
            (
                "AUDITFLOW_INVALIDATION_QUEUE",
                self.redis.invalidation_queue as u64,
            ),
            (
                "AUDITFLOW_MAX_EVENT_BYTES",
                self.sink.max_event_bytes as u64,
            ),
            (
                "AUDITFLOW_MAX_KEY_FIELD_BYTES",
                self.sink.max_key_field_bytes as u64,
            ),
            (
                "AUDITFLOW_MAX_TEXT_FIELD_BYTES",
                self.sink.max_text_field_bytes as u64,
            ),
            (
                "AUDITFLOW_MAX_DETAILS_BYTES",
                self.sink.max_details_bytes as u64,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError(format!("{variable} must be greater than zero")));
            }
        }
        if self.redis.invalidation_queue_bytes < 262_144 {
            return Err(ConfigError(format!(
                "AUDITFLOW_INVALIDATION_QUEUE_BYTES must be at least 262144 (the largest invalidation message), got {}",
                self.redis.invalidation_queue_bytes
            )));
        }
        if self.database.store_concurrency > 16 {
            return Err(ConfigError(format!(
                "AUDITFLOW_STORE_CONCURRENCY must be at most 16, got {}",
                self.database.store_concurrency
            )));
        }
        if self.batch.batch_max_events > 1_000_000 {
            return Err(ConfigError(
                "AUDITFLOW_BATCH_MAX_EVENTS must be at most 1000000".into(),
            ));
        }
        if self.sink.accept_past_days > 3_650 || self.sink.accept_future_days > 365 {
            return Err(ConfigError(
                "AUDITFLOW_ACCEPT_PAST_DAYS must be at most 3650 and AUDITFLOW_ACCEPT_FUTURE_DAYS at most 365".into(),
            ));
        }
        if self.sink.metrics_addr != METRICS_OFF
            && self.sink.metrics_addr.parse::<SocketAddr>().is_err()
        {
            return Err(ConfigError(format!(
                "AUDITFLOW_METRICS_ADDR must be host:port (an IP address) or off, got {:?}",
                self.sink.metrics_addr
            )));
        }
        if let Some(directives) = &self.sink.log_level {
            if tracing_subscriber::EnvFilter::try_new(directives).is_err() {
                return Err(ConfigError(format!(
                    "AUDITFLOW_LOG_LEVEL is not a valid log filter: {directives:?}"
                )));
            }
        }
        if self
            .sink
            .replay_rate
            .is_some_and(|rate| rate.is_nan() || rate <= 0.0)
        {
            return Err(ConfigError("AUDITFLOW_REPLAY_RATE must be positive".into()));
        }
        if !matches!(self.sink.log_format.as_str(), "text" | "json") {
            return Err(ConfigError(format!(
                "AUDITFLOW_LOG_FORMAT must be text or json, got {:?}",
                self.sink.log_format
            )));
        }
        self.breakers.validate()?;
        self.partitions.validate(&self.sink)?;
        self.serve.validate()?;
        self.registry.validate()?;
        if let Err(err) = crate::redis_client::open(
            self.redis.redis_url.expose(),
            self.redis.redis_ca_file.as_deref(),
        ) {
            use crate::redis_client::RedisClientError;
            return Err(ConfigError(match err {
                RedisClientError::Url(_) => {
                    "AUDITFLOW_REDIS_URL must be a redis:// or rediss:// URL".into()
                }
                RedisClientError::CaWithoutTls => {
                    "AUDITFLOW_REDIS_CA_FILE is set but AUDITFLOW_REDIS_URL is not rediss://".into()
                }
                other @ RedisClientError::CaFile { .. } => {
                    format!("AUDITFLOW_REDIS_CA_FILE: {other}")
                }
            }));
        }
        for reserved in ["enable.auto.offset.store", "enable.auto.commit", "group.id"] {
            if self.kafka.properties.contains_key(reserved) {
                return Err(ConfigError(format!(
                    "{} is managed by auditflow and cannot be overridden",
                    kafka_property_variable(reserved)
                )));
            }
        }
        check_kafka_properties(&self.kafka.properties)
    }

    /// The brokers, or an error naming the variable when a command needs them.
    pub fn require_brokers(&self) -> Result<&str, ConfigError> {
        self.kafka
            .kafka_brokers
            .as_deref()
            .ok_or_else(|| ConfigError("AUDITFLOW_KAFKA_BROKERS is required".into()))
    }

    /// The database URL, or an error naming the variable when a command needs it.
    pub fn require_database_url(&self) -> Result<&Secret, ConfigError> {
        self.database
            .database_url
            .as_ref()
            .ok_or_else(|| ConfigError("AUDITFLOW_DATABASE_URL is required".into()))
    }

    /// The log filter: `AUDITFLOW_LOG_LEVEL`, else `RUST_LOG`, else `info`.
    pub fn log_directives(&self) -> String {
        self.sink
            .log_level
            .clone()
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info".into())
    }

    /// The name this replica uses in logs and dead-letter headers.
    pub fn instance_id(&self) -> String {
        self.sink.instance_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|name| name.trim().to_owned())
                .unwrap_or_else(|_| "localhost".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

impl BatchConfig {
    /// The longest an event waits in an open batch.
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.batch_max_wait_ms)
    }
}

impl DatabaseConfig {
    /// How long a batch waits for a pooled connection.
    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.db_acquire_timeout_ms)
    }

    /// The pool these settings describe, with no session set-up of its own.
    pub fn pool_settings(&self) -> PoolSettings {
        PoolSettings {
            schema: self.db_schema.clone(),
            max_connections: self.db_max_connections,
            acquire_timeout: self.acquire_timeout(),
            session_setup: &[],
        }
    }
}

impl SinkConfig {
    /// The bound on a graceful shutdown.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

/// The librdkafka property an `AUDITFLOW_KAFKA_OPT_<NAME>` variable sets: lowercase, each `_` a
/// `.`, and each `__` a literal `_` (for the few properties with one, e.g. `LOG__LEVEL` is
/// `log_level`).
pub fn kafka_property_name(suffix: &str) -> String {
    suffix
        .to_lowercase()
        .split("__")
        .map(|part| part.replace('_', "."))
        .collect::<Vec<_>>()
        .join("_")
}

/// The variable that sets librdkafka property `name` (the inverse of [`kafka_property_name`]).
pub fn kafka_property_variable(name: &str) -> String {
    format!(
        "{KAFKA_OPT_PREFIX}{}",
        name.replace('_', "__").replace('.', "_").to_uppercase()
    )
}

/// Checks every pass-through property with librdkafka itself, so a misspelt name or a bad value
/// stops start-up with a message that names the variable and never shows the value (librdkafka's
/// own message repeats it, and the value may be a password).
fn check_kafka_properties(properties: &BTreeMap<String, Secret>) -> Result<(), ConfigError> {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaConfRes;
    for (name, value) in properties {
        let mut scratch = rdkafka::ClientConfig::new();
        scratch.set(name, value.expose());
        let Err(err) = scratch.create_native_config() else {
            continue;
        };
        let variable = kafka_property_variable(name);
        let why = match err {
            KafkaError::ClientConfig(RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN, ..) => {
                format!("librdkafka has no property {name:?}")
            }
            KafkaError::ClientConfig(RDKafkaConfRes::RD_KAFKA_CONF_INVALID, ..) => {
                format!("invalid value for librdkafka property {name:?} (value not shown)")
            }
            _ => format!("librdkafka refuses property {name:?} (value not shown)"),
        };
        return Err(ConfigError(format!("{variable}: {why}")));
    }
    Ok(())
}

/// Deserializes one concern's struct, turning envy's messages into ones naming the full variable.
fn load<T: DeserializeOwned>(vars: &[(String, String)]) -> Result<T, ConfigError> {
    envy::prefixed(ENV_PREFIX)
        .from_iter(vars.iter().cloned())
        .map_err(|err| match err {
            envy::Error::MissingValue(field) => {
                ConfigError(format!("{ENV_PREFIX}{} is required", field.to_uppercase()))
            }
            envy::Error::Custom(message) => {
                ConfigError(message.replace("provided by ", &format!("provided by {ENV_PREFIX}")))
            }
        })
}

/// True for identifiers that are safe to splice into SQL unquoted and lowercase.
pub fn is_plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let config = Config::from_vars(vars(&[])).unwrap();
        assert_eq!(config.kafka.kafka_topic, "audit-events");
        assert_eq!(config.kafka.kafka_group_id, "auditflow");
        assert_eq!(config.kafka.dlq_topic, "audit-events.dlq");
        assert_eq!(config.database.db_schema, "audit");
        assert_eq!(config.sink.accept_past_days, 30);
        assert_eq!(config.sink.accept_future_days, 1);
        assert!(config.require_brokers().is_err());
    }

    #[test]
    fn a_bad_number_names_the_variable() {
        let err = Config::from_vars(vars(&[("AUDITFLOW_BATCH_MAX_EVENTS", "many")])).unwrap_err();
        assert!(
            err.to_string().contains("AUDITFLOW_BATCH_MAX_EVENTS"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_schema_name_names_the_variable() {
        let err =
            Config::from_vars(vars(&[("AUDITFLOW_DB_SCHEMA", "audit; drop table x")])).unwrap_err();
        assert!(err.to_string().contains("AUDITFLOW_DB_SCHEMA"), "{err}");
    }

    #[test]
    fn missing_required_values_name_the_variable() {
        let config = Config::from_vars(vars(&[])).unwrap();
        let err = config.require_database_url().unwrap_err();
        assert!(err.to_string().contains("AUDITFLOW_DATABASE_URL"), "{err}");
    }

    #[test]
    fn zero_limits_are_rejected() {
        let err = Config::from_vars(vars(&[("AUDITFLOW_BATCH_MAX_WAIT_MS", "0")])).unwrap_err();
        assert!(
            err.to_string().contains("AUDITFLOW_BATCH_MAX_WAIT_MS"),
            "{err}"
        );
    }

    #[test]
    fn kafka_properties_pass_through_and_stay_secret() {
        let config = Config::from_vars(vars(&[
            ("AUDITFLOW_KAFKA_OPT_SASL_PASSWORD", "hunter2"),
            ("AUDITFLOW_KAFKA_OPT_SECURITY_PROTOCOL", "SASL_SSL"),
            ("AUDITFLOW_DATABASE_URL", "postgres://u:pw@h/db"),
        ]))
        .unwrap();
        assert_eq!(
            config
                .kafka
                .properties
                .get("sasl.password")
                .map(Secret::expose),
            Some("hunter2")
        );
        assert_eq!(
            config
                .kafka
                .properties
                .get("security.protocol")
                .map(Secret::expose),
            Some("SASL_SSL")
        );
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("pw@"), "{printed}");
    }

    #[test]
    fn breaker_thresholds_are_separate_for_ingest_and_interactive_use() {
        let config = Config::from_vars(vars(&[
            ("AUDITFLOW_BREAKER_CONSECUTIVE_FAILURES", "9"),
            ("AUDITFLOW_INTERACTIVE_BREAKER_OPEN_MS", "750"),
        ]))
        .unwrap();
        assert_eq!(config.breakers.ingest().consecutive_failures, 9);
        assert_eq!(
            config.breakers.ingest().open_for,
            BreakerConfig::INGEST.open_for
        );
        assert_eq!(
            config.breakers.interactive().open_for,
            Duration::from_millis(750)
        );
        assert_eq!(
            config.breakers.interactive().consecutive_failures,
            BreakerConfig::INTERACTIVE.consecutive_failures
        );
        let err = Config::from_vars(vars(&[(
            "AUDITFLOW_INTERACTIVE_BREAKER_FAILURE_RATE",
            "1.5",
        )]))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("AUDITFLOW_INTERACTIVE_BREAKER_FAILURE_RATE"),
            "{err}"
        );
    }

    #[test]
    fn partition_settings_load_with_defaults_and_name_their_variable() {
        let config = Config::from_vars(vars(&[])).unwrap();
        assert_eq!(config.partitions.partition_interval, PartitionInterval::Day);
        assert_eq!(config.partitions.partition_premake, 7);
        assert_eq!(config.partitions.partition_retention_days, 400);
        assert_eq!(config.partitions.partition_retired_grace_days, 30);
        assert_eq!(
            config.partitions.maintenance_interval(),
            Duration::from_secs(600)
        );
        assert_eq!(config.partitions.lock_timeout(), Duration::from_secs(2));
        let config = Config::from_vars(vars(&[
            ("AUDITFLOW_PARTITION_INTERVAL", "week"),
            ("AUDITFLOW_PARTITION_RETENTION_DAYS", "0"),
        ]))
        .unwrap();
        assert_eq!(
            config.partitions.partition_interval,
            PartitionInterval::Week
        );
        assert_eq!(config.partitions.retention(), None);
        for (variable, value) in [
            ("AUDITFLOW_PARTITION_INTERVAL", "fortnight"),
            ("AUDITFLOW_PARTITION_PREMAKE", "many"),
            ("AUDITFLOW_PARTITION_PREMAKE", "1000"),
            ("AUDITFLOW_PARTITION_LOCK_TIMEOUT_MS", "0"),
            ("AUDITFLOW_PARTITION_MAINTENANCE_INTERVAL_MS", "0"),
            ("AUDITFLOW_PARTITION_RETIRED_GRACE_DAYS", "100000"),
        ] {
            let err = Config::from_vars(vars(&[(variable, value)])).unwrap_err();
            assert!(
                err.to_string().contains(variable),
                "{variable}={value}: {err}"
            );
        }
    }

    #[test]
    fn retention_must_outlast_the_accepted_past() {
        let err = Config::from_vars(vars(&[
            ("AUDITFLOW_PARTITION_RETENTION_DAYS", "30"),
            ("AUDITFLOW_ACCEPT_PAST_DAYS", "30"),
        ]))
        .unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("AUDITFLOW_PARTITION_RETENTION_DAYS")
                && message.contains("AUDITFLOW_ACCEPT_PAST_DAYS"),
            "{message}"
        );
        let config = Config::from_vars(vars(&[
            ("AUDITFLOW_PARTITION_RETENTION_DAYS", "31"),
            ("AUDITFLOW_ACCEPT_PAST_DAYS", "30"),
        ]))
        .unwrap();
        // The partition lifecycle's protected window reads the same variable.
        assert_eq!(config.partitions.accept_past_days, 30);
        let config = Config::from_vars(vars(&[("AUDITFLOW_ACCEPT_PAST_DAYS", "3")])).unwrap();
        assert_eq!(config.partitions.accept_past_days, 3);
    }

    #[test]
    fn a_misspelt_or_invalid_kafka_property_names_its_variable_and_hides_its_value() {
        let err = Config::from_vars(vars(&[(
            "AUDITFLOW_KAFKA_OPT_SASL_PASSWD",
            "hunter2-secret",
        )]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("AUDITFLOW_KAFKA_OPT_SASL_PASSWD"), "{err}");
        assert!(err.contains("no property \"sasl.passwd\""), "{err}");
        assert!(!err.contains("hunter2-secret"), "{err}");
        let err = Config::from_vars(vars(&[(
            "AUDITFLOW_KAFKA_OPT_SECURITY_PROTOCOL",
            "hunter3-secret",
        )]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("AUDITFLOW_KAFKA_OPT_SECURITY_PROTOCOL"),
            "{err}"
        );
        assert!(!err.contains("hunter3-secret"), "{err}");
    }

    #[test]
    fn a_double_underscore_sets_a_property_whose_name_has_an_underscore() {
        assert_eq!(kafka_property_name("LOG__LEVEL"), "log_level");
        assert_eq!(kafka_property_name("SASL_MECHANISMS"), "sasl.mechanisms");
        assert_eq!(
            kafka_property_name("SSL_ENDPOINT_IDENTIFICATION_ALGORITHM"),
            "ssl.endpoint.identification.algorithm"
        );
        for name in ["log_level", "sasl.mechanisms", "enable.auto.commit"] {
            let variable = kafka_property_variable(name);
            let suffix = variable.strip_prefix(KAFKA_OPT_PREFIX).unwrap();
            assert_eq!(kafka_property_name(suffix), name, "{variable}");
        }
        let config = Config::from_vars(vars(&[("AUDITFLOW_KAFKA_OPT_LOG__LEVEL", "6")])).unwrap();
        assert_eq!(
            config.kafka.properties.get("log_level").map(Secret::expose),
            Some("6")
        );
    }

    #[test]
    fn the_registry_is_off_by_default_and_takes_a_list_of_urls() {
        let config = Config::from_vars(vars(&[])).unwrap();
        assert!(!config.registry.is_enabled());
        assert_eq!(config.registry.timeout(), Duration::from_secs(5));
        assert_eq!(config.registry.not_found_ttl(), Duration::from_secs(30));
        assert_eq!(config.registry.schema_registry_cache_capacity, 1_000);
        let config = Config::from_vars(vars(&[(
            "AUDITFLOW_SCHEMA_REGISTRY_URL",
            "http://sr-1:8081/, https://sr-2.example:8443/apis/ccompat/v7",
        )]))
        .unwrap();
        assert_eq!(
            config.registry.urls(),
            vec![
                "http://sr-1:8081".to_owned(),
                "https://sr-2.example:8443/apis/ccompat/v7".to_owned()
            ]
        );
    }

    #[test]
    fn bad_registry_settings_name_their_variable_and_never_echo_secrets() {
        for (pairs, variable) in [
            (
                vec![("AUDITFLOW_SCHEMA_REGISTRY_URL", "sr-1:8081")],
                "AUDITFLOW_SCHEMA_REGISTRY_URL",
            ),
            (
                vec![("AUDITFLOW_SCHEMA_REGISTRY_URL", " , ")],
                "AUDITFLOW_SCHEMA_REGISTRY_URL",
            ),
            (
                vec![(
                    "AUDITFLOW_SCHEMA_REGISTRY_URL",
                    "https://user:hunter2@sr-1:8081",
                )],
                "AUDITFLOW_SCHEMA_REGISTRY_URL",
            ),
            (
                vec![
                    ("AUDITFLOW_SCHEMA_REGISTRY_URL", "http://sr-1:8081"),
                    ("AUDITFLOW_SCHEMA_REGISTRY_USERNAME", "auditflow"),
                ],
                "AUDITFLOW_SCHEMA_REGISTRY_PASSWORD",
            ),
            (
                vec![
                    ("AUDITFLOW_SCHEMA_REGISTRY_URL", "http://sr-1:8081"),
                    ("AUDITFLOW_SCHEMA_REGISTRY_PASSWORD", "hunter2"),
                ],
                "AUDITFLOW_SCHEMA_REGISTRY_USERNAME",
            ),
            (
                vec![
                    ("AUDITFLOW_SCHEMA_REGISTRY_URL", "http://sr-1:8081"),
                    ("AUDITFLOW_SCHEMA_REGISTRY_USERNAME", "auditflow"),
                    ("AUDITFLOW_SCHEMA_REGISTRY_PASSWORD", "hunter2"),
                    ("AUDITFLOW_SCHEMA_REGISTRY_BEARER_TOKEN", "hunter2"),
                ],
                "AUDITFLOW_SCHEMA_REGISTRY_BEARER_TOKEN",
            ),
            (
                vec![
                    ("AUDITFLOW_SCHEMA_REGISTRY_URL", "http://sr-1:8081"),
                    ("AUDITFLOW_SCHEMA_REGISTRY_CERT_FILE", "/etc/hostname"),
                ],
                "AUDITFLOW_SCHEMA_REGISTRY_KEY_FILE",
            ),
            (
                vec![
                    ("AUDITFLOW_SCHEMA_REGISTRY_URL", "http://sr-1:8081"),
                    ("AUDITFLOW_SCHEMA_REGISTRY_CA_FILE", "/nonexistent/ca.pem"),
                ],
                "AUDITFLOW_SCHEMA_REGISTRY_CA_FILE",
            ),
            (
                vec![("AUDITFLOW_SCHEMA_REGISTRY_TIMEOUT_MS", "0")],
                "AUDITFLOW_SCHEMA_REGISTRY_TIMEOUT_MS",
            ),
            (
                vec![("AUDITFLOW_SCHEMA_REGISTRY_NOT_FOUND_TTL_MS", "soon")],
                "AUDITFLOW_SCHEMA_REGISTRY_NOT_FOUND_TTL_MS",
            ),
            (
                vec![("AUDITFLOW_SCHEMA_REGISTRY_CACHE_CAPACITY", "0")],
                "AUDITFLOW_SCHEMA_REGISTRY_CACHE_CAPACITY",
            ),
        ] {
            let err = Config::from_vars(vars(&pairs)).unwrap_err().to_string();
            assert!(err.contains(variable), "{pairs:?}: {err}");
            assert!(!err.contains("hunter2"), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn registry_secrets_stay_out_of_debug_output() {
        let config = Config::from_vars(vars(&[
            ("AUDITFLOW_SCHEMA_REGISTRY_URL", "http://sr-1:8081"),
            ("AUDITFLOW_SCHEMA_REGISTRY_USERNAME", "auditflow"),
            ("AUDITFLOW_SCHEMA_REGISTRY_PASSWORD", "hunter2"),
        ]))
        .unwrap();
        assert_eq!(
            config
                .registry
                .schema_registry_password
                .as_ref()
                .map(Secret::expose),
            Some("hunter2")
        );
        let printed = format!("{config:?}");
        assert!(printed.contains("auditflow"), "{printed}");
        assert!(!printed.contains("hunter2"), "{printed}");
        let config = Config::from_vars(vars(&[
            ("AUDITFLOW_SCHEMA_REGISTRY_URL", "http://sr-1:8081"),
            ("AUDITFLOW_SCHEMA_REGISTRY_BEARER_TOKEN", "tok-hunter2"),
        ]))
        .unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn managed_kafka_properties_cannot_be_overridden() {
        let err = Config::from_vars(vars(&[(
            "AUDITFLOW_KAFKA_OPT_ENABLE_AUTO_OFFSET_STORE",
            "true",
        )]))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("AUDITFLOW_KAFKA_OPT_ENABLE_AUTO_OFFSET_STORE"),
            "{err}"
        );
    }
}
