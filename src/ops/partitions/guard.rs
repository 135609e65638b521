//! The protected window: evidence the sink may still be writing is never retired or dropped,
//! whatever time a plan was made for.
//!
//! A plan is made for a `now` that can be simulated (`--now`, tests walking a timeline), so the
//! plan alone cannot be trusted near the present. The retire and drop steps therefore compute a
//! [`Guard`] from the real clock at the moment they run, and skip any partition overlapping
//! `[real now - AUDITFLOW_ACCEPT_PAST_DAYS, end of the premake horizon from real now]`. No caller
//! chooses the window: it is not a parameter of `apply`, only of [`Guard::around`], which tests
//! and reports use to say what the window is.

use std::fmt;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::inventory::Range;
use super::plan::{timestamp, ActionKind, Plan};
use crate::config::PartitionConfig;
use crate::db::partition::PartitionSpec;

/// How far `--now` may be from the real time before `apply` treats it as a simulation.
pub const NOW_TOLERANCE: Duration = Duration::minutes(5);

/// The range of time no retirement or drop may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guard {
    /// Real now minus `AUDITFLOW_ACCEPT_PAST_DAYS` (inclusive).
    pub protect_from: DateTime<Utc>,
    /// The end of the last premade interval from real now (exclusive).
    pub protect_to: DateTime<Utc>,
}

impl Guard {
    /// The window at the real time, as the retire and drop steps compute it.
    pub fn from_real_clock(config: &PartitionConfig) -> Self {
        Self::around(Utc::now(), config)
    }

    /// The window when the real time is `real_now`.
    pub fn around(real_now: DateTime<Utc>, config: &PartitionConfig) -> Self {
        let mut horizon =
            PartitionSpec::containing(config.partition_interval, real_now.date_naive());
        for _ in 0..config.partition_premake {
            horizon = horizon.next();
        }
        Guard {
            protect_from: real_now - Duration::days(i64::from(config.accept_past_days)),
            protect_to: horizon.to().max(real_now),
        }
    }

    /// True if `[from, to)` overlaps the window.
    pub fn protects(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> bool {
        from < self.protect_to && self.protect_from < to
    }
}

impl fmt::Display for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (real time - AUDITFLOW_ACCEPT_PAST_DAYS to the end of the premake horizon)",
            Range(Some(self.protect_from), Some(self.protect_to))
        )
    }
}

/// Checks a `--now` given to a command that changes the database: refused (with what to do
/// instead) when it is more than [`NOW_TOLERANCE`] away from `real_now`, unless the target is a
/// scratch schema.
pub fn check_simulated_now(
    now: DateTime<Utc>,
    real_now: DateTime<Utc>,
    scratch_schema: bool,
) -> Result<(), String> {
    let distance = (now - real_now).abs();
    if scratch_schema || distance <= NOW_TOLERANCE {
        return Ok(());
    }
    let days = distance.num_days();
    let distance = if days > 0 {
        format!("{days} days")
    } else {
        format!("{} minutes", distance.num_minutes())
    };
    Err(format!(
        "--now {} is {distance} away from the real time ({}): `apply` changes the database, so a \
         simulated time is refused. To see what maintenance would do then, run `auditflow \
         partitions plan --now {}` (changes nothing); to rehearse on a scratch schema that holds \
         no real evidence, add --scratch-schema. Either way, partitions overlapping the protected \
         window around the real time are never retired or dropped",
        timestamp(now),
        timestamp(real_now),
        timestamp(now),
    ))
}

/// Adds a warning to `plan` for each retire or drop that `apply` would skip because it overlaps
/// `guard` (a plan for a simulated `now` far from the real time).
pub(super) fn warn_protected(plan: &mut Plan, guard: &Guard) {
    let protected: Vec<String> = plan
        .actions
        .iter()
        .filter(|action| matches!(action.kind, ActionKind::Retire | ActionKind::Drop))
        .filter(|action| guard.protects(action.from, action.to))
        .map(|action| format!("{} {}", action.kind.as_str(), action.table))
        .collect();
    if !protected.is_empty() {
        plan.warnings.push(format!(
            "apply would skip {}: they overlap the protected window {guard}",
            protected.join(", ")
        ));
    }
}
