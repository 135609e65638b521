//! Cache-invalidation notices on Redis pub/sub, published after each batch is committed.
//!
//! Services that cache rows of the audit table subscribe to one Redis pub/sub channel
//! ([`NotifyConfig::channel`]) and evict what each notice names. The table stays the source of
//! truth: notices are best effort, so a Redis outage never stops or slows ingestion, and a
//! subscriber that cannot tolerate a missed notice still needs a TTL on its cache.
//!
//! # Message format (version 2)
//!
//! This is a public contract for every service that caches the audit table. Each committed
//! transaction that stored rows produces exactly one message (a transaction whose rows were all
//! duplicates stores nothing and publishes nothing): a UTF-8 JSON object such as
//!
//! ```json
//! {"version":2,"publisher":"6f1c0f7e-1b7a-4c39-9a38-3f9d8d0f4a51","batch_seq":17,"count":3,
//!  "tenants":["acme","globex"],
//!  "ranges":{"acme":{"from":"2026-03-01T10:00:00.000000Z","to":"2026-03-01T10:00:02.500000Z","count":2},
//!            "globex":{"from":"2026-03-01T09:59:59.000001Z","to":"2026-03-01T09:59:59.000001Z","count":1}},
//!  "resources":[{"type":"order","id":"42"},{"type":"user","id":"7"}],"truncated":false,
//!  "head":"9c1d…(64 hex digits)"}
//! ```
//!
//! (one line on the wire). Fields:
//!
//! - `version` (integer, new in 2): the format version. A message without it is version 1 (the
//!   fields below marked *new in 2* are absent).
//! - `publisher` (UUID string, new in 2): the publisher epoch, a random id per store stream per
//!   sink process start, registered in the `publishers` table.
//! - `batch_seq` (unsigned integer): the publisher's sequence number of this committed
//!   transaction, **gapless**: it advances only when a transaction that stored rows commits, and
//!   the same number is in the `batches` table (written in that transaction). Within one
//!   publisher, messages are published in order, so a subscriber that receives `n` and then
//!   `n + 2` lost `n + 1`; a publisher it has never seen whose first message is not `1` means it
//!   lost that publisher's earlier messages. (In version 1 it was a per-batch counter whose gaps
//!   said nothing.)
//! - `count` (unsigned integer): rows the transaction stored.
//! - `tenants` (array of strings): the distinct tenants it stored rows for, sorted, at most
//!   [`MAX_TENANTS_PER_SUMMARY`] (then `truncated`).
//! - `ranges` (object, new in 2): per tenant in `tenants`, `from` and `to` (RFC 3339 UTC with
//!   microseconds, both inclusive) the earliest and latest `occurred_at` stored, and `count`, the
//!   rows stored for that tenant. A cached result for tenant T over `[a, b)` can only be affected
//!   if `from < b` and `to >= a`.
//! - `resources` (array of `{"type": string, "id": string}`): distinct resources of the batch
//!   (possibly a superset of the stored rows' when the database refused some rows), sorted by
//!   type then id, at most [`MAX_RESOURCES_PER_MESSAGE`] entries.
//! - `truncated` (boolean): `true` when `tenants`/`ranges` or `resources` were cut (too many
//!   entries, or the message would exceed [`MAX_MESSAGE_BYTES`]). The subscriber must then
//!   invalidate **everything** it caches: the transaction may have touched any tenant. (In
//!   version 1 only `resources` could be cut, and invalidating the listed tenants sufficed.)
//!
//! - `head` (hex string, optional, added without a version change): the digest of the batch's
//!   hash-chain link (see `src/chain/`), i.e. the publisher's chain head once this batch is
//!   committed. A copy kept outside the database lets `auditflow verify --expect-head` prove
//!   the chain was not rewritten since.
//!
//! Subscribers must ignore fields they do not know: new fields may be added, existing ones keep
//! their meaning. Redis pub/sub keeps nothing for absent subscribers: a subscriber that
//! (re)connects has missed whatever was published meanwhile and must treat its cache as stale.
//! A publisher that dies right after a message was dropped leaves no later message to reveal
//! the gap: compare what was received with the `batches` table periodically (`auditflow serve`
//! does, see `src/serve/`).
//!
//! # Delivery
//!
//! [`Notifier::publish`] encodes the notice and puts it on a queue bounded both by count
//! ([`NotifyConfig::queue_capacity`]) and by encoded bytes ([`NotifyConfig::queue_bytes`]); it
//! never waits. One background
//! [`NotifyWorker`] owns the Redis connection and publishes the queue in order. While Redis is
//! unreachable the worker stops taking from the queue and reconnects with jittered exponential
//! backoff, so notices wait in the queue and those that do not fit are dropped. A notice whose
//! PUBLISH fails is dropped too, never retried. Every notice handed to [`Notifier::publish`] ends
//! up counted exactly once in [`NotifyStats`] (and the matching Prometheus counter) as published,
//! failed or dropped, once the worker has stopped.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use foldhash::fast::RandomState;
use hashbrown::HashTable;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

pub use super::store::MAX_TENANTS_PER_SUMMARY;
use super::store::{BatchSummary, CommittedBatch, TenantRange};
use crate::breaker::{Breaker, BreakerConfig};

/// Caps the `resources` array of one message; beyond it the message is marked `truncated`.
pub const MAX_RESOURCES_PER_MESSAGE: usize = 1000;

/// Caps one encoded message: resources, then tenants, are cut (and the message marked
/// `truncated`) until it fits. The byte bound of the queue must be at least this.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// The message format version published.
pub const MESSAGE_VERSION: u32 = 2;

/// Counts notices Redis acknowledged (the PUBLISH returned, whatever the number of subscribers).
pub const PUBLISHED_METRIC: &str = "auditflow_invalidations_published_total";
/// Counts notices whose PUBLISH failed or timed out; they are not retried.
pub const FAILED_METRIC: &str = "auditflow_invalidations_failed_total";
/// Counts notices that never reached Redis: the queue was full or closed, or shutdown ran out of
/// time before they could be sent.
pub const DROPPED_METRIC: &str = "auditflow_invalidations_dropped_total";

