//! Filters, routing, the end-of-topic snapshot and commit ordering, without a broker.

use super::run::CommitPoints;
use super::*;
use crate::ingest::dlq::{header, SourceRecord};

fn time(text: &str) -> DateTime<Utc> {
    parse_time(text).expect("valid time")
}

fn letter(class: &str, failed_at: &str, partition: i32, offset: i64) -> DeadLetterHeaders {
    DeadLetterHeaders {
        error_class: Some(class.into()),
        error_message: Some(format!("{class} failure")),
        failed_at: Some(time(failed_at)),
        source_topic: Some("audit-events".into()),
        source_partition: Some(partition),
        source_offset: Some(offset),
        attempt: Some(1),
        payload_omitted: None,
    }
}

fn record_with(headers: &[(&str, Option<&[u8]>)]) -> SourceRecord {
    SourceRecord {
        topic: "audit-events.dlq".into(),
        partition: 0,
        offset: 7,
        timestamp_ms: None,
        key: Some(b"k".to_vec()),
        payload: Some(b"v".to_vec()),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec)))
            .collect(),
    }
}

#[test]
fn offset_ranges_are_inclusive_and_may_be_open_ended() {
    let range: OffsetRange = "10..20".parse().unwrap();
    assert_eq!(range, OffsetRange { from: 10, to: 20 });
    assert!(range.contains(10) && range.contains(20));
    assert!(!range.contains(9) && !range.contains(21));
    assert_eq!(
        "5..".parse::<OffsetRange>().unwrap(),
        OffsetRange {
            from: 5,
            to: i64::MAX
        }
    );
    assert_eq!(
        "..5".parse::<OffsetRange>().unwrap(),
        OffsetRange { from: 0, to: 5 }
    );
    assert_eq!(
        " 3 .. 3 ".parse::<OffsetRange>().unwrap(),
        OffsetRange { from: 3, to: 3 }
    );
}

#[test]
fn malformed_offset_ranges_are_refused_with_the_input() {
    for bad in ["", "..", "5", "5-9", "9..5", "-1..3", "a..b", "1...3"] {
        let err = bad.parse::<OffsetRange>().unwrap_err();
        assert_eq!(err, ReplayArgError::OffsetRange(bad.to_owned()), "{bad:?}");
    }
}

#[test]
fn times_are_rfc3339_and_normalised_to_utc() {
    assert_eq!(
        time("2024-05-01T14:00:00+02:00"),
        time("2024-05-01T12:00:00Z")
    );
    assert!(matches!(
        parse_time("2024-05-01 12:00"),
        Err(ReplayArgError::Time { .. })
    ));
    assert!(parse_time("yesterday").is_err());
}

#[test]
fn an_empty_filter_selects_everything() {
    let filter = ReplayFilter::default();
    assert!(filter.matches(&letter("decode", "2024-05-01T00:00:00Z", 0, 1)));
    assert!(filter.matches(&DeadLetterHeaders::default()));
}

#[test]
fn error_classes_select_any_of_the_named_classes() {
    let filter = ReplayFilter {
        error_classes: vec!["decode".into(), "out_of_window".into()],
        ..Default::default()
    };
    assert!(filter.matches(&letter("decode", "2024-05-01T00:00:00Z", 0, 1)));
    assert!(filter.matches(&letter("out_of_window", "2024-05-01T00:00:00Z", 0, 1)));
    assert!(!filter.matches(&letter("validation", "2024-05-01T00:00:00Z", 0, 1)));
    assert!(!filter.matches(&DeadLetterHeaders::default()));
}

