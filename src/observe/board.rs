//! The live state of one replica, shared by the sink (writer) and the HTTP server (reader): what
//! `/status.json`, `/readyz` and the counters behind `/metrics` report.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::breaker::{Breaker, State as BreakerState};

/// The breaker that decides readiness: without the database nothing can be stored.
pub const DATABASE_DEPENDENCY: &str = "postgres";

/// The name of store stream N's breaker (N >= 1) starts with this; each decides readiness too.
pub const DATABASE_STREAM_DEPENDENCY_PREFIX: &str = "postgres-stream-";

/// Whether a breaker with this `dependency` guards a store stream's database connection.
pub fn is_database_dependency(dependency: &str) -> bool {
    dependency == DATABASE_DEPENDENCY || dependency.starts_with(DATABASE_STREAM_DEPENDENCY_PREFIX)
}

/// How far back "recent" dead letters reach on the status page (to the minute).
pub const RECENT_DEAD_LETTERS: Duration = Duration::from_secs(15 * 60);

/// The span over which throughput is averaged.
pub const THROUGHPUT_WINDOW: Duration = Duration::from_secs(10);

/// Counter names shared with the sink's documentation and the dashboard.
pub(crate) const CONSUMED_METRIC: &str = "auditflow_events_consumed_total";
pub(crate) const STORED_METRIC: &str = "auditflow_events_stored_total";
pub(crate) const DUPLICATES_METRIC: &str = "auditflow_duplicates_skipped_total";
pub(crate) const DEAD_LETTERED_METRIC: &str = "auditflow_events_dead_lettered_total";
pub(crate) const LAG_METRIC: &str = "auditflow_consumer_lag_messages";
pub(crate) const POOL_METRIC: &str = "auditflow_db_pool_connections";
pub(crate) const REGISTRY_PAUSED_METRIC: &str = "auditflow_schema_registry_paused";

/// Live state of one replica, shared by the sink (writer) and the HTTP server (reader).
///
/// Counters only grow; lag, pool and membership are last-value. Every method is cheap and
/// synchronous: atomics, or a std mutex held for a map update.
#[derive(Debug)]
pub struct StatusBoard {
    instance: String,
    pub(super) started_at: Instant,
    joined: AtomicBool,
    consumed: AtomicU64,
    stored: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
    pool_in_use: AtomicU32,
    pool_idle: AtomicU32,
    /// One per dependency name; registering the same name again replaces it.
    breakers: Mutex<Vec<Arc<Breaker>>>,
    /// Sampled by [`StatusBoard::sample`] when registered.
    pool: Mutex<Option<sqlx::PgPool>>,
    /// topic -> partition -> lag (`None`: unknown to librdkafka yet).
    lags: Mutex<BTreeMap<String, BTreeMap<i32, Option<i64>>>>,
    dead_letters: Mutex<BTreeMap<String, ClassLog>>,
    /// Counter samples, oldest first, no older than [`THROUGHPUT_WINDOW`] (plus the one just
    /// before it, so the window is always spanned once it has passed).
    samples: Mutex<VecDeque<Sample>>,
    /// The schema registry, when Confluent ids are looked up in one.
    schema_registry: Mutex<Option<SchemaRegistryStatus>>,
}

/// Dead letters of one error class.
#[derive(Debug, Default)]
struct ClassLog {
    total: u64,
    last_at: Option<Instant>,
    /// (minute since the board started, count), oldest first, pruned to the recent window.
    per_minute: VecDeque<(u64, u64)>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    consumed: u64,
    stored: u64,
}

impl StatusBoard {
    /// Creates an empty board for the replica named `instance` (shown on the status page).
    pub fn new(instance: impl Into<String>) -> Self {
        let started_at = Instant::now();
        StatusBoard {
            instance: instance.into(),
            started_at,
            joined: AtomicBool::new(false),
            consumed: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            pool_in_use: AtomicU32::new(0),
            pool_idle: AtomicU32::new(0),
            breakers: Mutex::new(Vec::new()),
            pool: Mutex::new(None),
            lags: Mutex::new(BTreeMap::new()),
            dead_letters: Mutex::new(BTreeMap::new()),
            samples: Mutex::new(VecDeque::from([Sample {
                at: started_at,
                consumed: 0,
                stored: 0,
            }])),
            schema_registry: Mutex::new(None),
        }
    }

