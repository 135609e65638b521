//! The invalidation subscriber: applies the sink's messages (`AUDITFLOW_INVALIDATION_CHANNEL`)
//! to the cache, detects the ones it missed, and reconciles with the committed-batch log.
//!
//! Missed messages are detected, never assumed away:
//! - a gap in a publisher's `batch_seq`, or a publisher never seen whose first message is not 1:
//!   flush everything (what the lost messages touched is unknown);
//! - a `truncated` message, or one that does not parse: flush everything;
//! - a lost Redis connection (the message stream ends, or a PING goes unanswered): the cache is
//!   untrusted (requests bypass it) until the subscription is back, then flushed;
//! - every `AUDITFLOW_SERVE_RECONCILE_INTERVAL_MS`, the `batches` table is read for batches
//!   beyond what each publisher's messages reached: each one found invalidates what its summary
//!   says it touched. So even a publisher that died right after a dropped message cannot leave a
//!   stale result past that interval. While reconciliation fails for three intervals the cache is
//!   untrusted too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use parking_lot::Mutex;
use serde::Deserialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::cache::{Affects, QueryCache};
use super::metrics as m;
use crate::db::quote_ident;

/// How often the subscription is PINGed to find a connection that died silently.
const PING_EVERY: Duration = Duration::from_secs(2);
/// How long a PING or a connection attempt may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Rows one reconciliation reads at most; beyond, everything is flushed instead.
const RECONCILE_MAX_ROWS: i64 = 10_000;

/// A message as the sink publishes it (version 1 or 2; unknown fields ignored).
#[derive(Debug, Deserialize)]
struct Message {
    publisher: Option<Uuid>,
    batch_seq: Option<u64>,
    #[serde(default)]
    tenants: Vec<String>,
    ranges: Option<HashMap<String, Range>>,
    #[serde(default)]
    truncated: bool,
}

#[derive(Debug, Deserialize)]
struct Range {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
}

/// A committed batch's summary as stored in `batches.summary`.
#[derive(Debug, Deserialize)]
struct Summary {
    #[serde(default)]
    tenants: HashMap<String, Range>,
    #[serde(default)]
    truncated: bool,
}

fn ranges_affect(ranges: HashMap<String, Range>) -> Affects {
    Affects::Tenants(
        ranges
            .into_iter()
            .map(|(tenant, range)| (tenant, Some((range.from, range.to))))
            .collect(),
    )
}

/// How far each publisher's batches are accounted for: every `batch_seq` up to the value was
/// either announced or handled by a flush or a reconciliation.
#[derive(Debug, Default)]
pub struct Publishers {
    seen: HashMap<Uuid, u64>,
}

/// What applying one message found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The next message of a known publisher (or a late one): its ranges invalidated.
    InOrder,
    /// Messages were lost before it: everything flushed.
    Gap,
    /// Cut, unparsable or unknown: everything flushed.
    Flushed,
}

/// Applies one message to `cache`, tracking publisher sequences in `publishers`.
pub fn apply_message(cache: &QueryCache, publishers: &Mutex<Publishers>, payload: &str) -> Applied {
    metrics::counter!(m::INVALIDATIONS).increment(1);
    let message: Message = match serde_json::from_str(payload) {
        Ok(message) => message,
        Err(err) => {
            tracing::warn!(error = %err, "unreadable invalidation message; flushing the cache");
            cache.flush_all("unreadable_message");
            return Applied::Flushed;
        }
    };
    let mut gap = false;
    if let (Some(publisher), Some(batch_seq)) = (message.publisher, message.batch_seq) {
        let mut publishers = publishers.lock();
        let seen = publishers.seen.get(&publisher).copied();
        match seen {
            None if batch_seq != 1 => {
                tracing::warn!(%publisher, batch_seq, "first message of an unknown publisher is not its first batch");
                gap = true;
            }
            Some(seen) if batch_seq > seen + 1 => {
                tracing::warn!(%publisher, batch_seq, expected = seen + 1, "gap in a publisher's batch sequence");
                gap = true;
            }
            _ => {}
        }
        let entry = publishers.seen.entry(publisher).or_default();
        *entry = (*entry).max(batch_seq);
    }
    if gap {
        metrics::counter!(m::GAPS).increment(1);
        cache.flush_all("sequence_gap");
        return Applied::Gap;
    }
    if message.truncated {
        cache.flush_all("truncated_message");
        return Applied::Flushed;
    }
    let affects = match message.ranges {
        Some(ranges) => ranges_affect(ranges),
        // Version 1: tenants only, so the whole tenant.
        None => Affects::Tenants(message.tenants.into_iter().map(|t| (t, None)).collect()),
    };
    cache.invalidate(affects);
    Applied::InOrder
}

