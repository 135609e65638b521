//! `auditflow serve`: the read side's settings (`AUDITFLOW_SERVE_*`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// The query API (`auditflow serve`).
#[derive(Debug, Clone, Deserialize)]
pub struct ServeConfig {
    /// `AUDITFLOW_SERVE_ADDR`: where the API, the viewer page and its `/metrics` listen
    /// (default `127.0.0.1:8080`). Anything but a loopback address needs
    /// `AUDITFLOW_SERVE_TOKENS_FILE`: without tokens, `serve` refuses to start.
    #[serde(default = "default_serve_addr")]
    pub serve_addr: String,
    /// `AUDITFLOW_SERVE_TOKENS_FILE`: one line per bearer token, the lowercase hex SHA-256 of
    /// the token, a space, and its comma-separated tenants (`*` for all); `#` starts a comment.
    /// Read at start (an unreadable or malformed file stops start-up) and again on SIGHUP (a
    /// malformed file is then rejected whole and the tokens in force stay).
    pub serve_tokens_file: Option<PathBuf>,
    /// `AUDITFLOW_SERVE_MAX_SPAN_DAYS`: the longest `to - from` a query or an export may ask for
    /// (default 31). It bounds what a query may touch before the cost guard even looks.
    #[serde(default = "default_serve_max_span_days")]
    pub serve_max_span_days: u32,
    /// `AUDITFLOW_SERVE_DEFAULT_LIMIT`: events per page when `limit` is not given (default 100).
    #[serde(default = "default_serve_default_limit")]
    pub serve_default_limit: u32,
    /// `AUDITFLOW_SERVE_MAX_LIMIT`: the largest `limit` accepted (default 1000).
    #[serde(default = "default_serve_max_limit")]
    pub serve_max_limit: u32,
    /// `AUDITFLOW_SERVE_MAX_COST`: a page query whose planned total cost (EXPLAIN, in the
    /// planner's units) exceeds this is refused with 422 (default 250000).
    #[serde(default = "default_serve_max_cost")]
    pub serve_max_cost: f64,
    /// `AUDITFLOW_SERVE_MAX_ROWS`: a page query whose plan estimates more rows than this is
    /// refused with 422 (default 1000000).
    #[serde(default = "default_serve_max_rows")]
    pub serve_max_rows: f64,
    /// `AUDITFLOW_SERVE_SEQ_SCAN_MAX_ROWS`: a query or export whose plan scans a partition
    /// holding more rows than this sequentially is refused with 422 (default 200000).
    #[serde(default = "default_serve_seq_scan_max_rows")]
    pub serve_seq_scan_max_rows: f64,
    /// `AUDITFLOW_SERVE_EXPORT_MAX_ROWS`: an export whose plan estimates more rows than this is
    /// refused with 422 (default 20000000). Exports stream in constant memory, so this bounds
    /// database work, not the server's memory.
    #[serde(default = "default_serve_export_max_rows")]
    pub serve_export_max_rows: f64,
    /// `AUDITFLOW_SERVE_STATEMENT_TIMEOUT_MS`: `statement_timeout` of every page query and
    /// lookup (default 5000).
    #[serde(default = "default_serve_statement_timeout_ms")]
    pub serve_statement_timeout_ms: u64,
    /// `AUDITFLOW_SERVE_EXPORT_STATEMENT_TIMEOUT_MS`: `statement_timeout` of an export, which
    /// runs as long as its client reads (default 600000).
    #[serde(default = "default_serve_export_statement_timeout_ms")]
    pub serve_export_statement_timeout_ms: u64,
    /// `AUDITFLOW_SERVE_CACHE_BYTES`: bound of the in-process (L1) cache, weighed in bytes of
    /// cached responses plus keys (default 67108864). The process's RSS stays under this plus
    /// a fixed overhead.
    #[serde(default = "default_serve_cache_bytes")]
    pub serve_cache_bytes: u64,
    /// `AUDITFLOW_SERVE_CACHE_TTL_MS`: the longest a cached result lives, in L1 and in Redis
    /// (default 60000). A safety net only: invalidations and reconciliation bound staleness.
    #[serde(default = "default_serve_cache_ttl_ms")]
    pub serve_cache_ttl_ms: u64,
    /// `AUDITFLOW_SERVE_L2_CACHE`: `true` (default) shares results between serve instances in
    /// Redis (`AUDITFLOW_REDIS_URL`); skipped while its breaker is open; `false` disables it.
    #[serde(default = "default_serve_l2_cache")]
    pub serve_l2_cache: bool,
    /// `AUDITFLOW_SERVE_MAX_CONCURRENT_QUERIES`: database queries one serve instance runs at
    /// once, exports included (default 8); the pool has two more connections for the
    /// invalidation subscriber's reconciliation.
    #[serde(default = "default_serve_max_concurrent_queries")]
    pub serve_max_concurrent_queries: u32,
    /// `AUDITFLOW_SERVE_QUEUE_TIMEOUT_MS`: how long a request waits for a query slot before it
    /// gets 503 with `Retry-After` (default 2000).
    #[serde(default = "default_serve_queue_timeout_ms")]
    pub serve_queue_timeout_ms: u64,
    /// `AUDITFLOW_SERVE_RATE_LIMIT`: requests per second per token (default 20), as a token
    /// bucket; beyond it 429 with `Retry-After`.
    #[serde(default = "default_serve_rate_limit")]
    pub serve_rate_limit: f64,
    /// `AUDITFLOW_SERVE_RATE_BURST`: requests a token may send at once above the rate
    /// (default 40).
    #[serde(default = "default_serve_rate_burst")]
    pub serve_rate_burst: u32,
    /// `AUDITFLOW_SERVE_RECONCILE_INTERVAL_MS`: how often the committed-batch log is compared
    /// with the invalidations received (default 5000): the bound on staleness when a message
    /// is lost and no later message reveals it.
    #[serde(default = "default_serve_reconcile_interval_ms")]
    pub serve_reconcile_interval_ms: u64,
}

