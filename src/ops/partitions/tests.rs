//! Planning against hand-built inventories: names, premake, retention, holds, grace, foreign tables.

use chrono::Duration;

use super::inventory::{Inventory, LifecycleRow};
use super::plan::plan_from;
use super::*;
use crate::db::partition::{partition_name, Attached, PartitionInterval};

/// Compiles only if the maintenance loop can be handed to `tokio::spawn`.
#[allow(dead_code)]
fn maintenance_can_be_spawned(lifecycle: PartitionLifecycle) {
    drop(tokio::spawn(run_maintenance(
        lifecycle,
        CancellationToken::new(),
    )));
}

fn day(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap()
}

fn at(text: &str) -> DateTime<Utc> {
    parse_time(text).unwrap()
}

fn config(
    interval: PartitionInterval,
    premake: u32,
    retention: u32,
    grace: u32,
) -> PartitionConfig {
    PartitionConfig {
        partition_interval: interval,
        partition_premake: premake,
        partition_retention_days: retention,
        partition_retired_grace_days: grace,
        ..PartitionConfig::default()
    }
}

fn attached(spec: &PartitionSpec) -> Attached {
    Attached {
        name: spec.name(),
        from: Some(spec.from()),
        to: Some(spec.to()),
        is_default: false,
        detach_pending: false,
    }
}

fn inventory(specs: &[PartitionSpec]) -> Inventory {
    Inventory {
        attached: specs.iter().map(attached).collect(),
        tables: specs.iter().map(PartitionSpec::name).collect(),
        ..Inventory::default()
    }
}

fn daily(from: NaiveDate, count: i64) -> Vec<PartitionSpec> {
    (0..count)
        .map(|i| PartitionSpec::containing(PartitionInterval::Day, from + Duration::days(i)))
        .collect()
}

fn names(plan: &Plan, kind: ActionKind) -> Vec<String> {
    plan.actions
        .iter()
        .filter(|a| a.kind == kind)
        .map(|a| a.table.clone())
        .collect()
}

#[test]
fn names_come_from_the_date_only() {
    let d = day(2026, 2, 3);
    assert_eq!(partition_name(d), "events_p20260203");
    assert_eq!(quote_ident("events_p20260203"), "\"events_p20260203\"");
    assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    let week = PartitionSpec::containing(PartitionInterval::Week, d);
    assert_eq!(week.name(), "events_p2026w06");
    assert_eq!(
        (week.start(), week.end()),
        (day(2026, 2, 2), day(2026, 2, 9))
    );
    let month = PartitionSpec::containing(PartitionInterval::Month, d);
    assert_eq!(month.name(), "events_p202602");
    assert_eq!(
        (month.start(), month.end()),
        (day(2026, 2, 1), day(2026, 3, 1))
    );
    assert_eq!(
        PartitionSpec::containing(PartitionInterval::Month, day(2025, 12, 31)).end(),
        day(2026, 1, 1)
    );
    assert_eq!(month.retired_name(), "retired_events_p202602");
    assert_eq!(
        month.bounds_sql(),
        "FOR VALUES FROM ('2026-02-01 00:00:00+00') TO ('2026-03-01 00:00:00+00')"
    );
}

#[test]
fn iso_weeks_take_the_iso_year() {
    // 2025-12-29 is the Monday of ISO week 1 of 2026.
    let spec = PartitionSpec::containing(PartitionInterval::Week, day(2026, 1, 1));
    assert_eq!(spec.start(), day(2025, 12, 29));
    assert_eq!(spec.name(), "events_p2026w01");
    assert_eq!(PartitionSpec::from_name("events_p2026w01"), Some(spec));
    assert_eq!(spec.next().name(), "events_p2026w02");
}

