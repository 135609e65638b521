//! Planning: for a given `now`, what to create (premake), retire (past retention) and drop
//! (retired, grace over), and why every other partition is kept. Pure: reads an
//! [`Inventory`](super::inventory::Inventory), touches no database.

use std::collections::BTreeSet;
use std::fmt;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::inventory::{Hold, Inventory, Range};
use crate::config::PartitionConfig;
use crate::db::partition::Attached;
use crate::db::partition::{Bounds, PartitionInterval, PartitionSpec, RETIRED_PREFIX};

/// What an action does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    /// Create and attach a partition.
    Create,
    /// Detach a partition past retention and rename it to its retired name.
    Retire,
    /// Drop a retired partition whose grace period is over.
    Drop,
}

impl ActionKind {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            ActionKind::Create => "create",
            ActionKind::Retire => "retire",
            ActionKind::Drop => "drop",
        }
    }
}

/// One step of a [`Plan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    /// What is done.
    pub kind: ActionKind,
    /// The partition's name while attached (`events_p…`); with `from` and `to` it must match its
    /// [`PartitionSpec`] or the action is skipped.
    pub partition: String,
    /// The table the DDL acts on: the partition itself for `create` and `retire`, its retired
    /// name for `drop`.
    pub table: String,
    /// Lower bound of the partition's range (inclusive).
    pub from: DateTime<Utc>,
    /// Upper bound (exclusive).
    pub to: DateTime<Utc>,
    /// Why, in words.
    pub reason: String,
}

impl Action {
    pub(super) fn new(kind: ActionKind, spec: &PartitionSpec, reason: String) -> Self {
        Action {
            kind,
            partition: spec.name(),
            table: match kind {
                ActionKind::Create | ActionKind::Retire => spec.name(),
                ActionKind::Drop => spec.retired_name(),
            },
            from: spec.from(),
            to: spec.to(),
            reason,
        }
    }

    /// The spec, if the names and bounds are exactly what the dates give.
    pub(super) fn spec(&self) -> Option<PartitionSpec> {
        let spec = PartitionSpec::from_name(&self.partition)?;
        let expected = Action::new(self.kind, &spec, String::new());
        (expected.table == self.table && expected.from == self.from && expected.to == self.to)
            .then_some(spec)
    }

    pub(super) fn same_step(&self, other: &Action) -> bool {
        self.kind == other.kind
            && self.partition == other.partition
            && self.table == other.table
            && self.from == other.from
            && self.to == other.to
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = match self.kind {
            ActionKind::Retire => format!("{} -> {RETIRED_PREFIX}{}", self.table, self.partition),
            _ => self.table.clone(),
        };
        write!(
            f,
            "{:<6}  {target}  {}  {}",
            self.kind.as_str(),
            Range(Some(self.from), Some(self.to)),
            self.reason
        )
    }
}

/// A partition the plan leaves alone although something might be expected of it, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    /// The table as it is named now.
    pub table: String,
    /// Lower bound (inclusive); `None` for MINVALUE.
    pub from: Option<DateTime<Utc>>,
    /// Upper bound (exclusive); `None` for MAXVALUE.
    pub to: Option<DateTime<Utc>>,
    /// Why it is kept.
    pub reason: String,
    /// The legal holds keeping it, if any.
    pub holds: Vec<i64>,
}

impl fmt::Display for Kept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "keep    {}  {}  {}",
            self.table,
            Range(self.from, self.to),
            self.reason
        )
    }
}

/// A table that looks like a partition but is not one of auditflow's: a hand-made partition of
/// `events` (any other name, or an auditflow name with other bounds), the default partition, or
/// a detached table named `events_p…` or `retired_…` that no date gives. Maintenance never
/// retires, drops, restores or renames it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Foreign {
    /// The table's name, as the catalog has it (any characters).
    pub table: String,
    /// Attached to `events`.
    pub attached: bool,
    /// Lower bound when attached (inclusive); `None` for MINVALUE or when detached.
    pub from: Option<DateTime<Utc>>,
    /// Upper bound when attached (exclusive); `None` for MAXVALUE or when detached.
    pub to: Option<DateTime<Utc>>,
    /// Why it is not auditflow's.
    pub reason: String,
}

