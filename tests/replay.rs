//! `auditflow replay` against a Kafka-protocol broker, with the real sink (Postgres, Redis)
//! producing and consuming the dead letters where the test is about the round trip.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use auditflow::event::{Actor, ActorType, AuditEvent, Outcome, Resource};
use auditflow::ingest::decode::Decoder;
use auditflow::ingest::dlq::{header as dlq_header, DeadLetter, Failure, SourceRecord};
use auditflow::ops::replay::{self, OffsetRange, ReplayFilter, ReplayOptions, ReplaySummary};
use auditflow::{RunSummary, Sink};
use chrono::{DateTime, Utc};
use common::{header, partitions_of, suffix, wait_exit, TestEnv};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const IDLE: Duration = Duration::from_secs(2);
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

async fn run_sink(env: &TestEnv, overrides: &[(&str, &str)]) -> RunSummary {
    let sink = Sink::build(env.config(overrides))
        .await
        .expect("build sink");
    tokio::time::timeout(
        Duration::from_secs(120),
        sink.run_until_stopped(CancellationToken::new(), Some(IDLE)),
    )
    .await
    .expect("sink drained in time")
    .expect("sink run")
}

async fn replay_with(
    env: &TestEnv,
    overrides: &[(&str, &str)],
    options: &ReplayOptions,
) -> ReplaySummary {
    tokio::time::timeout(
        Duration::from_secs(60),
        replay::replay(&env.config(overrides), options, CancellationToken::new()),
    )
    .await
    .expect("replay finished by itself")
    .expect("replay")
}

/// Runs `auditflow replay ARGS` and returns its JSON summary line.
async fn replay_cli(env: &TestEnv, args: &[&str]) -> serde_json::Value {
    let mut argv = vec!["replay"];
    argv.extend_from_slice(args);
    let mut child = env.spawn_sink(&argv, &[]);
    let status = wait_exit(&mut child, Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "auditflow replay {args:?} failed: {status}"
    );
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().expect("stdout"), &mut stdout)
        .expect("read stdout");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line on stdout: {stdout}");
    serde_json::from_str(lines[0]).expect("the summary line is JSON")
}

fn producer(env: &TestEnv) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", env.kafka.brokers())
        .create()
        .expect("producer")
}

fn classes(names: &[&str]) -> ReplayFilter {
    ReplayFilter {
        error_classes: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    }
}

