//! The result caches: L1 in process (moka, bounded by bytes through a weigher, with a TTL), L2
//! in Redis (optional, skipped while its breaker is open), coalesced misses, and the
//! invalidation log that decides whether a cached result may still be served.
//!
//! Every cached result carries its *scope* (tenant, `[from, to)`) and when its load started:
//! the log's generation for L1, the wall clock for L2 (shared between instances). Every
//! invalidation, flush and missed batch is appended to the [`InvalidationLog`]; a result is
//! served only if nothing appended since its load started overlaps its scope. This one rule
//! closes the stale-load race (a load that started before an invalidation of its key is not
//! installed, and would be refused on read if it were), makes flushes cheap, and judges L2
//! entries written by other instances.
//!
//! The cache is *trusted* only while the invalidation subscriber is connected and the last
//! reconciliation is recent ([`QueryCache::set_connected`], [`QueryCache::reconciled`]);
//! otherwise every request goes to the database (still coalesced, never installed).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use futures::future::{BoxFuture, FutureExt as _, Shared};
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::error::ApiError;
use super::metrics as m;
use crate::breaker::Breaker;

/// Allowance for clock differences between serve instances when judging an L2 entry written
/// elsewhere: an invalidation received up to this long *before* the entry's load started still
/// counts against it.
pub const CLOCK_SKEW_MS: i64 = 2_000;

/// Bounds each L2 (Redis) call; past it the call counts as a failure of the breaker.
const L2_TIMEOUT: Duration = Duration::from_millis(250);

/// Entries the log keeps at most; older ones are forgotten and anything loaded before them is
/// treated as stale.
const LOG_MAX_ENTRIES: usize = 200_000;

/// What a cached result covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The tenant.
    pub tenant: String,
    /// Inclusive start.
    pub from: DateTime<Utc>,
    /// Exclusive end.
    pub to: DateTime<Utc>,
}

/// The inclusive `occurred_at` range a batch stored for one tenant.
pub type StoredRange = (DateTime<Utc>, DateTime<Utc>);

/// What one invalidation may have changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Affects {
    /// Anything (a gap, a lost connection, a truncated message).
    All,
    /// These tenants; per tenant the inclusive `occurred_at` range stored, or `None` for the
    /// whole tenant (a version 1 message).
    Tenants(HashMap<String, Option<StoredRange>>),
}

impl Affects {
    /// Tells whether a result of `scope` may have changed.
    pub fn overlaps(&self, scope: &Scope) -> bool {
        match self {
            Affects::All => true,
            Affects::Tenants(tenants) => match tenants.get(&scope.tenant) {
                None => false,
                Some(None) => true,
                Some(Some((from, to))) => *from < scope.to && *to >= scope.from,
            },
        }
    }
}

#[derive(Debug)]
struct LogEntry {
    generation: u64,
    at_ms: i64,
    affects: Affects,
}

/// The invalidations of the recent past, in arrival order.
#[derive(Debug)]
pub struct InvalidationLog {
    entries: VecDeque<LogEntry>,
    next_generation: u64,
    /// Loads that started before this generation cannot be judged (entries were forgotten).
    floor_generation: u64,
    /// Loads that started before this time cannot be judged.
    floor_ms: i64,
    last_ms: i64,
    retain_ms: i64,
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

impl InvalidationLog {
    /// An empty log that remembers entries for `retain` (at least the cache TTL plus the clock
    /// skew allowance). Nothing loaded before now can be judged.
    pub fn new(retain: Duration) -> Self {
        let now = now_ms();
        InvalidationLog {
            entries: VecDeque::new(),
            next_generation: 0,
            floor_generation: 0,
            floor_ms: now,
            last_ms: now,
            retain_ms: i64::try_from(retain.as_millis()).unwrap_or(i64::MAX),
        }
    }

    /// The generation the next entry will get: a load that starts now records it.
    pub fn next_generation(&self) -> u64 {
        self.next_generation
    }

    /// Appends an invalidation received now; returns its generation.
    pub fn push(&mut self, affects: Affects) -> u64 {
        let generation = self.next_generation;
        self.next_generation += 1;
        // Never backwards, so entries stay sorted by time even if the clock steps back.
        let at_ms = now_ms().max(self.last_ms);
        self.last_ms = at_ms;
        self.entries.push_back(LogEntry {
            generation,
            at_ms,
            affects,
        });
        self.prune(at_ms);
        generation
    }