    /// Records whether the consumer holds a group assignment: true after an assignment, false
    /// after a revoke or when it leaves the group. Part of readiness.
    pub fn set_joined(&self, joined: bool) {
        self.joined.store(joined, Ordering::Relaxed);
    }

    /// Shows `breaker` on the page; the database ones (one per store stream, see
    /// [`is_database_dependency`]) also decide readiness. Its state is read when asked, so later
    /// transitions need no call.
    pub fn register_breaker(&self, breaker: Arc<Breaker>) {
        let mut breakers = self.breakers.lock();
        breakers.retain(|known| known.dependency() != breaker.dependency());
        breakers.push(breaker);
    }

    /// Samples `pool` (connections in use and idle) every [`SAMPLE_EVERY`](super::SAMPLE_EVERY) while the server
    /// runs, instead of [`StatusBoard::set_pool`] calls.
    pub fn register_pool(&self, pool: sqlx::PgPool) {
        *self.pool.lock() = Some(pool);
    }

    /// Adds `n` messages received from Kafka (`auditflow_events_consumed_total`).
    pub fn add_consumed(&self, n: u64) {
        self.consumed.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(CONSUMED_METRIC).increment(n);
    }

    /// Adds `n` rows committed to Postgres (`auditflow_events_stored_total`).
    pub fn add_stored(&self, n: u64) {
        self.stored.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(STORED_METRIC).increment(n);
    }

    /// Adds `n` events skipped as already stored (`auditflow_duplicates_skipped_total`).
    pub fn add_duplicates(&self, n: u64) {
        self.duplicates.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(DUPLICATES_METRIC).increment(n);
    }

    /// Records one record acknowledged by the dead-letter topic with error `class`
    /// (`auditflow_events_dead_lettered_total{class}`).
    pub fn record_dead_letter(&self, class: &str) {
        self.record_dead_letters(class, 1);
    }

    /// Records `n` dead letters of error `class`.
    pub fn record_dead_letters(&self, class: &str, n: u64) {
        if n == 0 {
            return;
        }
        self.record_dead_letters_at(class, n, Instant::now());
        metrics::counter!(DEAD_LETTERED_METRIC, "class" => class.to_owned()).increment(n);
    }

    fn record_dead_letters_at(&self, class: &str, n: u64, now: Instant) {
        self.dead_lettered.fetch_add(n, Ordering::Relaxed);
        let minute = self.minute_of(now);
        let mut classes = self.dead_letters.lock();
        let log = match classes.get_mut(class) {
            Some(log) => log,
            None => classes.entry(class.to_owned()).or_default(),
        };
        log.total += n;
        log.last_at = Some(now);
        match log.per_minute.back_mut() {
            Some((last, count)) if *last == minute => *count += n,
            _ => log.per_minute.push_back((minute, n)),
        }
        prune_minutes(&mut log.per_minute, minute);
    }

    /// Records the lag of one assigned partition: messages between the committed (or consumed)
    /// position and the high watermark (`auditflow_consumer_lag_messages{topic,partition}`).
    /// A negative `lag` (librdkafka's -1) means not known yet: shown as unknown, gauge untouched.
    pub fn set_partition_lag(&self, topic: &str, partition: i32, lag: i64) {
        let lag = (lag >= 0).then_some(lag);
        {
            let mut lags = self.lags.lock();
            let partitions = match lags.get_mut(topic) {
                Some(partitions) => partitions,
                None => lags.entry(topic.to_owned()).or_default(),
            };
            partitions.insert(partition, lag);
        }
        if let Some(lag) = lag {
            metrics::gauge!(LAG_METRIC, "topic" => topic.to_owned(), "partition" => partition.to_string())
                .set(lag as f64);
        }
    }

    /// Forgets a partition this replica no longer owns (after a revoke). Its gauge drops to 0:
    /// the new owner reports the real lag, and a sum over replicas stays right.
    pub fn remove_partition(&self, topic: &str, partition: i32) {
        let removed = {
            let mut lags = self.lags.lock();
            let removed = lags
                .get_mut(topic)
                .and_then(|partitions| partitions.remove(&partition));
            if lags.get(topic).is_some_and(BTreeMap::is_empty) {
                lags.remove(topic);
            }
            removed
        };
        if removed.is_some() {
            metrics::gauge!(LAG_METRIC, "topic" => topic.to_owned(), "partition" => partition.to_string())
                .set(0.0);
        }
    }