impl ServeConfig {
    /// The listen address.
    pub fn addr(&self) -> Result<SocketAddr, ConfigError> {
        self.serve_addr.parse().map_err(|_| {
            ConfigError(format!(
                "AUDITFLOW_SERVE_ADDR must be host:port (an IP address), got {:?}",
                self.serve_addr
            ))
        })
    }

    /// Refuses a non-loopback address without tokens: an API nobody authenticates must not be
    /// reachable from outside the host.
    pub fn check_exposure(&self) -> Result<SocketAddr, ConfigError> {
        let addr = self.addr()?;
        if self.serve_tokens_file.is_none() && !addr.ip().is_loopback() {
            return Err(ConfigError(format!(
                "AUDITFLOW_SERVE_ADDR {addr} is not a loopback address: set \
                 AUDITFLOW_SERVE_TOKENS_FILE (bearer tokens scoped to tenants) to serve beyond this \
                 host, or bind 127.0.0.1"
            )));
        }
        Ok(addr)
    }

    /// `statement_timeout` of page queries.
    pub fn statement_timeout(&self) -> Duration {
        Duration::from_millis(self.serve_statement_timeout_ms)
    }

    /// `statement_timeout` of exports.
    pub fn export_statement_timeout(&self) -> Duration {
        Duration::from_millis(self.serve_export_statement_timeout_ms)
    }

    /// Cache time to live.
    pub fn cache_ttl(&self) -> Duration {
        Duration::from_millis(self.serve_cache_ttl_ms)
    }

    /// Wait for a query slot.
    pub fn queue_timeout(&self) -> Duration {
        Duration::from_millis(self.serve_queue_timeout_ms)
    }