impl fmt::Display for Foreign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let range = if self.attached {
            Range(self.from, self.to).to_string()
        } else {
            "(detached)".to_string()
        };
        write!(f, "foreign {}  {range}  {}", self.table, self.reason)
    }
}

/// What maintenance would do at `now`, and why it keeps what it keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The schema of the `events` table.
    pub schema: String,
    /// The time the plan is for (the clock; `--now` simulates another).
    pub now: DateTime<Utc>,
    /// `AUDITFLOW_PARTITION_INTERVAL` when planned.
    pub interval: PartitionInterval,
    /// `AUDITFLOW_PARTITION_PREMAKE` when planned.
    pub premake: u32,
    /// `AUDITFLOW_PARTITION_RETENTION_DAYS` when planned (0: forever).
    pub retention_days: u32,
    /// `AUDITFLOW_PARTITION_RETIRED_GRACE_DAYS` when planned.
    pub retired_grace_days: u32,
    /// The steps, in the order `apply` runs them: create, then retire, then drop.
    pub actions: Vec<Action>,
    /// Partitions past retention or retired ones past grace that stay, with the reason.
    pub kept: Vec<Kept>,
    /// Anomalies found that maintenance does not fix by itself.
    pub warnings: Vec<String>,
    /// Tables that look like partitions but are not auditflow's; left alone.
    #[serde(default)]
    pub foreign: Vec<Foreign>,
}

impl Plan {
    pub(super) fn kept_reason(&self, table: &str) -> Option<&str> {
        self.kept
            .iter()
            .find(|kept| kept.table == table)
            .map(|kept| kept.reason.as_str())
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let retention = if self.retention_days == 0 {
            "forever".to_string()
        } else {
            format!("{} days", self.retention_days)
        };
        writeln!(
            f,
            "partition plan for {}.events at {}: interval {}, premake {}, retention {}, retired grace {} days",
            self.schema,
            self.now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            self.interval,
            self.premake,
            retention,
            self.retired_grace_days
        )?;
        for action in &self.actions {
            writeln!(f, "  {action}")?;
        }
        for kept in &self.kept {
            writeln!(f, "  {kept}")?;
        }
        for foreign in &self.foreign {
            writeln!(f, "  {foreign}")?;
        }
        for warning in &self.warnings {
            writeln!(f, "  warning: {warning}")?;
        }
        let count = |kind| self.actions.iter().filter(|a| a.kind == kind).count();
        write!(
            f,
            "{} to create, {} to retire, {} to drop, {} kept",
            count(ActionKind::Create),
            count(ActionKind::Retire),
            count(ActionKind::Drop),
            self.kept.len()
        )?;
        if !self.foreign.is_empty() {
            write!(f, ", {} foreign", self.foreign.len())?;
        }
        Ok(())
    }
}