    fn prune(&mut self, now: i64) {
        while let Some(front) = self.entries.front() {
            let too_old = front.at_ms < now.saturating_sub(self.retain_ms);
            if !too_old && self.entries.len() <= LOG_MAX_ENTRIES {
                break;
            }
            self.floor_generation = front.generation + 1;
            self.floor_ms = front.at_ms + 1;
            self.entries.pop_front();
        }
    }

    /// Tells whether anything appended at or after `generation` overlaps `scope`.
    pub fn stale_since_generation(&self, generation: u64, scope: &Scope) -> bool {
        if generation < self.floor_generation {
            return true;
        }
        let start = self.entries.partition_point(|e| e.generation < generation);
        self.entries
            .range(start..)
            .any(|entry| entry.affects.overlaps(scope))
    }

    /// Tells whether anything received at or after `at_ms` overlaps `scope`.
    pub fn stale_since_ms(&self, at_ms: i64, scope: &Scope) -> bool {
        if at_ms < self.floor_ms {
            return true;
        }
        let start = self.entries.partition_point(|e| e.at_ms < at_ms);
        self.entries
            .range(start..)
            .any(|entry| entry.affects.overlaps(scope))
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A cached result.
#[derive(Debug)]
struct Cached {
    body: Bytes,
    scope: Scope,
    /// The log generation when its load started.
    loaded_generation: u64,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The in-process cache.
    L1,
    /// Redis.
    L2,
    /// The database, result cached.
    Db,
    /// The database, cache not trusted (nothing read from or written to it).
    Bypass,
}

impl Source {
    /// The label used in metrics and the `X-Auditflow-Cache` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::L1 => "l1",
            Source::L2 => "l2",
            Source::Db => "miss",
            Source::Bypass => "bypass",
        }
    }
}

type SharedLoad = Shared<BoxFuture<'static, Result<Bytes, ApiError>>>;

struct Flight {
    id: u64,
    started_generation: u64,
    scope: Scope,
    result: SharedLoad,
}

/// Settings of [`QueryCache`].
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// L1 bound in weighed bytes.
    pub max_bytes: u64,
    /// Time to live in L1 and L2.
    pub ttl: Duration,
    /// Reconciliation interval: the cache is trusted while the last one is younger than three.
    pub reconcile_interval: Duration,
}

/// L1, L2, coalescing and the invalidation log.
pub struct QueryCache {
    l1: moka::future::Cache<String, Arc<Cached>>,
    l2: Option<L2>,
    log: Mutex<InvalidationLog>,
    flights: Mutex<HashMap<String, Flight>>,
    next_flight: AtomicU64,
    connected: AtomicBool,
    reconciled_at_ms: AtomicI64,
    trust_window_ms: i64,
    num_flushes: AtomicU64,
}

impl QueryCache {
    /// Builds the caches; `l2` is the Redis level, if enabled.
    pub fn new(settings: &CacheSettings, l2: Option<L2>) -> Self {
        let l1 = moka::future::Cache::builder()
            .max_capacity(settings.max_bytes)
            .weigher(|key: &String, value: &Arc<Cached>| {
                // Key, body, and a fixed allowance for the entry's own bookkeeping.
                u32::try_from(key.len() + value.body.len() + value.scope.tenant.len() + 256)
                    .unwrap_or(u32::MAX)
            })
            .time_to_live(settings.ttl)
            .eviction_listener(|_key, _value, cause| {
                let cause = match cause {
                    moka::notification::RemovalCause::Expired => "expired",
                    moka::notification::RemovalCause::Explicit => "explicit",
                    moka::notification::RemovalCause::Replaced => "replaced",
                    moka::notification::RemovalCause::Size => "size",
                };
                metrics::counter!(m::CACHE_EVICTIONS, "cause" => cause).increment(1);
            })
            .build();
        let reconcile_ms =
            i64::try_from(settings.reconcile_interval.as_millis()).unwrap_or(i64::MAX);
        let retain =
            settings.ttl + Duration::from_millis(CLOCK_SKEW_MS as u64) + Duration::from_secs(60);
        QueryCache {
            l1,
            l2,
            log: Mutex::new(InvalidationLog::new(retain)),
            flights: Mutex::new(HashMap::new()),
            next_flight: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            reconciled_at_ms: AtomicI64::new(i64::MIN / 2),
            trust_window_ms: reconcile_ms.saturating_mul(3),
            num_flushes: AtomicU64::new(0),
        }
    }