/// A valid event that happened 40 days ago: outside the default 30-day window, inside 60 days.
fn old_event(i: usize) -> AuditEvent {
    AuditEvent {
        event_id: Uuid::new_v4(),
        occurred_at: Utc::now() - chrono::Duration::days(40),
        tenant_id: "tenant-archive".into(),
        actor: Actor {
            id: format!("user-{i}"),
            actor_type: ActorType::User,
            ip: None,
            user_agent: None,
        },
        action: "order.update".into(),
        resource: Resource {
            resource_type: "order".into(),
            id: format!("order-{i}"),
        },
        outcome: Outcome::Success,
        reason: None,
        trace_id: None,
        details: Some(r#"{"migrated":true}"#.into()),
        session_id: None,
    }
}

/// Writes `count` 40-day-old events to the source topic and returns their payloads.
async fn produce_old_events(env: &TestEnv, count: usize) -> BTreeSet<Vec<u8>> {
    let producer = producer(env);
    let decoder = Decoder::embedded();
    let mut payloads = BTreeSet::new();
    for i in 0..count {
        let payload = decoder
            .encode_confluent(&old_event(i), 2)
            .expect("encode event");
        producer
            .send(
                FutureRecord::to(&env.topic)
                    .key("tenant-archive")
                    .payload(&payload)
                    .headers(OwnedHeaders::new().insert(Header {
                        key: "traceparent",
                        value: Some(format!("00-old-{i}").as_str()),
                    })),
                KAFKA_TIMEOUT,
            )
            .await
            .expect("produce old event");
        payloads.insert(payload);
    }
    payloads
}

/// A dead letter as the sink would write it, for tests about selection rather than the round trip.
fn dead_letter(
    i: usize,
    class: &str,
    source_topic: &str,
    source: (i32, i64),
    failed_at: DateTime<Utc>,
) -> DeadLetter {
    DeadLetter {
        source: SourceRecord {
            topic: source_topic.to_owned(),
            partition: source.0,
            offset: source.1,
            timestamp_ms: Some(failed_at.timestamp_millis()),
            key: Some(format!("key-{i}").into_bytes()),
            payload: Some(format!("payload-{i}").into_bytes()),
            headers: vec![("traceparent".into(), Some(format!("00-{i}").into_bytes()))],
        },
        failure: Failure {
            class: class.to_owned(),
            message: format!("{class} failure"),
            sqlstate: None,
        },
        failed_at,
        omitted: None,
    }
}

/// Writes dead letters to `partition` of `dlq_topic`, in order, with the contract's headers.
async fn send_dead_letters(env: &TestEnv, dlq_topic: &str, partition: i32, letters: &[DeadLetter]) {
    let producer = producer(env);
    for letter in letters {
        let mut headers = OwnedHeaders::new();
        for (key, value) in letter.headers("test-replica") {
            headers = headers.insert(Header {
                key: &key,
                value: value.as_deref(),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(dlq_topic)
            .partition(partition)
            .headers(headers);
        if let Some(key) = &letter.source.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = &letter.source.payload {
            record = record.payload(payload.as_slice());
        }
        producer
            .send(record, KAFKA_TIMEOUT)
            .await
            .expect("produce dead letter");
    }
}

fn reader(env: &TestEnv, group: &str) -> StreamConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", env.kafka.brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("reader")
}

/// Records in `topic` now (sum of high minus low watermarks).
fn count_records(env: &TestEnv, topic: &str) -> i64 {
    let consumer = reader(env, &format!("counter-{}", suffix()));
    partitions_of(&consumer, topic)
        .into_iter()
        .map(|partition| {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, KAFKA_TIMEOUT)
                .expect("watermarks");
            high - low
        })
        .sum()
}

/// Every record in `topic` now, partition by partition in offset order.
async fn read_topic(env: &TestEnv, topic: &str) -> Vec<OwnedMessage> {
    let consumer = reader(env, &format!("reader-{}", suffix()));
    let mut assignment = TopicPartitionList::new();
    let mut ends = HashMap::new();
    let mut remaining = 0;
    for partition in partitions_of(&consumer, topic) {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, KAFKA_TIMEOUT)
            .expect("watermarks");
        if high > low {
            assignment
                .add_partition_offset(topic, partition, Offset::Offset(low))
                .expect("assignment");
            ends.insert(partition, high);
            remaining += high - low;
        }
    }
    let mut messages = Vec::new();
    if remaining == 0 {
        return messages;
    }
    consumer.assign(&assignment).expect("assign");
    while remaining > 0 {
        let message = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
            .await
            .expect("records arrive")
            .expect("read");
        if message.offset() < ends[&message.partition()] {
            messages.push(message.detach());
            remaining -= 1;
        }
    }
    messages.sort_by_key(|m| (m.partition(), m.offset()));
    messages
}

/// The committed offsets of `group` on every partition of `topic`.
fn committed_offsets(env: &TestEnv, group: &str, topic: &str) -> Vec<Offset> {
    let consumer = reader(env, group);
    let mut partitions = TopicPartitionList::new();
    for partition in partitions_of(&consumer, topic) {
        partitions.add_partition(topic, partition);
    }
    consumer
        .committed_offsets(partitions, KAFKA_TIMEOUT)
        .expect("committed offsets")
        .elements()
        .iter()
        .map(|e| e.offset())
        .collect()
}

fn headers_of(message: &OwnedMessage) -> Vec<(String, Option<Vec<u8>>)> {
    message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_the_cause_is_fixed_stores_every_replayable_record_once() {
    let env = TestEnv::new(2).await;
    let good = env.produce(30, 0.0, 0.0, 3).await;
    let old_payloads = produce_old_events(&env, 50).await;

    let first = run_sink(&env, &[]).await;
    assert_eq!(first.stored, good.distinct_valid);
    assert_eq!(first.dead_lettered, 50, "the old events are out of window");
    let dead = read_topic(&env, &env.dlq_topic).await;
    assert_eq!(dead.len(), 50);
    for message in &dead {
        assert_eq!(
            header(message, dlq_header::ERROR_CLASS).as_deref(),
            Some("out_of_window")
        );
        assert_eq!(header(message, dlq_header::ATTEMPT).as_deref(), Some("1"));
    }

    let options = ReplayOptions {
        filter: classes(&["out_of_window"]),
        ..Default::default()
    };
    let summary = replay_with(&env, &[], &options).await;
    assert_eq!(
        (
            summary.matched,
            summary.replayed,
            summary.parked,
            summary.skipped
        ),
        (50, 50, 0, 0),
        "{summary:?}"
    );
    assert!(!summary.interrupted && !summary.dry_run);

    // The source topic now holds the originals and one re-publication of each old event, with
    // its key, value and producer headers, marked as the second attempt.
    let source = read_topic(&env, &env.topic).await;
    assert_eq!(source.len() as u64, good.total + 100);
    let replayed: Vec<&OwnedMessage> = source
        .iter()
        .filter(|m| header(m, dlq_header::ATTEMPT).is_some())
        .collect();
    assert_eq!(replayed.len(), 50);
    let replayed_payloads: BTreeSet<Vec<u8>> = replayed
        .iter()
        .map(|m| m.payload().expect("payload").to_vec())
        .collect();
    assert_eq!(replayed_payloads, old_payloads);
    for message in &replayed {
        assert_eq!(message.key(), Some(&b"tenant-archive"[..]));
        let headers = headers_of(message);
        assert_eq!(headers.len(), 2, "{headers:?}");
        assert_eq!(headers[0].0, "traceparent");
        assert_eq!(
            headers[1],
            (dlq_header::ATTEMPT.to_string(), Some(b"2".to_vec()))
        );
    }

    // The cause is fixed: a wider window stores every replayed record.
    let second = run_sink(&env, &[("AUDITFLOW_ACCEPT_PAST_DAYS", "60")]).await;
    assert_eq!(second.stored, 50);
    assert_eq!(second.dead_lettered, 0);
    assert_eq!(env.count_rows().await, good.distinct_valid as i64 + 50);

    // The same command again (through the binary) resumes at the end: nothing to do.
    let again = replay_cli(&env, &["--error-class", "out_of_window"]).await;
    assert_eq!(again["replayed"], 0, "{again}");
    assert_eq!(again["matched"], 0, "{again}");
    assert_eq!(again["skipped"], 0, "{again}");
    assert_eq!(again["dry_run"], false, "{again}");
    assert_eq!(
        again["group"],
        options.group_id(&env.dlq_topic),
        "the binary derives the same group from the same options"
    );

    // A fresh group re-publishes everything again; the sink stores none of it twice.
    let fresh = ReplayOptions {
        group: Some(format!("{}-fresh-replay", env.group)),
        ..options.clone()
    };
    let repeat = replay_with(&env, &[], &fresh).await;
    assert_eq!(repeat.replayed, 50);
    let third = run_sink(&env, &[("AUDITFLOW_ACCEPT_PAST_DAYS", "60")]).await;
    assert_eq!(third.consumed, 50);
    assert_eq!(third.stored, 0);
    assert_eq!(third.duplicates, 50);
    assert_eq!(env.count_rows().await, good.distinct_valid as i64 + 50);
    assert_eq!(
        env.count_distinct_ids().await,
        good.distinct_valid as i64 + 50
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_keeps_failing_ends_in_the_parking_topic_after_max_attempts() {
    let env = TestEnv::new(1).await;
    let parking_topic = format!("{}.parking", env.dlq_topic);
    env.kafka.create_topic(&parking_topic, 1).await;
    let original_headers = [
        ("traceparent".to_string(), Some(b"00-4bf92f-01".to_vec())),
        ("binary".to_string(), Some(vec![0u8, 255, 1])),
    ];
    env.produce_garbage_with_headers().await;
    let options = ReplayOptions {
        filter: classes(&["decode"]),
        max_attempts: 2,
        ..Default::default()
    };

    // Two rounds of: the sink dead-letters it, the replay sends it back.
    for round in 1..=2 {
        let sink = run_sink(&env, &[]).await;
        assert_eq!(sink.dead_lettered, 1, "round {round}");
        let summary = replay_with(&env, &[], &options).await;
        assert_eq!(
            (summary.replayed, summary.parked),
            (1, 0),
            "round {round}: {summary:?}"
        );
    }
    // Third failure: it has been replayed twice, so it is parked.
    let sink = run_sink(&env, &[]).await;
    assert_eq!(sink.dead_lettered, 1);
    let summary = replay_with(&env, &[], &options).await;
    assert_eq!(
        (summary.matched, summary.replayed, summary.parked),
        (1, 0, 1),
        "{summary:?}"
    );

    let dead = read_topic(&env, &env.dlq_topic).await;
    let attempts: Vec<Option<String>> = dead
        .iter()
        .map(|m| header(m, dlq_header::ATTEMPT))
        .collect();
    assert_eq!(
        attempts,
        vec![Some("1".into()), Some("2".into()), Some("3".into())]
    );

    let parked = read_topic(&env, &parking_topic).await;
    assert_eq!(parked.len(), 1, "exactly the one record is parked");
    let parked = &parked[0];
    assert_eq!(parked.key(), Some(&b"tenant-x"[..]));
    assert_eq!(parked.payload(), Some(common::GARBAGE));
    assert_eq!(
        headers_of(parked),
        headers_of(&dead[2]),
        "parked with every header unchanged"
    );
    assert_eq!(&headers_of(parked)[..2], &original_headers[..]);
    assert_eq!(
        header(parked, dlq_header::ERROR_CLASS).as_deref(),
        Some("decode")
    );
    assert_eq!(header(parked, dlq_header::ATTEMPT).as_deref(), Some("3"));

    // The source topic: the original and exactly two re-publications.
    let source = read_topic(&env, &env.topic).await;
    assert_eq!(source.len(), 3);
    for (message, attempt) in source.iter().zip([None, Some("2"), Some("3")]) {
        assert_eq!(message.payload(), Some(common::GARBAGE));
        assert_eq!(message.key(), Some(&b"tenant-x"[..]));
        assert_eq!(&headers_of(message)[..2], &original_headers[..]);
        assert_eq!(header(message, dlq_header::ATTEMPT).as_deref(), attempt);
    }

    // Parking is final: the next replay finds nothing to do.
    let after = replay_with(&env, &[], &options).await;
    assert_eq!((after.matched, after.replayed, after.parked), (0, 0, 0));
    assert_eq!(read_topic(&env, &parking_topic).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_writes_nothing_and_commits_nothing() {
    let env = TestEnv::new(2).await;
    let parking_topic = format!("{}.parking", env.dlq_topic);
    env.kafka.create_topic(&parking_topic, 1).await;
    let produced = env.produce(300, 0.0, 0.05, 17).await;
    produce_old_events(&env, 7).await;
    let producer = producer(&env);
    for (i, payload) in [
        &b"\x00\x00\x00\x00\x02not avro at all"[..],
        b"\x00\x00\x00\x00\x02not avro at all",
        b"\x00\x00\x00\x00\x02not avro at all",
        b"\x00\x00\x00\x00\x02not avro at all",
        b"plain text, not avro",
        b"plain text, not avro",
    ]
    .into_iter()
    .enumerate()
    {
        producer
            .send(
                FutureRecord::to(&env.topic)
                    .key(&format!("garbage-{i}"))
                    .payload(payload),
                KAFKA_TIMEOUT,
            )
            .await
            .expect("produce garbage");
    }
    let sink = run_sink(&env, &[]).await;
    assert_eq!(sink.dead_lettered, produced.invalid + 13);

    let dead = read_topic(&env, &env.dlq_topic).await;
    assert_eq!(dead.len() as u64, sink.dead_lettered);
    let mut expected_classes: BTreeMap<String, u64> = BTreeMap::new();
    let mut expected_messages: HashMap<String, u64> = HashMap::new();
    for message in &dead {
        *expected_classes
            .entry(header(message, dlq_header::ERROR_CLASS).expect("class"))
            .or_default() += 1;
        *expected_messages
            .entry(header(message, dlq_header::ERROR_MESSAGE).expect("message"))
            .or_default() += 1;
    }
    // The generator's too-old events join ours.
    let num_out_of_window = expected_classes.get("out_of_window").copied().unwrap_or(0);
    assert!(num_out_of_window >= 7);
    let source_before = count_records(&env, &env.topic);
    let dlq_before = count_records(&env, &env.dlq_topic);

    let summary = replay_cli(&env, &["--dry-run"]).await;
    assert_eq!(summary["dry_run"], true, "{summary}");
    assert_eq!(summary["matched"], dead.len() as u64, "{summary}");
    assert_eq!(summary["replayed"], 0);
    assert_eq!(summary["parked"], 0);
    assert_eq!(summary["skipped"], 0);
    assert_eq!(summary["classes"], serde_json::json!(expected_classes));
    let top: Vec<(String, u64)> =
        serde_json::from_value(summary["top_messages"].clone()).expect("top_messages pairs");
    assert_eq!(top.len(), expected_messages.len().min(10));
    assert!(
        top.windows(2).all(|w| w[0].1 >= w[1].1),
        "most common first: {top:?}"
    );
    for (message, count) in &top {
        assert_eq!(expected_messages.get(message), Some(count), "{message}");
    }
    let smallest_listed = top.last().map_or(0, |(_, count)| *count);
    let listed: BTreeSet<&String> = top.iter().map(|(message, _)| message).collect();
    for (message, count) in &expected_messages {
        if !listed.contains(message) {
            assert!(
                *count <= smallest_listed,
                "{message} ({count}) missing from {top:?}"
            );
        }
    }
    let repeated_garbage = dead
        .iter()
        .find(|m| m.key() == Some(&b"garbage-0"[..]))
        .and_then(|m| header(m, dlq_header::ERROR_MESSAGE))
        .expect("our garbage is dead-lettered");
    assert!(
        top.iter()
            .any(|(message, count)| *message == repeated_garbage && *count >= 4),
        "the garbage sent four times is among the most common messages: {top:?}"
    );

    // A filtered dry run through the library counts only the selection.
    let filtered = replay_with(
        &env,
        &[],
        &ReplayOptions {
            filter: classes(&["out_of_window"]),
            dry_run: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(filtered.matched, num_out_of_window);
    assert_eq!(filtered.skipped, dead.len() as u64 - num_out_of_window);
    assert_eq!(
        filtered.classes,
        Some(BTreeMap::from([(
            "out_of_window".to_string(),
            num_out_of_window
        )]))
    );

    assert_eq!(
        count_records(&env, &env.topic),
        source_before,
        "nothing re-published"
    );
    assert_eq!(count_records(&env, &env.dlq_topic), dlq_before);
    assert_eq!(count_records(&env, &parking_topic), 0, "nothing parked");
    let group = summary["group"].as_str().expect("group");
    assert_eq!(group, ReplayOptions::default().group_id(&env.dlq_topic));
    for (group, what) in [
        (group.to_string(), "cli dry run"),
        (filtered.group.clone(), "library dry run"),
    ] {
        let committed = committed_offsets(&env, &group, &env.dlq_topic);
        assert!(!committed.is_empty());
        assert!(
            committed.iter().all(|offset| *offset == Offset::Invalid),
            "{what}: group {group} has committed offsets {committed:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_select_by_class_partition_offsets_and_time() {
    let env = TestEnv::new(2).await;
    let base = replay::parse_time("2024-05-01T00:00:00Z").expect("time");
    // Twelve dead letters: classes in turn decode, validation, out_of_window; source partitions
    // alternate 0, 1; source offsets 100..=111; failed one hour apart from `base`.
    let kinds = ["decode", "validation", "out_of_window"];
    let letters: Vec<DeadLetter> = (0..12)
        .map(|i| {
            dead_letter(
                i,
                kinds[i % 3],
                &env.topic,
                ((i % 2) as i32, 100 + i as i64),
                base + chrono::Duration::hours(i as i64),
            )
        })
        .collect();
    send_dead_letters(&env, &env.dlq_topic, 0, &letters).await;

    let dry = |filter: ReplayFilter, max: Option<u64>| ReplayOptions {
        filter,
        max,
        dry_run: true,
        ..Default::default()
    };
    let at = |hours: i64| Some(base + chrono::Duration::hours(hours));
    // (name, options, matched, skipped, matched per class)
    type Case<'a> = (&'a str, ReplayOptions, u64, u64, Vec<(&'a str, u64)>);
    let cases: Vec<Case<'_>> = vec![
        (
            "one class",
            dry(classes(&["decode"]), None),
            4,
            8,
            vec![("decode", 4)],
        ),
        (
            "two classes",
            dry(classes(&["decode", "validation"]), None),
            8,
            4,
            vec![("decode", 4), ("validation", 4)],
        ),
        (
            "source partition",
            dry(
                ReplayFilter {
                    source_partition: Some(1),
                    ..Default::default()
                },
                None,
            ),
            6,
            6,
            vec![("decode", 2), ("out_of_window", 2), ("validation", 2)],
        ),
        (
            "source offsets, inclusive",
            dry(
                ReplayFilter {
                    source_offsets: Some("103..106".parse::<OffsetRange>().expect("range")),
                    ..Default::default()
                },
                None,
            ),
            4,
            8,
            vec![("decode", 2), ("out_of_window", 1), ("validation", 1)],
        ),
        (
            "partition and offsets",
            dry(
                ReplayFilter {
                    source_partition: Some(0),
                    source_offsets: Some(OffsetRange { from: 103, to: 106 }),
                    ..Default::default()
                },
                None,
            ),
            2,
            10,
            vec![("decode", 1), ("validation", 1)],
        ),
        (
            "failure time, until exclusive",
            dry(
                ReplayFilter {
                    since: at(2),
                    until: at(5),
                    ..Default::default()
                },
                None,
            ),
            3,
            9,
            vec![("decode", 1), ("out_of_window", 1), ("validation", 1)],
        ),
        (
            "class and time",
            dry(
                ReplayFilter {
                    error_classes: vec!["out_of_window".into()],
                    since: at(3),
                    ..Default::default()
                },
                None,
            ),
            3,
            9,
            vec![("out_of_window", 3)],
        ),
        (
            "max stops after the first five",
            dry(ReplayFilter::default(), Some(5)),
            5,
            0,
            vec![("decode", 2), ("out_of_window", 1), ("validation", 2)],
        ),
        (
            "max counts matching records only",
            dry(classes(&["out_of_window"]), Some(2)),
            2,
            // Stops at the second match (letter 5): letters 0, 1, 3 and 4 skipped, 6.. unread.
            4,
            vec![("out_of_window", 2)],
        ),
        (
            "no match",
            dry(classes(&["constraint"]), None),
            0,
            12,
            vec![],
        ),
    ];
    for (name, options, matched, skipped, expected) in cases {
        let summary = replay_with(&env, &[], &options).await;
        assert_eq!(
            (summary.matched, summary.skipped),
            (matched, skipped),
            "{name}: {summary:?}"
        );
        let expected: BTreeMap<String, u64> = expected
            .into_iter()
            .map(|(class, count)| (class.to_string(), count))
            .collect();
        assert_eq!(summary.classes, Some(expected), "{name}");
    }

    // A real replay of the validation failures to another topic.
    let retry_topic = format!("{}-retry", env.topic);
    env.kafka.create_topic(&retry_topic, 1).await;
    let summary = replay_with(
        &env,
        &[],
        &ReplayOptions {
            filter: classes(&["validation"]),
            to_topic: Some(retry_topic.clone()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!((summary.replayed, summary.skipped), (4, 8), "{summary:?}");
    let retried = read_topic(&env, &retry_topic).await;
    let payloads: Vec<Vec<u8>> = retried
        .iter()
        .map(|m| m.payload().expect("payload").to_vec())
        .collect();
    assert_eq!(
        payloads,
        [1, 4, 7, 10]
            .iter()
            .map(|i| format!("payload-{i}").into_bytes())
            .collect::<Vec<_>>()
    );
    for (message, i) in retried.iter().zip([1, 4, 7, 10]) {
        assert_eq!(message.key(), Some(format!("key-{i}").as_bytes()));
        assert_eq!(
            headers_of(message),
            vec![
                (
                    "traceparent".to_string(),
                    Some(format!("00-{i}").into_bytes())
                ),
                (dlq_header::ATTEMPT.to_string(), Some(b"2".to_vec())),
            ]
        );
    }
    assert_eq!(
        count_records(&env, &env.topic),
        0,
        "the source topic is untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_replay_resumes_without_republishing_anything_twice() {
    let env = TestEnv::new(1).await;
    // A dead-letter topic with three partitions: 35 and 25 letters, and an empty one.
    let dlq_topic = format!("{}-wide", env.dlq_topic);
    env.kafka.create_topic(&dlq_topic, 3).await;
    let overrides = [("AUDITFLOW_DLQ_TOPIC", dlq_topic.as_str())];
    let failed_at = Utc::now();
    let letter = |i: usize| {
        // Every sixth is a schema failure the replay skips: 10 of 60.
        let class = if i % 6 == 5 { "schema" } else { "decode" };
        dead_letter(i, class, &env.topic, (0, i as i64), failed_at)
    };
    let first: Vec<DeadLetter> = (0..35).map(letter).collect();
    let second: Vec<DeadLetter> = (35..60).map(letter).collect();
    send_dead_letters(&env, &dlq_topic, 0, &first).await;
    send_dead_letters(&env, &dlq_topic, 1, &second).await;
    let options = ReplayOptions {
        filter: classes(&["decode"]),
        ..Default::default()
    };

    // 1. Stopped by --max.
    let limited = replay_with(
        &env,
        &overrides,
        &ReplayOptions {
            max: Some(10),
            ..options.clone()
        },
    )
    .await;
    assert_eq!(limited.replayed, 10, "{limited:?}");
    assert_eq!(count_records(&env, &env.topic), 10);

    // 2. Stopped by shutdown while rate-limited.
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    let config = env.config(&overrides);
    let paced = ReplayOptions {
        rate: Some(25.0),
        ..options.clone()
    };
    let (interrupted, ()) = tokio::join!(replay::replay(&config, &paced, shutdown), async {
        // Cancel once a few more records went out (at 25 per second).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while count_records(&env, &env.topic) < 15 {
            assert!(tokio::time::Instant::now() < deadline, "replay progresses");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        trigger.cancel();
    });
    let interrupted = interrupted.expect("interrupted replay");
    assert!(interrupted.interrupted, "{interrupted:?}");
    assert!(
        interrupted.replayed > 0 && interrupted.replayed < 40,
        "stopped part-way: {interrupted:?}"
    );

    // 3. The same command finishes the rest.
    let rest = replay_with(&env, &overrides, &options).await;
    assert!(!rest.interrupted);
    assert_eq!(
        limited.replayed + interrupted.replayed + rest.replayed,
        50,
        "{limited:?} {interrupted:?} {rest:?}"
    );
    assert_eq!(limited.skipped + interrupted.skipped + rest.skipped, 10);
    let nothing_left = replay_with(&env, &overrides, &options).await;
    assert_eq!((nothing_left.matched, nothing_left.skipped), (0, 0));

    // Each decode letter reached the source topic exactly once.
    let source = read_topic(&env, &env.topic).await;
    let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
    for message in &source {
        *seen
            .entry(message.payload().expect("payload").to_vec())
            .or_default() += 1;
    }
    let expected: BTreeSet<Vec<u8>> = (0..60)
        .filter(|i| i % 6 != 5)
        .map(|i| format!("payload-{i}").into_bytes())
        .collect();
    assert_eq!(source.len(), 50, "nothing re-published twice");
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), expected);
    assert!(seen.values().all(|count| *count == 1), "{seen:?}");

    let group = options.group_id(&dlq_topic);
    assert_eq!(
        committed_offsets(&env, &group, &dlq_topic),
        vec![Offset::Offset(35), Offset::Offset(25), Offset::Invalid],
        "committed to the end of each partition; the empty one never needed a commit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_arriving_during_a_replay_are_left_for_the_next_one() {
    let env = TestEnv::new(1).await;
    let failed_at = Utc::now();
    let letters: Vec<DeadLetter> = (0..25)
        .map(|i| dead_letter(i, "decode", &env.topic, (0, i as i64), failed_at))
        .collect();
    send_dead_letters(&env, &env.dlq_topic, 0, &letters[..20]).await;
    let options = ReplayOptions {
        rate: Some(20.0),
        ..Default::default()
    };
    let config = env.config(&[]);
    let (during, ()) = tokio::join!(
        replay::replay(&config, &options, CancellationToken::new()),
        async {
            // Once the first record is re-published the replay has taken its snapshot.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while count_records(&env, &env.topic) == 0 {
                assert!(tokio::time::Instant::now() < deadline, "replay started");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            send_dead_letters(&env, &env.dlq_topic, 0, &letters[20..]).await;
        }
    );
    let during = during.expect("replay");
    assert_eq!(
        during.replayed, 20,
        "only what was there at the start: {during:?}"
    );
    assert!(!during.interrupted);
    assert_eq!(
        count_records(&env, &env.dlq_topic),
        25,
        "the late ones did arrive meanwhile"
    );

    let next = replay_with(&env, &[], &options).await;
    assert_eq!(next.replayed, 5);
    let source = read_topic(&env, &env.topic).await;
    let payloads: Vec<Vec<u8>> = source
        .iter()
        .map(|m| m.payload().expect("payload").to_vec())
        .collect();
    let expected: Vec<Vec<u8>> = (0..25)
        .map(|i| format!("payload-{i}").into_bytes())
        .collect();
    assert_eq!(payloads, expected, "each once, in dead-letter order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_fails_for_a_while_is_retried_under_the_interactive_breaker() {
    let env = TestEnv::new(1).await;
    let common::TestKafka::Mock(cluster) = &env.kafka else {
        eprintln!("skipped: injecting target errors needs the in-process mock cluster");
        return;
    };
    let failed_at = Utc::now();
    let letters: Vec<DeadLetter> = (0..20)
        .map(|i| dead_letter(i, "decode", &env.topic, (0, i as i64), failed_at))
        .collect();
    send_dead_letters(&env, &env.dlq_topic, 0, &letters).await;
    // The replay target refuses every write until the error is cleared.
    cluster
        .topic_error(
            &env.topic,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )
        .unwrap();
    let overrides = [
        ("AUDITFLOW_KAFKA_OPT_MESSAGE_TIMEOUT_MS", "500"),
        // The producer caches a topic's error until its next metadata refresh: refresh often,
        // so the probe sees the cleared error.
        (
            "AUDITFLOW_KAFKA_OPT_TOPIC_METADATA_REFRESH_INTERVAL_MS",
            "200",
        ),
        ("AUDITFLOW_INTERACTIVE_BREAKER_OPEN_MS", "3000"),
    ];
    let options = ReplayOptions::default();

    // The target stays down: a few retries, the breaker opens, the probe fails, the replay gives
    // up without committing past the record it could not write.
    let config = env.config(&overrides);
    let failed = tokio::time::timeout(
        Duration::from_secs(60),
        replay::replay(&config, &options, CancellationToken::new()),
    )
    .await
    .expect("gives up by itself");
    assert!(failed.is_err(), "a target that stays down fails the replay");
    let group = options.group_id(&env.dlq_topic);
    assert!(
        committed_offsets(&env, &group, &env.dlq_topic)
            .iter()
            .all(|offset| !matches!(offset, Offset::Offset(o) if *o > 0)),
        "nothing committed past the first unwritten record"
    );

    // The target comes back while the breaker is open: the probe succeeds and the replay ends.
    let (summary, ()) = tokio::join!(
        tokio::time::timeout(
            Duration::from_secs(60),
            replay::replay(&config, &options, CancellationToken::new())
        ),
        async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            cluster
                .topic_error(&env.topic, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
                .unwrap();
        }
    );
    let summary = summary
        .expect("finished")
        .expect("replay succeeds once the target is back");
    assert_eq!(summary.replayed, 20, "{summary:?}");
    assert!(
        summary.retries >= 1,
        "the first write was retried: {summary:?}"
    );
    assert_eq!(
        count_records(&env, &env.topic),
        20,
        "each record written once"
    );
}