#[test]
fn names_parse_back_only_when_they_round_trip() {
    for spec in [
        PartitionSpec::containing(PartitionInterval::Day, day(2026, 2, 3)),
        PartitionSpec::containing(PartitionInterval::Week, day(2026, 2, 3)),
        PartitionSpec::containing(PartitionInterval::Month, day(2026, 2, 3)),
    ] {
        assert_eq!(PartitionSpec::from_name(&spec.name()), Some(spec));
        assert_eq!(
            PartitionSpec::from_retired_name(&spec.retired_name()),
            Some(spec)
        );
    }
    for bad in [
        "events_p20260230",
        "events_p2026w54",
        "events_p202613",
        "events_p2026020",
        "events_p+0260203",
        "events_p2026020x",
        "events_x20260203",
        "events_p20260203; drop table events",
        "events_p2026w6",
        "retired_events_p20260203",
        "",
        // Non-ASCII, 8 and 7 bytes long: byte slicing would cut the character in half.
        "events_p123é567",
        "events_p12é4567",
        "events_p2026wé",
        "events_p2026é",
    ] {
        assert_eq!(PartitionSpec::from_name(bad), None, "{bad}");
    }
}

#[test]
fn times_parse_as_rfc3339_or_dates() {
    assert_eq!(at("2026-02-03"), at("2026-02-03T00:00:00Z"));
    assert_eq!(at("2026-02-03T01:00:00+01:00"), at("2026-02-03T00:00:00Z"));
    assert!(parse_time("yesterday").is_err());
    for out_of_range in ["0999-12-31", "9999-01-01", "+262143-12-31", "-0001-01-01"] {
        assert!(parse_time(out_of_range).is_err(), "{out_of_range}");
    }
    assert!(parse_time("9998-12-31T23:59:59Z").is_ok());
}

#[test]
fn premake_creates_the_current_and_the_next_intervals() {
    let plan = plan_from(
        &Inventory::default(),
        "audit",
        &config(PartitionInterval::Day, 2, 0, 30),
        at("2026-02-03T13:00:00Z"),
    );
    assert_eq!(
        names(&plan, ActionKind::Create),
        ["events_p20260203", "events_p20260204", "events_p20260205"]
    );
    assert!(plan.actions[0].reason.contains("current day"), "{plan}");
    let weekly = plan_from(
        &inventory(&[PartitionSpec::containing(
            PartitionInterval::Week,
            day(2026, 2, 3),
        )]),
        "audit",
        &config(PartitionInterval::Week, 2, 0, 30),
        at("2026-02-03T13:00:00Z"),
    );
    assert_eq!(
        names(&weekly, ActionKind::Create),
        ["events_p2026w07", "events_p2026w08"]
    );
    let monthly = plan_from(
        &Inventory::default(),
        "audit",
        &config(PartitionInterval::Month, 1, 0, 30),
        at("2026-12-31T23:59:59Z"),
    );
    assert_eq!(
        names(&monthly, ActionKind::Create),
        ["events_p202612", "events_p202701"]
    );
}

#[test]
fn a_changed_interval_fills_partly_covered_ranges_with_days() {
    // Daily partitions up to Wednesday; the setting is now weekly.
    let existing = daily(day(2026, 2, 2), 3);
    let plan = plan_from(
        &inventory(&existing),
        "audit",
        &config(PartitionInterval::Week, 1, 0, 30),
        at("2026-02-03T13:00:00Z"),
    );
    assert_eq!(
        names(&plan, ActionKind::Create),
        [
            "events_p20260205",
            "events_p20260206",
            "events_p20260207",
            "events_p20260208",
            "events_p2026w07"
        ]
    );
    assert!(plan.actions[0].reason.contains("daily because"), "{plan}");
}

#[test]
fn a_stray_table_with_the_name_is_a_warning_not_an_action() {
    let mut inv = Inventory::default();
    inv.tables.insert("events_p20260203".into());
    let plan = plan_from(
        &inv,
        "audit",
        &config(PartitionInterval::Day, 0, 0, 30),
        at("2026-02-03T13:00:00Z"),
    );
    assert!(plan.actions.is_empty(), "{plan}");
    assert_eq!(plan.warnings.len(), 1, "{plan}");
}