/// Loads how far every publisher got, from the committed-batch log.
pub async fn load_publishers(pool: &PgPool, schema: &str) -> Result<Publishers, sqlx::Error> {
    let rows: Vec<(Uuid, Option<i64>)> = sqlx::query_as(&format!(
        "SELECT p.publisher, (SELECT max(b.batch_seq) FROM {schema}.batches b \
                              WHERE b.publisher_id = p.publisher_id) \
         FROM {schema}.publishers p",
        schema = quote_ident(schema)
    ))
    .fetch_all(pool)
    .await?;
    Ok(Publishers {
        seen: rows
            .into_iter()
            .map(|(publisher, seq)| (publisher, seq.map_or(0, |s| u64::try_from(s).unwrap_or(0))))
            .collect(),
    })
}

/// One reconciliation: reads the batches committed within `window` beyond what each publisher's
/// messages reached, invalidates what each touched, and moves the publishers on. Returns how
/// many batches no message had announced.
pub async fn reconcile_once(
    cache: &QueryCache,
    publishers: &Mutex<Publishers>,
    pool: &PgPool,
    schema: &str,
    window: Duration,
) -> Result<u64, sqlx::Error> {
    let (known, upto): (Vec<Uuid>, Vec<i64>) = publishers
        .lock()
        .seen
        .iter()
        .map(|(publisher, seq)| (*publisher, i64::try_from(*seq).unwrap_or(i64::MAX)))
        .unzip();
    let rows: Vec<(Uuid, i64, String)> = sqlx::query_as(&format!(
        "SELECT p.publisher, b.batch_seq, b.summary::text \
         FROM {schema}.batches b JOIN {schema}.publishers p USING (publisher_id) \
         LEFT JOIN unnest($2::uuid[], $3::int8[]) AS seen(publisher, upto) \
           ON seen.publisher = p.publisher \
         WHERE b.committed_at >= now() - make_interval(secs => $1) \
           AND b.batch_seq > coalesce(seen.upto, 0) \
         ORDER BY b.publisher_id, b.batch_seq LIMIT $4",
        schema = quote_ident(schema)
    ))
    .bind(window.as_secs_f64())
    .bind(&known)
    .bind(&upto)
    .bind(RECONCILE_MAX_ROWS + 1)
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let num_missed = rows.len() as u64;
    if rows.len() as i64 > RECONCILE_MAX_ROWS {
        cache.flush_all("reconcile_overflow");
        let fresh = load_publishers(pool, schema).await?;
        *publishers.lock() = fresh;
        return Ok(num_missed);
    }
    let mut flushed = false;
    for (publisher, batch_seq, summary) in rows {
        tracing::warn!(%publisher, batch_seq, "committed batch found that no invalidation announced");
        match serde_json::from_str::<Summary>(&summary) {
            Ok(summary) if !summary.truncated => cache.invalidate(ranges_affect(summary.tenants)),
            _ if !flushed => {
                cache.flush_all("reconcile_truncated");
                flushed = true;
            }
            _ => {}
        }
        let mut publishers = publishers.lock();
        let entry = publishers.seen.entry(publisher).or_default();
        *entry = (*entry).max(u64::try_from(batch_seq).unwrap_or(0));
    }
    metrics::counter!(m::RECONCILE_MISSED).increment(num_missed);
    Ok(num_missed)
}