/// First reconnect delay after Redis is found unreachable.
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
/// Longest reconnect delay, jitter included.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(5);

/// Settings of the invalidation publisher.
#[derive(Clone)]
pub struct NotifyConfig {
    /// Redis URL, e.g. `redis://redis:6379` or `redis://:password@host:6379/0` (plain TCP: the
    /// crate is built without Redis TLS support). A malformed URL is caught by
    /// [`NotifyConfig::validate`]; an unreachable server is not an error (the worker keeps
    /// reconnecting).
    pub redis_url: String,
    /// `AUDITFLOW_REDIS_CA_FILE`: the CA of a `rediss://` server's certificate (system roots
    /// when unset).
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// Pub/sub channel the notices are published on; every subscriber of the audit table's
    /// caches listens here.
    pub channel: String,
    /// How many notices (one per committed batch) may wait for Redis; at least 1. While Redis is
    /// down, the queue fills after this many batches and later notices are dropped, so size it
    /// for the outage to ride out, not for throughput.
    pub queue_capacity: usize,
    /// How many encoded bytes may wait for Redis, at least [`MAX_MESSAGE_BYTES`]: with
    /// high-cardinality batches the count bound alone could hold gigabytes.
    pub queue_bytes: usize,
    /// Bounds each connection attempt and each PUBLISH, and the whole shutdown: the worker stops
    /// within this long of cancellation, counting what it could not flush as dropped. Must be
    /// greater than zero.
    pub publish_timeout: Duration,
    /// Thresholds of the Redis circuit breaker: while it is open the worker neither connects nor
    /// publishes, and notices wait in (and overflow from) the queue.
    pub breaker: BreakerConfig,
}

impl NotifyConfig {
    /// Checks the settings [`spawn`] would otherwise reject by disabling notices, so start-up
    /// can fail instead.
    pub fn validate(&self) -> Result<(), NotifyError> {
        self.build_client().map(drop)
    }

    /// Validates the settings and parses the URL (no network access).
    fn build_client(&self) -> Result<redis::Client, NotifyError> {
        if self.queue_capacity == 0 {
            return Err(NotifyError::InvalidConfig {
                field: "queue_capacity",
                reason: "must be at least 1",
            });
        }
        if self.queue_bytes < MAX_MESSAGE_BYTES {
            return Err(NotifyError::InvalidConfig {
                field: "queue_bytes",
                reason: "must be at least 262144 (the largest message)",
            });
        }
        if self.publish_timeout.is_zero() {
            return Err(NotifyError::InvalidConfig {
                field: "publish_timeout",
                reason: "must be greater than zero",
            });
        }
        crate::redis_client::open(&self.redis_url, self.redis_ca_file.as_deref())
            .map_err(NotifyError::InvalidRedisUrl)
    }
}

impl fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotifyConfig")
            .field("redis_url", &redact_url_credentials(&self.redis_url))
            .field("channel", &self.channel)
            .field("queue_capacity", &self.queue_capacity)
            .field("queue_bytes", &self.queue_bytes)
            .field("publish_timeout", &self.publish_timeout)
            .finish()
    }
}

/// Errors raised while building the publisher; publishing itself never fails to the caller.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The Redis URL does not parse or its CA file cannot be read. The message includes the
    /// reason (which never repeats the URL, so no password leaks into logs).
    #[error("invalid redis settings for invalidation notices: {0}")]
    InvalidRedisUrl(crate::redis_client::RedisClientError),
    /// A setting is out of range.
    #[error("invalid invalidation setting {field}: {reason}")]
    InvalidConfig {
        /// The [`NotifyConfig`] field at fault.
        field: &'static str,
        /// What the field must satisfy.
        reason: &'static str,
    },
}

/// Distinct `(resource type, resource id)` pairs.
///
/// The pairs' text lives in one buffer and a hash table holds where each pair is in it, so
/// recording a resource allocates nothing once the buffer has grown (a batch records every
/// event's resource, and a recycled batch keeps the buffer, [`Resources::clear`]); hashed,
/// because they are sorted only once, when a message is written
/// ([`Resources::first_sorted`]); and shared, so the messages of a batch's transactions (one per
/// store stream) take the batch's set without copying it.
#[derive(Clone, Default)]
pub struct Resources {
    set: Arc<ResourceSet>,
}

#[derive(Clone, Default)]
struct ResourceSet {
    /// Each pair's type then id, back to back.
    text: String,
    pairs: HashTable<Pair>,
    hasher: RandomState,
}

/// Where one pair's text is in [`ResourceSet::text`].
#[derive(Debug, Clone, Copy)]
struct Pair {
    start: usize,
    type_len: usize,
    id_len: usize,
}

impl Pair {
    /// The pair's type and id in `text` (the set's buffer, where [`Resources::insert`] wrote them
    /// whole, so the bounds are in it and on character boundaries).
    fn in_text(self, text: &str) -> (&str, &str) {
        let type_end = self.start + self.type_len;
        (
            &text[self.start..type_end],
            &text[type_end..type_end + self.id_len],
        )
    }
}

impl ResourceSet {
    fn hash(hasher: &RandomState, resource_type: &str, resource_id: &str) -> u64 {
        hasher.hash_one((resource_type, resource_id))
    }
}

impl Resources {
    /// Records one resource; false if it was already there.
    pub fn insert(&mut self, resource_type: &str, resource_id: &str) -> bool {
        let set = Arc::make_mut(&mut self.set);
        let hash = ResourceSet::hash(&set.hasher, resource_type, resource_id);
        let ResourceSet {
            text,
            pairs,
            hasher,
        } = set;
        let same = |pair: &Pair| pair.in_text(text) == (resource_type, resource_id);
        if pairs.find(hash, same).is_some() {
            return false;
        }
        let pair = Pair {
            start: text.len(),
            type_len: resource_type.len(),
            id_len: resource_id.len(),
        };
        text.push_str(resource_type);
        text.push_str(resource_id);
        let rehash = |pair: &Pair| {
            let (resource_type, resource_id) = pair.in_text(text);
            ResourceSet::hash(hasher, resource_type, resource_id)
        };
        pairs.insert_unique(hash, pair, rehash);
        true
    }

