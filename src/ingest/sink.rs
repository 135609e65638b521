//! The running service: Kafka in, Postgres out, with dead letters and invalidations on the side.
//!
//! Two tasks share the work. The consumer task polls Kafka, decodes each message and fills the
//! open [`Batch`]; a full or expired batch is handed over a one-slot channel to the store task,
//! which writes it ([`Sink::process_batch`]), waits for its dead letters to be acknowledged,
//! stores the offsets and publishes the invalidation. The consumer keeps decoding the next batch
//! while the store writes the previous one.
//!
//! While the Postgres circuit breaker is not closed, or when the store falls behind for longer
//! than [`PAUSE_AFTER`], the consumer pauses its partitions but keeps polling, so it stays in
//! the group and serves rebalances; it resumes once the breaker closes and the store takes the
//! waiting batch. Nothing is dead-lettered because a dependency is down: transient failures are
//! retried, only records refused for their content go to the dead-letter topic.
//!
//! With a schema registry, a message whose schema id is not cached yet is held (`ingest::hold`)
//! while the id is fetched in the background, and decoded when the fetch settles; the consumer
//! pauses the same way while the registry is unavailable or refuses auditflow, or while too
//! many messages are held.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use anyhow::Context as _;
use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use futures::{FutureExt as _, StreamExt as _};
use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::ClientConfig;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::batch::{self, Batch, BatchLimits};
use super::consume::{
    commit_sync, set_paused, Membership, SinkConsumer, SinkContext, TopicOffsets, PAUSE_AFTER,
};
use super::decode::registry::{RegistryState, SchemaRegistry};
use super::decode::{DecodeError, DecodedView, Decoder, Policy, RegistryCache};
use super::dlq::{DeadLetter, DlqError, DlqProducer, Failure};
use super::hold::{Held, Refused, Waiting};
use super::isolate::isolate;
use super::notify::{self, Notifier, NotifyConfig};
use super::offsets::{complete_and_store, Delivery, OffsetTracker};
use super::sources::SourceRef;
use super::stats::{
    add_elapsed, add_sampled, nanos_to_s, peak_rss_mb, process_cpu_s, BatchReport, RunSummary,
    SinkStats,
};
use super::store::{self, CommittedBatch, CopyRows, Store, StoreError, WriteOutcome};
use crate::breaker::{Breaker, State as BreakerState};
use crate::config::Config;
use crate::db::retry::Retry;
use crate::kafka;
use crate::observe::StatusBoard;
use crate::telemetry::Throttle;

/// Messages taken from librdkafka's queue in one turn of the consume loop, at most: enough to
/// spread the loop's own cost (timers, locks) thin, few enough to keep its other branches
/// (shutdown, the store, breakers) served every few milliseconds.
const MAX_BURST: u64 = 512;

/// Why a batch did not complete.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// Shutdown cut the retries short; nothing of the batch's offsets was stored.
    #[error("interrupted by shutdown before the batch was durable")]
    Interrupted,
    /// The store reported a row the batch does not have (a defect): the batch stops there, its
    /// offsets are not stored and its records are read again.
    #[error("row {0} refused by the database is not in its batch")]
    UnknownRow(usize),
}

/// The sink, built and ready to run.
pub struct Sink {
    config: Config,
    consumer: Arc<SinkConsumer>,
    decoder: Arc<Decoder>,
    /// With `AUDITFLOW_SCHEMA_REGISTRY_URL`: the client and the cache the decoder reads.
    registry: Option<(Arc<SchemaRegistry>, Arc<RegistryCache>)>,
    /// The store streams (`AUDITFLOW_STORE_CONCURRENCY`): a Kafka partition's rows always go to
    /// `stores[partition % len]`.
    stores: Vec<Arc<Store>>,
    dlq: DlqProducer,
    notifier: Notifier,
    notifier_task: tokio::task::JoinHandle<()>,
    notifier_shutdown: CancellationToken,
    tracker: Arc<Mutex<OffsetTracker>>,
    membership: Arc<Mutex<Membership>>,
    stats: Arc<SinkStats>,
    board: Arc<StatusBoard>,
    policy: Policy,
    /// Batch limits; replaced on live reload, read at every turn of the consumer loop.
    limits: watch::Sender<BatchLimits>,
    /// When the chain head was last logged (it is logged at the first commit, then at most once
    /// per [`CHAIN_HEAD_LOG_INTERVAL`]).
    chain_head_logged: Mutex<std::collections::HashMap<uuid::Uuid, std::time::Instant>>,
}

/// The consumer's `fetch.wait.max.ms` unless `AUDITFLOW_KAFKA_OPT_FETCH_WAIT_MAX_MS` says
/// otherwise.
pub const FETCH_WAIT_MAX_MS: &str = "100";

/// The sink consumer's settings: the operator's properties, then what the sink depends on.
fn consumer_config(brokers: &str, config: &Config) -> ClientConfig {
    let mut consumer = kafka::client_config(brokers, &config.kafka);
    // A fetch waits at most this long for data (librdkafka's default is 500 ms): batches close
    // within 250 ms, and the longer wait showed in the end-to-end latency (bench at half load:
    // p99 1.0-1.1 s with 500, 0.6-0.7 s with 100). The operator's value wins.
    if !config.kafka.properties.contains_key("fetch.wait.max.ms") {
        consumer.set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS);
    }
    consumer
        .set("group.id", &config.kafka.kafka_group_id)
        .set("client.id", config.instance_id())
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("queued.max.messages.kbytes", "32768")
        .set("statistics.interval.ms", "5000");
    consumer
}