    /// True while results may be served from and written to the caches.
    pub fn trusted(&self) -> bool {
        self.connected.load(Ordering::Acquire)
            && now_ms() - self.reconciled_at_ms.load(Ordering::Acquire) <= self.trust_window_ms
    }

    /// The subscriber reports its connection (after a reconnect it first flushes).
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
    }

    /// The subscriber reports a successful reconciliation.
    pub fn reconciled(&self) {
        self.reconciled_at_ms.store(now_ms(), Ordering::Release);
    }

    /// Records an invalidation: results it overlaps are no longer served.
    pub fn invalidate(&self, affects: Affects) {
        self.log.lock().push(affects);
    }

    /// Records a flush: nothing cached or loading now is served afterwards.
    pub fn flush_all(&self, reason: &'static str) {
        self.log.lock().push(Affects::All);
        self.l1.invalidate_all();
        self.num_flushes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::FLUSHES, "reason" => reason).increment(1);
        tracing::info!(reason, "serve cache flushed");
    }

    /// Entries appended to the invalidation log so far (invalidations, flushes, missed batches).
    pub fn log_generation(&self) -> u64 {
        self.log.lock().next_generation()
    }

    /// Flushes so far.
    pub fn num_flushes(&self) -> u64 {
        self.num_flushes.load(Ordering::Relaxed)
    }

    /// Runs moka's pending maintenance (evictions, size accounting) and exports the weighed
    /// size; the serve housekeeping task calls it every second.
    pub async fn maintain(&self) {
        self.l1.run_pending_tasks().await;
        metrics::gauge!(m::CACHE_BYTES).set(self.l1.weighted_size() as f64);
    }

    /// Weighed bytes in L1.
    pub fn weighted_size(&self) -> u64 {
        self.l1.weighted_size()
    }

    /// Answers `key` from L1, L2, or by running `load` once however many callers ask at the
    /// same time. A load's result is cached only if nothing that overlaps `scope` was
    /// invalidated since it started, and only while the cache is trusted.
    pub async fn get_or_load<F, Fut>(
        self: &Arc<Self>,
        key: String,
        scope: Scope,
        load: F,
    ) -> Result<(Bytes, Source), ApiError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Bytes, ApiError>> + Send + 'static,
    {
        let trusted = self.trusted();
        if trusted {
            if let Some(body) = self.lookup_l1(&key, &scope).await {
                return Ok((body, Source::L1));
            }
            if let Some(body) = self.lookup_l2(&key, &scope).await {
                return Ok((body, Source::L2));
            }
        } else {
            metrics::counter!(m::CACHE_BYPASSED).increment(1);
        }
        let shared = self.join_or_start(key, scope, load);
        let body = shared.await?;
        Ok((body, if trusted { Source::Db } else { Source::Bypass }))
    }

    async fn lookup_l1(&self, key: &str, scope: &Scope) -> Option<Bytes> {
        let Some(entry) = self.l1.get(key).await else {
            metrics::counter!(m::CACHE_MISSES, "level" => "l1").increment(1);
            return None;
        };
        let stale = self
            .log
            .lock()
            .stale_since_generation(entry.loaded_generation, scope);
        if stale {
            self.l1.invalidate(key).await;
            metrics::counter!(m::CACHE_STALE).increment(1);
            metrics::counter!(m::CACHE_MISSES, "level" => "l1").increment(1);
            return None;
        }
        metrics::counter!(m::CACHE_HITS, "level" => "l1").increment(1);
        Some(entry.body.clone())
    }

    async fn lookup_l2(&self, key: &str, scope: &Scope) -> Option<Bytes> {
        let l2 = self.l2.as_ref()?;
        let generation = self.log.lock().next_generation();
        let Some((loaded_at_ms, body)) = l2.get(key).await else {
            metrics::counter!(m::CACHE_MISSES, "level" => "l2").increment(1);
            return None;
        };
        let stale = self
            .log
            .lock()
            .stale_since_ms(loaded_at_ms - CLOCK_SKEW_MS, scope);
        if stale {
            metrics::counter!(m::CACHE_STALE).increment(1);
            metrics::counter!(m::CACHE_MISSES, "level" => "l2").increment(1);
            return None;
        }
        metrics::counter!(m::CACHE_HITS, "level" => "l2").increment(1);
        let cached = Arc::new(Cached {
            body: body.clone(),
            scope: scope.clone(),
            loaded_generation: generation,
        });
        self.l1.insert(key.to_owned(), cached).await;
        Some(body)
    }

    fn join_or_start<F, Fut>(self: &Arc<Self>, key: String, scope: Scope, load: F) -> SharedLoad
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Bytes, ApiError>> + Send + 'static,
    {
        let mut flights = self.flights.lock();
        if let Some(flight) = flights.get(&key) {
            // Join only a load that no invalidation overlapped since it started: a late joiner
            // must not get a result older than an invalidation it could have seen.
            let stale = self
                .log
                .lock()
                .stale_since_generation(flight.started_generation, &flight.scope);
            if !stale {
                return flight.result.clone();
            }
        }
        let started_generation = self.log.lock().next_generation();
        let started_at_ms = now_ms();
        let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
        let cache = Arc::clone(self);
        let task_key = key.clone();
        let task_scope = scope.clone();
        // Spawned, so a caller that goes away does not cancel the load for the others.
        let task = tokio::spawn(async move {
            let result = load().await;
            cache
                .finish(
                    id,
                    task_key,
                    task_scope,
                    started_generation,
                    started_at_ms,
                    &result,
                )
                .await;
            result
        });
        let result: SharedLoad = async move {
            match task.await {
                Ok(result) => result,
                Err(_) => Err(ApiError::internal()),
            }
        }
        .boxed()
        .shared();
        flights.insert(
            key,
            Flight {
                id,
                started_generation,
                scope,
                result: result.clone(),
            },
        );
        result
    }

    /// Ends a load: forgets the flight and installs the result if it is still current.
    async fn finish(
        self: &Arc<Self>,
        id: u64,
        key: String,
        scope: Scope,
        started_generation: u64,
        started_at_ms: i64,
        result: &Result<Bytes, ApiError>,
    ) {
        {
            let mut flights = self.flights.lock();
            if flights.get(&key).is_some_and(|flight| flight.id == id) {
                flights.remove(&key);
            }
        }
        let Ok(body) = result else { return };
        if !self.trusted() {
            return;
        }
        let stale = self
            .log
            .lock()
            .stale_since_generation(started_generation, &scope);
        if stale {
            metrics::counter!(m::CACHE_STALE).increment(1);
            return;
        }
        self.l1
            .insert(
                key.clone(),
                Arc::new(Cached {
                    body: body.clone(),
                    scope,
                    loaded_generation: started_generation,
                }),
            )
            .await;
        if self.l2.is_some() {
            let cache = Arc::clone(self);
            let body = body.clone();
            tokio::spawn(async move {
                if let Some(l2) = &cache.l2 {
                    l2.set(&key, started_at_ms, &body).await;
                }
            });
        }
    }
}