#[test]
fn the_time_window_includes_since_and_excludes_until() {
    let filter = ReplayFilter {
        since: Some(time("2024-05-01T10:00:00Z")),
        until: Some(time("2024-05-01T12:00:00Z")),
        ..Default::default()
    };
    let at = |t: &str| letter("decode", t, 0, 1);
    assert!(!filter.matches(&at("2024-05-01T09:59:59.999Z")));
    assert!(filter.matches(&at("2024-05-01T10:00:00Z")));
    assert!(filter.matches(&at("2024-05-01T11:59:59.999Z")));
    assert!(!filter.matches(&at("2024-05-01T12:00:00Z")));
    let mut undated = at("2024-05-01T11:00:00Z");
    undated.failed_at = None;
    assert!(!filter.matches(&undated), "no failure time, no time match");
}

#[test]
fn partition_and_offsets_combine_with_and() {
    let filter = ReplayFilter {
        error_classes: vec!["decode".into()],
        source_partition: Some(2),
        source_offsets: Some(OffsetRange { from: 10, to: 12 }),
        ..Default::default()
    };
    let t = "2024-05-01T00:00:00Z";
    assert!(filter.matches(&letter("decode", t, 2, 10)));
    assert!(filter.matches(&letter("decode", t, 2, 12)));
    assert!(!filter.matches(&letter("decode", t, 2, 13)));
    assert!(!filter.matches(&letter("decode", t, 1, 11)));
    assert!(!filter.matches(&letter("schema", t, 2, 11)));
}

#[test]
fn headers_are_read_from_the_contract_and_the_last_value_wins() {
    let record = record_with(&[
        ("traceparent", Some(b"00-abc")),
        (header::ERROR_CLASS, Some(b"old")),
        (header::ERROR_CLASS, Some(b"out_of_window")),
        (header::ERROR_MESSAGE, Some(b"occurred_at too old")),
        (header::FAILED_AT, Some(b"2024-05-01T12:00:00.123Z")),
        (header::SOURCE_TOPIC, Some(b"audit-events")),
        (header::SOURCE_PARTITION, Some(b"3")),
        (header::SOURCE_OFFSET, Some(b"42")),
        (header::ATTEMPT, Some(b"2")),
    ]);
    let letter = DeadLetterHeaders::from_record(&record);
    assert_eq!(letter.error_class.as_deref(), Some("out_of_window"));
    assert_eq!(letter.error_message.as_deref(), Some("occurred_at too old"));
    assert_eq!(letter.failed_at, Some(time("2024-05-01T12:00:00.123Z")));
    assert_eq!(letter.source_topic.as_deref(), Some("audit-events"));
    assert_eq!(letter.source_partition, Some(3));
    assert_eq!(letter.source_offset, Some(42));
    assert_eq!(letter.attempt, Some(2));
}

#[test]
fn unreadable_headers_count_as_missing() {
    let record = record_with(&[
        (header::FAILED_AT, Some(b"last tuesday")),
        (header::SOURCE_PARTITION, Some(b"x")),
        (header::ATTEMPT, Some(&[0xff, 0xfe])),
        (header::SOURCE_TOPIC, Some(b"")),
        (header::ERROR_CLASS, None),
    ]);
    let letter = DeadLetterHeaders::from_record(&record);
    assert_eq!(letter, DeadLetterHeaders::default());
    assert_eq!(letter.attempt_or_first(), 1);
}

#[test]
fn a_record_is_parked_once_it_has_been_replayed_max_attempts_times() {
    // Attempt 1 is the first failure: never replayed.
    assert!(!out_of_attempts(1, 2));
    assert!(!out_of_attempts(2, 2));
    assert!(out_of_attempts(3, 2));
    assert!(out_of_attempts(4, 2));
    assert!(out_of_attempts(1, 0), "max 0 parks everything");
    assert!(!out_of_attempts(0, 1), "attempt 0 is treated like 1");
}