fn describe_holds(holds: &[&Hold]) -> String {
    holds
        .iter()
        .map(|hold| {
            format!(
                "legal hold {} ({:?}, {})",
                hold.id,
                hold.reason,
                Range(Some(hold.range_from), Some(hold.range_to))
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn count_of(interval: PartitionInterval, count: u32) -> String {
    let unit = interval.as_str();
    if count == 1 {
        format!("1 {unit}")
    } else {
        format!("{count} {unit}s")
    }
}

pub(super) fn timestamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Decides what maintenance does at `now`. Pure: everything it needs is in `inventory`.
pub(super) fn plan_from(
    inventory: &Inventory,
    schema: &str,
    config: &PartitionConfig,
    now: DateTime<Utc>,
) -> Plan {
    let mut plan = Plan {
        schema: schema.to_string(),
        now,
        interval: config.partition_interval,
        premake: config.partition_premake,
        retention_days: config.partition_retention_days,
        retired_grace_days: config.partition_retired_grace_days,
        actions: Vec::new(),
        kept: Vec::new(),
        warnings: Vec::new(),
        foreign: Vec::new(),
    };
    plan_foreign(inventory, &mut plan);
    plan_creation(inventory, config, now, &mut plan);
    plan_retirement(inventory, config, now, &mut plan);
    plan_drop(inventory, config, now, &mut plan);
    plan
}

/// Lists the tables that look like partitions but are not auditflow's. Only names that parse
/// back into a [`PartitionSpec`] reproducing them, with that spec's bounds, are auditflow's; the
/// name of anything else is only ever compared and printed.
fn plan_foreign(inventory: &Inventory, plan: &mut Plan) {
    const LEFT_ALONE: &str = "never retired, dropped or restored by auditflow";
    for partition in &inventory.attached {
        let reason = if partition.is_default {
            format!("the default partition (auditflow creates none); {LEFT_ALONE}")
        } else {
            match PartitionSpec::from_name(&partition.name) {
                None => format!(
                    "attached, but not named like an auditflow partition (events_pYYYYMMDD, \
                     events_pIYYYwIW, events_pYYYYMM); {LEFT_ALONE}"
                ),
                Some(spec)
                    if (partition.from, partition.to) != (Some(spec.from()), Some(spec.to())) =>
                {
                    format!(
                        "named like an auditflow partition, but bounded {} instead of {}; {LEFT_ALONE}",
                        Range(partition.from, partition.to),
                        Range(Some(spec.from()), Some(spec.to()))
                    )
                }
                Some(_) => continue,
            }
        };
        plan.foreign.push(Foreign {
            table: partition.name.clone(),
            attached: true,
            from: partition.from,
            to: partition.to,
            reason,
        });
    }
    let attached: BTreeSet<&str> = inventory.attached.iter().map(|p| p.name.as_str()).collect();
    for table in &inventory.tables {
        let looks_like_a_partition =
            table.starts_with("events_p") || table.starts_with(RETIRED_PREFIX);
        if !looks_like_a_partition
            || attached.contains(table.as_str())
            || PartitionSpec::from_name(table).is_some()
            || PartitionSpec::from_retired_name(table).is_some()
        {
            continue;
        }
        plan.foreign.push(Foreign {
            table: table.clone(),
            attached: false,
            from: None,
            to: None,
            reason: format!(
                "detached, named like a partition, but no interval and date give this name; {LEFT_ALONE}"
            ),
        });
    }
}

fn plan_creation(
    inventory: &Inventory,
    config: &PartitionConfig,
    now: DateTime<Utc>,
    plan: &mut Plan,
) {
    let interval = config.partition_interval;
    let current = PartitionSpec::containing(interval, now.date_naive());
    let mut last = current;
    for _ in 0..config.partition_premake {
        last = last.next();
    }
    // Ranges covered so far: attached partitions plus the ones planned here.
    let mut covered: Vec<Bounds> = inventory
        .attached
        .iter()
        .filter(|p| !p.is_default)
        .map(|p| (p.from, p.to))
        .collect();
    let overlaps = |covered: &[Bounds], spec: &PartitionSpec| {
        covered
            .iter()
            .any(|(f, t)| f.is_none_or(|f| f < spec.to()) && t.is_none_or(|t| spec.from() < t))
    };
    let mut day = current.start();
    while day < last.end() {
        let day_spec = PartitionSpec::containing(PartitionInterval::Day, day);
        let next_day = day + Duration::days(1);
        if overlaps(&covered, &day_spec) {
            day = next_day;
            continue;
        }
        let natural = PartitionSpec::containing(interval, day);
        let ahead = {
            let mut spec = current;
            let mut steps = 0;
            while spec != natural && steps <= config.partition_premake {
                spec = spec.next();
                steps += 1;
            }
            steps
        };
        let why = if ahead == 0 {
            format!("the current {interval}")
        } else {
            format!(
                "premake: {} ahead (AUDITFLOW_PARTITION_PREMAKE={})",
                count_of(interval, ahead),
                config.partition_premake
            )
        };
        let (target, why) = if overlaps(&covered, &natural) {
            (
                day_spec,
                format!("{why}; daily because partitions of another interval cover part of the {interval}"),
            )
        } else {
            (natural, why)
        };
        if inventory.tables.contains(&target.name()) {
            plan.warnings.push(format!(
                "a table named {} exists but is not attached to events: {} is not covered \
                 (attach or rename it)",
                target.name(),
                Range(Some(target.from()), Some(target.to()))
            ));
        } else {
            plan.actions
                .push(Action::new(ActionKind::Create, &target, why));
        }
        covered.push((Some(target.from()), Some(target.to())));
        day = next_day;
    }
}

fn plan_retirement(
    inventory: &Inventory,
    config: &PartitionConfig,
    now: DateTime<Utc>,
    plan: &mut Plan,
) {
    let grace = Duration::days(i64::from(config.partition_retired_grace_days));
    let mut retiring: BTreeSet<String> = BTreeSet::new();
    let mut actions = Vec::new();
    // Interrupted retirements first: one pending detach blocks every other concurrent detach.
    for row in inventory
        .lifecycle
        .values()
        .filter(|row| row.state == "retiring")
    {
        let Some(spec) = PartitionSpec::from_name(&row.partition_name) else {
            plan.warnings.push(format!(
                "partition_lifecycle row {:?} is not an auditflow partition name; ignored",
                row.partition_name
            ));
            continue;
        };
        let attached = inventory
            .attached
            .iter()
            .find(|p| p.name == spec.name() || p.name == spec.retired_name());
        if attached.is_some_and(|p| !p.detach_pending) {
            // The detach never started (it timed out waiting for a lock): an ordinary candidate
            // below, so holds and retention are checked again.
            continue;
        }
        let present = inventory.tables.contains(&spec.name())
            || inventory.tables.contains(&spec.retired_name());
        if !present {
            plan.warnings.push(format!(
                "{} is recorded as retiring but neither it nor {} exists",
                spec.name(),
                spec.retired_name()
            ));
            continue;
        }
        retiring.insert(spec.name());
        actions.push(Action::new(
            ActionKind::Retire,
            &spec,
            format!(
                "finishing the retirement started {} (interrupted or timed out)",
                timestamp(row.retired_at)
            ),
        ));
    }
    if config.partition_retention_days > 0 {
        let cutoff = now - Duration::days(i64::from(config.partition_retention_days));
        let mut candidates: Vec<&Attached> = inventory
            .attached
            .iter()
            .filter(|p| !p.is_default && p.to.is_some_and(|to| to <= cutoff))
            .filter(|p| !retiring.contains(&p.name))
            .collect();
        candidates.sort_by_key(|p| (!p.detach_pending, p.from));
        for partition in candidates {
            let kept = |reason: String, holds: Vec<i64>| Kept {
                table: partition.name.clone(),
                from: partition.from,
                to: partition.to,
                reason,
                holds,
            };
            let spec = PartitionSpec::from_name(&partition.name).filter(|spec| {
                Some(spec.from()) == partition.from && Some(spec.to()) == partition.to
            });
            let Some(spec) = spec else {
                // Not auditflow's: listed in `plan.foreign`.
                continue;
            };
            let holds: Vec<&Hold> = inventory
                .holds
                .iter()
                .filter(|hold| hold.overlaps(partition.from, partition.to))
                .collect();
            if !holds.is_empty() {
                plan.kept.push(kept(
                    format!("past retention, kept by {}", describe_holds(&holds)),
                    holds.iter().map(|hold| hold.id).collect(),
                ));
                continue;
            }
            if let Some(restored_at) = inventory
                .lifecycle
                .get(&spec.name())
                .filter(|row| row.state == "restored")
                .and_then(|row| row.restored_at)
            {
                if restored_at + grace > now {
                    plan.kept.push(kept(
                        format!(
                            "past retention, restored {}; retired again from {} unless a legal hold covers it",
                            timestamp(restored_at),
                            timestamp(restored_at + grace)
                        ),
                        Vec::new(),
                    ));
                    continue;
                }
            }
            actions.push(Action::new(
                ActionKind::Retire,
                &spec,
                format!(
                    "ended {}, before the retention cutoff {} (AUDITFLOW_PARTITION_RETENTION_DAYS={})",
                    timestamp(spec.to()),
                    timestamp(cutoff),
                    config.partition_retention_days
                ),
            ));
        }
    }
    for partition in inventory.attached.iter().filter(|p| p.detach_pending) {
        let handled = actions
            .iter()
            .any(|a: &Action| a.table == partition.name || a.partition == partition.name);
        if !handled {
            plan.warnings.push(format!(
                "{} is pending detach (an interrupted DETACH ... CONCURRENTLY that maintenance does \
                 not own); no other partition can be detached concurrently until it is finalized \
                 (ALTER TABLE events DETACH PARTITION ... FINALIZE)",
                partition.name
            ));
        }
    }
    plan.actions.extend(actions);
}

fn plan_drop(inventory: &Inventory, config: &PartitionConfig, now: DateTime<Utc>, plan: &mut Plan) {
    let grace = Duration::days(i64::from(config.partition_retired_grace_days));
    for row in inventory
        .lifecycle
        .values()
        .filter(|row| row.state == "retired")
    {
        let Some(spec) = PartitionSpec::from_name(&row.partition_name)
            .filter(|spec| spec.from() == row.range_from && spec.to() == row.range_to)
        else {
            plan.warnings.push(format!(
                "partition_lifecycle row {:?} does not match an auditflow partition; ignored",
                row.partition_name
            ));
            continue;
        };
        let table = spec.retired_name();
        if !inventory.tables.contains(&table) {
            plan.warnings.push(format!(
                "{table} is recorded as retired but does not exist (dropped by hand?)"
            ));
            continue;
        }
        if inventory.attached.iter().any(|p| p.name == table) {
            plan.warnings.push(format!(
                "{table} is recorded as retired but is attached to events; left alone"
            ));
            continue;
        }
        let kept = |reason: String, holds: Vec<i64>| Kept {
            table: table.clone(),
            from: Some(spec.from()),
            to: Some(spec.to()),
            reason,
            holds,
        };
        let holds: Vec<&Hold> = inventory
            .holds
            .iter()
            .filter(|hold| hold.overlaps(Some(spec.from()), Some(spec.to())))
            .collect();
        let due = row.retired_at + grace;
        if due > now {
            plan.kept.push(kept(
                format!(
                    "retired {}; dropped from {} (AUDITFLOW_PARTITION_RETIRED_GRACE_DAYS={})",
                    timestamp(row.retired_at),
                    timestamp(due),
                    config.partition_retired_grace_days
                ),
                holds.iter().map(|hold| hold.id).collect(),
            ));
            continue;
        }
        if !holds.is_empty() {
            plan.kept.push(kept(
                format!(
                    "retired {}, grace over, kept by {}",
                    timestamp(row.retired_at),
                    describe_holds(&holds)
                ),
                holds.iter().map(|hold| hold.id).collect(),
            ));
            continue;
        }
        plan.actions.push(Action::new(
            ActionKind::Drop,
            &spec,
            format!(
                "retired {}; the grace period ended {}",
                timestamp(row.retired_at),
                timestamp(due)
            ),
        ));
    }
}