/// The empty batch `seq` that follows `open`: a stored batch handed back, if one is spare, else
/// a new one sized like `open`.
fn next_batch(open: &Batch, spare: &mut Option<Batch>, seq: u64) -> Batch {
    match spare.take() {
        Some(spent) => spent.recycle(seq),
        None => open.successor(seq),
    }
}

/// Dead letters (class `conflict`) for the rows the store did not insert because their id and
/// time are stored with other content: a producer cannot reuse an id to make a later event
/// vanish.
fn conflict_letters(batch: &Batch, conflicts: &[store::Conflict]) -> Vec<DeadLetter> {
    conflicts
        .iter()
        .filter_map(|conflict| {
            let source = batch
                .row_sources
                .position(conflict.partition, conflict.offset)
                .and_then(|index| batch.row_sources.get(index));
            if source.is_none() {
                // Cannot happen: the store only reports rows of this batch.
                tracing::error!(
                    partition = conflict.partition,
                    offset = conflict.offset,
                    "conflicting row not found in its batch"
                );
            }
            source.map(|source| {
                DeadLetter::new(
                    source.to_record(),
                    Failure {
                        class: batch::CONFLICT_CLASS.to_owned(),
                        message: conflict.message(),
                        sqlstate: None,
                    },
                )
            })
        })
        .collect()
}

/// The `dependency` label of store stream `stream`'s breaker: stream 0 keeps the name `postgres`
/// (the only one before store streams), the others are `postgres-stream-N`.
pub(crate) fn store_breaker_name(stream: usize) -> Cow<'static, str> {
    match stream {
        0 => Cow::Borrowed(crate::observe::DATABASE_DEPENDENCY),
        n => Cow::Owned(format!(
            "{}{n}",
            crate::observe::DATABASE_STREAM_DEPENDENCY_PREFIX
        )),
    }
}

/// The store stream of a Kafka partition.
pub(crate) fn stream_of(partition: i32, streams: usize) -> usize {
    usize::try_from(partition).unwrap_or(0) % streams.max(1)
}

/// How often the sink logs its hash chain's head: a copy outside the database that
/// `auditflow verify --expect-head` can check.
const CHAIN_HEAD_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// What a live reload can change in a running sink.
#[derive(Clone)]
pub struct SinkTuning {
    limits: watch::Sender<BatchLimits>,
    breakers: Vec<Arc<Breaker>>,
}

impl SinkTuning {
    /// Applies the live settings of `config`: batch limits and ingest breaker thresholds.
    pub fn apply(&self, config: &Config) {
        self.limits.send_replace(BatchLimits::from(&config.batch));
        for breaker in &self.breakers {
            breaker.reconfigure(config.breakers.ingest());
        }
    }
}