/// Settings of the subscriber.
#[derive(Clone)]
pub struct SubscriberSettings {
    /// The Redis client (see [`crate::redis_client`]).
    pub client: redis::Client,
    /// `AUDITFLOW_INVALIDATION_CHANNEL`.
    pub channel: String,
    /// The schema of the committed-batch log.
    pub schema: String,
    /// `AUDITFLOW_SERVE_RECONCILE_INTERVAL_MS`.
    pub reconcile_interval: Duration,
    /// How far back reconciliation looks: the cache TTL plus slack.
    pub window: Duration,
}

/// Runs the subscriber and the reconciliation until `shutdown`.
pub async fn run(
    cache: Arc<QueryCache>,
    pool: PgPool,
    settings: SubscriberSettings,
    shutdown: CancellationToken,
) {
    let publishers = Arc::new(Mutex::new(Publishers::default()));
    let reconciler = tokio::spawn(reconcile_loop(
        Arc::clone(&cache),
        Arc::clone(&publishers),
        pool.clone(),
        settings.clone(),
        shutdown.clone(),
    ));
    let mut delay = Duration::from_millis(100);
    let mut flush_reason = "startup";
    loop {
        cache.set_connected(false);
        let subscribed = tokio::select! {
            _ = shutdown.cancelled() => break,
            subscribed = subscribe(&settings) => subscribed,
        };
        let (mut sink, mut stream) = match subscribed {
            Ok(pubsub) => pubsub.split(),
            Err(err) => {
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "cannot subscribe to invalidations; cache bypassed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        // Subscribed: whatever was published before is unknown, so start from the log's view
        // of every publisher and an empty cache.
        match load_publishers(&pool, &settings.schema).await {
            Ok(fresh) => *publishers.lock() = fresh,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the committed-batch log; cache bypassed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        }
        cache.flush_all(flush_reason);
        cache.set_connected(true);
        delay = Duration::from_millis(100);
        tracing::info!(channel = %settings.channel, "subscribed to invalidations");
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let reason = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break None,
                message = stream.next() => match message {
                    Some(message) => match message.get_payload::<String>() {
                        Ok(payload) => {
                            apply_message(&cache, &publishers, &payload);
                        }
                        Err(_) => {
                            cache.flush_all("unreadable_message");
                        }
                    },
                    None => break Some("connection_lost"),
                },
                _ = ping.tick() => {
                    // In subscribed mode the reply is ["pong", ""], not +PONG: any reply will do.
                    let pong = tokio::time::timeout(REDIS_TIMEOUT, sink.ping::<redis::Value>()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        break Some("ping_failed");
                    }
                }
            }
        };
        cache.set_connected(false);
        let Some(reason) = reason else { break };
        tracing::warn!(
            reason,
            "invalidation subscription lost; cache bypassed until it is back"
        );
        flush_reason = "connection_lost";
    }
    cache.set_connected(false);
    reconciler.abort();
}

async fn subscribe(settings: &SubscriberSettings) -> redis::RedisResult<redis::aio::PubSub> {
    let connect = async {
        let mut pubsub = settings.client.get_async_pubsub().await?;
        pubsub.subscribe(&settings.channel).await?;
        Ok(pubsub)
    };
    match tokio::time::timeout(REDIS_TIMEOUT, connect).await {
        Ok(result) => result,
        Err(_) => Err(redis::RedisError::from((
            redis::ErrorKind::IoError,
            "subscribing timed out",
        ))),
    }
}

