//! Integration tests of the invalidation publisher against a real Redis.
//!
//! Redis defaults to `redis://127.0.0.1:6379`; `AUDITFLOW_TEST_REDIS_URL` overrides it. Each test
//! publishes on its own randomly named channel, so tests can run in parallel against one server.
//! Outages are simulated with a TCP proxy in front of Redis that the test stops and restarts.

use std::time::Duration;

#[path = "common/proxy.rs"]
mod proxy;

use auditflow::breaker::BreakerConfig;
use auditflow::ingest::notify::{
    spawn, Invalidation, NotifyConfig, NotifyStats, MAX_RESOURCES_PER_MESSAGE,
};
use futures::StreamExt;
use proxy::TcpProxy;
use redis::aio::PubSubStream;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a test waits for a message or a shutdown before failing; generous because the
/// worker's reconnect delay alone can reach 5 s.
const PATIENCE: Duration = Duration::from_secs(15);

fn redis_url() -> String {
    std::env::var("AUDITFLOW_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn random_channel() -> String {
    format!(
        "auditflow.test.invalidations.{}",
        uuid::Uuid::new_v4().simple()
    )
}

fn notify_config(redis_url: String, channel: &str, queue_capacity: usize) -> NotifyConfig {
    NotifyConfig {
        redis_url,
        redis_ca_file: None,
        channel: channel.to_owned(),
        queue_capacity,
        queue_bytes: 16 * 1024 * 1024,
        publish_timeout: Duration::from_millis(500),
        breaker: BreakerConfig::INGEST,
    }
}

/// Subscribes to `channel` on the real Redis; returns once Redis has confirmed the subscription.
async fn subscribe(channel: &str) -> PubSubStream {
    let client = redis::Client::open(redis_url()).expect("valid test redis url");
    let mut pubsub = client
        .get_async_pubsub()
        .await
        .expect("test redis is reachable (start redis-server or set AUDITFLOW_TEST_REDIS_URL)");
    pubsub.subscribe(channel).await.expect("subscribe");
    pubsub.into_on_message()
}

async fn next_payload(messages: &mut PubSubStream) -> String {
    let message = tokio::time::timeout(PATIENCE, messages.next())
        .await
        .expect("an invalidation message arrives in time")
        .expect("subscription stays open");
    message.get_payload::<String>().expect("utf-8 payload")
}

/// Waits until `condition` holds on the stats, failing the test after [`PATIENCE`].
async fn wait_for(stats: &NotifyStats, condition: impl Fn(&NotifyStats) -> bool) {
    let started = tokio::time::Instant::now();
    while !condition(stats) {
        assert!(
            started.elapsed() < PATIENCE,
            "stats never reached the expected state: published={} failed={} dropped={}",
            stats.published(),
            stats.failed(),
            stats.dropped()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stop_worker(shutdown: &CancellationToken, worker: JoinHandle<()>) {
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, worker)
        .await
        .expect("worker stops promptly after cancellation")
        .expect("worker does not panic");
}

fn invalidation(batch_seq: u64, resources: &[(&str, &str, &str)]) -> Invalidation {
    let mut invalidation = Invalidation::new(batch_seq);
    for (tenant, resource_type, resource_id) in resources {
        invalidation.add(tenant, resource_type, resource_id);
    }
    invalidation
}

/// The test Redis URL with its host and port replaced by `127.0.0.1:port`, credentials and
/// database kept.
fn redis_url_via(port: u16) -> String {
    let url = redis_url();
    let scheme_end = url.find("://").expect("redis url has a scheme") + 3;
    let (scheme, rest) = url.split_at(scheme_end);
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let host_start = rest[..authority_end].rfind('@').map_or(0, |at| at + 1);
    format!(
        "{scheme}{}127.0.0.1:{port}{}",
        &rest[..host_start],
        &rest[authority_end..]
    )
}

/// A proxy in front of the test Redis; cutting it looks like a Redis outage to the notifier.
async fn redis_proxy() -> TcpProxy {
    let upstream = match redis::Client::open(redis_url())
        .expect("valid test redis url")
        .get_connection_info()
        .addr
        .clone()
    {
        redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        other => panic!("proxy tests need a plain tcp redis url, got {other}"),
    };
    TcpProxy::start(&upstream).await
}

#[tokio::test]
async fn subscriber_receives_exact_json_of_each_invalidation_in_order() {
    let channel = random_channel();
    let mut messages = subscribe(&channel).await;
    let shutdown = CancellationToken::new();
    let (notifier, worker) = spawn(notify_config(redis_url(), &channel, 64), shutdown.clone());

    let mut large = Invalidation::new(2);
    for index in 0..MAX_RESOURCES_PER_MESSAGE + 5 {
        large.add("acme", "order", &format!("{index:05}"));
    }
    let expected_large = large.to_json().expect("encodes");
    notifier.publish(invalidation(
        1,
        &[
            ("globex", "user", "7"),
            ("acme", "order", "42"),
            ("acme", "order", "42"),
        ],
    ));
    notifier.publish(large);
    notifier.publish(invalidation(3, &[("initech", "invoice", "INV-9")]));

    assert_eq!(
        next_payload(&mut messages).await,
        r#"{"version":2,"publisher":"00000000-0000-0000-0000-000000000000","batch_seq":1,"count":3,"tenants":["acme","globex"],"ranges":{},"resources":[{"type":"order","id":"42"},{"type":"user","id":"7"}],"truncated":false}"#
    );
    let received_large = next_payload(&mut messages).await;
    assert_eq!(received_large, expected_large);
    assert!(received_large.ends_with(r#""truncated":true}"#));
    assert_eq!(
        next_payload(&mut messages).await,
        r#"{"version":2,"publisher":"00000000-0000-0000-0000-000000000000","batch_seq":3,"count":1,"tenants":["initech"],"ranges":{},"resources":[{"type":"invoice","id":"INV-9"}],"truncated":false}"#
    );

    let stats = notifier.stats();
    stop_worker(&shutdown, worker).await;
    assert_eq!(stats.published(), 3);
    assert_eq!(stats.failed(), 0);
    assert_eq!(stats.dropped(), 0);
}

#[tokio::test]
async fn unreachable_redis_never_blocks_publish_and_counts_overflow_as_dropped() {
    const NUM_PUBLISHED: u64 = 10_000;
    const QUEUE_CAPACITY: usize = 16;
    // Nothing listens on port 1, so every connection attempt is refused.
    let shutdown = CancellationToken::new();
    let (notifier, worker) = spawn(
        notify_config(
            "redis://127.0.0.1:1".to_owned(),
            &random_channel(),
            QUEUE_CAPACITY,
        ),
        shutdown.clone(),
    );
    let stats = notifier.stats();

    let started = std::time::Instant::now();
    for batch_seq in 0..NUM_PUBLISHED {
        notifier.publish(invalidation(batch_seq, &[("acme", "order", "42")]));
    }
    let publish_elapsed = started.elapsed();

    // Loose bound: the point is that publish never waits on Redis (which would take minutes).
    assert!(
        publish_elapsed < Duration::from_secs(5),
        "{publish_elapsed:?}"
    );
    assert!(stats.dropped() >= NUM_PUBLISHED - QUEUE_CAPACITY as u64);
    assert_eq!(stats.published(), 0);
    assert_eq!(stats.failed(), 0);

    // The worker keeps retrying in the background rather than giving up or crashing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!worker.is_finished());

    stop_worker(&shutdown, worker).await;
    // Whatever was still queued could not be flushed, so every notice counts as dropped.
    assert_eq!(stats.published(), 0);
    assert_eq!(stats.failed(), 0);
    assert_eq!(stats.dropped(), NUM_PUBLISHED);

    notifier.publish(Invalidation::new(NUM_PUBLISHED));
    assert_eq!(stats.dropped(), NUM_PUBLISHED + 1);
}

#[tokio::test]
async fn invalidations_queued_while_redis_is_down_are_published_once_it_is_up() {
    let channel = random_channel();
    let mut messages = subscribe(&channel).await;
    let proxy = redis_proxy().await;
    proxy.cut().await;
    let port = proxy.port();
    let shutdown = CancellationToken::new();
    let (notifier, worker) = spawn(
        notify_config(redis_url_via(port), &channel, 16),
        shutdown.clone(),
    );
    let stats = notifier.stats();

    let queued: Vec<Invalidation> = (1..=3)
        .map(|batch_seq| invalidation(batch_seq, &[("acme", "order", "42")]))
        .collect();
    for pending in &queued {
        notifier.publish(pending.clone());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stats.published(), 0);
    assert_eq!(stats.failed(), 0);
    assert_eq!(stats.dropped(), 0);

    proxy.restore().await;
    for pending in &queued {
        assert_eq!(
            next_payload(&mut messages).await,
            pending.to_json().expect("encodes")
        );
    }

    stop_worker(&shutdown, worker).await;
    assert_eq!(stats.published(), 3);
    assert_eq!(stats.failed(), 0);
    assert_eq!(stats.dropped(), 0);
    proxy.cut().await;
}

#[tokio::test]
async fn publish_on_a_lost_connection_fails_once_and_later_invalidations_arrive_after_reconnect() {
    let channel = random_channel();
    let mut messages = subscribe(&channel).await;
    let proxy = redis_proxy().await;
    let port = proxy.port();
    let shutdown = CancellationToken::new();
    let (notifier, worker) = spawn(
        notify_config(redis_url_via(port), &channel, 16),
        shutdown.clone(),
    );
    let stats = notifier.stats();

    let before_outage = invalidation(1, &[("acme", "order", "1")]);
    notifier.publish(before_outage.clone());
    assert_eq!(
        next_payload(&mut messages).await,
        before_outage.to_json().expect("encodes")
    );

    proxy.cut().await;
    notifier.publish(invalidation(2, &[("acme", "order", "2")]));
    wait_for(&stats, |stats| stats.failed() == 1).await;

    // Redis is still down: these wait in the queue instead of failing one by one.
    let after_outage: Vec<Invalidation> = (3..=4)
        .map(|batch_seq| invalidation(batch_seq, &[("acme", "order", "3")]))
        .collect();
    for pending in &after_outage {
        notifier.publish(pending.clone());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stats.failed(), 1);
    assert_eq!(stats.published(), 1);

    proxy.restore().await;
    for pending in &after_outage {
        assert_eq!(
            next_payload(&mut messages).await,
            pending.to_json().expect("encodes")
        );
    }

    stop_worker(&shutdown, worker).await;
    assert_eq!(stats.published(), 3);
    assert_eq!(stats.failed(), 1);
    assert_eq!(stats.dropped(), 0);
    proxy.cut().await;
}

#[tokio::test]
async fn invalidations_still_queued_at_shutdown_are_flushed_before_the_worker_stops() {
    let channel = random_channel();
    let mut messages = subscribe(&channel).await;
    let shutdown = CancellationToken::new();
    let config = NotifyConfig {
        publish_timeout: Duration::from_secs(3),
        ..notify_config(redis_url(), &channel, 64)
    };
    let (notifier, worker) = spawn(config, shutdown.clone());
    let stats = notifier.stats();

    let queued: Vec<Invalidation> = (1..=5)
        .map(|batch_seq| invalidation(batch_seq, &[("acme", "order", "42")]))
        .collect();
    for pending in &queued {
        notifier.publish(pending.clone());
    }
    // Cancelled before the worker has (most likely) even connected: the flush does the work.
    stop_worker(&shutdown, worker).await;

    for pending in &queued {
        assert_eq!(
            next_payload(&mut messages).await,
            pending.to_json().expect("encodes")
        );
    }
    assert_eq!(stats.published(), 5);
    assert_eq!(stats.failed(), 0);
    assert_eq!(stats.dropped(), 0);
}

#[tokio::test]
async fn unresponsive_redis_cannot_hang_the_worker_or_its_shutdown() {
    // Accepts connections and never answers, like a frozen server.
    let black_hole = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = black_hole.local_addr().expect("local addr").port();
    let accept_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = black_hole.accept().await {
            held.push(connection);
        }
    });
    let shutdown = CancellationToken::new();
    let (notifier, worker) = spawn(
        notify_config(format!("redis://127.0.0.1:{port}"), &random_channel(), 16),
        shutdown.clone(),
    );
    let stats = notifier.stats();

    for batch_seq in 0..3 {
        notifier.publish(invalidation(batch_seq, &[("acme", "order", "42")]));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!worker.is_finished());

    let stopping = std::time::Instant::now();
    stop_worker(&shutdown, worker).await;
    let shutdown_elapsed = stopping.elapsed();

    // publish_timeout is 500 ms; the bound is loose to tolerate a loaded machine.
    assert!(
        shutdown_elapsed < Duration::from_secs(5),
        "{shutdown_elapsed:?}"
    );
    assert_eq!(stats.published(), 0);
    assert_eq!(stats.published() + stats.failed() + stats.dropped(), 3);
    accept_task.abort();
}

#[tokio::test]
async fn with_redis_down_high_cardinality_notices_stay_under_the_byte_bound_and_drops_are_counted()
{
    const NUM_PUBLISHED: u64 = 300;
    const QUEUE_BYTES: usize = 2 * 1024 * 1024;
    let shutdown = CancellationToken::new();
    let config = NotifyConfig {
        queue_bytes: QUEUE_BYTES,
        ..notify_config("redis://127.0.0.1:1".to_owned(), &random_channel(), 1024)
    };
    let (notifier, worker) = spawn(config, shutdown.clone());
    let stats = notifier.stats();
    for batch_seq in 0..NUM_PUBLISHED {
        let mut notice = Invalidation::new(batch_seq);
        // A thousand tenants and a thousand resources: a message of ~100 KB.
        for index in 0..MAX_RESOURCES_PER_MESSAGE {
            notice.add(
                &format!("tenant-{batch_seq}-{index:04}"),
                "order",
                &format!("{batch_seq}-{index:040}"),
            );
        }
        notifier.publish(notice);
    }
    assert!(
        stats.peak_queued_bytes() <= QUEUE_BYTES,
        "{}",
        stats.peak_queued_bytes()
    );
    assert!(
        stats.peak_queued_bytes() > QUEUE_BYTES / 2,
        "the bound is what stopped it"
    );
    assert!(
        stats.dropped() >= NUM_PUBLISHED - 40,
        "{} dropped",
        stats.dropped()
    );
    stop_worker(&shutdown, worker).await;
    assert_eq!(
        stats.dropped(),
        NUM_PUBLISHED,
        "nothing reached redis, all counted"
    );
    assert_eq!(stats.queued_bytes(), 0, "the flush released every byte");
}
