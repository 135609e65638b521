//! Failure paths against the real Postgres and Redis: poison records, outages, breakers.

mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use auditflow::breaker::{Breaker, State as BreakerState};
use auditflow::event::{Actor, ActorType, AuditEvent, Outcome, Resource};
use auditflow::ingest::decode::Decoder;
use auditflow::ingest::dlq::header as dlq_header;
use auditflow::ingest::store;
use auditflow::Sink;
use chrono::Utc;
use common::{header, TestEnv};
use proxy::{CommitCutProxy, TcpProxy};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const POISON_ACTION: &str = "poison.record";

fn event(action: &str) -> AuditEvent {
    AuditEvent {
        event_id: Uuid::new_v4(),
        occurred_at: Utc::now() - chrono::Duration::minutes(5),
        tenant_id: "tenant-1".into(),
        actor: Actor {
            id: "user-1".into(),
            actor_type: ActorType::User,
            ip: Some("10.1.2.3".into()),
            user_agent: Some("test".into()),
        },
        action: action.into(),
        resource: Resource {
            resource_type: "order".into(),
            id: "o-1".into(),
        },
        outcome: Outcome::Success,
        reason: None,
        trace_id: None,
        details: Some(r#"{"field":"status","from":"open","to":"paid"}"#.into()),
        session_id: None,
    }
}

/// Produces the events in order to one partition; returns their offsets.
async fn produce_events(env: &TestEnv, events: &[AuditEvent]) -> Vec<i64> {
    let decoder = Decoder::embedded();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", env.kafka.brokers())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut deliveries = Vec::with_capacity(events.len());
    for event in events {
        let payload = decoder.encode_confluent(event, 2).unwrap();
        let record = FutureRecord::to(&env.topic)
            .key("tenant-1")
            .payload(&payload)
            .partition(0);
        deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    let mut offsets = Vec::with_capacity(events.len());
    for delivery in deliveries {
        offsets.push(delivery.await.unwrap().map_err(|(e, _)| e).unwrap().offset);
    }
    offsets
}

/// Migrates the test schema and adds a rule the decoder does not know, so some valid events are
/// refused by the database itself (SQLSTATE 23514).
async fn refuse_poison_in_database(env: &TestEnv) {
    let config = env.config(&[]);
    let pool = store::connect(&config.database, &common::database_url())
        .await
        .unwrap();
    auditflow::db::migrate(&pool, &env.schema).await.unwrap();
    sqlx::query(&format!(
        "ALTER TABLE \"{}\".events ADD CONSTRAINT no_poison CHECK (action <> '{POISON_ACTION}')",
        env.schema
    ))
    .execute(&pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_percent_poison_records_are_dead_lettered_alone_while_every_good_one_is_stored() {
    let env = TestEnv::new(1).await;
    refuse_poison_in_database(&env).await;
    let events: Vec<AuditEvent> = (0..3_000)
        .map(|i| {
            event(if i % 100 == 37 {
                POISON_ACTION
            } else {
                "order.update"
            })
        })
        .collect();
    let offsets = produce_events(&env, &events).await;
    let poison_offsets: BTreeSet<String> = events
        .iter()
        .zip(&offsets)
        .filter(|(e, _)| e.action == POISON_ACTION)
        .map(|(_, o)| o.to_string())
        .collect();
    assert_eq!(poison_offsets.len(), 30);

    let sink = Sink::build(env.config(&[])).await.unwrap();
    let store = sink.store();
    let summary = sink
        .run_until_stopped(CancellationToken::new(), Some(Duration::from_secs(2)))
        .await
        .unwrap();
    assert_eq!(summary.stored, 2_970);
    assert_eq!(summary.dead_lettered, 30);
    assert_eq!(env.count_rows().await, 2_970);
    // Six batches of 500, each with five poison rows: bisection costs about 2 * log2(500 / 5)
    // statements per poison row (measured: 440 in all), far from one per row (3,000).
    assert!(
        store.num_writes() < 600,
        "{} write statements",
        store.num_writes()
    );

    let dead = env.read_dlq(30, Duration::from_secs(20)).await;
    assert_eq!(dead.len(), 30);
    let dead_offsets: BTreeSet<String> = dead
        .iter()
        .map(|m| header(m, dlq_header::SOURCE_OFFSET).unwrap())
        .collect();
    assert_eq!(dead_offsets, poison_offsets, "exactly the poison records");
    for message in &dead {
        assert_eq!(
            header(message, dlq_header::ERROR_CLASS).as_deref(),
            Some("constraint")
        );
        assert_eq!(
            header(message, dlq_header::ERROR_SQLSTATE).as_deref(),
            Some("23514")
        );
        assert!(header(message, dlq_header::ERROR_MESSAGE)
            .unwrap()
            .contains("no_poison"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_record_among_five_thousand_costs_a_few_statements() {
    let env = TestEnv::new(1).await;
    refuse_poison_in_database(&env).await;
    let events: Vec<AuditEvent> = (0..5_000)
        .map(|i| {
            event(if i == 2_718 {
                POISON_ACTION
            } else {
                "order.update"
            })
        })
        .collect();
    produce_events(&env, &events).await;
    let sink = Sink::build(env.config(&[
        ("AUDITFLOW_BATCH_MAX_EVENTS", "5000"),
        ("AUDITFLOW_BATCH_MAX_WAIT_MS", "3000"),
    ]))
    .await
    .unwrap();
    let store = sink.store();
    let summary = sink
        .run_until_stopped(CancellationToken::new(), Some(Duration::from_secs(2)))
        .await
        .unwrap();
    assert_eq!((summary.stored, summary.dead_lettered), (4_999, 1));
    // One failed batch, then two halves per level down to the row: 1 + 2 * ceil(log2 5000) = 27.
    assert!(
        store.num_writes() <= 27,
        "{} write statements",
        store.num_writes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_pauses_consumption_dead_letters_nothing_and_recovers() {
    database_outage(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_pauses_consumption_dead_letters_nothing_and_recovers_with_one_store_stream(
) {
    database_outage(Some("1")).await;
}

/// The row count once it has held still for a second (at most 10 s). A COMMIT the server
/// received just before a cut still finishes (its WAL flush) after the sockets are gone: what it
/// makes visible was written before the outage, not during it.
async fn rows_once_settled(env: &TestEnv) -> i64 {
    let mut last = env.count_rows().await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = env.count_rows().await;
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("rows still changing 10 s after the database was cut off: {last}");
}

/// With `concurrency` store streams (the default when `None`).
async fn database_outage(concurrency: Option<&str>) {
    let env = TestEnv::new(2).await;
    let database = common::database_url();
    let upstream = database_host_port(&database);
    let proxy = TcpProxy::start(&upstream).await;
    let via_proxy = database.replace(&upstream, &format!("127.0.0.1:{}", proxy.port()));
    let mut vars = vec![
        ("AUDITFLOW_DATABASE_URL", via_proxy.as_str()),
        ("AUDITFLOW_DB_ACQUIRE_TIMEOUT_MS", "1000"),
        ("AUDITFLOW_BREAKER_OPEN_MS", "2000"),
    ];
    if let Some(concurrency) = concurrency {
        vars.push(("AUDITFLOW_STORE_CONCURRENCY", concurrency));
    }
    let sink = Sink::build(env.config(&vars)).await.unwrap();
    let stats = sink.stats();
    let board = sink.board();
    // A stream whose partitions had no batch in flight when the database went away never
    // tries it (consumption pauses for every partition), so its breaker may stay closed.
    let breakers: Vec<Arc<Breaker>> = sink
        .stores()
        .iter()
        .map(|store| Arc::clone(store.breaker()))
        .collect();
    let num_opened = |breakers: &[Arc<Breaker>]| -> u64 {
        breakers.iter().map(|breaker| breaker.num_opened()).sum()
    };
    let running = tokio::spawn(
        sink.run_until_stopped(CancellationToken::new(), Some(Duration::from_secs(3))),
    );

    let producing = env.produce_at(16_000, 0.0, 0.0, 77, Some(800.0));
    let outage = async {
        let before = env.wait_for_rows(2_000, Duration::from_secs(60)).await;
        assert!(before >= 2_000);
        proxy.cut().await;
        let cut_rows = rows_once_settled(&env).await;
        let opened_before = num_opened(&breakers);
        tokio::time::sleep(Duration::from_secs(20)).await;
        let during = env.count_rows().await;
        assert_eq!(
            during, cut_rows,
            "nothing is written while the database is unreachable"
        );
        assert!(
            num_opened(&breakers) > opened_before,
            "a postgres breaker opened"
        );
        assert!(
            stats.pauses.load(std::sync::atomic::Ordering::Relaxed) >= 1,
            "consumption paused"
        );
        assert_eq!(board.snapshot().totals.dead_lettered, 0);
        proxy.restore().await;
        tokio::time::Instant::now()
    };
    let (produced, restored_at) = tokio::join!(producing, outage);
    let remaining_at_restore = produced.distinct_valid as i64 - env.count_rows().await;
    let rows = env
        .wait_for_rows(produced.distinct_valid as i64, Duration::from_secs(60))
        .await;
    let recovery = restored_at.elapsed();
    assert_eq!(rows, produced.distinct_valid as i64, "nothing lost");
    assert_eq!(
        stats.revokes.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the consumer stayed in its group through the outage"
    );
    let summary = running.await.unwrap().unwrap();
    assert_eq!(summary.dead_lettered, 0, "an outage dead-letters nothing");
    assert_eq!(
        env.count_distinct_ids().await,
        produced.distinct_valid as i64
    );
    for breaker in &breakers {
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "{} closed again after recovery",
            breaker.dependency()
        );
    }
    eprintln!(
        "backlog of {remaining_at_restore} rows drained in {:.1}s after the database returned",
        recovery.as_secs_f64()
    );
    assert!(
        env.read_dlq(1, Duration::from_secs(2)).await.is_empty(),
        "the DLQ stays empty"
    );
}

/// `host:port` of a `postgres://user@host:port/db` URL.
fn database_host_port(url: &str) -> String {
    url.split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_reply_is_lost_is_retried_and_deduplicated_storing_every_event_once() {
    const NUM_EVENTS: u64 = 5_000;
    const NUM_CUTS: usize = 3;
    let env = TestEnv::new(1).await;
    let database = common::database_url();
    let upstream = database_host_port(&database);
    let proxy = CommitCutProxy::start(&upstream).await;
    // Plain text, so the proxy can read the protocol (the local server accepts TLS).
    let mut via_proxy = database.replace(&upstream, &format!("127.0.0.1:{}", proxy.port()));
    via_proxy.push_str(if via_proxy.contains('?') { "&" } else { "?" });
    via_proxy.push_str("sslmode=disable");
    // The first row-writing commit, then every third: batch 1 on the staging path the store
    // starts on, the later ones on the fast COPY path, whose retry hits 23505 and falls back.
    proxy.arm(NUM_CUTS, 2);
    let produced = env.produce(NUM_EVENTS, 0.0, 0.0, 53).await;
    assert_eq!(produced.distinct_valid, NUM_EVENTS);

    let started = std::time::Instant::now();
    let (mut sink, log) = env.spawn_sink_captured(
        &["run", "--until-idle", "3"],
        &[
            ("AUDITFLOW_DATABASE_URL", &via_proxy),
            ("AUDITFLOW_BATCH_MAX_EVENTS", "500"),
        ],
    );
    let status = common::wait_exit(&mut sink, Duration::from_secs(180)).await;
    let elapsed = started.elapsed();
    let log = log.lock().unwrap().clone();
    assert!(status.success(), "the sink exits 0 when idle: {log}");
    let mut line = String::new();
    std::io::Read::read_to_string(sink.stdout.as_mut().unwrap(), &mut line).unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(line.trim()).expect("one JSON summary line");
    let figure = |key: &str| {
        summary[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}: {summary}"))
    };

    assert_eq!(
        proxy.commit_kinds(),
        BTreeSet::from(['Q']),
        "sqlx sends COMMIT as a simple query"
    );
    assert_eq!(
        proxy.num_cut(),
        NUM_CUTS,
        "the proxy withheld the reply of {NUM_CUTS} commits the server made"
    );
    // The store starts on the staging path and takes the fast one after a clean batch: a cut
    // on the fast path means its retry's COPY into events met 23505 and fell back to staging.
    let cut_targets = proxy.cut_copy_targets();
    let num_fast_path_cuts = cut_targets
        .iter()
        .filter(|targets| targets.iter().any(|table| table.ends_with(".events")))
        .count();
    assert!(
        num_fast_path_cuts >= 1,
        "a cut hit the fast COPY path: {cut_targets:?}"
    );
    let rows = env.count_rows().await;
    let distinct = env.count_distinct_ids().await;
    assert_eq!(rows, NUM_EVENTS as i64, "nothing lost");
    assert_eq!(distinct, rows, "nothing stored twice");
    assert_eq!(
        figure("dead_lettered"),
        0,
        "a lost reply dead-letters nothing"
    );
    // Every cut commit did commit, so its retry found all of its rows already stored: the sink
    // counts them as duplicates, never as stored (it cannot know its own lost commit stored
    // them), and every event is one or the other.
    let duplicates = figure("duplicates");
    assert!(
        duplicates >= NUM_CUTS as u64,
        "the retries were absorbed as duplicates: {summary}"
    );
    assert_eq!(
        figure("stored") + duplicates,
        NUM_EVENTS,
        "every event stored or absorbed, once: {summary}"
    );
    let num_retries = log.matches("batch write failed; retrying").count();
    assert!(
        num_retries >= NUM_CUTS,
        "each lost reply surfaced as a transient error ({num_retries} retries): {log}"
    );
    let (logged_rows, num_batches, last_seq): (i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT coalesce(sum(row_count), 0)::bigint, count(*), coalesce(max(batch_seq), 0) \
         FROM \"{}\".batches",
        env.schema
    ))
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        logged_rows, rows,
        "the committed-batch log counts every stored row once"
    );
    assert_eq!(num_batches, last_seq, "batch_seq is gapless");
    assert!(
        env.read_dlq(1, Duration::from_secs(2)).await.is_empty(),
        "the DLQ stays empty"
    );
    println!(
        "commit outcome unknown: {} of {} row-writing commits cut after the server committed \
         ({num_fast_path_cuts} on the fast COPY path, the rest on the staging path); \
         {rows} rows stored, {distinct} distinct, {} stored as the sink knows it and \
         {duplicates} duplicates absorbed by the retries, {num_retries} retries, {num_batches} batches logged ({logged_rows} rows), \
         0 dead-lettered, {:.1} s (3 s of it idle wait)",
        proxy.num_cut(),
        proxy.num_commits(),
        figure("stored"),
        elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_keeps_ingestion_going_opens_the_breaker_and_counts_dropped_invalidations() {
    let env = TestEnv::new(2).await;
    let redis = common::redis_url();
    let upstream = redis
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let proxy = TcpProxy::start(&upstream).await;
    let sink = Sink::build(env.config(&[
        (
            "AUDITFLOW_REDIS_URL",
            &format!("redis://127.0.0.1:{}", proxy.port()),
        ),
        ("AUDITFLOW_INVALIDATION_QUEUE", "2"),
        ("AUDITFLOW_BATCH_MAX_EVENTS", "100"),
    ]))
    .await
    .unwrap();
    let notify_stats = sink.notifier().stats();
    let breaker = sink.notifier().breaker();
    let running = tokio::spawn(
        sink.run_until_stopped(CancellationToken::new(), Some(Duration::from_secs(3))),
    );
    let producing = env.produce_at(6_000, 0.0, 0.0, 13, Some(1_000.0));
    let outage = async {
        env.wait_for_rows(1_000, Duration::from_secs(60)).await;
        let published_before = notify_stats.published();
        assert!(
            published_before > 0,
            "invalidations flowed while redis was up"
        );
        proxy.cut().await;
    };
    let (produced, ()) = tokio::join!(producing, outage);
    let summary = running.await.unwrap().unwrap();
    assert_eq!(summary.stored, produced.distinct_valid, "ingestion went on");
    assert_eq!(env.count_rows().await, 6_000);
    assert!(breaker.num_opened() >= 1, "the redis breaker opened");
    assert!(
        notify_stats.dropped() > 0,
        "the dropped-invalidation counter rose"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_dead_letter_topic_holds_the_offsets_and_drops_nothing() {
    let env = TestEnv::new(1).await;
    let common::TestKafka::Mock(cluster) = &env.kafka else {
        eprintln!("skipped: injecting dead-letter topic errors needs the in-process mock cluster");
        return;
    };
    let produced = env.produce(400, 0.0, 0.05, 19).await;
    assert!(produced.invalid > 5, "{produced:?}");
    // Every metadata request for the dead-letter topic fails: nothing can be produced there.
    cluster
        .topic_error(
            &env.dlq_topic,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )
        .unwrap();
    let sink = Sink::build(env.config(&[
        ("AUDITFLOW_KAFKA_OPT_MESSAGE_TIMEOUT_MS", "1500"),
        // The producer caches a topic's error until its next metadata refresh.
        (
            "AUDITFLOW_KAFKA_OPT_TOPIC_METADATA_REFRESH_INTERVAL_MS",
            "200",
        ),
        ("AUDITFLOW_BREAKER_OPEN_MS", "500"),
    ]))
    .await
    .unwrap();
    let board = sink.board();
    let dlq_breaker = Arc::clone(sink.dlq().breaker());
    let running = tokio::spawn(
        sink.run_until_stopped(CancellationToken::new(), Some(Duration::from_secs(2))),
    );

    // Good neighbours are stored; the dead letters cannot be, so the offsets stay behind them.
    env.wait_for_rows(produced.distinct_valid as i64, Duration::from_secs(60))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while dlq_breaker.num_opened() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dlq breaker never opened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(board.snapshot().totals.dead_lettered, 0);
    assert!(
        !running.is_finished(),
        "the sink cannot finish while dead letters are unacknowledged"
    );
    let committed = committed_offset(&env).await;
    assert!(
        committed.is_none_or(|offset| offset < produced.total as i64),
        "offsets must not move past unacknowledged dead letters (committed {committed:?})"
    );

    cluster
        .topic_error(&env.dlq_topic, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(90), running)
        .await
        .expect("the sink finishes once the dead-letter topic is back")
        .unwrap()
        .unwrap();
    assert_eq!(
        summary.dead_lettered, produced.invalid,
        "every bad record dead-lettered, none dropped"
    );
    let dead = env
        .read_dlq(produced.invalid as usize, Duration::from_secs(20))
        .await;
    assert_eq!(dead.len() as u64, produced.invalid, "each exactly once");
    assert_eq!(
        committed_offset(&env).await,
        Some(produced.total as i64),
        "then everything is committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_its_topic_goes_without_its_payload_and_the_stream_moves_on() {
    let env = TestEnv::new(1).await;
    let before = env.produce(50, 0.0, 0.0, 31).await;
    // Just under librdkafka's default message.max.bytes (1,000,000): it reaches the source topic
    // and fails decoding, but with the dead-letter headers added it no longer fits.
    let big = vec![0xFFu8; 999_700];
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", env.kafka.brokers())
        .create()
        .unwrap();
    let delivered = producer
        .send(
            FutureRecord::to(&env.topic).key("big").payload(&big),
            Duration::from_secs(10),
        )
        .await
        .expect("the record itself fits the source topic");
    let (big_partition, big_offset) = (delivered.partition, delivered.offset);
    let after = env.produce(200, 0.0, 0.0, 32).await;

    let started = std::time::Instant::now();
    let sink = Sink::build(env.config(&[])).await.unwrap();
    let summary = tokio::time::timeout(
        Duration::from_secs(60),
        sink.run_until_stopped(CancellationToken::new(), Some(Duration::from_secs(2))),
    )
    .await
    .expect("the oversized dead letter does not stall the sink")
    .unwrap();
    eprintln!(
        "stored {} rows after the oversized record in {:.1} s (2 s of it idle wait)",
        summary.stored,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(summary.stored, before.distinct_valid + after.distinct_valid);
    assert_eq!(summary.dead_lettered, 1);
    assert_eq!(
        committed_offset(&env).await,
        Some((before.total + 1 + after.total) as i64),
        "the offset moved past the oversized record"
    );
    let dead = env.read_dlq(1, Duration::from_secs(20)).await;
    assert_eq!(dead.len(), 1);
    let letter = &dead[0];
    assert_eq!(letter.payload(), None, "the record is left out");
    assert_eq!(letter.key(), None);
    assert_eq!(
        header(letter, dlq_header::SOURCE_OFFSET),
        Some(big_offset.to_string())
    );
    assert_eq!(
        header(letter, dlq_header::SOURCE_PARTITION),
        Some(big_partition.to_string())
    );
    assert_eq!(
        header(letter, dlq_header::ERROR_CLASS).as_deref(),
        Some("decode"),
        "the reason is the record's own"
    );
    let omitted = header(letter, dlq_header::PAYLOAD_OMITTED).expect("marked as omitted");
    assert!(omitted.starts_with("999703 bytes: "), "{omitted}");
}

/// The sink group's committed offset of partition 0.
async fn committed_offset(env: &TestEnv) -> Option<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", env.kafka.brokers())
        .set("group.id", &env.group)
        .create()
        .unwrap();
    let mut partitions = rdkafka::TopicPartitionList::new();
    partitions.add_partition(&env.topic, 0);
    let topic = env.topic.clone();
    tokio::task::spawn_blocking(move || {
        let committed = consumer
            .committed_offsets(partitions, Duration::from_secs(10))
            .unwrap();
        committed
            .find_partition(&topic, 0)
            .and_then(|element| element.offset().to_raw())
            .filter(|offset| *offset >= 0)
    })
    .await
    .unwrap()
}