#[test]
fn routing_republishes_with_the_next_attempt_or_parks() {
    let options = ReplayOptions {
        max_attempts: 2,
        ..Default::default()
    };
    let mut first = letter("decode", "2024-05-01T00:00:00Z", 0, 1);
    assert_eq!(
        route(&first, &options),
        Route::Republish {
            topic: "audit-events".into(),
            attempt: 2
        }
    );
    first.attempt = Some(3);
    assert_eq!(
        route(&first, &options),
        Route::Park(ParkReason::OutOfAttempts)
    );
    first.attempt = None;
    first.source_topic = None;
    assert_eq!(
        route(&first, &options),
        Route::Park(ParkReason::NoSourceTopic)
    );
    let mut without_record = letter("decode", "2024-05-01T00:00:00Z", 0, 2);
    without_record.payload_omitted = Some("999700 bytes: message size too large".into());
    assert_eq!(
        route(&without_record, &options),
        Route::Park(ParkReason::PayloadOmitted),
        "nothing to republish: parked, the record stays readable in the source topic"
    );
    let redirected = ReplayOptions {
        to_topic: Some("audit-events-retry".into()),
        ..options.clone()
    };
    assert_eq!(
        route(&first, &redirected),
        Route::Republish {
            topic: "audit-events-retry".into(),
            attempt: 2
        }
    );
    let only_schema = ReplayOptions {
        filter: ReplayFilter {
            error_classes: vec!["schema".into()],
            ..Default::default()
        },
        ..options
    };
    assert_eq!(route(&first, &only_schema), Route::Skip);
}

#[test]
fn republished_headers_keep_the_originals_in_order_and_carry_the_next_attempt() {
    let headers = vec![
        ("traceparent".to_string(), Some(b"00-abc".to_vec())),
        (header::ERROR_CLASS.to_string(), Some(b"decode".to_vec())),
        ("empty".to_string(), None),
        (header::ATTEMPT.to_string(), Some(b"1".to_vec())),
        ("binary".to_string(), Some(vec![0, 255])),
    ];
    assert_eq!(
        republish_headers(&headers, 2),
        vec![
            ("traceparent".to_string(), Some(b"00-abc".to_vec())),
            ("empty".to_string(), None),
            ("binary".to_string(), Some(vec![0, 255])),
            (header::ATTEMPT.to_string(), Some(b"2".to_vec())),
        ]
    );
}