    /// Forgets every resource, keeping the buffers unless a message still shares them.
    pub fn clear(&mut self) {
        match Arc::get_mut(&mut self.set) {
            Some(set) => {
                set.text.clear();
                set.pairs.clear();
            }
            None => *self = Resources::default(),
        }
    }

    /// Number of distinct resources.
    pub fn len(&self) -> usize {
        self.set.pairs.len()
    }

    /// True when none was recorded.
    pub fn is_empty(&self) -> bool {
        self.set.pairs.is_empty()
    }

    /// Every resource, in no particular order.
    fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.set
            .pairs
            .iter()
            .map(|pair| pair.in_text(&self.set.text))
    }

    /// The first `limit` resources by type then id, in that order.
    pub fn first_sorted(&self, limit: usize) -> Vec<(&str, &str)> {
        let mut all: Vec<(&str, &str)> = self.iter().collect();
        // Only the first `limit` need an order: pick them, then sort just those.
        if limit < all.len() {
            all.select_nth_unstable(limit);
            all.truncate(limit);
        }
        all.sort_unstable();
        all
    }
}

impl PartialEq for Resources {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && {
            let theirs: HashSet<(&str, &str)> = other.iter().collect();
            self.iter().all(|pair| theirs.contains(&pair))
        }
    }
}

impl Eq for Resources {}

impl fmt::Debug for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.first_sorted(self.len()))
            .finish()
    }
}

/// What one committed transaction changed, published as one message.
///
/// A batch accumulates the resources it touches event by event ([`Invalidation::add`]); once a
/// transaction commits, [`Invalidation::committed`] makes the message of that transaction from
/// its committed-batch log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    /// The publisher epoch (nil until committed).
    pub publisher: Uuid,
    /// Gapless sequence number of the committed transaction within its publisher.
    pub batch_seq: u64,
    /// Number of rows stored.
    pub count: u64,
    /// Distinct tenants touched.
    pub tenants: BTreeSet<String>,
    /// Per tenant, the `occurred_at` range and count stored.
    pub ranges: BTreeMap<String, TenantRange>,
    /// Distinct `(resource type, resource id)` pairs touched.
    pub resources: Resources,
    /// Tenants were left out upstream (the summary was capped).
    pub tenants_truncated: bool,
    /// The batch's hash-chain link digest, hex (`None` for notices not built from a commit).
    pub head: Option<String>,
}

impl Invalidation {
    /// Starts an empty notice for batch `batch_seq`.
    pub fn new(batch_seq: u64) -> Self {
        Self {
            publisher: Uuid::nil(),
            batch_seq,
            count: 0,
            tenants: BTreeSet::new(),
            ranges: BTreeMap::new(),
            resources: Resources::default(),
            tenants_truncated: false,
            head: None,
        }
    }

    /// The message of one committed transaction: its publisher, sequence number and per-tenant
    /// summary, with the resources the batch touched.
    pub fn committed(committed: &CommittedBatch, resources: &Resources) -> Self {
        let BatchSummary { tenants, truncated } = &committed.summary;
        Self {
            publisher: committed.publisher,
            batch_seq: committed.batch_seq,
            count: committed.num_rows,
            tenants: tenants.keys().cloned().collect(),
            ranges: tenants.clone(),
            resources: resources.clone(),
            tenants_truncated: *truncated,
            head: Some(crate::chain::to_hex(&committed.digest)),
        }
    }

    /// Records one event touching `resource_type`/`resource_id` of `tenant`.
    pub fn add(&mut self, tenant: &str, resource_type: &str, resource_id: &str) -> &mut Self {
        self.count += 1;
        if !self.tenants.contains(tenant) {
            self.tenants.insert(tenant.to_owned());
        }
        self.resources.insert(resource_type, resource_id);
        self
    }

    /// Tells whether no event was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encodes the message described in the [module documentation](self), capping `tenants`
    /// and `ranges` at [`MAX_TENANTS_PER_SUMMARY`], `resources` at [`MAX_RESOURCES_PER_MESSAGE`],
    /// and the whole at [`MAX_MESSAGE_BYTES`].
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        let resources = self.resources.first_sorted(MAX_RESOURCES_PER_MESSAGE);
        let mut num_resources = resources.len();
        let mut num_tenants = self.tenants.len().min(MAX_TENANTS_PER_SUMMARY);
        loop {
            let encoded = self.encode(&resources[..num_resources], num_tenants)?;
            if encoded.len() <= MAX_MESSAGE_BYTES || (num_resources == 0 && num_tenants == 0) {
                return Ok(encoded);
            }
            // Too big: halve resources first (they only narrow an invalidation), then tenants.
            if num_resources > 0 {
                num_resources /= 2;
            } else {
                num_tenants /= 2;
            }
        }
    }

    /// Encodes the message with `resources` (the first of [`Resources::first_sorted`]) and the first
    /// `num_tenants` tenants.
    fn encode(
        &self,
        resources: &[(&str, &str)],
        num_tenants: usize,
    ) -> Result<String, serde_json::Error> {
        let resources: Vec<ResourceRef<'_>> = resources
            .iter()
            .map(|&(resource_type, id)| ResourceRef { resource_type, id })
            .collect();
        let tenants: Vec<&String> = self.tenants.iter().take(num_tenants).collect();
        let ranges: BTreeMap<&String, &TenantRange> = tenants
            .iter()
            .filter_map(|tenant| self.ranges.get(*tenant).map(|range| (*tenant, range)))
            .collect();
        let truncated = self.tenants_truncated
            || tenants.len() < self.tenants.len()
            || resources.len() < self.resources.len();
        serde_json::to_string(&InvalidationMessage {
            version: MESSAGE_VERSION,
            publisher: self.publisher,
            batch_seq: self.batch_seq,
            count: self.count,
            tenants,
            ranges,
            resources,
            truncated,
            head: self.head.as_deref(),
        })
    }
}

/// Wire shape of a notice; field order is the order in the JSON.
#[derive(Serialize)]
struct InvalidationMessage<'a> {
    version: u32,
    publisher: Uuid,
    batch_seq: u64,
    count: u64,
    tenants: Vec<&'a String>,
    ranges: BTreeMap<&'a String, &'a TenantRange>,
    resources: Vec<ResourceRef<'a>>,
    truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    head: Option<&'a str>,
}