    /// Records the schema registry's state and cache (the registry client calls it on every
    /// change and every second). Its state is part of readiness from then on.
    pub fn set_schema_registry(&self, status: SchemaRegistryStatus) {
        *self.schema_registry.lock() = Some(status);
    }

    /// Records whether consumption is paused because of the schema registry (unavailable,
    /// refusing auditflow, or too many records waiting for schemas)
    /// (`auditflow_schema_registry_paused`).
    pub fn set_schema_registry_paused(&self, paused: bool) {
        if let Some(status) = self.schema_registry.lock().as_mut() {
            status.paused = paused;
        }
        metrics::gauge!(REGISTRY_PAUSED_METRIC).set(if paused { 1.0 } else { 0.0 });
    }

    /// The schema registry as last reported, if one is configured.
    pub fn schema_registry(&self) -> Option<SchemaRegistryStatus> {
        self.schema_registry.lock().clone()
    }

    /// Records the database pool's connections in use and idle
    /// (`auditflow_db_pool_connections{state}`).
    pub fn set_pool(&self, in_use: u32, idle: u32) {
        self.pool_in_use.store(in_use, Ordering::Relaxed);
        self.pool_idle.store(idle, Ordering::Relaxed);
        metrics::gauge!(POOL_METRIC, "state" => "in_use").set(f64::from(in_use));
        metrics::gauge!(POOL_METRIC, "state" => "idle").set(f64::from(idle));
    }

    /// Takes one throughput sample of the counters and reads the registered pool. The server
    /// calls it every [`SAMPLE_EVERY`](super::SAMPLE_EVERY); tests call it directly.
    pub fn sample(&self) {
        let pool = self.pool.lock().clone();
        if let Some(pool) = pool {
            let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX);
            self.set_pool(pool.size().saturating_sub(idle), idle);
        }
        self.sample_at(Instant::now());
    }

    fn sample_at(&self, now: Instant) {
        let sample = Sample {
            at: now,
            consumed: self.consumed.load(Ordering::Relaxed),
            stored: self.stored.load(Ordering::Relaxed),
        };
        let mut samples = self.samples.lock();
        samples.push_back(sample);
        // Keep the newest sample at or beyond the window's start, and everything after it.
        while samples
            .get(1)
            .is_some_and(|second| now.duration_since(second.at) >= THROUGHPUT_WINDOW)
        {
            samples.pop_front();
        }
    }

    /// Whether orchestrators may route work here, and what is missing if not.
    pub fn readiness(&self) -> Readiness {
        let joined_group = self.joined.load(Ordering::Relaxed);
        // The worst of the store streams' breakers: one stream that cannot reach the database
        // holds its partitions, so the replica is not fit to take more.
        let database_breaker = self
            .breakers
            .lock()
            .iter()
            .filter(|breaker| is_database_dependency(breaker.dependency()))
            .map(|breaker| breaker.state())
            .max()
            .map(BreakerState::as_str);
        let schema_registry = self
            .schema_registry
            .lock()
            .as_ref()
            .map(|status| status.state);
        let mut missing = Vec::new();
        if !joined_group {
            missing.push("joined_group");
        }
        if database_breaker != Some(BreakerState::Closed.as_str()) {
            missing.push("database_breaker_closed");
        }
        match schema_registry {
            None | Some("ok") => {}
            Some("unauthorized") => missing.push("schema_registry_authorized"),
            Some("misconfigured") => missing.push("schema_registry_configured"),
            Some(_) => missing.push("schema_registry_available"),
        }
        Readiness {
            ready: missing.is_empty(),
            joined_group,
            database_breaker,
            schema_registry,
            missing,
        }
    }

    /// Everything the status page shows, as of now.
    pub fn snapshot(&self) -> StatusSnapshot {
        self.snapshot_at(Instant::now())
    }

    fn snapshot_at(&self, now: Instant) -> StatusSnapshot {
        let totals = Totals {
            consumed: self.consumed.load(Ordering::Relaxed),
            stored: self.stored.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
        };
        let throughput = {
            let samples = self.samples.lock();
            let oldest = samples.front().copied();
            let span = oldest.map_or(Duration::ZERO, |oldest| now.duration_since(oldest.at));
            // Under half a second the rate is mostly noise: report none rather than a spike.
            let rate = |now_count: u64, then_count: u64| {
                (span >= Duration::from_millis(500))
                    .then(|| now_count.saturating_sub(then_count) as f64 / span.as_secs_f64())
            };
            Throughput {
                window_s: span.as_secs_f64(),
                consumed_per_s: oldest.and_then(|oldest| rate(totals.consumed, oldest.consumed)),
                stored_per_s: oldest.and_then(|oldest| rate(totals.stored, oldest.stored)),
            }
        };
        let partitions = self
            .lags
            .lock()
            .iter()
            .flat_map(|(topic, partitions)| {
                partitions.iter().map(|(partition, lag)| PartitionLag {
                    topic: topic.clone(),
                    partition: *partition,
                    lag: *lag,
                })
            })
            .collect();
        let mut breakers: Vec<BreakerStatus> = self
            .breakers
            .lock()
            .iter()
            .map(|breaker| BreakerStatus {
                dependency: breaker.dependency().to_owned(),
                state: breaker.state().as_str(),
            })
            .collect();
        breakers.sort_by(|a, b| a.dependency.cmp(&b.dependency));
        let minute = self.minute_of(now);
        let dead_letters = self
            .dead_letters
            .lock()
            .iter_mut()
            .map(|(class, log)| {
                prune_minutes(&mut log.per_minute, minute);
                DeadLetterClass {
                    class: class.clone(),
                    recent: log.per_minute.iter().map(|(_, count)| count).sum(),
                    total: log.total,
                    last_seen_s_ago: log
                        .last_at
                        .map(|at| now.saturating_duration_since(at).as_secs_f64()),
                }
            })
            .collect();
        StatusSnapshot {
            instance: self.instance.clone(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: now.duration_since(self.started_at).as_secs_f64(),
            readiness: self.readiness(),
            totals,
            throughput,
            partitions,
            breakers,
            dead_letters: DeadLetters {
                recent_window_s: RECENT_DEAD_LETTERS.as_secs(),
                classes: dead_letters,
            },
            pool: Pool {
                in_use: self.pool_in_use.load(Ordering::Relaxed),
                idle: self.pool_idle.load(Ordering::Relaxed),
            },
            schema_registry: self.schema_registry(),
        }
    }

    fn minute_of(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started_at).as_secs() / 60
    }
}

