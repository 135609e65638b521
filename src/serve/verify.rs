//! `GET /v1/verify`: hash-chain verification of a time range.
//!
//! The chain is built by the evidence feature (issue 11), which provides `crate::ops::verify`.
//! Until it exists there is nothing to verify, and the handler says so (404). Wiring it is a
//! matter of calling it from [`verify_range`] and adding a variant for its report.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// The database has no hash chain: nothing can be verified.
    NoChain,
}

/// Verifies `[from, to)` of `schema`'s chain.
pub async fn verify_range(
    _pool: &PgPool,
    _schema: &str,
    _from: DateTime<Utc>,
    _to: DateTime<Utc>,
) -> Verification {
    Verification::NoChain
}