/// The Redis level: `GET`/`SET PX` of `<8-byte load start, ms><body>` under a per-schema prefix.
pub struct L2 {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    breaker: Arc<Breaker>,
    prefix: String,
    ttl_ms: u64,
}

impl L2 {
    /// The Redis level for `schema`'s results.
    pub fn new(client: redis::Client, breaker: Arc<Breaker>, schema: &str, ttl: Duration) -> Self {
        L2 {
            client,
            connection: tokio::sync::Mutex::new(None),
            breaker,
            prefix: format!("auditflow:serve:v1:{schema}:"),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1),
        }
    }

    /// The breaker in front of it.
    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }

    /// A connection, connecting if needed; `None` while another call is connecting or the
    /// connection fails (then the breaker hears of it).
    async fn connection(&self) -> Option<ConnectionManager> {
        let mut slot = self.connection.try_lock().ok()?;
        if let Some(connection) = slot.as_ref() {
            return Some(connection.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(L2_TIMEOUT)
            .set_response_timeout(L2_TIMEOUT);
        let connect = ConnectionManager::new_with_config(self.client.clone(), config);
        match tokio::time::timeout(L2_TIMEOUT * 2, connect).await {
            Ok(Ok(connection)) => {
                *slot = Some(connection.clone());
                Some(connection)
            }
            _ => None,
        }
    }

    async fn forget_connection(&self) {
        if let Ok(mut slot) = self.connection.try_lock() {
            *slot = None;
        }
    }

    /// The entry of `key`: when its load started (ms) and its body.
    pub async fn get(&self, key: &str) -> Option<(i64, Bytes)> {
        let permit = self.breaker.try_acquire()?;
        let Some(mut connection) = self.connection().await else {
            self.breaker.record(permit, true);
            return None;
        };
        let mut command = redis::cmd("GET");
        command.arg(format!("{}{key}", self.prefix));
        let result = tokio::time::timeout(
            L2_TIMEOUT,
            command.query_async::<Option<Vec<u8>>>(&mut connection),
        )
        .await;
        let failed = !matches!(result, Ok(Ok(_)));
        self.breaker.record(permit, failed);
        if failed {
            self.forget_connection().await;
        }
        let value = result.ok()?.ok()??;
        if value.len() < 8 {
            return None;
        }
        let loaded_at_ms = i64::from_be_bytes(value[..8].try_into().ok()?);
        Some((loaded_at_ms, Bytes::copy_from_slice(&value[8..])))
    }

    /// Stores `body` for `key`, loaded at `loaded_at_ms`, with the TTL.
    pub async fn set(&self, key: &str, loaded_at_ms: i64, body: &[u8]) {
        let Some(permit) = self.breaker.try_acquire() else {
            return;
        };
        let Some(mut connection) = self.connection().await else {
            self.breaker.record(permit, true);
            return;
        };
        let mut value = Vec::with_capacity(8 + body.len());
        value.extend_from_slice(&loaded_at_ms.to_be_bytes());
        value.extend_from_slice(body);
        let mut command = redis::cmd("SET");
        command
            .arg(format!("{}{key}", self.prefix))
            .arg(value)
            .arg("PX")
            .arg(self.ttl_ms);
        let result =
            tokio::time::timeout(L2_TIMEOUT, command.query_async::<()>(&mut connection)).await;
        let failed = !matches!(result, Ok(Ok(())));
        self.breaker.record(permit, failed);
        if failed {
            self.forget_connection().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(tenant: &str, from: i64, to: i64) -> Scope {
        Scope {
            tenant: tenant.into(),
            from: DateTime::from_timestamp(from, 0).unwrap(),
            to: DateTime::from_timestamp(to, 0).unwrap(),
        }
    }

    fn range(tenant: &str, from: i64, to: i64) -> Affects {
        Affects::Tenants(HashMap::from([(
            tenant.to_owned(),
            Some((
                DateTime::from_timestamp(from, 0).unwrap(),
                DateTime::from_timestamp(to, 0).unwrap(),
            )),
        )]))
    }

    #[test]
    fn an_invalidation_overlaps_only_its_tenant_and_time_range() {
        let cached = scope("acme", 100, 200);
        assert!(range("acme", 150, 150).overlaps(&cached));
        assert!(range("acme", 50, 100).overlaps(&cached), "to is inclusive");
        assert!(
            !range("acme", 200, 300).overlaps(&cached),
            "the scope's end is exclusive"
        );
        assert!(!range("acme", 10, 99).overlaps(&cached));
        assert!(!range("globex", 150, 150).overlaps(&cached));
        assert!(Affects::All.overlaps(&cached));
        let whole_tenant = Affects::Tenants(HashMap::from([("acme".to_owned(), None)]));
        assert!(whole_tenant.overlaps(&cached));
    }

    fn trusted_cache() -> Arc<QueryCache> {
        let cache = Arc::new(QueryCache::new(
            &CacheSettings {
                max_bytes: 1024 * 1024,
                ttl: Duration::from_secs(60),
                reconcile_interval: Duration::from_secs(60),
            },
            None,
        ));
        cache.set_connected(true);
        cache.reconciled();
        cache
    }

    /// A load that waits for `release`, counting its runs.
    fn gated_load(
        runs: &Arc<AtomicU64>,
        release: &Arc<tokio::sync::Notify>,
    ) -> impl FnOnce() -> BoxFuture<'static, Result<Bytes, ApiError>> + Send + 'static {
        let runs = Arc::clone(runs);
        let release = Arc::clone(release);
        move || {
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                release.notified().await;
                Ok(Bytes::from_static(b"rows"))
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn a_load_that_started_before_an_invalidation_of_its_key_is_not_installed() {
        let cache = trusted_cache();
        let runs = Arc::new(AtomicU64::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let cached = scope("acme", 100, 200);
        let first = tokio::spawn({
            let cache = Arc::clone(&cache);
            let load = gated_load(&runs, &release);
            let cached = cached.clone();
            async move { cache.get_or_load("k".into(), cached, load).await }
        });
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // The batch commits (and is announced) while the load is reading.
        cache.invalidate(range("acme", 150, 150));
        release.notify_one();
        let (_, source) = first.await.unwrap().unwrap();
        assert_eq!(source, Source::Db, "the caller still gets its answer");
        // Not installed: the next request loads again instead of serving the stale result.
        let again = tokio::spawn({
            let cache = Arc::clone(&cache);
            let load = gated_load(&runs, &release);
            async move { cache.get_or_load("k".into(), cached, load).await }
        });
        while runs.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        release.notify_one();
        assert_eq!(again.await.unwrap().unwrap().1, Source::Db);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_load_overlapped_by_nothing_is_installed_and_a_late_joiner_never_gets_a_stale_flight()
    {
        let cache = trusted_cache();
        let runs = Arc::new(AtomicU64::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let cached = scope("acme", 100, 200);
        let first = tokio::spawn({
            let cache = Arc::clone(&cache);
            let load = gated_load(&runs, &release);
            let cached = cached.clone();
            async move { cache.get_or_load("k".into(), cached, load).await }
        });
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // Another tenant's batch: irrelevant to this load.
        cache.invalidate(range("globex", 150, 150));
        release.notify_one();
        assert_eq!(first.await.unwrap().unwrap().1, Source::Db);
        let (_, source) = cache
            .get_or_load("k".into(), cached.clone(), || async {
                Err::<Bytes, _>(ApiError::internal())
            })
            .await
            .unwrap();
        assert_eq!(source, Source::L1);

        // A flight overlapped by an invalidation is not joined: the late caller starts its own.
        let slow = tokio::spawn({
            let cache = Arc::clone(&cache);
            let load = gated_load(&runs, &release);
            let cached = cached.clone();
            async move { cache.get_or_load("other".into(), cached, load).await }
        });
        while runs.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        cache.invalidate(range("acme", 120, 130));
        let late = tokio::spawn({
            let cache = Arc::clone(&cache);
            let load = gated_load(&runs, &release);
            async move { cache.get_or_load("other".into(), cached, load).await }
        });
        while runs.load(Ordering::SeqCst) < 3 {
            tokio::task::yield_now().await;
        }
        release.notify_waiters();
        slow.await.unwrap().unwrap();
        late.await.unwrap().unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_hundred_concurrent_identical_misses_run_one_load() {
        let cache = trusted_cache();
        let runs = Arc::new(AtomicU64::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let callers: Vec<_> = (0..200)
            .map(|_| {
                let cache = Arc::clone(&cache);
                let load = gated_load(&runs, &release);
                tokio::spawn(async move {
                    cache
                        .get_or_load("k".into(), scope("acme", 100, 200), load)
                        .await
                })
            })
            .collect();
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        release.notify_waiters();
        for caller in callers {
            let (body, _) = caller.await.unwrap().unwrap();
            assert_eq!(&body[..], b"rows");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_untrusted_cache_neither_serves_nor_installs() {
        let cache = trusted_cache();
        cache.set_connected(false);
        for expected_runs in 1..=2 {
            let runs = Arc::new(AtomicU64::new(0));
            let (_, source) = cache
                .get_or_load("k".into(), scope("acme", 0, 10), {
                    let runs = Arc::clone(&runs);
                    move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok(Bytes::from_static(b"x"))
                    }
                })
                .await
                .unwrap();
            assert_eq!(source, Source::Bypass, "round {expected_runs}");
            assert_eq!(runs.load(Ordering::SeqCst), 1);
        }
    }

    #[test]
    fn the_log_judges_loads_by_when_they_started() {
        let mut log = InvalidationLog::new(Duration::from_secs(600));
        let before = log.next_generation();
        log.push(range("acme", 150, 150));
        let after = log.next_generation();
        assert!(log.stale_since_generation(before, &scope("acme", 100, 200)));
        assert!(!log.stale_since_generation(after, &scope("acme", 100, 200)));
        assert!(!log.stale_since_generation(before, &scope("globex", 100, 200)));
        log.push(Affects::All);
        assert!(log.stale_since_generation(after, &scope("globex", 100, 200)));
        // By time: a load from before the log began cannot be judged, so it is stale.
        assert!(log.stale_since_ms(0, &scope("globex", 100, 200)));
        assert!(!log.stale_since_ms(now_ms() + 10_000, &scope("acme", 100, 200)));
    }
}