/// Drops per-minute buckets older than the recent window, as seen at `minute`.
fn prune_minutes(per_minute: &mut VecDeque<(u64, u64)>, minute: u64) {
    let window_minutes = RECENT_DEAD_LETTERS.as_secs() / 60;
    while per_minute
        .front()
        .is_some_and(|(at, _)| at + window_minutes <= minute)
    {
        per_minute.pop_front();
    }
}

/// The `/readyz` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// Joined and the database breaker closed.
    pub ready: bool,
    /// The consumer holds a group assignment.
    pub joined_group: bool,
    /// The `postgres` breaker's state; `None` when none is registered.
    pub database_breaker: Option<&'static str>,
    /// The schema registry's state (`ok`, `unavailable`, `unauthorized`, `misconfigured`);
    /// absent without a registry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema_registry: Option<&'static str>,
    /// What keeps it from being ready: `joined_group`, `database_breaker_closed`,
    /// `schema_registry_available`, `schema_registry_authorized`, `schema_registry_configured`.
    pub missing: Vec<&'static str>,
}

/// The schema registry on `/status.json` (never its credentials).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SchemaRegistryStatus {
    /// `ok`, `unavailable`, `unauthorized` or `misconfigured`.
    pub state: &'static str,
    /// The base URLs, in the order configured.
    pub urls: Vec<String>,
    /// Writer schemas fetched and kept (compiled, or known unreadable).
    pub cached_ids: usize,
    /// The bound on `cached_ids`.
    pub cache_capacity: usize,
    /// Ids the registry answered 404 for, remembered for the not-found TTL.
    pub not_found_ids: usize,
    /// The error behind a state other than `ok`.
    pub last_error: Option<String>,
    /// Consumption is paused because of the registry.
    pub paused: bool,
}