#[test]
fn retention_retires_only_partitions_that_ended_before_the_cutoff() {
    let now = at("2026-02-10T12:00:00Z");
    let plan = plan_from(
        &inventory(&daily(day(2026, 1, 1), 45)),
        "audit",
        &config(PartitionInterval::Day, 0, 30, 7),
        now,
    );
    // The cutoff is 2026-01-11T12:00: partitions ending at or before it go.
    let retired = names(&plan, ActionKind::Retire);
    assert_eq!(
        retired.first().map(String::as_str),
        Some("events_p20260101")
    );
    assert_eq!(retired.last().map(String::as_str), Some("events_p20260110"));
    assert_eq!(retired.len(), 10);
    assert_eq!(
        plan.actions
            .iter()
            .filter(|a| a.kind == ActionKind::Create)
            .count(),
        0
    );
}

#[test]
fn zero_retention_keeps_everything() {
    let plan = plan_from(
        &inventory(&daily(day(2000, 1, 1), 10)),
        "audit",
        &config(PartitionInterval::Day, 0, 0, 7),
        at("2026-02-10T12:00:00Z"),
    );
    assert!(names(&plan, ActionKind::Retire).is_empty(), "{plan}");
}

fn hold(id: i64, from: &str, to: &str) -> Hold {
    Hold {
        id,
        range_from: at(from),
        range_to: at(to),
        reason: format!("case {id}"),
        created_at: at("2026-01-01"),
        created_by: "postgres".into(),
    }
}

#[test]
fn a_hold_keeps_the_partitions_it_overlaps_and_says_so() {
    let mut inv = inventory(&daily(day(2026, 1, 1), 5));
    inv.holds
        .push(hold(7, "2026-01-02T23:00:00Z", "2026-01-03T00:00:01Z"));
    let plan = plan_from(
        &inv,
        "audit",
        &config(PartitionInterval::Day, 0, 10, 7),
        at("2026-03-01"),
    );
    assert_eq!(
        names(&plan, ActionKind::Retire),
        ["events_p20260101", "events_p20260104", "events_p20260105"]
    );
    let kept: Vec<&str> = plan.kept.iter().map(|k| k.table.as_str()).collect();
    assert_eq!(kept, ["events_p20260102", "events_p20260103"]);
    assert!(plan.kept.iter().all(|k| k.holds == [7]));
    assert!(plan.kept[0].reason.contains("legal hold 7"), "{plan}");
}

fn retired_row(spec: &PartitionSpec, state: &str, retired_at: &str) -> LifecycleRow {
    LifecycleRow {
        partition_name: spec.name(),
        state: state.into(),
        range_from: spec.from(),
        range_to: spec.to(),
        retired_at: at(retired_at),
        restored_at: None,
        dropped_at: None,
    }
}

#[test]
fn retired_partitions_are_dropped_after_the_grace_period_unless_held() {
    let old = daily(day(2025, 1, 1), 3);
    let mut inv = Inventory::default();
    for spec in &old {
        inv.tables.insert(spec.retired_name());
        inv.lifecycle.insert(
            spec.name(),
            retired_row(spec, "retired", "2026-02-01T00:00:00Z"),
        );
    }
    let cfg = config(PartitionInterval::Day, 0, 30, 7);
    let early = plan_from(&inv, "audit", &cfg, at("2026-02-07T23:59:59Z"));
    assert!(names(&early, ActionKind::Drop).is_empty(), "{early}");
    assert_eq!(early.kept.len(), 3);
    assert!(
        early.kept[0].reason.contains("dropped from 2026-02-08"),
        "{early}"
    );

    inv.holds.push(hold(1, "2025-01-02", "2025-01-03"));
    let late = plan_from(&inv, "audit", &cfg, at("2026-02-08T00:00:00Z"));
    assert_eq!(
        names(&late, ActionKind::Drop),
        ["retired_events_p20250101", "retired_events_p20250103"]
    );
    assert_eq!(late.kept.len(), 1);
    assert!(late.kept[0].reason.contains("legal hold 1"), "{late}");
}