#[derive(Serialize)]
struct ResourceRef<'a> {
    #[serde(rename = "type")]
    resource_type: &'a str,
    id: &'a str,
}

/// One encoded notice waiting for Redis.
#[derive(Debug)]
struct Queued {
    batch_seq: u64,
    payload: String,
}

/// Running totals of notice outcomes, shared by every [`Notifier`] clone and the worker.
///
/// Each total only grows. Once the worker has stopped, `published + failed + dropped` equals the
/// number of [`Notifier::publish`] calls.
#[derive(Debug, Default)]
pub struct NotifyStats {
    published: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    queued_bytes: AtomicUsize,
    peak_queued_bytes: AtomicUsize,
}

impl NotifyStats {
    /// Returns how many notices Redis acknowledged.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Returns how many notices failed to publish and were discarded.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Returns how many notices were discarded without a publish attempt.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Returns the encoded bytes waiting in the queue now.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Returns the most encoded bytes that ever waited in the queue at once.
    pub fn peak_queued_bytes(&self) -> usize {
        self.peak_queued_bytes.load(Ordering::Relaxed)
    }

    /// Takes `num_bytes` of the queue's byte budget `limit`; false (nothing taken) if they do
    /// not fit.
    fn reserve_bytes(&self, num_bytes: usize, limit: usize) -> bool {
        let reserved =
            self.queued_bytes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                    queued
                        .checked_add(num_bytes)
                        .filter(|total| *total <= limit)
                });
        match reserved {
            Ok(before) => {
                self.peak_queued_bytes
                    .fetch_max(before + num_bytes, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    fn release_bytes(&self, num_bytes: usize) {
        self.queued_bytes.fetch_sub(num_bytes, Ordering::AcqRel);
    }

    fn record_published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(PUBLISHED_METRIC).increment(1);
    }

    fn record_failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(FAILED_METRIC).increment(1);
    }

    /// Adds `num_dropped` and returns the new total.
    fn record_dropped(&self, num_dropped: u64) -> u64 {
        metrics::counter!(DROPPED_METRIC).increment(num_dropped);
        self.dropped.fetch_add(num_dropped, Ordering::Relaxed) + num_dropped
    }
}

/// Registers descriptions of the invalidation counters with the installed metrics recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(
        PUBLISHED_METRIC,
        "cache-invalidation notices published on redis"
    );
    metrics::describe_counter!(
        FAILED_METRIC,
        "cache-invalidation notices whose redis publish failed or timed out"
    );
    metrics::describe_counter!(
        DROPPED_METRIC,
        "cache-invalidation notices discarded before reaching redis (queue full or shut down)"
    );
}

/// Hands invalidation notices to the background worker; cheap to clone.
///
/// The worker stops on its own once every clone is dropped and the queue is empty.
#[derive(Debug, Clone)]
pub struct Notifier {
    invalidation_tx: mpsc::Sender<Queued>,
    stats: Arc<NotifyStats>,
    breaker: Arc<Breaker>,
    queue_bytes: usize,
}

impl Notifier {
    /// Queues `invalidation` for publishing without blocking or awaiting.
    ///
    /// When the queue is full (Redis slow or down) or the worker has stopped, the notice is
    /// discarded and counted as dropped.
    pub fn publish(&self, invalidation: Invalidation) {
        let batch_seq = invalidation.batch_seq;
        let payload = match invalidation.to_json() {
            Ok(payload) => payload,
            Err(err) => {
                self.stats.record_failed();
                error!(error = %err, batch_seq, "cannot encode invalidation notice");
                return;
            }
        };
        let num_bytes = payload.len();
        let reason = if self.stats.reserve_bytes(num_bytes, self.queue_bytes) {
            match self.invalidation_tx.try_send(Queued { batch_seq, payload }) {
                Ok(()) => return,
                Err(TrySendError::Full(_)) => {
                    self.stats.release_bytes(num_bytes);
                    "queue full"
                }
                Err(TrySendError::Closed(_)) => {
                    self.stats.release_bytes(num_bytes);
                    "worker stopped"
                }
            }
        } else {
            "queue bytes full"
        };
        let num_dropped = self.stats.record_dropped(1);
        // Logs at 1, 2, 4, 8, ... drops so a long outage cannot flood the log.
        if num_dropped.is_power_of_two() {
            warn!(reason, num_dropped, "dropped invalidation notice");
        } else {
            debug!(reason, num_dropped, "dropped invalidation notice");
        }
    }

    /// Returns the shared outcome counters, which stay readable after the notifier is gone.
    pub fn stats(&self) -> Arc<NotifyStats> {
        Arc::clone(&self.stats)
    }

    /// Returns the Redis circuit breaker.
    pub fn breaker(&self) -> Arc<Breaker> {
        Arc::clone(&self.breaker)
    }
}

/// Builds the publisher and spawns its worker on the current Tokio runtime.
///
/// The returned task ends within [`NotifyConfig::publish_timeout`] of `shutdown` being cancelled
/// (after flushing what it can), or once every [`Notifier`] clone is dropped and the queue is
/// empty. It never fails: when `config` is invalid (see [`NotifyConfig::validate`], which callers
/// should run at start-up), it logs an error and returns a notifier that counts every notice as
/// dropped, alongside an already finished task. Use [`NotifyWorker::new`] to get the error
/// instead. Panics if called outside a Tokio runtime.
pub fn spawn(config: NotifyConfig, shutdown: CancellationToken) -> (Notifier, JoinHandle<()>) {
    let breaker_config = config.breaker;
    match NotifyWorker::new(config, shutdown) {
        Ok((notifier, worker)) => (notifier, tokio::spawn(worker.run())),
        Err(err) => {
            error!(error = %err, "invalidation notices disabled");
            // The receiver is dropped at once, so every publish fails fast with `Closed`.
            let (invalidation_tx, _) = mpsc::channel(1);
            let notifier = Notifier {
                invalidation_tx,
                stats: Arc::new(NotifyStats::default()),
                breaker: Arc::new(Breaker::new("redis", breaker_config)),
                queue_bytes: MAX_MESSAGE_BYTES,
            };
            (notifier, tokio::spawn(async {}))
        }
    }
}