    /// Reconciliation interval.
    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_millis(self.serve_reconcile_interval_ms)
    }

    /// The longest span a query may ask for.
    pub fn max_span(&self) -> chrono::Duration {
        chrono::Duration::days(i64::from(self.serve_max_span_days))
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.addr()?;
        for (variable, value) in [
            (
                "AUDITFLOW_SERVE_MAX_SPAN_DAYS",
                u64::from(self.serve_max_span_days),
            ),
            (
                "AUDITFLOW_SERVE_DEFAULT_LIMIT",
                u64::from(self.serve_default_limit),
            ),
            ("AUDITFLOW_SERVE_MAX_LIMIT", u64::from(self.serve_max_limit)),
            (
                "AUDITFLOW_SERVE_STATEMENT_TIMEOUT_MS",
                self.serve_statement_timeout_ms,
            ),
            (
                "AUDITFLOW_SERVE_EXPORT_STATEMENT_TIMEOUT_MS",
                self.serve_export_statement_timeout_ms,
            ),
            ("AUDITFLOW_SERVE_CACHE_TTL_MS", self.serve_cache_ttl_ms),
            (
                "AUDITFLOW_SERVE_MAX_CONCURRENT_QUERIES",
                u64::from(self.serve_max_concurrent_queries),
            ),
            (
                "AUDITFLOW_SERVE_QUEUE_TIMEOUT_MS",
                self.serve_queue_timeout_ms,
            ),
            (
                "AUDITFLOW_SERVE_RATE_BURST",
                u64::from(self.serve_rate_burst),
            ),
            (
                "AUDITFLOW_SERVE_RECONCILE_INTERVAL_MS",
                self.serve_reconcile_interval_ms,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError(format!("{variable} must be greater than zero")));
            }
        }
        if self.serve_max_span_days > 3_650 {
            return Err(ConfigError(format!(
                "AUDITFLOW_SERVE_MAX_SPAN_DAYS must be at most 3650, got {}",
                self.serve_max_span_days
            )));
        }
        if self.serve_default_limit > self.serve_max_limit {
            return Err(ConfigError(format!(
                "AUDITFLOW_SERVE_DEFAULT_LIMIT ({}) must not exceed AUDITFLOW_SERVE_MAX_LIMIT ({})",
                self.serve_default_limit, self.serve_max_limit
            )));
        }
        if self.serve_max_limit > 10_000 {
            return Err(ConfigError(format!(
                "AUDITFLOW_SERVE_MAX_LIMIT must be at most 10000 (use /v1/export for more), got {}",
                self.serve_max_limit
            )));
        }
        if self.serve_max_concurrent_queries > 1_000 {
            return Err(ConfigError(format!(
                "AUDITFLOW_SERVE_MAX_CONCURRENT_QUERIES must be at most 1000, got {}",
                self.serve_max_concurrent_queries
            )));
        }
        for (variable, value) in [
            ("AUDITFLOW_SERVE_MAX_COST", self.serve_max_cost),
            ("AUDITFLOW_SERVE_MAX_ROWS", self.serve_max_rows),
            (
                "AUDITFLOW_SERVE_SEQ_SCAN_MAX_ROWS",
                self.serve_seq_scan_max_rows,
            ),
            (
                "AUDITFLOW_SERVE_EXPORT_MAX_ROWS",
                self.serve_export_max_rows,
            ),
            ("AUDITFLOW_SERVE_RATE_LIMIT", self.serve_rate_limit),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(ConfigError(format!(
                    "{variable} must be a positive number, got {value}"
                )));
            }
        }
        if self.serve_cache_bytes < 1024 * 1024 {
            return Err(ConfigError(format!(
                "AUDITFLOW_SERVE_CACHE_BYTES must be at least 1048576, got {}",
                self.serve_cache_bytes
            )));
        }
        if self.serve_cache_bytes > u64::from(u32::MAX) * 16 {
            return Err(ConfigError(format!(
                "AUDITFLOW_SERVE_CACHE_BYTES must be at most {}, got {}",
                u64::from(u32::MAX) * 16,
                self.serve_cache_bytes
            )));
        }
        Ok(())
    }
}