#[test]
fn interrupted_retirements_are_finished_first_even_under_a_hold() {
    let specs = daily(day(2025, 1, 1), 2);
    let mut inv = inventory(&specs);
    inv.attached[1].detach_pending = true;
    inv.lifecycle.insert(
        specs[1].name(),
        retired_row(&specs[1], "retiring", "2026-01-01"),
    );
    inv.holds.push(hold(1, "2025-01-01", "2025-01-03"));
    let plan = plan_from(
        &inv,
        "audit",
        &config(PartitionInterval::Day, 0, 30, 7),
        at("2026-02-01"),
    );
    assert_eq!(names(&plan, ActionKind::Retire), ["events_p20250102"]);
    let retire = plan
        .actions
        .iter()
        .find(|a| a.kind == ActionKind::Retire)
        .unwrap();
    assert!(retire.reason.contains("finishing"), "{plan}");
    assert_eq!(plan.kept.len(), 1, "{plan}");
}

#[test]
fn a_restored_partition_is_left_attached_for_the_grace_period() {
    let specs = daily(day(2025, 1, 1), 1);
    let mut inv = inventory(&specs);
    let mut row = retired_row(&specs[0], "restored", "2026-01-01");
    row.restored_at = Some(at("2026-02-01"));
    inv.lifecycle.insert(specs[0].name(), row);
    let cfg = config(PartitionInterval::Day, 0, 30, 7);
    let during = plan_from(&inv, "audit", &cfg, at("2026-02-07T23:00:00Z"));
    assert!(names(&during, ActionKind::Retire).is_empty(), "{during}");
    assert!(during.kept[0].reason.contains("restored"), "{during}");
    let after = plan_from(&inv, "audit", &cfg, at("2026-02-08T00:00:00Z"));
    assert_eq!(names(&after, ActionKind::Retire), ["events_p20250101"]);
}

#[test]
fn a_pending_detach_maintenance_does_not_own_is_a_warning() {
    let specs = daily(day(2026, 1, 20), 1);
    let mut inv = inventory(&specs);
    inv.attached[0].detach_pending = true;
    let plan = plan_from(
        &inv,
        "audit",
        &config(PartitionInterval::Day, 0, 30, 7),
        at("2026-01-25"),
    );
    assert!(names(&plan, ActionKind::Retire).is_empty(), "{plan}");
    assert_eq!(plan.warnings.len(), 1, "{plan}");
    assert!(plan.warnings[0].contains("FINALIZE"), "{plan}");
}

#[test]
fn partitions_not_named_by_auditflow_are_left_alone() {
    let mut inv = Inventory::default();
    inv.attached.push(Attached {
        name: "events_archive".into(),
        from: None,
        to: Some(at("2020-01-01")),
        is_default: false,
        detach_pending: false,
    });
    // Named like a daily partition but bounded like something else.
    inv.attached.push(Attached {
        name: "events_p20200101".into(),
        from: Some(at("2020-01-01")),
        to: Some(at("2020-01-03")),
        is_default: false,
        detach_pending: false,
    });
    let plan = plan_from(
        &inv,
        "audit",
        &config(PartitionInterval::Day, 0, 30, 7),
        at("2026-02-01"),
    );
    assert!(names(&plan, ActionKind::Retire).is_empty(), "{plan}");
    assert!(plan.kept.is_empty(), "{plan}");
    let foreign: Vec<&str> = plan.foreign.iter().map(|f| f.table.as_str()).collect();
    assert_eq!(foreign, ["events_archive", "events_p20200101"], "{plan}");
    assert!(
        plan.foreign[1]
            .reason
            .contains("bounded [2020-01-01, 2020-01-03) instead of [2020-01-01, 2020-01-02)"),
        "{plan}"
    );
    assert!(
        plan.to_string()
            .contains("foreign events_archive  [MINVALUE, 2020-01-01)"),
        "{plan}"
    );
}

