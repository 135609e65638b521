//! `GET /v1/verify`: hash-chain verification of a time range, through [`crate::ops::verify`].
//!
//! Every link's digests are checked (cheap: no rows read); the rows are recomputed for the links
//! committed in `[from, to)`. A schema migrated before the chain existed has nothing to verify,
//! and the handler says so (404).

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::ops::verify::{self, VerifyError, VerifyOptions, VerifyReport};

/// What verification found.
#[derive(Debug)]
pub enum Verification {
    /// The database has no hash chain: nothing can be verified.
    NoChain,
    /// The verdict: intact, or the first broken link.
    Report(Box<VerifyReport>),
    /// The database failed before a verdict.
    Failed(sqlx::Error),
}

/// Verifies the links of `schema`'s chain committed in `[from, to)`.
pub async fn verify_range(
    pool: &PgPool,
    schema: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Verification {
    let options = VerifyOptions {
        since: Some(from),
        until: Some(to),
        expect_head: None,
    };
    match verify::verify(pool, schema, &options).await {
        Ok(report) => Verification::Report(Box::new(report)),
        Err(VerifyError::NoChain(_)) => Verification::NoChain,
        Err(VerifyError::Database(err)) => Verification::Failed(err),
    }
}