fn default_serve_addr() -> String {
    "127.0.0.1:8080".into()
}
fn default_serve_max_span_days() -> u32 {
    31
}
fn default_serve_default_limit() -> u32 {
    100
}
fn default_serve_max_limit() -> u32 {
    1_000
}
fn default_serve_max_cost() -> f64 {
    250_000.0
}
fn default_serve_max_rows() -> f64 {
    1_000_000.0
}
fn default_serve_seq_scan_max_rows() -> f64 {
    200_000.0
}
fn default_serve_export_max_rows() -> f64 {
    20_000_000.0
}
fn default_serve_statement_timeout_ms() -> u64 {
    5_000
}
fn default_serve_export_statement_timeout_ms() -> u64 {
    600_000
}
fn default_serve_cache_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_serve_cache_ttl_ms() -> u64 {
    60_000
}
fn default_serve_l2_cache() -> bool {
    true
}
fn default_serve_max_concurrent_queries() -> u32 {
    8
}
fn default_serve_queue_timeout_ms() -> u64 {
    2_000
}
fn default_serve_rate_limit() -> f64 {
    20.0
}
fn default_serve_rate_burst() -> u32 {
    40
}
fn default_serve_reconcile_interval_ms() -> u64 {
    5_000
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn load(pairs: &[(&str, &str)]) -> Result<Config, String> {
        Config::from_vars(
            pairs
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string())),
        )
        .map_err(|err| err.to_string())
    }

    #[test]
    fn serve_defaults_load_and_bind_loopback_only() {
        let config = load(&[]).unwrap();
        assert_eq!(config.serve.serve_addr, "127.0.0.1:8080");
        assert!(config.serve.check_exposure().is_ok());
        let exposed = load(&[("AUDITFLOW_SERVE_ADDR", "0.0.0.0:8080")]).unwrap();
        let err = exposed.serve.check_exposure().unwrap_err().to_string();
        assert!(err.contains("AUDITFLOW_SERVE_TOKENS_FILE"), "{err}");
        let with_tokens = load(&[
            ("AUDITFLOW_SERVE_ADDR", "0.0.0.0:8080"),
            ("AUDITFLOW_SERVE_TOKENS_FILE", "/etc/auditflow/tokens"),
        ])
        .unwrap();
        assert!(with_tokens.serve.check_exposure().is_ok());
    }

    #[test]
    fn every_bad_serve_setting_names_its_variable() {
        for (variable, value) in [
            ("AUDITFLOW_SERVE_ADDR", "localhost"),
            ("AUDITFLOW_SERVE_MAX_SPAN_DAYS", "0"),
            ("AUDITFLOW_SERVE_MAX_LIMIT", "100000"),
            ("AUDITFLOW_SERVE_DEFAULT_LIMIT", "5000"),
            ("AUDITFLOW_SERVE_MAX_COST", "-1"),
            ("AUDITFLOW_SERVE_SEQ_SCAN_MAX_ROWS", "NaN"),
            ("AUDITFLOW_SERVE_STATEMENT_TIMEOUT_MS", "0"),
            ("AUDITFLOW_SERVE_CACHE_BYTES", "1000"),
            ("AUDITFLOW_SERVE_CACHE_TTL_MS", "0"),
            ("AUDITFLOW_SERVE_MAX_CONCURRENT_QUERIES", "0"),
            ("AUDITFLOW_SERVE_RATE_LIMIT", "0"),
            ("AUDITFLOW_SERVE_RECONCILE_INTERVAL_MS", "0"),
            ("AUDITFLOW_SERVE_L2_CACHE", "maybe"),
        ] {
            let err = load(&[(variable, value)]).unwrap_err();
            assert!(err.contains(variable), "{variable}={value}: {err}");
        }
    }
}