async fn reconcile_loop(
    cache: Arc<QueryCache>,
    publishers: Arc<Mutex<Publishers>>,
    pool: PgPool,
    settings: SubscriberSettings,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(settings.reconcile_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_success = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match reconcile_once(
            &cache,
            &publishers,
            &pool,
            &settings.schema,
            settings.window,
        )
        .await
        {
            Ok(num_missed) => {
                if num_missed > 0 {
                    tracing::warn!(num_missed, "reconciliation found unannounced batches");
                }
                cache.reconciled();
                last_success = tokio::time::Instant::now();
            }
            Err(err) => tracing::warn!(error = %err, "reconciliation failed"),
        }
        metrics::gauge!(m::RECONCILE_LAG).set(last_success.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::cache::{CacheSettings, Scope};

    fn cache() -> QueryCache {
        QueryCache::new(
            &CacheSettings {
                max_bytes: 1024 * 1024,
                ttl: Duration::from_secs(60),
                reconcile_interval: Duration::from_secs(60),
            },
            None,
        )
    }

    fn message(publisher: &str, seq: u64, tenant: &str, truncated: bool) -> String {
        format!(
            r#"{{"version":2,"publisher":"{publisher}","batch_seq":{seq},"count":1,"tenants":["{tenant}"],"ranges":{{"{tenant}":{{"from":"2030-01-01T10:00:00.000000Z","to":"2030-01-01T10:00:00.000000Z","count":1}}}},"resources":[],"truncated":{truncated},"future_field":[1]}}"#
        )
    }

    const P: &str = "6f1c0f7e-1b7a-4c39-9a38-3f9d8d0f4a51";

    #[test]
    fn messages_in_order_invalidate_only_their_ranges_and_gaps_flush() {
        let cache = cache();
        let publishers = Mutex::new(Publishers::default());
        assert_eq!(
            apply_message(&cache, &publishers, &message(P, 1, "acme", false)),
            Applied::InOrder
        );
        assert_eq!(
            apply_message(&cache, &publishers, &message(P, 2, "acme", false)),
            Applied::InOrder
        );
        assert_eq!(cache.num_flushes(), 0);
        // A late duplicate is harmless.
        assert_eq!(
            apply_message(&cache, &publishers, &message(P, 2, "acme", false)),
            Applied::InOrder
        );
        assert_eq!(
            apply_message(&cache, &publishers, &message(P, 4, "acme", false)),
            Applied::Gap
        );
        assert_eq!(cache.num_flushes(), 1);
        assert_eq!(
            apply_message(&cache, &publishers, &message(P, 5, "acme", false)),
            Applied::InOrder
        );
    }

    #[test]
    fn an_unknown_epoch_not_starting_at_one_truncation_and_garbage_flush() {
        let cache = cache();
        let publishers = Mutex::new(Publishers::default());
        let other = "00000000-0000-0000-0000-0000000000aa";
        assert_eq!(
            apply_message(&cache, &publishers, &message(other, 1, "acme", false)),
            Applied::InOrder
        );
        assert_eq!(
            apply_message(&cache, &publishers, &message(P, 7, "acme", false)),
            Applied::Gap
        );
        assert_eq!(
            apply_message(&cache, &publishers, &message(P, 8, "acme", true)),
            Applied::Flushed
        );
        assert_eq!(
            apply_message(&cache, &publishers, "not json"),
            Applied::Flushed
        );
        assert_eq!(cache.num_flushes(), 3);
    }

    #[test]
    fn a_version_one_message_invalidates_its_whole_tenants() {
        let cache = cache();
        let publishers = Mutex::new(Publishers::default());
        let before = cache.log_generation();
        let v1 = r#"{"batch_seq":3,"count":1,"tenants":["acme"],"resources":[],"truncated":false}"#;
        assert_eq!(apply_message(&cache, &publishers, v1), Applied::InOrder);
        assert_eq!(cache.log_generation(), before + 1);
        let _ = Scope {
            tenant: "acme".into(),
            from: Utc::now(),
            to: Utc::now(),
        };
    }
}