/// The `/status.json` body.
#[derive(Debug, Clone, Serialize)]
pub struct StatusSnapshot {
    /// `AUDITFLOW_INSTANCE_ID` of the replica.
    pub instance: String,
    /// auditflow's version.
    pub version: &'static str,
    /// Seconds since the board was created.
    pub uptime_s: f64,
    /// As `/readyz` answers.
    pub readiness: Readiness,
    /// Counters since start; equal to the Prometheus counters of the same name.
    pub totals: Totals,
    /// Recent rates.
    pub throughput: Throughput,
    /// Lag of each assigned partition, by topic then partition.
    pub partitions: Vec<PartitionLag>,
    /// Each registered breaker, by dependency name.
    pub breakers: Vec<BreakerStatus>,
    /// Dead letters by error class.
    pub dead_letters: DeadLetters,
    /// Database pool connections.
    pub pool: Pool,
    /// The schema registry; absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema_registry: Option<SchemaRegistryStatus>,
}

/// Counters since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// `auditflow_events_consumed_total`.
    pub consumed: u64,
    /// `auditflow_events_stored_total`.
    pub stored: u64,
    /// `auditflow_duplicates_skipped_total`.
    pub duplicates: u64,
    /// `auditflow_events_dead_lettered_total`, all classes.
    pub dead_lettered: u64,
}

/// Events per second over the last [`THROUGHPUT_WINDOW`], from sampled counters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Throughput {
    /// The span actually averaged over (shorter just after start).
    pub window_s: f64,
    /// Messages consumed per second; `None` until half a second has been sampled.
    pub consumed_per_s: Option<f64>,
    /// Rows stored per second.
    pub stored_per_s: Option<f64>,
}

/// One partition's lag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionLag {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Messages behind the high watermark; `None` while unknown.
    pub lag: Option<i64>,
}

/// One breaker's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BreakerStatus {
    /// `postgres`, `postgres-stream-1`, `redis`, `dlq`, ...
    pub dependency: String,
    /// `closed`, `half_open` or `open` (the gauge's 0, 1, 2).
    pub state: &'static str,
}

/// Dead letters by class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetters {
    /// What "recent" covers, seconds (to the minute).
    pub recent_window_s: u64,
    /// Classes seen since start, by name.
    pub classes: Vec<DeadLetterClass>,
}

/// Dead letters of one class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterClass {
    /// `decode`, `schema`, `validation`, `out_of_window`, `data`, `constraint`.
    pub class: String,
    /// Over the recent window.
    pub recent: u64,
    /// Since start; equals `auditflow_events_dead_lettered_total{class}`.
    pub total: u64,
    /// Seconds since the last one.
    pub last_seen_s_ago: Option<f64>,
}