#[test]
fn the_replay_ends_when_every_partition_reaches_its_snapshot() {
    let mut end = EndOfDlq::new([
        PartitionSnapshot {
            partition: 0,
            start: 0,
            end: 3,
        },
        PartitionSnapshot {
            partition: 1,
            start: 5,
            end: 6,
        },
        // Empty, and fully committed: finished from the start.
        PartitionSnapshot {
            partition: 2,
            start: 0,
            end: 0,
        },
        PartitionSnapshot {
            partition: 3,
            start: 9,
            end: 9,
        },
    ]);
    assert_eq!(end.total(), 4);
    assert_eq!(
        end.unfinished()
            .iter()
            .map(|p| p.partition)
            .collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert!(end.is_done(2) && end.is_done(3));
    assert_eq!(end.admit(0, 0), Admission::InSnapshot);
    assert_eq!(end.admit(0, 1), Admission::InSnapshot);
    assert!(!end.is_done(0));
    assert_eq!(end.admit(1, 5), Admission::InSnapshot);
    assert!(end.is_done(1), "the last offset before the end finishes it");
    assert!(!end.all_done());
    assert_eq!(end.read(), 3);
    assert_eq!(end.admit(0, 2), Admission::InSnapshot);
    assert!(end.all_done());
    assert_eq!(end.read(), 4);
}

#[test]
fn records_that_arrive_after_the_start_are_left_alone() {
    let mut end = EndOfDlq::new([PartitionSnapshot {
        partition: 0,
        start: 0,
        end: 10,
    }]);
    assert_eq!(end.admit(0, 4), Admission::InSnapshot);
    assert_eq!(
        end.admit(0, 10),
        Admission::AfterSnapshot,
        "offset at the snapshot end"
    );
    assert!(end.is_done(0));
    assert_eq!(
        end.admit(0, 5),
        Admission::AfterSnapshot,
        "finished stays finished"
    );
    assert_eq!(
        end.admit(7, 0),
        Admission::AfterSnapshot,
        "a partition added later"
    );
}

#[test]
fn the_end_of_a_partition_finishes_it_despite_offset_gaps() {
    // Offsets 8 and 9 are transaction markers or compacted away: never delivered.
    let mut end = EndOfDlq::new([PartitionSnapshot {
        partition: 0,
        start: 0,
        end: 10,
    }]);
    assert_eq!(end.admit(0, 7), Admission::InSnapshot);
    assert!(!end.all_done());
    end.reached_eof(0);
    assert!(end.all_done());
    assert_eq!(end.read(), 10);
}

#[test]
fn commit_points_stop_at_the_first_unacknowledged_record() {
    let mut points = CommitPoints::default();
    assert!(points.settle(0, 4, true));
    assert!(points.settle(1, 9, true));
    assert_eq!(points.moved(), vec![(0, 5), (1, 10)]);
    points.mark_committed(&points.moved());
    assert!(points.moved().is_empty(), "nothing new to commit");
    assert!(points.settle(0, 5, true));
    assert_eq!(points.moved(), vec![(0, 6)]);
    assert!(!points.settle(1, 10, false));
    assert!(
        !points.settle(0, 6, true),
        "acknowledged after a failure: still not committable"
    );
    assert_eq!(points.moved(), vec![(0, 6)]);
}

#[test]
fn the_default_group_is_stable_and_follows_the_selection_not_the_pace() {
    let base = ReplayOptions {
        filter: ReplayFilter {
            error_classes: vec!["out_of_window".into(), "decode".into()],
            ..Default::default()
        },
        ..Default::default()
    };
    let group = base.default_group_id("audit-events.dlq");
    assert!(
        group.starts_with("auditflow-replay-audit-events.dlq-"),
        "{group}"
    );
    assert_eq!(group.len(), "auditflow-replay-audit-events.dlq-".len() + 8);
    // Pinned: a change here makes every operator's replay start over.
    assert_eq!(group, "auditflow-replay-audit-events.dlq-e7aa8e97");

    let reordered = ReplayOptions {
        filter: ReplayFilter {
            error_classes: vec!["decode".into(), "out_of_window".into(), "decode".into()],
            ..Default::default()
        },
        ..Default::default()
    };
    let paced = ReplayOptions {
        max: Some(10),
        rate: Some(5.0),
        max_attempts: 7,
        dry_run: true,
        ..base.clone()
    };
    let explicit_default_parking = ReplayOptions {
        parking_topic: Some("audit-events.dlq.parking".into()),
        ..base.clone()
    };
    for same in [reordered, paced, explicit_default_parking] {
        assert_eq!(same.default_group_id("audit-events.dlq"), group);
    }

    let mut different = Vec::new();
    different.push(ReplayOptions {
        to_topic: Some("elsewhere".into()),
        ..base.clone()
    });
    let mut filtered = base.clone();
    filtered.filter.source_offsets = Some(OffsetRange { from: 1, to: 2 });
    different.push(filtered);
    let mut since = base.clone();
    since.filter.since = Some(time("2024-05-01T00:00:00Z"));
    different.push(since);
    let mut partition = base.clone();
    partition.filter.source_partition = Some(0);
    different.push(partition);
    for options in different {
        assert_ne!(options.default_group_id("audit-events.dlq"), group);
    }
    assert_ne!(base.default_group_id("other.dlq"), group);
    let named = ReplayOptions {
        group: Some("mine".into()),
        ..base
    };
    assert_eq!(named.group_id("audit-events.dlq"), "mine");
}

#[test]
fn contradictory_options_are_refused() {
    let dlq = "audit-events.dlq";
    let ok = ReplayOptions::default();
    assert_eq!(ok.validate(dlq), Ok(()));
    let cases = [
        ReplayOptions {
            rate: Some(0.0),
            ..ok.clone()
        },
        ReplayOptions {
            rate: Some(f64::NAN),
            ..ok.clone()
        },
        ReplayOptions {
            max: Some(0),
            ..ok.clone()
        },
        ReplayOptions {
            to_topic: Some(dlq.into()),
            ..ok.clone()
        },
        ReplayOptions {
            parking_topic: Some(dlq.into()),
            ..ok.clone()
        },
        ReplayOptions {
            group: Some(" ".into()),
            ..ok.clone()
        },
        ReplayOptions {
            filter: ReplayFilter {
                since: Some(time("2024-05-02T00:00:00Z")),
                until: Some(time("2024-05-01T00:00:00Z")),
                ..Default::default()
            },
            ..ok.clone()
        },
    ];
    for options in cases {
        assert!(
            matches!(options.validate(dlq), Err(ReplayArgError::Options(_))),
            "{options:?}"
        );
    }
}

#[test]
fn the_histogram_ranks_messages_by_count_then_text() {
    let mut histogram = ErrorHistogram::default();
    let mut add = |class: Option<&str>, message: Option<&str>, times: usize| {
        for _ in 0..times {
            histogram.add(&DeadLetterHeaders {
                error_class: class.map(str::to_owned),
                error_message: message.map(str::to_owned),
                ..Default::default()
            });
        }
    };
    add(Some("decode"), Some("bad magic byte"), 3);
    add(Some("decode"), Some("truncated"), 1);
    add(Some("out_of_window"), Some("too old"), 3);
    add(None, None, 2);
    for i in 0..12 {
        add(Some("validation"), Some(&format!("bad id {i:02}")), 1);
    }
    let classes: Vec<(&str, u64)> = histogram
        .classes()
        .iter()
        .map(|(c, n)| (c.as_str(), *n))
        .collect();
    assert_eq!(
        classes,
        vec![
            ("(none)", 2),
            ("decode", 4),
            ("out_of_window", 3),
            ("validation", 12)
        ]
    );
    let top = histogram.top_messages(TOP_MESSAGES);
    assert_eq!(top.len(), 10);
    assert_eq!(top[0], ("bad magic byte".to_string(), 3));
    assert_eq!(top[1], ("too old".to_string(), 3));
    assert_eq!(top[2], ("(none)".to_string(), 2));
    assert_eq!(top[3], ("bad id 00".to_string(), 1));
    assert_eq!(top[9], ("bad id 06".to_string(), 1));
}

#[test]
fn the_summary_line_has_the_histogram_only_for_dry_runs() {
    let mut summary = ReplaySummary {
        matched: 3,
        replayed: 2,
        parked: 1,
        skipped: 4,
        retries: 0,
        dry_run: false,
        elapsed_s: 1.5,
        interrupted: false,
        group: "g".into(),
        classes: None,
        top_messages: None,
        dlq_topic: "d".into(),
        parking_topic: "d.parking".into(),
    };
    let line: serde_json::Value = serde_json::to_value(&summary).unwrap();
    assert_eq!(
        line,
        serde_json::json!({"matched":3,"replayed":2,"parked":1,"skipped":4,"retries":0,"dry_run":false,
            "elapsed_s":1.5,"interrupted":false,"group":"g"})
    );
    summary.dry_run = true;
    summary.classes = Some(BTreeMap::from([("decode".to_string(), 3)]));
    summary.top_messages = Some(vec![("bad magic byte".to_string(), 3)]);
    let line: serde_json::Value = serde_json::to_value(&summary).unwrap();
    assert_eq!(line["classes"], serde_json::json!({"decode": 3}));
    assert_eq!(
        line["top_messages"],
        serde_json::json!([["bad magic byte", 3]])
    );
    assert!(summary.to_string().contains("bad magic byte"));
}