#[test]
fn foreign_names_of_any_characters_are_listed_and_never_acted_on() {
    let inside = PartitionSpec::containing(PartitionInterval::Day, day(2026, 1, 10));
    let mut inv = inventory(&[inside]);
    for (name, from, to) in [
        ("events_p123é567", Some("2020-01-01"), Some("2020-01-05")),
        ("events_p12é4567", None, Some("2019-01-01")),
        ("ÉVÉNEMENTS", Some("2030-01-01"), None),
    ] {
        inv.attached.push(Attached {
            name: name.into(),
            from: from.map(at),
            to: to.map(at),
            is_default: false,
            detach_pending: false,
        });
        inv.tables.insert(name.into());
    }
    inv.attached.push(Attached {
        name: "events_default".into(),
        from: None,
        to: None,
        is_default: true,
        detach_pending: false,
    });
    // Detached: hand-made, and one auditflow would recognize (not foreign).
    for name in [
        "retired_events_p123é567",
        "events_p2026é",
        "retired_events_p20250101",
        "chain_links",
    ] {
        inv.tables.insert(name.into());
    }
    inv.holds.push(hold(1, "2020-01-02", "2020-01-03"));
    let plan = plan_from(
        &inv,
        "audit",
        &config(PartitionInterval::Day, 1, 30, 0),
        at("2026-03-01"),
    );
    let foreign: Vec<(&str, bool)> = plan
        .foreign
        .iter()
        .map(|f| (f.table.as_str(), f.attached))
        .collect();
    assert_eq!(
        foreign,
        [
            ("events_p123é567", true),
            ("events_p12é4567", true),
            ("ÉVÉNEMENTS", true),
            ("events_default", true),
            ("events_p2026é", false),
            ("retired_events_p123é567", false),
        ],
        "{plan}"
    );
    // Only the auditflow partition is retired; nothing is done to any foreign one.
    assert_eq!(
        names(&plan, ActionKind::Retire),
        ["events_p20260110"],
        "{plan}"
    );
    for action in &plan.actions {
        assert!(action.spec().is_some(), "{plan}");
    }
    let text = plan.to_string();
    assert!(
        text.contains("foreign events_p123é567  [2020-01-01, 2020-01-05)"),
        "{text}"
    );
    assert!(
        text.contains("foreign retired_events_p123é567  (detached)"),
        "{text}"
    );
    assert!(text.ends_with(", 6 foreign"), "{text}");
    let json = serde_json::to_string(&plan).unwrap();
    assert_eq!(serde_json::from_str::<Plan>(&json).unwrap(), plan);
}

#[test]
fn actions_from_a_tampered_plan_do_not_validate() {
    let spec = PartitionSpec::containing(PartitionInterval::Day, day(2026, 2, 3));
    let good = Action::new(ActionKind::Drop, &spec, "x".into());
    assert_eq!(good.spec(), Some(spec));
    let mut renamed = good.clone();
    renamed.table = "events; drop table x".into();
    assert_eq!(renamed.spec(), None);
    let mut widened = good.clone();
    widened.to = at("2026-02-05");
    assert_eq!(widened.spec(), None);
}

#[test]
fn plans_and_results_round_trip_through_json() {
    let plan = plan_from(
        &inventory(&daily(day(2025, 1, 1), 2)),
        "audit",
        &config(PartitionInterval::Day, 1, 30, 7),
        at("2026-02-01"),
    );
    let text = serde_json::to_string(&plan).unwrap();
    assert_eq!(serde_json::from_str::<Plan>(&text).unwrap(), plan);
    let result = ActionResult {
        action: plan.actions[0].clone(),
        outcome: Outcome::Skipped {
            detail: "busy".into(),
        },
    };
    let value = serde_json::to_value(&result).unwrap();
    assert_eq!(value["kind"], "create");
    assert_eq!(value["outcome"], "skipped");
    assert_eq!(value["detail"], "busy");
    assert_eq!(
        serde_json::from_value::<ActionResult>(value).unwrap(),
        result
    );
}

