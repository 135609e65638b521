//! The read side's metrics. No label carries a tenant, a token or a query: cardinality stays
//! fixed and `/metrics` tells nobody anything about a tenant.

use metrics::Unit;

/// Cache lookups answered, by `level` (`l1`, `l2`).
pub const CACHE_HITS: &str = "auditflow_serve_cache_hits_total";
/// Cache lookups not answered, by `level`.
pub const CACHE_MISSES: &str = "auditflow_serve_cache_misses_total";
/// L1 entries removed, by `cause` (`size`, `expired`, `explicit`, `replaced`).
pub const CACHE_EVICTIONS: &str = "auditflow_serve_cache_evictions_total";
/// Weighed bytes in L1.
pub const CACHE_BYTES: &str = "auditflow_serve_cache_bytes";
/// Results not cached because an invalidation overlapped their load, or found stale on read.
pub const CACHE_STALE: &str = "auditflow_serve_cache_stale_total";
/// Requests answered from the database because the cache could not be trusted.
pub const CACHE_BYPASSED: &str = "auditflow_serve_cache_bypassed_total";
/// Invalidation messages received.
pub const INVALIDATIONS: &str = "auditflow_serve_invalidations_received_total";
/// Gaps found in a publisher's sequence (lost messages).
pub const GAPS: &str = "auditflow_serve_invalidation_gaps_total";
/// Cache flushes, by `reason`.
pub const FLUSHES: &str = "auditflow_serve_cache_flushes_total";
/// Committed batches found by reconciliation that no message had announced.
pub const RECONCILE_MISSED: &str = "auditflow_serve_reconcile_missed_batches_total";
/// Seconds since the last successful reconciliation.
pub const RECONCILE_LAG: &str = "auditflow_serve_reconcile_lag_seconds";
/// Requests refused, by `reason` (the error code).
pub const REFUSED: &str = "auditflow_serve_requests_refused_total";
/// Database queries run, by `kind` (`page`, `event`, `export`).
pub const DB_QUERIES: &str = "auditflow_serve_db_queries_total";
/// Database query latency, by `kind`.
pub const QUERY_DURATION: &str = "auditflow_serve_query_duration_seconds";
/// Requests answered, by `source` (`l1`, `l2`, `db`, `bypass`).
pub const RESPONSES: &str = "auditflow_serve_responses_total";

/// Counts a refused or failed request.
pub fn request_failed(code: &'static str) {
    metrics::counter!(REFUSED, "reason" => code).increment(1);
}

/// Registers the help texts.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(CACHE_HITS, Unit::Count, "serve cache hits, by level");
    describe_counter!(CACHE_MISSES, Unit::Count, "serve cache misses, by level");
    describe_counter!(
        CACHE_EVICTIONS,
        Unit::Count,
        "serve l1 cache entries removed, by cause"
    );
    describe_gauge!(
        CACHE_BYTES,
        Unit::Bytes,
        "weighed bytes in the serve l1 cache"
    );
    describe_counter!(
        CACHE_STALE,
        Unit::Count,
        "results not installed or dropped on read because an invalidation overlapped them"
    );
    describe_counter!(
        CACHE_BYPASSED,
        Unit::Count,
        "requests answered from the database because the cache could not be trusted (subscriber down, reconciliation late)"
    );
    describe_counter!(INVALIDATIONS, Unit::Count, "invalidation messages received");
    describe_counter!(
        GAPS,
        Unit::Count,
        "gaps found in a publisher's batch sequence (lost invalidation messages)"
    );
    describe_counter!(FLUSHES, Unit::Count, "serve cache flushes, by reason");
    describe_counter!(
        RECONCILE_MISSED,
        Unit::Count,
        "committed batches found by reconciliation that no invalidation message had announced"
    );
    describe_gauge!(
        RECONCILE_LAG,
        Unit::Seconds,
        "seconds since the last successful reconciliation with the committed-batch log"
    );
    describe_counter!(REFUSED, Unit::Count, "serve requests refused, by reason");
    describe_counter!(
        DB_QUERIES,
        Unit::Count,
        "database queries run by serve, by kind"
    );
    describe_histogram!(
        QUERY_DURATION,
        Unit::Seconds,
        "serve database query latency (plan check included), by kind"
    );
    describe_counter!(RESPONSES, Unit::Count, "serve responses, by source");
}