/// Background task that owns the Redis connection and drains the notice queue in order.
pub struct NotifyWorker {
    client: redis::Client,
    manager_config: ConnectionManagerConfig,
    channel: String,
    publish_timeout: Duration,
    invalidation_rx: mpsc::Receiver<Queued>,
    stats: Arc<NotifyStats>,
    shutdown: CancellationToken,
    /// `None` while Redis is unreachable: the worker then reconnects before taking the next
    /// notice, so notices wait in the queue rather than fail one by one.
    connection: Option<ConnectionManager>,
    breaker: Arc<Breaker>,
}

impl fmt::Debug for NotifyWorker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `redis::Client`'s Debug would print the password.
        f.debug_struct("NotifyWorker")
            .field("redis_addr", &self.client.get_connection_info().addr)
            .field("channel", &self.channel)
            .field("publish_timeout", &self.publish_timeout)
            .field("connected", &self.connection.is_some())
            .finish_non_exhaustive()
    }
}

impl NotifyWorker {
    /// Validates `config` and builds the notifier handle and its (not yet running) worker
    /// without touching the network.
    pub fn new(
        config: NotifyConfig,
        shutdown: CancellationToken,
    ) -> Result<(Notifier, NotifyWorker), NotifyError> {
        let client = config.build_client()?;
        // The worker paces reconnection itself and holds notices back meanwhile; retries inside
        // the manager would only stretch the time each failing command waits.
        let manager_config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(config.publish_timeout)
            .set_response_timeout(config.publish_timeout);
        let (invalidation_tx, invalidation_rx) = mpsc::channel(config.queue_capacity);
        let stats = Arc::new(NotifyStats::default());
        let breaker = Arc::new(Breaker::new("redis", config.breaker));
        let notifier = Notifier {
            invalidation_tx,
            stats: Arc::clone(&stats),
            breaker: Arc::clone(&breaker),
            queue_bytes: config.queue_bytes,
        };
        let worker = NotifyWorker {
            client,
            manager_config,
            channel: config.channel,
            publish_timeout: config.publish_timeout,
            invalidation_rx,
            stats,
            shutdown,
            connection: None,
            breaker,
        };
        Ok((notifier, worker))
    }

    /// Publishes queued notices until shutdown is requested, then, within
    /// [`NotifyConfig::publish_timeout`] of the request, flushes what is queued and counts the
    /// rest as dropped.
    pub async fn run(mut self) {
        let redis_addr = self.client.get_connection_info().addr.to_string();
        info!(redis_addr, channel = %self.channel, "invalidation publisher started");
        let shutdown = self.shutdown.clone();
        let mut cancelled_at = None;
        loop {
            if self.connection.is_none() {
                let connection = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    connection = connect_with_backoff(
                        &self.client,
                        &self.manager_config,
                        self.publish_timeout,
                        &self.breaker,
                    ) => connection,
                };
                self.connection = Some(connection);
            }
            let invalidation = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                received = self.invalidation_rx.recv() => match received {
                    Some(queued) => {
                        self.stats.release_bytes(queued.payload.len());
                        queued
                    }
                    None => {
                        info!("every notifier handle dropped, invalidation publisher stopped");
                        return;
                    }
                },
            };
            let publish_deadline = Instant::now() + self.publish_timeout;
            let publish = self.publish_one(&invalidation, publish_deadline);
            tokio::pin!(publish);
            tokio::select! {
                biased;
                () = &mut publish => {}
                () = shutdown.cancelled() => {
                    // Cut short, the publish would vanish from the stats; it ends by its own
                    // deadline, which falls inside the shutdown budget starting now.
                    cancelled_at = Some(Instant::now());
                    publish.await;
                    break;
                }
            }
        }
        let flush_deadline = cancelled_at.unwrap_or_else(Instant::now) + self.publish_timeout;
        self.flush_queue(flush_deadline).await;
        info!(
            num_published = self.stats.published(),
            num_failed = self.stats.failed(),
            num_dropped = self.stats.dropped(),
            "invalidation publisher stopped"
        );
    }

    /// Closes the queue, publishes what it holds until `deadline` and counts whatever is left as
    /// dropped.
    async fn flush_queue(&mut self, deadline: Instant) {
        // From here on `Notifier::publish` fails fast with `Closed` and counts its own drops.
        self.invalidation_rx.close();
        let mut num_abandoned: u64 = 0;
        while let Ok(invalidation) = self.invalidation_rx.try_recv() {
            self.stats.release_bytes(invalidation.payload.len());
            if self.connection.is_none() {
                let connect = connect_with_backoff(
                    &self.client,
                    &self.manager_config,
                    self.publish_timeout,
                    &self.breaker,
                );
                match timeout_at(deadline, connect).await {
                    Ok(connection) => self.connection = Some(connection),
                    Err(_elapsed) => {
                        num_abandoned = 1;
                        break;
                    }
                }
            }
            self.publish_one(&invalidation, deadline).await;
        }
        while let Ok(queued) = self.invalidation_rx.try_recv() {
            self.stats.release_bytes(queued.payload.len());
            num_abandoned += 1;
        }
        if num_abandoned > 0 {
            self.stats.record_dropped(num_abandoned);
            warn!(
                num_abandoned,
                "shutdown flush of invalidation notices timed out, rest dropped"
            );
        }
    }

    /// Publishes one notice and records its outcome; forgets the connection when the failure
    /// says Redis is unreachable, so the caller reconnects before taking the next one.
    async fn publish_one(&mut self, queued: &Queued, deadline: Instant) {
        let batch_seq = queued.batch_seq;
        let payload = queued.payload.as_str();
        let Some(connection) = self.connection.as_mut() else {
            // Callers connect first; treated like a lost connection should that ever change.
            self.stats.record_dropped(1);
            return;
        };
        let Some(permit) = self.breaker.try_acquire() else {
            // Connected, but the breaker opened meanwhile (another failure path): do not wait.
            self.stats.record_dropped(1);
            return;
        };
        let mut command = redis::cmd("PUBLISH");
        command.arg(&self.channel).arg(payload);
        let result = timeout_at(deadline, command.query_async::<u64>(connection)).await;
        self.breaker.record(permit, !matches!(result, Ok(Ok(_))));
        match result {
            Ok(Ok(num_receivers)) => {
                self.stats.record_published();
                debug!(batch_seq, num_receivers, "published invalidation notice");
            }
            Ok(Err(err)) => {
                self.stats.record_failed();
                let connection_lost = is_connection_error(&err);
                warn!(error = %err, batch_seq, connection_lost, "cannot publish invalidation notice");
                if connection_lost {
                    self.connection = None;
                }
            }
            Err(_elapsed) => {
                self.stats.record_failed();
                warn!(batch_seq, "publishing invalidation notice timed out");
                self.connection = None;
            }
        }
    }
}

