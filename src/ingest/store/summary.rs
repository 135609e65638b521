//! What one committed transaction stored, per tenant: the `occurred_at` range and the row count.
//!
//! Written to the `batches` table in the batch's own transaction (the committed-batch log readers
//! reconcile against) and carried by the invalidation message of that transaction
//! ([`crate::ingest::notify`]), so a reader invalidates only what overlaps.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::ser::SerializeMap as _;
use serde::{Serialize, Serializer};

/// Caps the tenants of one summary (and so of one invalidation message); beyond it the summary
/// is marked `truncated` and a reader must treat the batch as touching every tenant.
pub const MAX_TENANTS_PER_SUMMARY: usize = 1000;

/// The rows one transaction stored for one tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantRange {
    /// Earliest `occurred_at` stored.
    pub from: DateTime<Utc>,
    /// Latest `occurred_at` stored (inclusive).
    pub to: DateTime<Utc>,
    /// Rows stored.
    pub count: u64,
}

impl TenantRange {
    /// A range of one row.
    pub fn at(occurred_at: DateTime<Utc>) -> Self {
        TenantRange {
            from: occurred_at,
            to: occurred_at,
            count: 1,
        }
    }

    /// Widens the range by `other`.
    pub fn merge(&mut self, other: TenantRange) {
        self.from = self.from.min(other.from);
        self.to = self.to.max(other.to);
        self.count += other.count;
    }
}

impl Serialize for TenantRange {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("from", &rfc3339_micros(self.from))?;
        map.serialize_entry("to", &rfc3339_micros(self.to))?;
        map.serialize_entry("count", &self.count)?;
        map.end()
    }
}

/// RFC 3339 in UTC with microseconds, the precision of `timestamptz`.
pub fn rfc3339_micros(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Per tenant, what one committed transaction stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BatchSummary {
    /// Per tenant, at most [`MAX_TENANTS_PER_SUMMARY`] of them (the first in byte order).
    pub tenants: BTreeMap<String, TenantRange>,
    /// True when tenants were left out: the batch may touch any tenant.
    pub truncated: bool,
}

impl BatchSummary {
    /// Adds rows stored for `tenant`.
    pub fn add(&mut self, tenant: &str, range: TenantRange) {
        match self.tenants.get_mut(tenant) {
            Some(existing) => existing.merge(range),
            None => {
                self.tenants.insert(tenant.to_owned(), range);
            }
        }
    }

    /// Rows stored, over every tenant kept.
    pub fn num_rows(&self) -> u64 {
        self.tenants.values().map(|range| range.count).sum()
    }

    /// Cuts the tenants to [`MAX_TENANTS_PER_SUMMARY`], marking the summary truncated if any
    /// were left out.
    pub fn capped(mut self) -> Self {
        if self.tenants.len() > MAX_TENANTS_PER_SUMMARY {
            self.tenants = self
                .tenants
                .into_iter()
                .take(MAX_TENANTS_PER_SUMMARY)
                .collect();
            self.truncated = true;
        }
        self
    }

    /// The JSON stored in `batches.summary`.
    pub fn to_json(&self) -> String {
        // A map of strings and numbers cannot fail to encode.
        serde_json::to_string(self).unwrap_or_else(|_| r#"{"tenants":{},"truncated":true}"#.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64, micros: u32) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, micros * 1000).unwrap()
    }

    #[test]
    fn summary_json_has_microsecond_ranges_per_tenant() {
        let mut summary = BatchSummary::default();
        summary.add("globex", TenantRange::at(at(1_700_000_000, 5)));
        summary.add("acme", TenantRange::at(at(1_700_000_100, 0)));
        summary.add("acme", TenantRange::at(at(1_700_000_000, 123_456)));
        assert_eq!(summary.num_rows(), 3);
        assert_eq!(
            summary.to_json(),
            r#"{"tenants":{"acme":{"from":"2023-11-14T22:13:20.123456Z","to":"2023-11-14T22:15:00.000000Z","count":2},"globex":{"from":"2023-11-14T22:13:20.000005Z","to":"2023-11-14T22:13:20.000005Z","count":1}},"truncated":false}"#
        );
    }

    #[test]
    fn too_many_tenants_are_cut_and_marked_truncated() {
        let mut summary = BatchSummary::default();
        for index in 0..=MAX_TENANTS_PER_SUMMARY {
            summary.add(&format!("t{index:05}"), TenantRange::at(at(0, 0)));
        }
        let capped = summary.capped();
        assert_eq!(capped.tenants.len(), MAX_TENANTS_PER_SUMMARY);
        assert!(capped.truncated);
        let mut small = BatchSummary::default();
        small.add("acme", TenantRange::at(at(0, 0)));
        assert!(!small.capped().truncated);
    }
}