impl Sink {
    /// Connects to Kafka, Postgres and Redis, migrates, premakes partitions and subscribes.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let board = Arc::new(StatusBoard::new(config.instance_id()));
        Self::build_with_board(config, board).await
    }

    /// Like [`Sink::build`], reporting to `board` (which the status endpoints serve). The board
    /// must be this sink's alone: the run summary reads its totals.
    pub async fn build_with_board(config: Config, board: Arc<StatusBoard>) -> anyhow::Result<Self> {
        let brokers = config.require_brokers()?.to_owned();
        let database_url = config.require_database_url()?.clone();
        let mut decoder = if config.sink.schema_dir.is_dir() {
            Decoder::from_dir(&config.sink.schema_dir).with_context(|| {
                format!("loading schemas from {}", config.sink.schema_dir.display())
            })?
        } else {
            Decoder::embedded()
        };
        let registry = if config.registry.is_enabled() {
            let cache = Arc::new(RegistryCache::new(
                config.registry.schema_registry_cache_capacity,
                config.registry.not_found_ttl(),
            )?);
            let registry = SchemaRegistry::new(&config.registry, config.breakers.ingest())
                .context("AUDITFLOW_SCHEMA_REGISTRY_URL")?
                .with_board(Arc::clone(&board));
            registry.publish(Some(&cache));
            tracing::info!(urls = ?registry.urls(), "confluent schema ids are looked up in the schema registry");
            decoder = decoder.with_registry(Arc::clone(&cache));
            Some((Arc::new(registry), cache))
        } else {
            None
        };
        let pool = store::connect(&config.database, database_url.expose())
            .await
            .context("connecting to the database")?;
        // A least-privilege writer cannot migrate: it only checks the schema's version.
        match crate::db::ensure_migrated(&pool, &config.database.db_schema).await {
            Ok(()) => {}
            Err(err @ crate::db::EnsureMigratedError::NotAllowed { .. }) => {
                return Err(crate::config::ConfigError::new(err.to_string()).into());
            }
            Err(err) => return Err(anyhow::Error::new(err).context("migrating the database")),
        }
        let breaker_config = config.breakers.ingest();
        // One store per stream: its own publisher epoch (and so its own hash chain and
        // invalidation sequence) and its own breaker; stream 0's breaker keeps the name
        // `postgres`.
        let mut stores = Vec::new();
        let streams = config
            .database
            .store_concurrency
            .clamp(1, config.database.db_max_connections.max(1));
        if streams < config.database.store_concurrency {
            tracing::warn!(
                streams,
                store_concurrency = config.database.store_concurrency,
                db_max_connections = config.database.db_max_connections,
                "AUDITFLOW_STORE_CONCURRENCY is capped by AUDITFLOW_DB_MAX_CONNECTIONS: each stream needs a connection"
            );
        }
        for stream in 0..streams {
            let name = store_breaker_name(stream as usize);
            let store = Store::new(
                pool.clone(),
                config.database.db_schema.clone(),
                Arc::new(Breaker::new(name, breaker_config)),
            )
            .with_partition_interval(config.partitions.partition_interval)
            .with_instance(config.instance_id());
            store
                .register_publisher()
                .await
                .context("registering the publisher epoch")?;
            stores.push(Arc::new(store));
        }
        let store = Arc::clone(&stores[0]);
        let today = Utc::now().date_naive();
        store
            .ensure_partitions(
                (0..=i64::from(config.sink.accept_future_days) + 1)
                    .map(|d| today + chrono::Duration::days(d)),
            )
            .await
            .context("creating partitions")?;
        // Each store stream's connection now, before the group hands out partitions, rather
        // than in the stream's first batch; and one for partition upkeep, which shares this pool
        // unless AUDITFLOW_MAINTENANCE_DATABASE_URL is set and holds a connection for its round
        // as the run starts. A failure here is not fatal: a stream connects when it needs to,
        // under its breaker.
        let ahead = (streams + 1).min(config.database.db_max_connections);
        if let Err(err) = crate::db::warm(&pool, ahead).await {
            tracing::warn!(error = %err, connections = ahead, "could not open the store streams' connections ahead");
        }

        let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
        let membership = Arc::new(Mutex::new(Membership::default()));
        let stats = Arc::new(SinkStats::default());
        let context = SinkContext {
            tracker: Arc::clone(&tracker),
            topic: config.kafka.kafka_topic.clone(),
            membership: Arc::clone(&membership),
            stats: Arc::clone(&stats),
            board: Arc::clone(&board),
            log: kafka::ClientLog::new(&config.kafka),
            closing: AtomicBool::new(false),
        };
        let creation_log = kafka::ClientLog::new(&config.kafka);
        let consumer: SinkConsumer = consumer_config(&brokers, &config)
            .create_with_context(context)
            .map_err(|err| creation_log.creation_error(err, "kafka consumer"))?;
        consumer
            .subscribe(&[&config.kafka.kafka_topic])
            .context("subscribing")?;
        let producer = kafka::producer(
            &kafka::durable_producer_config(&brokers, &config.kafka),
            &config.kafka,
            "dead-letter producer",
        )?;
        let dlq = DlqProducer::new(
            producer,
            config.kafka.dlq_topic.clone(),
            config.instance_id(),
            Arc::new(Breaker::new("dlq", breaker_config)),
        );
        let notifier_shutdown = CancellationToken::new();
        let (notifier, notifier_task) = notify::spawn(
            NotifyConfig {
                redis_url: config.redis.redis_url.expose().to_owned(),
                redis_ca_file: config.redis.redis_ca_file.clone(),
                channel: config.redis.invalidation_channel.clone(),
                queue_capacity: config.redis.invalidation_queue,
                queue_bytes: config.redis.invalidation_queue_bytes,
                publish_timeout: Duration::from_secs(2),
                breaker: breaker_config,
            },
            notifier_shutdown.clone(),
        );
        for store in &stores {
            board.register_breaker(Arc::clone(store.breaker()));
        }
        board.register_breaker(Arc::clone(dlq.breaker()));
        board.register_breaker(notifier.breaker());
        board.register_pool(store.pool().clone());
        Ok(Sink {
            board,
            policy: Policy::from_config(&config.sink),
            limits: watch::Sender::new(BatchLimits::from(&config.batch)),
            config,
            consumer: Arc::new(consumer),
            decoder: Arc::new(decoder),
            registry,
            stores,
            dlq,
            notifier,
            notifier_task,
            notifier_shutdown,
            tracker,
            membership,
            stats,
            chain_head_logged: Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// Run statistics beyond the board's totals.
    pub fn stats(&self) -> Arc<SinkStats> {
        Arc::clone(&self.stats)
    }

    /// The status board: consumed, stored, duplicates and dead-lettered totals, readiness, lag.
    pub fn board(&self) -> Arc<StatusBoard> {
        Arc::clone(&self.board)
    }

    /// The store of stream 0 (shared with the running sink).
    pub fn store(&self) -> Arc<Store> {
        Arc::clone(&self.stores[0])
    }

    /// The store of every stream, stream 0 first.
    pub fn stores(&self) -> &[Arc<Store>] {
        &self.stores
    }

    /// The dead-letter producer.
    pub fn dlq(&self) -> &DlqProducer {
        &self.dlq
    }

    /// The notifier.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// The schema registry client, when Confluent ids are looked up in one.
    pub fn schema_registry(&self) -> Option<&Arc<SchemaRegistry>> {
        self.registry.as_ref().map(|(registry, _)| registry)
    }

    /// The handle a live reload uses to retune this sink.
    pub fn tuning(&self) -> SinkTuning {
        let mut breakers = vec![Arc::clone(self.dlq.breaker()), self.notifier.breaker()];
        breakers.extend(self.stores.iter().map(|store| Arc::clone(store.breaker())));
        if let Some(registry) = self.schema_registry() {
            breakers.push(Arc::clone(registry.breaker()));
        }
        SinkTuning {
            limits: self.limits.clone(),
            breakers,
        }
    }

    /// Runs until `shutdown` fires, or, with `until_idle`, until everything received is stored
    /// and committed and nothing new arrived for that long. Then drains: the open batch is
    /// stored and committed within the drain timeout, the consumer leaves the group.
    pub async fn run_until_stopped(
        self,
        shutdown: CancellationToken,
        until_idle: Option<Duration>,
    ) -> anyhow::Result<RunSummary> {
        let started = Instant::now();
        let sink = Arc::new(self);
        let (batch_tx, mut batch_rx) = mpsc::channel::<Batch>(1);
        // Stored batches come back to this loop: their buffers are reused for the next one and
        // what they hold is freed on the thread that allocated it.
        let (spent_tx, mut spent_rx) = mpsc::unbounded_channel::<Batch>();
        let in_flight = Arc::new(AtomicUsize::new(0));
        // Fires when the drain timeout is over: retries stop, offsets of unfinished work stay
        // uncommitted, and the records are redelivered later.
        let abort = CancellationToken::new();

        let store_task = {
            let sink = Arc::clone(&sink);
            let in_flight = Arc::clone(&in_flight);
            let abort = abort.clone();
            tokio::spawn(async move {
                while let Some(batch) = batch_rx.recv().await {
                    let result = sink.process_batch(&batch, &abort).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    let _ = spent_tx.send(batch);
                    if let Err(err) = result {
                        tracing::warn!(error = %err, "batch abandoned");
                        break;
                    }
                }
            })
        };

        let mut seq = 0;
        let mut open = Batch::new(seq);
        let mut spare: Option<Batch> = None;
        let mut ready: Option<Batch> = None;
        let mut waiting_since: Option<Instant> = None;
        // Why the partitions should be paused: the store has not taken a finished batch for
        // PAUSE_AFTER, or the database breaker is not closed.
        let mut store_stalled = false;
        let mut breaker_rx = sink.stores[0].breaker().subscribe();
        let mut database_unavailable = false;
        let mut paused_generation: Option<u64> = None;
        let mut last_message = Instant::now();
        let mut resumed_at = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let consumer = Arc::clone(&sink.consumer);
        // One stream for the whole run: each `recv` would register and drop a waker of its own.
        let mut messages = consumer.stream();
        // With the brokers down, every poll fails: one line per interval, with the count.
        let consumer_errors = Throttle::default();
        // Messages waiting for their schema from the registry, at most two batches' worth.
        let hold_limit = sink.limits.borrow().max_events.saturating_mul(2).max(1_000);
        let (mut held, mut settled_rx) = Held::new(hold_limit, sink.registry.clone());
        let mut registry_rx = sink.schema_registry().map(|registry| registry.subscribe());
        let mut registry_unavailable = false;
        let mut registry_paused = false;
        let mut revokes_seen = sink.stats.revokes.load(Ordering::Relaxed);
        let reporter_shutdown = CancellationToken::new();
        if let Some((registry, cache)) = sink.registry.clone() {
            let shutdown = reporter_shutdown.clone();
            tokio::spawn(async move {
                registry
                    .report_until(&cache, Duration::from_secs(1), shutdown)
                    .await;
            });
        }

        loop {
            let limits = *sink.limits.borrow();
            let deadline = open.deadline(&limits);
            let paused = paused_generation.is_some();
            let store_behind = ready.is_some() && open.is_full(&limits);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                permit = batch_tx.reserve(), if ready.is_some() => {
                    let Ok(permit) = permit else { break };
                    if let Some(batch) = ready.take() {
                        in_flight.fetch_add(1, Ordering::SeqCst);
                        permit.send(batch);
                    }
                    waiting_since = None;
                    store_stalled = false;
                }
                _ = sleep_until_opt(waiting_since.map(|since| since + PAUSE_AFTER)), if !store_stalled && waiting_since.is_some() => {
                    store_stalled = true;
                }
                changed = breaker_rx.changed() => {
                    if changed.is_ok() {
                        breaker_rx.borrow_and_update();
                        database_unavailable = sink.any_store_breaker_open();
                    }
                }
                Some(id) = settled_rx.recv() => held.settled(id),
                Some(state) = registry_changed(&mut registry_rx) => {
                    registry_unavailable = state != RegistryState::Ok;
                }
                _ = sleep_until_opt(deadline), if ready.is_none() && deadline.is_some() => {
                    seq += 1;
                    let next = next_batch(&open, &mut spare, seq);
                    ready = Some(std::mem::replace(&mut open, next));
                    waiting_since = Some(Instant::now());
                }
                // While paused, keep polling: it serves rebalances and heartbeats, and whatever
                // was fetched before the pause still goes into the open batch.
                Some(message) = messages.next(), if !store_behind || paused => {
                    // What librdkafka fetched already is taken now, up to the open batch's
                    // limits, instead of one message per turn of this loop.
                    let mut next = Some(message);
                    let (mut polled, mut taken) = (0, 0);
                    // One reading of the clock for the burst's accept-window checks.
                    let now = Utc::now();
                    while let Some(message) = next.take() {
                        polled += 1;
                        match message {
                            Ok(message) => {
                                if taken == 0 {
                                    sink.stats.message_arrived();
                                }
                                taken += 1;
                                sink.add_message(&mut open, &mut held, &message, now);
                            }
                            Err(err) => {
                                consumer_errors.record(|repeated| {
                                    tracing::warn!(error = %err, repeated, "kafka consumer error");
                                });
                            }
                        }
                        if polled < MAX_BURST && !open.is_full(&limits) && !held.is_full() {
                            next = messages.next().now_or_never().flatten();
                        }
                    }
                    if taken > 0 {
                        last_message = Instant::now();
                        sink.board.add_consumed(taken);
                    }
                }
                _ = tick.tick() => {
                    // The other streams' breakers are read here (stream 0's also wakes the loop).
                    database_unavailable = sink.any_store_breaker_open();
                    // Held messages of revoked partitions go: their new owner reads them again.
                    let revokes = sink.stats.revokes.load(Ordering::Relaxed);
                    if revokes != revokes_seen && !held.is_empty() {
                        let tracker = sink.tracker.lock();
                        let dropped = held.retain(|delivery| tracker.is_current(delivery));
                        tracing::debug!(dropped, "dropped held messages of revoked partitions");
                    }
                    revokes_seen = revokes;
                    // The tick also wakes the loop so a pause is re-applied after a rebalance.
                    if let Some(idle_for) = until_idle {
                        // Idle only counts while the group has assigned partitions: joining and
                        // rebalancing can take longer than the idle period.
                        let membership = *sink.membership.lock();
                        // Nor while paused: nothing can arrive then.
                        let quiet_since = membership
                            .changed_at
                            .filter(|_| membership.assigned && paused_generation.is_none())
                            .map(|at| at.max(last_message).max(resumed_at));
                        if open.is_empty()
                            && ready.is_none()
                            && in_flight.load(Ordering::SeqCst) == 0
                            && quiet_since.is_some_and(|since| since.elapsed() >= idle_for)
                            && sink.tracker.lock().num_pending() == 0
                        {
                            tracing::info!(idle_s = idle_for.as_secs_f64(), "idle; stopping");
                            break;
                        }
                    }
                }
            }
            while let Ok(spent) = spent_rx.try_recv() {
                spare = Some(spent.recycle(0));
            }
            // Held messages whose schema settled go into the open batch, as far as it has room.
            if held.is_dirty() {
                held.drain(|waiting| sink.offer(&mut open, &limits, waiting));
            }
            // A full batch goes out as soon as the slot is free, whichever branch freed it.
            if ready.is_none() && open.is_full(&limits) {
                seq += 1;
                let next = next_batch(&open, &mut spare, seq);
                ready = Some(std::mem::replace(&mut open, next));
                waiting_since = Some(Instant::now());
            }
            let holding_full = held.is_full();
            let want_paused =
                store_stalled || database_unavailable || registry_unavailable || holding_full;
            let for_registry = want_paused && (registry_unavailable || holding_full);
            if for_registry != registry_paused {
                registry_paused = for_registry;
                sink.board.set_schema_registry_paused(for_registry);
            }
            let generation = sink.membership.lock().generation;
            // Partitions assigned after a pause start fetching: pause them too.
            if want_paused && paused_generation != Some(generation) {
                if paused_generation.is_none() {
                    tracing::warn!(
                        store_stalled,
                        database_unavailable,
                        registry_unavailable,
                        held = held.len(),
                        "pausing consumption"
                    );
                    sink.stats.pauses.fetch_add(1, Ordering::Relaxed);
                }
                set_paused(&sink.consumer, true);
                paused_generation = Some(generation);
            } else if !want_paused && paused_generation.is_some() {
                tracing::info!("resuming consumption");
                set_paused(&sink.consumer, false);
                paused_generation = None;
                resumed_at = Instant::now();
            }
        }

        // Held messages are not decided: their offsets stay uncommitted and they are redelivered.
        held.stop();
        reporter_shutdown.cancel();
        if !held.is_empty() {
            tracing::info!(
                held = held.len(),
                "messages waiting for their schema are left for redelivery"
            );
        }
        if registry_paused {
            sink.board.set_schema_registry_paused(false);
        }
        // The loop's handle goes now, so the sink's is the last one and closing happens off the
        // runtime below.
        drop(messages);
        drop(consumer);
        // Drain: hand over what is open, wait for the store within the drain timeout.
        let draining = Instant::now();
        let drain_deadline = draining + sink.config.sink.drain_timeout();
        let pending: Vec<Batch> = ready
            .into_iter()
            .chain((!open.is_empty()).then_some(open))
            .collect();
        let handover = async {
            for batch in pending {
                in_flight.fetch_add(1, Ordering::SeqCst);
                if batch_tx.send(batch).await.is_err() {
                    break;
                }
            }
            drop(batch_tx);
        };
        let mut store_task = store_task;
        let drained = tokio::time::timeout_at(drain_deadline, async {
            handover.await;
            (&mut store_task).await
        })
        .await;
        if drained.is_err() {
            tracing::warn!("drain timeout reached; unfinished batches will be redelivered");
            abort.cancel();
            let _ = store_task.await;
        }
        let drain_ms = millis(draining.elapsed());
        // Committing and leaving the group are exchanges with the coordinator that librdkafka
        // waits for without a bound: they get LEAVE_TIMEOUT together.
        let committing = Instant::now();
        let leave_deadline = committing + LEAVE_TIMEOUT;
        let consumer = Arc::clone(&sink.consumer);
        let committed = off_runtime_until("offset-commit", leave_deadline, move || {
            commit_sync(consumer.as_ref(), "shutdown");
        })
        .await;
        if committed.is_none() {
            tracing::warn!(
                "the shutdown commit did not finish in time; records since the last commit \
                 are redelivered and stored once"
            );
        }
        tracing::info!(
            drain_ms,
            commit_ms = millis(committing.elapsed()),
            "drained and committed"
        );
        sink.board.set_joined(false);
        // From here on the consumer is closing: the revoke that leaving the group brings must
        // not commit synchronously (see `SinkContext::closing`).
        sink.consumer
            .context()
            .closing
            .store(true, Ordering::Release);
        sink.consumer.unsubscribe();
        sink.notifier_shutdown.cancel();
        let elapsed_s = started.elapsed().as_secs_f64();
        let stats = &sink.stats;
        // One board per sink (see `build_with_board`), so its totals are this run's.
        let totals = sink.board.snapshot().totals;
        let summary = RunSummary {
            consumed: totals.consumed,
            stored: totals.stored,
            duplicates: totals.duplicates,
            dead_lettered: totals.dead_lettered,
            conflicts: stats.conflicts.load(Ordering::Relaxed),
            elapsed_s,
            active_s: stats.active_s(),
            latency_p50_ms: stats.latency_ms(0.5),
            latency_p99_ms: stats.latency_ms(0.99),
            peak_rss_mb: peak_rss_mb(),
            decode_s: nanos_to_s(&stats.decode_ns),
            encode_s: nanos_to_s(&stats.encode_ns),
            store_s: nanos_to_s(&stats.store_ns),
            cpu_s: process_cpu_s(),
        };
        match Arc::try_unwrap(sink) {
            Ok(sink) => {
                let _ = tokio::time::timeout(Duration::from_secs(3), sink.notifier_task).await;
                // Dropping the last handle closes the consumer: it leaves the group. While the
                // commit is still waiting, its thread holds a handle and the close would only
                // start when it returns: not waited for.
                let consumer = sink.consumer;
                let closing = Instant::now();
                let closed = match committed {
                    Some(()) => {
                        off_runtime_until("consumer-close", leave_deadline, move || drop(consumer))
                            .await
                    }
                    None => None,
                };
                match closed {
                    Some(()) => {
                        tracing::info!(close_ms = millis(closing.elapsed()), "consumer closed")
                    }
                    None => tracing::warn!(
                        "the consumer did not leave the group in time; exiting without it (the \
                         group reassigns its partitions after session.timeout.ms, from the \
                         committed offsets)"
                    ),
                }
            }
            Err(_) => tracing::warn!("sink still referenced at shutdown"),
        }
        Ok(summary)
    }

    /// Decodes one message into the open batch, or queues it for the dead-letter topic, or
    /// holds it until its schema is fetched (and so every later message of its partition).
    fn add_message(
        &self,
        batch: &mut Batch,
        held: &mut Held,
        message: &BorrowedMessage<'_>,
        now: DateTime<Utc>,
    ) {
        let Some(delivery) = self
            .tracker
            .lock()
            .begin(message.partition(), message.offset())
        else {
            // Fetched before a revoke was processed: the new owner reads it again.
            return;
        };
        let source = SourceRef::from_message(message);
        if held.holds(delivery.partition) {
            held.hold(delivery, source.to_record());
            return;
        }
        let decode_started = self.stats.sample_timing();
        let decoded = self.decoder.decode_view_validated(
            message.payload().unwrap_or_default(),
            now,
            &self.policy,
        );
        let decoded_at = add_sampled(&self.stats.decode_ns, decode_started);
        match decoded {
            Err(DecodeError::NotFetched(id)) => {
                held.hold(delivery, source.to_record());
                held.fetch(id);
            }
            decoded => self.add_decoded(batch, delivery, source, decoded, decoded_at),
        }
    }

    /// Takes a held message into the open batch if there is room and its schema is settled.
    fn offer(
        &self,
        batch: &mut Batch,
        limits: &BatchLimits,
        waiting: Waiting,
    ) -> Result<(), (Waiting, Refused)> {
        if batch.is_full(limits) {
            return Err((waiting, Refused::Full));
        }
        if !self.tracker.lock().is_current(&waiting.delivery) {
            // Revoked meanwhile: the new owner reads it again.
            return Ok(());
        }
        let source = SourceRef::from(waiting.source.as_ref());
        let decode_started = self.stats.sample_timing();
        let decoded = self.decoder.decode_view_validated(
            source.payload.unwrap_or_default(),
            Utc::now(),
            &self.policy,
        );
        let decoded_at = add_sampled(&self.stats.decode_ns, decode_started);
        match decoded {
            Err(DecodeError::NotFetched(id)) => Err((waiting, Refused::Unfetched(id))),
            decoded => {
                self.add_decoded(batch, waiting.delivery, source, decoded, decoded_at);
                Ok(())
            }
        }
    }

    /// Adds a decoded event to the batch, or its permanent failure as a dead letter. `decoded_at`
    /// is when decoding ended, for an event whose time is sampled: encoding time counts from
    /// there.
    fn add_decoded(
        &self,
        batch: &mut Batch,
        delivery: Delivery,
        source: SourceRef<'_>,
        decoded: Result<DecodedView<'_>, DecodeError>,
        decoded_at: Option<std::time::Instant>,
    ) {
        match decoded {
            Ok(decoded) => {
                let hash = crate::event::view_content_hash(&decoded.event);
                batch.add_event(delivery, &decoded, hash, source);
                add_sampled(&self.stats.encode_ns, decoded_at);
            }
            Err(err) => {
                tracing::debug!(
                    error = %err, partition = source.partition, offset = source.offset,
                    "undecodable record; dead-lettering"
                );
                batch.add_dead_letter(
                    delivery,
                    DeadLetter::new(
                        source.to_record(),
                        Failure {
                            class: err.class().as_str().to_owned(),
                            message: err.to_string(),
                            sqlstate: None,
                        },
                    ),
                );
            }
        }
    }

    /// Makes one batch durable: rows in Postgres (refused rows isolated and dead-lettered),
    /// dead letters acknowledged, then offsets stored and the invalidation published.
    /// Transient failures are retried until `abort` fires.
    pub async fn process_batch(
        &self,
        batch: &Batch,
        abort: &CancellationToken,
    ) -> Result<BatchReport, BatchError> {
        let started = std::time::Instant::now();
        let (written, refused) = self.write_isolating(batch, abort).await?;
        let outcome = written.outcome;
        let conflicting = conflict_letters(batch, &outcome.conflicting);
        let letters: Vec<&DeadLetter> = batch
            .dead_letters
            .iter()
            .chain(refused.iter())
            .chain(conflicting.iter())
            .collect();
        futures::future::try_join_all(letters.iter().map(|letter| self.dlq.deliver(letter, abort)))
            .await
            .map_err(|err: DlqError| {
                tracing::warn!(error = %err, "dead letters not acknowledged");
                BatchError::Interrupted
            })?;
        self.store_offsets(batch);

        let duplicates = outcome.duplicates + batch.num_duplicates;
        let conflicts = outcome.conflicts + batch.num_conflicts;
        let dead_lettered = letters.len() as u64;
        let stats = &self.stats;
        stats.conflicts.fetch_add(conflicts, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.batch_completed();
        self.board.add_stored(outcome.stored);
        self.board.add_duplicates(duplicates);
        metrics::counter!("auditflow_duplicate_conflicts_total").increment(conflicts);
        for letter in &letters {
            self.board.record_dead_letter(&letter.failure.class);
        }
        metrics::histogram!("auditflow_batch_size_events").record(batch.num_messages() as f64);
        metrics::histogram!("auditflow_batch_flush_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        let now_ms = Utc::now().timestamp_millis();
        stats.record_latencies(&batch.kafka_timestamps_ms, now_ms);
        add_elapsed(&stats.store_ns, started);
        let latency = metrics::histogram!("auditflow_end_to_end_latency_seconds");
        for ts in &batch.kafka_timestamps_ms {
            latency.record((now_ms - ts).max(0) as f64 / 1000.0);
        }
        // One message per committed transaction that stored rows, in commit order: the
        // publisher's sequence has no gap unless a message is lost.
        for committed in &written.commits {
            self.notifier
                .publish(notify::Invalidation::committed(committed, &batch.resources));
        }
        for head in &written.commits {
            self.log_chain_head(head);
        }
        Ok(BatchReport {
            outcome: WriteOutcome {
                stored: outcome.stored,
                duplicates,
                conflicts,
                // Dead-lettered above, counted in `dead_lettered`.
                conflicting: Vec::new(),
            },
            dead_lettered,
        })
    }

    /// Logs a stream's chain head at its first commit, then at most once per interval.
    fn log_chain_head(&self, head: &CommittedBatch) {
        let mut logged = self.chain_head_logged.lock();
        let now = std::time::Instant::now();
        if logged
            .get(&head.publisher)
            .is_some_and(|at| now.duration_since(*at) < CHAIN_HEAD_LOG_INTERVAL)
        {
            return;
        }
        logged.insert(head.publisher, now);
        tracing::info!(
            publisher = %head.publisher,
            batch_seq = head.batch_seq,
            head = %crate::chain::to_hex(&head.digest),
            "hash chain head (keep a copy: auditflow verify --expect-head)"
        );
    }

    /// Writes the batch's rows; rows the database refuses for their content are isolated
    /// ([`isolate`]) and come back as dead letters while the rest is stored.
    async fn write_isolating(
        &self,
        batch: &Batch,
        abort: &CancellationToken,
    ) -> Result<(Written, Vec<DeadLetter>), BatchError> {
        if self.stores.len() == 1 {
            return self
                .write_stream(&self.stores[0], &batch.rows, batch, None, abort)
                .await;
        }
        // Each stream its rows (a partition always to the same stream), written concurrently:
        // one transaction per stream, each on its own connection.
        let mut indices: Vec<Vec<usize>> = vec![Vec::new(); self.stores.len()];
        for (row, partition) in batch.row_sources.partitions().enumerate() {
            indices[stream_of(partition, self.stores.len())].push(row);
        }
        let parts: Vec<(usize, CopyRows, Vec<usize>)> = indices
            .into_iter()
            .enumerate()
            .filter(|(_, rows)| !rows.is_empty())
            .map(|(stream, rows)| (stream, batch.rows.select(&rows), rows))
            .collect();
        let results = futures::future::try_join_all(parts.iter().map(|(stream, rows, indices)| {
            self.write_stream(&self.stores[*stream], rows, batch, Some(indices), abort)
        }))
        .await?;
        let mut written = Written::default();
        let mut refused = Vec::new();
        for (part, part_refused) in results {
            written += part;
            refused.extend(part_refused);
        }
        Ok((written, refused))
    }

    /// Writes one stream's rows through its store, isolating refused rows. `indices` maps the
    /// stream's rows to the batch's (`None`: the stream has the whole batch).
    async fn write_stream(
        &self,
        store: &Store,
        rows: &CopyRows,
        batch: &Batch,
        indices: Option<&[usize]>,
        abort: &CancellationToken,
    ) -> Result<(Written, Vec<DeadLetter>), BatchError> {
        let isolated = isolate(rows.len(), |range| {
            self.write_retrying(store, rows, range, abort)
        })
        .await?;
        let refused = isolated
            .refused
            .into_iter()
            .map(|(row, err)| {
                let index = indices.map_or(Some(row), |indices| indices.get(row).copied());
                let source = index
                    .and_then(|index| batch.row_sources.get(index))
                    .ok_or(BatchError::UnknownRow(row))?
                    .to_record();
                let sqlstate = err.sqlstate();
                let class = match sqlstate.as_deref() {
                    Some(code) if code.starts_with("22") => "data",
                    _ => "constraint",
                };
                tracing::warn!(
                    error = %err, partition = source.partition, offset = source.offset,
                    "database refused record; dead-lettering"
                );
                Ok(DeadLetter::new(
                    source,
                    Failure {
                        class: class.to_owned(),
                        message: err.to_string(),
                        sqlstate,
                    },
                ))
            })
            .collect::<Result<_, BatchError>>()?;
        Ok((isolated.outcome, refused))
    }

    /// Writes one range, retrying transient failures with jittered backoff until `abort`.
    /// The inner result is a permanent failure for the caller to isolate.
    async fn write_retrying(
        &self,
        store: &Store,
        rows: &CopyRows,
        range: std::ops::Range<usize>,
        abort: &CancellationToken,
    ) -> Result<Result<Written, StoreError>, BatchError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times();
        let attempt = || async {
            let (outcome, committed) = store.write_committed(rows, range.clone()).await?;
            Ok::<_, StoreError>(Written {
                outcome,
                commits: committed.into_iter().collect(),
            })
        };
        let result = tokio::select! {
            result = attempt
                .retry(backoff)
                .when(|err: &StoreError| err.retry() == Retry::Transient)
                .notify(|err: &StoreError, wait| {
                    if err.sqlstate().as_deref() == Some("42501") {
                        // Not the data and not an outage: the role lacks a grant. Paused, and
                        // said loudly at every retry (at most every 5 s), never dead-lettered.
                        tracing::error!(
                            error = %err, retry_in = ?wait,
                            "permission denied: a configuration fault, ingestion is paused; \
                             grant the writer with `auditflow migrate --grant-writer ROLE`"
                        );
                        metrics::counter!("auditflow_store_permission_denied_total").increment(1);
                    } else {
                        tracing::warn!(error = %err, retry_in = ?wait, "batch write failed; retrying");
                    }
                    metrics::counter!("auditflow_store_retries_total").increment(1);
                }) => result,
            _ = abort.cancelled() => return Err(BatchError::Interrupted),
        };
        Ok(result)
    }

    /// Whether any store stream's breaker is not closed: then consumption pauses.
    fn any_store_breaker_open(&self) -> bool {
        self.stores
            .iter()
            .any(|store| store.breaker().state() != BreakerState::Closed)
    }

    /// Marks the batch's messages done and stores every offset that became committable.
    fn store_offsets(&self, batch: &Batch) {
        let offsets = TopicOffsets {
            consumer: &self.consumer,
            topic: &self.config.kafka.kafka_topic,
        };
        complete_and_store(&mut self.tracker.lock(), &batch.deliveries, &offsets);
    }
}

/// The registry's next state; never resolves without a registry.
async fn registry_changed(
    registry_rx: &mut Option<watch::Receiver<super::decode::registry::RegistryHealth>>,
) -> Option<RegistryState> {
    match registry_rx {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(rx.borrow_and_update().state),
            // The registry client is gone only at shutdown.
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// What the writes of one batch did, summed over the transactions isolation needed.
#[derive(Debug, Default)]
struct Written {
    outcome: WriteOutcome,
    /// The transactions that stored rows, in commit order.
    commits: Vec<CommittedBatch>,
}

impl std::ops::AddAssign for Written {
    fn add_assign(&mut self, other: Self) {
        self.outcome += other.outcome;
        self.commits.extend(other.commits);
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// How long committing the offsets and leaving the group may take at shutdown, together, after
/// the drain.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `work` on a thread of its own and waits for it until `deadline`: `None` if it has not
/// finished by then, and the thread is left to finish on its own. For librdkafka's unbounded
/// blocking calls at shutdown; a blocking-pool task would not do, the runtime waits for those at
/// exit however long they take.
async fn off_runtime_until<T: Send + 'static>(
    name: &str,
    deadline: Instant,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _ = done_tx.send(work());
        });
    if let Err(err) = spawned {
        tracing::warn!(error = %err, name, "cannot start a thread");
        return None;
    }
    tokio::time::timeout_at(deadline, done_rx).await.ok()?.ok()
}

/// A duration in milliseconds, for log fields.
fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Config {
        Config::from_vars(
            vars.iter()
                .map(|(key, value)| (key.to_string(), value.to_string())),
        )
        .expect("valid configuration")
    }

    #[test]
    fn fetches_wait_100_ms_unless_the_operator_says_otherwise() {
        let ours = consumer_config("127.0.0.1:9092", &config(&[]));
        assert_eq!(ours.get("fetch.wait.max.ms"), Some(FETCH_WAIT_MAX_MS));
        let theirs = consumer_config(
            "127.0.0.1:9092",
            &config(&[("AUDITFLOW_KAFKA_OPT_FETCH_WAIT_MAX_MS", "300")]),
        );
        assert_eq!(theirs.get("fetch.wait.max.ms"), Some("300"));
        assert_eq!(theirs.get("enable.auto.offset.store"), Some("false"));
    }

    #[test]
    fn every_store_streams_breaker_decides_readiness() {
        assert_eq!(store_breaker_name(0), "postgres");
        assert_eq!(store_breaker_name(3), "postgres-stream-3");
        for stream in 0..16 {
            let name = store_breaker_name(stream);
            assert!(crate::observe::is_database_dependency(&name), "{name}");
        }
    }

    #[tokio::test]
    async fn blocking_work_off_the_runtime_is_waited_for_until_the_deadline_only() {
        let soon = Instant::now() + Duration::from_secs(5);
        assert_eq!(off_runtime_until("quick", soon, || 7).await, Some(7));
        let started = Instant::now();
        let deadline = started + Duration::from_millis(200);
        let stuck = off_runtime_until("stuck", deadline, || {
            std::thread::sleep(Duration::from_secs(30));
        })
        .await;
        assert!(stuck.is_none(), "work past the deadline is left behind");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
}