/// Database pool connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Pool {
    /// Checked out by a write.
    pub in_use: u32,
    /// Open and waiting.
    pub idle: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::BreakerConfig;

    #[test]
    fn throughput_is_averaged_over_the_sampled_window() {
        let board = StatusBoard::new("test");
        let start = board.started_at;
        assert_eq!(
            board.snapshot_at(start).throughput.consumed_per_s,
            None,
            "no rate before half a second"
        );
        for second in 1..=20u64 {
            board.consumed.fetch_add(100, Ordering::Relaxed);
            board.stored.fetch_add(50, Ordering::Relaxed);
            board.sample_at(start + Duration::from_secs(second));
        }
        let throughput = board
            .snapshot_at(start + Duration::from_secs(20))
            .throughput;
        assert_eq!(throughput.window_s, 10.0);
        assert_eq!(throughput.consumed_per_s, Some(100.0));
        assert_eq!(throughput.stored_per_s, Some(50.0));
        assert!(board.samples.lock().len() <= 11, "samples are pruned");
    }

    #[test]
    fn recent_dead_letters_age_out_but_totals_stay() {
        let board = StatusBoard::new("test");
        let start = board.started_at;
        board.record_dead_letters_at("decode", 3, start);
        board.record_dead_letters_at("decode", 2, start + Duration::from_secs(10 * 60));
        board.record_dead_letters_at("schema", 1, start + Duration::from_secs(60));
        let at = |minutes: u64| board.snapshot_at(start + Duration::from_secs(minutes * 60));
        let classes = at(14).dead_letters.classes;
        assert_eq!(
            (
                classes[0].class.as_str(),
                classes[0].recent,
                classes[0].total
            ),
            ("decode", 5, 5)
        );
        let classes = at(16).dead_letters.classes;
        assert_eq!((classes[0].recent, classes[0].total), (2, 5));
        assert_eq!((classes[1].recent, classes[1].total), (0, 1));
        assert_eq!(at(16).totals.dead_lettered, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_needs_the_group_and_a_closed_database_breaker() {
        let board = StatusBoard::new("test");
        assert_eq!(
            board.readiness().missing,
            vec!["joined_group", "database_breaker_closed"]
        );
        board.set_joined(true);
        let config = BreakerConfig {
            consecutive_failures: 1,
            ..BreakerConfig::INGEST
        };
        let breaker = Arc::new(Breaker::new("postgres", config));
        board.register_breaker(Arc::new(Breaker::new("redis", config)));
        board.register_breaker(Arc::clone(&breaker));
        assert!(board.readiness().ready);
        let permit = breaker.try_acquire().expect("closed");
        breaker.record(permit, true);
        let readiness = board.readiness();
        assert_eq!(readiness.database_breaker, Some("open"));
        assert_eq!(readiness.missing, vec!["database_breaker_closed"]);
    }

    #[test]
    fn readiness_needs_every_store_streams_database_breaker_closed() {
        let board = StatusBoard::new("test");
        board.set_joined(true);
        let config = BreakerConfig {
            consecutive_failures: 1,
            ..BreakerConfig::INGEST
        };
        let stream_one = Arc::new(Breaker::new("postgres-stream-1", config));
        board.register_breaker(Arc::new(Breaker::new("postgres", config)));
        board.register_breaker(Arc::clone(&stream_one));
        board.register_breaker(Arc::new(Breaker::new("postgres-stream-2", config)));
        assert!(board.readiness().ready);
        let permit = stream_one.try_acquire().expect("closed");
        stream_one.record(permit, true);
        let readiness = board.readiness();
        assert_eq!(
            readiness.database_breaker,
            Some("open"),
            "the worst stream's"
        );
        assert_eq!(readiness.missing, vec!["database_breaker_closed"]);
    }

    #[test]
    fn a_registry_that_refuses_or_fails_makes_the_replica_not_ready() {
        let board = StatusBoard::new("test");
        board.set_joined(true);
        board.register_breaker(Arc::new(Breaker::new("postgres", BreakerConfig::INGEST)));
        assert!(board.readiness().ready, "no registry configured");
        assert!(board.snapshot().schema_registry.is_none());
        let status = |state| SchemaRegistryStatus {
            state,
            urls: vec!["http://sr:8081".to_owned()],
            cached_ids: 3,
            cache_capacity: 1000,
            not_found_ids: 1,
            last_error: None,
            paused: false,
        };
        board.set_schema_registry(status("ok"));
        assert!(board.readiness().ready);
        for (state, missing) in [
            ("unauthorized", "schema_registry_authorized"),
            ("misconfigured", "schema_registry_configured"),
            ("unavailable", "schema_registry_available"),
        ] {
            board.set_schema_registry(status(state));
            let readiness = board.readiness();
            assert!(!readiness.ready, "{state}");
            assert_eq!(readiness.schema_registry, Some(state));
            assert_eq!(readiness.missing, vec![missing]);
        }
        board.set_schema_registry_paused(true);
        let shown = board.snapshot().schema_registry.unwrap();
        assert!(shown.paused);
        assert_eq!(shown.cached_ids, 3);
    }

    #[test]
    fn unknown_and_revoked_partitions() {
        let board = StatusBoard::new("test");
        board.set_partition_lag("t", 1, 7);
        board.set_partition_lag("t", 0, -1);
        let partitions = board.snapshot().partitions;
        assert_eq!(
            partitions
                .iter()
                .map(|p| (p.partition, p.lag))
                .collect::<Vec<_>>(),
            vec![(0, None), (1, Some(7))]
        );
        board.remove_partition("t", 0);
        board.remove_partition("t", 1);
        assert!(board.snapshot().partitions.is_empty());
    }
}