/// Tells whether `err` means the connection is unusable, as opposed to Redis rejecting the
/// command (which the next notice would not fix by reconnecting).
fn is_connection_error(err: &redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_timeout()
        || err.is_unrecoverable_error()
}

/// Reconnect schedule: 100 ms doubling to 5 s, jittered, never giving up.
fn reconnect_backoff() -> ExponentialBuilder {
    // backon's jitter adds up to 100% of the base delay, hence the halved cap.
    ExponentialBuilder::new()
        .with_jitter()
        .with_factor(2.0)
        .with_min_delay(RECONNECT_MIN_DELAY)
        .with_max_delay(RECONNECT_MAX_DELAY / 2)
        .without_max_times()
}

/// Connects to Redis, retrying with [`reconnect_backoff`] until it succeeds; callers bound it by
/// racing it against shutdown or a deadline.
async fn connect_with_backoff(
    client: &redis::Client,
    manager_config: &ConnectionManagerConfig,
    attempt_timeout: Duration,
    breaker: &Breaker,
) -> ConnectionManager {
    let redis_addr = &client.get_connection_info().addr;
    let mut delays = reconnect_backoff().build();
    let mut attempt: u64 = 0;
    loop {
        let Some(permit) = breaker.try_acquire() else {
            // The breaker is open: no connection attempt until it lets a probe through.
            tokio::time::sleep(breaker.retry_after().max(RECONNECT_MIN_DELAY)).await;
            continue;
        };
        attempt += 1;
        let connect = ConnectionManager::new_with_config(client.clone(), manager_config.clone());
        let result = timeout(attempt_timeout, connect).await;
        breaker.record(permit, !matches!(result, Ok(Ok(_))));
        let error = match result {
            Ok(Ok(connection)) => {
                info!(%redis_addr, attempt, "connected to redis for invalidation notices");
                return connection;
            }
            Ok(Err(err)) => err.to_string(),
            Err(_elapsed) => "connection attempt timed out".to_owned(),
        };
        let delay = delays.next().unwrap_or(RECONNECT_MAX_DELAY);
        warn!(
            error,
            %redis_addr,
            attempt,
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "cannot connect to redis for invalidation notices"
        );
        tokio::time::sleep(delay).await;
    }
}