#[test]
fn the_protected_window_reaches_back_accept_past_days_and_ahead_to_the_premake_horizon() {
    let cfg = PartitionConfig {
        accept_past_days: 30,
        ..config(PartitionInterval::Day, 2, 400, 30)
    };
    let real_now = at("2026-12-01T12:00:00Z");
    let guard = Guard::around(real_now, &cfg);
    assert_eq!(guard.protect_from, at("2026-11-01T12:00:00Z"));
    // Today and two days ahead: up to the end of 2026-12-03.
    assert_eq!(guard.protect_to, at("2026-12-04"));
    let covers = |d: NaiveDate| guard.protects(midnight(d), midnight(d + Duration::days(1)));
    assert!(!covers(day(2026, 10, 31)));
    assert!(covers(day(2026, 11, 1)), "overlaps by its last 12 hours");
    assert!(covers(day(2026, 12, 1)));
    assert!(covers(day(2026, 12, 3)));
    assert!(!covers(day(2026, 12, 4)));
    let monthly = Guard::around(
        real_now,
        &PartitionConfig {
            accept_past_days: 0,
            ..config(PartitionInterval::Month, 1, 400, 30)
        },
    );
    assert_eq!(
        (monthly.protect_from, monthly.protect_to),
        (real_now, at("2027-02-01"))
    );
    assert!(guard
        .to_string()
        .contains("[2026-11-01T12:00:00Z, 2026-12-04T00:00:00Z)"));
}

#[test]
fn a_simulated_now_is_refused_unless_near_the_real_time_or_on_a_scratch_schema() {
    let real_now = at("2026-12-01T12:00:00Z");
    assert!(check_simulated_now(real_now + Duration::minutes(4), real_now, false).is_ok());
    assert!(check_simulated_now(real_now - Duration::minutes(5), real_now, false).is_ok());
    let refusal = check_simulated_now(real_now + Duration::days(365), real_now, false)
        .expect_err("a year ahead is a simulation");
    assert!(refusal.contains("365 days"), "{refusal}");
    assert!(
        refusal.contains("partitions plan --now 2027-12-01T12:00:00Z"),
        "{refusal}"
    );
    assert!(refusal.contains("--scratch-schema"), "{refusal}");
    let refusal = check_simulated_now(real_now - Duration::minutes(6), real_now, false)
        .expect_err("six minutes back is a simulation");
    assert!(refusal.contains("6 minutes"), "{refusal}");
    assert!(check_simulated_now(real_now + Duration::days(365), real_now, true).is_ok());
}

#[test]
fn a_plan_warns_about_the_actions_the_protected_window_refuses() {
    let real_now = at("2026-12-01T12:00:00Z");
    let cfg = config(PartitionInterval::Day, 1, 40, 0);
    // Planned a year ahead: every partition around the real time is past retention.
    let mut plan = plan_from(
        &inventory(&daily(day(2026, 11, 29), 4)),
        "audit",
        &cfg,
        real_now + Duration::days(365),
    );
    assert_eq!(names(&plan, ActionKind::Retire).len(), 4, "{plan}");
    guard::warn_protected(&mut plan, &Guard::around(real_now, &cfg));
    assert_eq!(plan.warnings.len(), 1, "{plan}");
    assert!(
        plan.warnings[0]
            .contains("apply would skip retire events_p20261129, retire events_p20261130"),
        "{plan}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_maintenance_loop_survives_a_round_that_fails_or_panics() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let shutdown = CancellationToken::new();
    let calls = AtomicU32::new(0);
    let started = tokio::time::Instant::now();
    let summary = maintenance_loop("audit", StdDuration::from_secs(600), &shutdown, || {
        let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
        let shutdown = shutdown.clone();
        async move {
            match call {
                1 => panic!("a round that panics"),
                2 => Err(PartitionError::Invalid("a round that fails".into())),
                _ => {
                    shutdown.cancel();
                    Ok(MaintenanceRound::Skipped)
                }
            }
        }
    })
    .await;
    assert_eq!(
        summary,
        MaintenanceSummary {
            num_rounds: 3,
            num_failed_rounds: 2
        }
    );
    // Each failure brings the next round within 30 s (±10%), not a whole interval later.
    assert!(
        started.elapsed() <= StdDuration::from_secs(66),
        "{:?}",
        started.elapsed()
    );
}