/// Hides the user-info and query (where redis URLs may carry a password) of `url`.
fn redact_url_credentials(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return "<redacted>".to_owned();
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    let rest = match rest.find('?') {
        Some(query_start) => format!("{}?<redacted>", &rest[..query_start]),
        None => rest.to_owned(),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}<redacted>@{}", &rest[at + 1..]),
        None => format!("{scheme}{rest}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_config(queue_capacity: usize) -> NotifyConfig {
        NotifyConfig {
            redis_url: "redis://127.0.0.1:1".to_owned(),
            redis_ca_file: None,
            channel: "auditflow.test".to_owned(),
            queue_capacity,
            queue_bytes: 16 * 1024 * 1024,
            publish_timeout: Duration::from_millis(200),
            breaker: BreakerConfig::INGEST,
        }
    }

    fn committed(
        batch_seq: u64,
        tenants: &[(&str, i64, i64, u64)],
        truncated: bool,
    ) -> CommittedBatch {
        let mut summary = BatchSummary::default();
        for (tenant, from, to, count) in tenants {
            summary.add(
                tenant,
                TenantRange {
                    from: chrono::DateTime::from_timestamp(*from, 0).unwrap(),
                    to: chrono::DateTime::from_timestamp(*to, 0).unwrap(),
                    count: *count,
                },
            );
        }
        summary.truncated = truncated;
        CommittedBatch {
            publisher: Uuid::from_u128(0x6f1c0f7e_1b7a_4c39_9a38_3f9d8d0f4a51),
            batch_seq,
            num_rows: summary.num_rows(),
            summary,
            digest: [0xab; 32],
        }
    }

    #[test]
    fn a_committed_batch_message_carries_the_epoch_sequence_and_ranges_per_tenant() {
        let mut resources = Resources::default();
        assert!(resources.insert("order", "42"));
        assert!(
            !resources.insert("order", "42"),
            "a repeat is not recorded twice"
        );
        let message = Invalidation::committed(
            &committed(
                17,
                &[
                    ("globex", 1_700_000_000, 1_700_000_000, 1),
                    ("acme", 1_700_000_000, 1_700_000_060, 2),
                ],
                false,
            ),
            &resources,
        );

        assert_eq!(
            message.to_json().expect("encodes"),
            r#"{"version":2,"publisher":"6f1c0f7e-1b7a-4c39-9a38-3f9d8d0f4a51","batch_seq":17,"count":3,"tenants":["acme","globex"],"ranges":{"acme":{"from":"2023-11-14T22:13:20.000000Z","to":"2023-11-14T22:14:20.000000Z","count":2},"globex":{"from":"2023-11-14T22:13:20.000000Z","to":"2023-11-14T22:13:20.000000Z","count":1}},"resources":[{"type":"order","id":"42"}],"truncated":false,"head":"abababababababababababababababababababababababababababababababab"}"#
        );
    }

    #[test]
    fn a_summary_truncated_upstream_marks_the_message_truncated() {
        let message = Invalidation::committed(
            &committed(3, &[("acme", 0, 0, 1)], true),
            &Resources::default(),
        );
        let json: serde_json::Value =
            serde_json::from_str(&message.to_json().expect("encodes")).expect("valid json");
        assert_eq!(json["truncated"], serde_json::json!(true));
    }

    #[test]
    fn a_message_too_big_for_its_byte_cap_is_cut_and_marked_truncated() {
        let mut invalidation = Invalidation::new(9);
        // 500 resources of 2 KB each: a megabyte before the cap.
        let long_id = "x".repeat(2000);
        for index in 0..500 {
            invalidation.add("acme", "order", &format!("{index:04}{long_id}"));
        }
        let encoded = invalidation.to_json().expect("encodes");
        assert!(encoded.len() <= MAX_MESSAGE_BYTES, "{}", encoded.len());
        let json: serde_json::Value = serde_json::from_str(&encoded).expect("valid json");
        assert_eq!(json["truncated"], serde_json::json!(true));
        assert_eq!(json["tenants"], serde_json::json!(["acme"]));
        assert!(!json["resources"].as_array().unwrap().is_empty());
    }

    #[test]
    fn tenants_beyond_the_cap_are_cut_and_marked_truncated() {
        let mut invalidation = Invalidation::new(4);
        for index in 0..=MAX_TENANTS_PER_SUMMARY {
            invalidation.add(&format!("tenant-{index:05}"), "order", "1");
        }
        let json: serde_json::Value =
            serde_json::from_str(&invalidation.to_json().expect("encodes")).expect("valid json");
        assert_eq!(
            json["tenants"].as_array().map(Vec::len),
            Some(MAX_TENANTS_PER_SUMMARY)
        );
        assert_eq!(json["truncated"], serde_json::json!(true));
    }

    #[test]
    fn the_queue_never_holds_more_bytes_than_its_bound_and_counts_what_it_drops() {
        // High-cardinality notices (~100 KB each) with the worker never running (Redis down):
        // the count bound alone (1024) would hold ~100 MB.
        let config = NotifyConfig {
            queue_bytes: 1024 * 1024,
            ..test_config(1024)
        };
        let (notifier, _worker) =
            NotifyWorker::new(config, CancellationToken::new()).expect("valid config");
        for batch_seq in 0..200 {
            let mut invalidation = Invalidation::new(batch_seq);
            for index in 0..MAX_RESOURCES_PER_MESSAGE {
                invalidation.add("acme", "order", &format!("{batch_seq}-{index:060}"));
            }
            notifier.publish(invalidation);
        }
        let stats = notifier.stats();
        assert!(stats.peak_queued_bytes() <= 1024 * 1024);
        assert!(stats.queued_bytes() > 512 * 1024, "the bound is used");
        assert!(stats.dropped() >= 180, "{} dropped", stats.dropped());
        assert_eq!(stats.published(), 0);
    }

    #[test]
    fn a_queue_byte_bound_below_the_largest_message_is_rejected() {
        let config = NotifyConfig {
            queue_bytes: 1000,
            ..test_config(8)
        };
        assert!(matches!(
            config.validate(),
            Err(NotifyError::InvalidConfig {
                field: "queue_bytes",
                ..
            })
        ));
    }

    #[test]
    fn message_lists_tenants_and_resources_sorted_and_deduplicated() {
        let mut invalidation = Invalidation::new(17);
        invalidation
            .add("globex", "user", "7")
            .add("acme", "order", "42")
            .add("acme", "order", "42");

        assert_eq!(invalidation.count, 3);
        assert_eq!(
            invalidation.to_json().expect("encodes"),
            r#"{"version":2,"publisher":"00000000-0000-0000-0000-000000000000","batch_seq":17,"count":3,"tenants":["acme","globex"],"ranges":{},"resources":[{"type":"order","id":"42"},{"type":"user","id":"7"}],"truncated":false}"#
        );
    }

    #[test]
    fn empty_invalidation_encodes_empty_arrays() {
        let invalidation = Invalidation::new(0);

        assert!(invalidation.is_empty());
        assert_eq!(
            invalidation.to_json().expect("encodes"),
            r#"{"version":2,"publisher":"00000000-0000-0000-0000-000000000000","batch_seq":0,"count":0,"tenants":[],"ranges":{},"resources":[],"truncated":false}"#
        );
    }

    #[test]
    fn resources_are_capped_and_marked_truncated_beyond_the_limit() {
        let mut invalidation = Invalidation::new(5);
        for index in 0..=MAX_RESOURCES_PER_MESSAGE {
            let tenant = format!("tenant-{}", index % 3);
            invalidation.add(&tenant, "order", &format!("{index:05}"));
        }

        let message: serde_json::Value =
            serde_json::from_str(&invalidation.to_json().expect("encodes")).expect("valid json");
        let resources = message["resources"].as_array().expect("resources array");
        assert_eq!(resources.len(), MAX_RESOURCES_PER_MESSAGE);
        assert_eq!(
            resources[0],
            serde_json::json!({"type": "order", "id": "00000"})
        );
        assert_eq!(
            resources[MAX_RESOURCES_PER_MESSAGE - 1],
            serde_json::json!({"type": "order", "id": "00999"})
        );
        assert_eq!(message["truncated"], serde_json::json!(true));
        assert_eq!(message["count"], serde_json::json!(1001));
        assert_eq!(
            message["tenants"],
            serde_json::json!(["tenant-0", "tenant-1", "tenant-2"])
        );
    }

    #[test]
    fn resources_are_distinct_ordered_by_type_then_id_and_copied_on_write() {
        let mut resources = Resources::default();
        for (resource_type, id) in [
            ("user", "7"),
            ("order", "42"),
            ("order", "5"),
            ("order", "42"),
        ] {
            resources.insert(resource_type, id);
        }
        assert_eq!(resources.len(), 3);
        assert_eq!(
            resources.first_sorted(usize::MAX),
            [("order", "42"), ("order", "5"), ("user", "7")]
        );
        assert_eq!(resources.first_sorted(2), [("order", "42"), ("order", "5")]);
        let shared = resources.clone();
        resources.insert("order", "6");
        assert_eq!(
            (shared.len(), resources.len()),
            (3, 4),
            "a clone keeps its own set"
        );
        assert!(!shared
            .first_sorted(usize::MAX)
            .iter()
            .any(|(_, id)| *id == "6"));
    }

    #[test]
    fn resources_split_between_type_and_id_differently_are_different_and_clear_spares_a_sharer() {
        let mut resources = Resources::default();
        assert!(resources.insert("ab", "c"));
        assert!(resources.insert("a", "bc"), "same bytes, another pair");
        assert!(resources.insert("", "abc"));
        assert!(!resources.insert("a", "bc"));
        for index in 0..10_000 {
            // Enough to make the table grow and rehash every pair from the shared text.
            resources.insert("order", &index.to_string());
        }
        assert_eq!(resources.len(), 10_003);
        assert!(!resources.insert("order", "9999"));
        assert_eq!(
            resources.first_sorted(3),
            [("", "abc"), ("a", "bc"), ("ab", "c")]
        );
        let published = resources.clone();
        resources.clear();
        assert!(resources.is_empty() && resources.first_sorted(10).is_empty());
        assert_eq!(published.len(), 10_003, "a message keeps what it shares");
        let mut alone = published.clone();
        drop(published);
        alone.clear();
        assert!(alone.is_empty() && alone.insert("order", "1"));
        assert_eq!(alone.first_sorted(10), [("order", "1")]);
    }

    #[test]
    fn resources_exactly_at_the_limit_are_not_truncated() {
        let mut invalidation = Invalidation::new(6);
        for index in 0..MAX_RESOURCES_PER_MESSAGE {
            invalidation.add("acme", "order", &index.to_string());
        }

        let message: serde_json::Value =
            serde_json::from_str(&invalidation.to_json().expect("encodes")).expect("valid json");
        assert_eq!(
            message["resources"].as_array().map(Vec::len),
            Some(MAX_RESOURCES_PER_MESSAGE)
        );
        assert_eq!(message["truncated"], serde_json::json!(false));
    }

    #[test]
    fn publish_on_a_full_queue_drops_and_counts_without_blocking() {
        // The worker is never run, so nothing drains the queue.
        let (notifier, _worker) =
            NotifyWorker::new(test_config(2), CancellationToken::new()).expect("valid config");

        let started = std::time::Instant::now();
        for batch_seq in 0..10_000 {
            notifier.publish(Invalidation::new(batch_seq));
        }

        assert!(started.elapsed() < Duration::from_secs(5));
        let stats = notifier.stats();
        assert_eq!(stats.dropped(), 10_000 - 2);
        assert_eq!(stats.published(), 0);
        assert_eq!(stats.failed(), 0);
    }

    #[test]
    fn publish_after_the_worker_is_gone_is_counted_as_dropped() {
        let (notifier, worker) =
            NotifyWorker::new(test_config(8), CancellationToken::new()).expect("valid config");
        drop(worker);

        notifier.publish(Invalidation::new(1));

        assert_eq!(notifier.stats().dropped(), 1);
    }

    #[tokio::test]
    async fn spawn_with_an_invalid_config_disables_notices_instead_of_failing() {
        let config = NotifyConfig {
            redis_url: "not a url".to_owned(),
            redis_ca_file: None,
            ..test_config(8)
        };
        assert!(config.validate().is_err());

        let (notifier, worker) = spawn(config, CancellationToken::new());
        notifier.publish(Invalidation::new(1));

        assert_eq!(notifier.stats().dropped(), 1);
        worker.await.expect("finished task");
    }

    #[test]
    fn valid_config_passes_validation() {
        assert!(test_config(8).validate().is_ok());
    }

    #[test]
    fn zero_queue_capacity_is_rejected() {
        let result = NotifyWorker::new(test_config(0), CancellationToken::new());

        assert!(matches!(
            result,
            Err(NotifyError::InvalidConfig {
                field: "queue_capacity",
                ..
            })
        ));
    }

    #[test]
    fn zero_publish_timeout_is_rejected() {
        let config = NotifyConfig {
            publish_timeout: Duration::ZERO,
            ..test_config(8)
        };

        let result = NotifyWorker::new(config, CancellationToken::new());

        assert!(matches!(
            result,
            Err(NotifyError::InvalidConfig {
                field: "publish_timeout",
                ..
            })
        ));
    }

    #[test]
    fn malformed_redis_url_is_rejected() {
        let config = NotifyConfig {
            redis_url: "not a url".to_owned(),
            redis_ca_file: None,
            ..test_config(8)
        };

        let result = NotifyWorker::new(config, CancellationToken::new());

        assert!(matches!(result, Err(NotifyError::InvalidRedisUrl(_))));
    }

    #[test]
    fn config_debug_hides_redis_credentials() {
        let config = NotifyConfig {
            redis_url: "rediss://auditflow:s3cret@cache.internal:6380/2".to_owned(),
            redis_ca_file: None,
            ..test_config(8)
        };

        let printed = format!("{config:?}");

        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(
            printed.contains("rediss://<redacted>@cache.internal:6380/2"),
            "{printed}"
        );
    }

    #[test]
    fn url_redaction_hides_query_passwords_and_keeps_plain_urls() {
        assert_eq!(
            redact_url_credentials("redis+unix:///run/redis.sock?db=1&pass=s3cret"),
            "redis+unix:///run/redis.sock?<redacted>"
        );
        assert_eq!(
            redact_url_credentials("redis://redis:6379"),
            "redis://redis:6379"
        );
        assert_eq!(redact_url_credentials("s3cret@host"), "<redacted>");
    }

    #[test]
    fn reconnect_delays_grow_from_the_floor_and_never_exceed_the_ceiling() {
        let delays: Vec<Duration> = reconnect_backoff().build().take(50).collect();

        assert_eq!(delays.len(), 50, "the schedule never gives up");
        assert!(delays[0] >= RECONNECT_MIN_DELAY && delays[0] < RECONNECT_MIN_DELAY * 2);
        assert!(delays.iter().all(|delay| *delay <= RECONNECT_MAX_DELAY));
        assert!(delays[49] >= RECONNECT_MAX_DELAY / 2);
    }
}
