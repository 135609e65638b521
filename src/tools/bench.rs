//! `auditflow bench`: the end-to-end benchmark, measured in one run on one machine.
//!
//! 1. Ceilings: the same rows the pipeline will store, decoded and COPY-encoded beforehand, are
//!    copied straight into a fresh copy of the partitioned table (a scratch schema per
//!    configuration, migrated like the sink's), one transaction per batch of the default size:
//!    in COPY text over one connection, in binary COPY (what the store sends) over one, and in
//!    binary over 2 and 4 concurrent connections, each taking its own batches. The one-stream
//!    binary figure is what one store task can reach; the best is what this PostgreSQL can take.
//! 2. Pipeline: the same N events, already in the broker, are consumed, decoded, deduplicated
//!    and committed by the sink (`auditflow run --until-idle`, a child process with default
//!    settings, so its peak RSS is its own), from first fetch to last commit.
//! 3. Latency: a fresh topic is fed at half the measured pipeline throughput while the sink runs;
//!    the sink reports the 99th percentile from Kafka timestamp to commit.
//!
//! Without `AUDITFLOW_KAFKA_BROKERS` the broker is librdkafka's in-process mock cluster. It keeps
//! only about 5 MB per partition, so the topics get enough partitions for every event to survive
//! until it is read.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use futures::TryStreamExt as _;
use rdkafka::mocking::MockCluster;
use serde::Serialize;
use sqlx::Connection as _;
use tokio::time::Instant;

use crate::breaker::{Breaker, BreakerConfig};
use crate::config::{Config, Secret, METRICS_OFF};
use crate::db::quote_ident;
use crate::event::content_hash;
use crate::ingest::decode::Decoder;
use crate::ingest::stats::process_cpu_s;
use crate::ingest::store::{self, CopyRows, RowMeta, Store};
use crate::ingest::RunSummary;
use crate::kafka;
use crate::tools::generate::{EventGenerator, GeneratorConfig};
use crate::tools::produce::{self, ProduceOptions};

/// Benchmark parameters.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Events to store.
    pub events: u64,
    /// Partitions of the benchmark topics.
    pub partitions: i32,
    /// How long the latency phase feeds the sink.
    pub latency_duration: Duration,
}

/// The JSON line `bench` prints.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Events per phase.
    pub events: u64,
    /// COPY straight into the table over one connection, in the format the store uses (binary),
    /// rows per second: what one store stream can reach.
    pub ceiling_rows_per_s: f64,
    /// Every configuration measured (named like `binary_2_streams`), rows per second.
    pub ceilings: BTreeMap<String, f64>,
    /// The highest of `ceilings`: what this PostgreSQL takes with the best configuration tried.
    pub best_ceiling_rows_per_s: f64,
    /// The configuration that reached `best_ceiling_rows_per_s`.
    pub best_ceiling_config: String,
    /// The sink, first fetch to last commit, events per second.
    pub pipeline_events_per_s: f64,
    /// `pipeline_events_per_s / ceiling_rows_per_s`.
    pub pipeline_to_ceiling: f64,
    /// `pipeline_events_per_s / best_ceiling_rows_per_s`.
    pub pipeline_to_best_ceiling: f64,
    /// 99th percentile end-to-end latency at `latency_rate_eps`, milliseconds.
    pub p99_latency_ms: Option<u64>,
    /// Median of the same.
    pub p50_latency_ms: Option<u64>,
    /// The feed rate of the latency phase (half the pipeline throughput).
    pub latency_rate_eps: f64,
    /// The sink's peak resident set size over both sink runs, MiB.
    pub peak_rss_mb: Option<f64>,
    /// The pipeline run's own summary: where its time went.
    pub pipeline: RunSummary,
    /// Where the machine's CPU went during the pipeline run, per event stored (Linux).
    pub pipeline_cpu: Option<CpuFigures>,
    /// The machine's busy CPU per row while each ceiling was measured (PostgreSQL, almost all
    /// of it), microseconds.
    pub ceiling_cpu_us_per_row: BTreeMap<String, f64>,
    /// Every phase (each ceiling, the pipeline) began right after a `CHECKPOINT`, so none paid
    /// for writing out what an earlier one left in PostgreSQL's buffers, and each started its
    /// checkpoint cycle (and the full-page images that follow a checkpoint) at the same point.
    /// False when the role may not run `CHECKPOINT` (it needs superuser or `pg_checkpoint`).
    pub checkpointed: bool,
    /// `auditflow verify` over what both phases stored: its verdict and rate.
    pub verify: VerifyFigures,
}

/// CPU time per event stored during the pipeline run, microseconds, split by process.
///
/// With every process on one machine, the pipeline's rate is at most the machine's cores
/// divided by the sum: what the sink spends per event is taken from what PostgreSQL could
/// otherwise have used.
#[derive(Debug, Clone, Serialize)]
pub struct CpuFigures {
    /// The sink process (`auditflow run`): fetch, decode, encode, store streams, librdkafka.
    pub sink_us_per_event: f64,
    /// This process: the in-process mock broker serving the sink's fetches, when no brokers
    /// are configured.
    pub bench_us_per_event: f64,
    /// Everything else on the machine: PostgreSQL's backends and WAL writer, mostly.
    pub rest_us_per_event: f64,
    /// The CPUs this benchmark may run on (the machine's, unless it was started pinned with
    /// `taskset`), for reading the sum against.
    pub cpus: usize,
}

/// Busy CPU time of the whole machine and of this process, seconds.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    machine_s: f64,
    own_s: f64,
}

impl CpuSample {
    fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        // cpu user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy.
        let ticks: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|field| field.parse().ok())
            .collect::<Option<_>>()?;
        let busy = ticks.get(..8)?.iter().sum::<u64>() - ticks[3] - ticks[4];
        Some(CpuSample {
            // USER_HZ, 100 per second (see `process_cpu_s`).
            machine_s: busy as f64 / 100.0,
            own_s: process_cpu_s()?,
        })
    }

    /// Busy machine CPU since `self`, per row, microseconds.
    fn machine_us_per_row_since(&self, rows: usize) -> Option<f64> {
        let now = Self::now()?;
        Some((now.machine_s - self.machine_s) * 1e6 / rows.max(1) as f64)
    }
}

/// What `auditflow verify` did with the benchmark's rows.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyFigures {
    /// The chain verified.
    pub intact: bool,
    /// Chains (one per sink run).
    pub chains: u64,
    /// Links checked.
    pub links: u64,
    /// Rows read and recomputed.
    pub rows: u64,
    /// Seconds.
    pub elapsed_s: f64,
    /// Rows per second.
    pub rows_per_s: f64,
}

/// Runs the benchmark.
pub async fn run(mut config: Config, options: &BenchOptions) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(options.events > 0, "--events must be positive");
    let suffix: u32 = rand::random();
    let mut _mock = None;
    let brokers = match config.kafka.kafka_brokers.clone() {
        Some(brokers) => brokers,
        None => {
            let cluster = MockCluster::new(1).context("starting the mock Kafka cluster")?;
            let brokers = cluster.bootstrap_servers();
            _mock = Some(cluster);
            brokers
        }
    };
    config.kafka.kafka_brokers = Some(brokers.clone());
    let database_url = config
        .database
        .database_url
        .get_or_insert_with(|| Secret::new(crate::tools::demo::DEFAULT_DATABASE_URL))
        .clone();
    let topic = format!("auditflow-bench-{suffix:08x}");
    let latency_topic = format!("{topic}-latency");
    let dlq_topic = format!("{topic}.dlq");
    if let Some(cluster) = &_mock {
        for (name, partitions) in [
            (&topic, options.partitions),
            (&latency_topic, options.partitions),
            (&dlq_topic, 1),
        ] {
            cluster
                .create_topic(name, partitions, 1)
                .context("creating a benchmark topic")?;
        }
    }
    let ceiling_schemas: Vec<String> = CEILING_CONFIGS
        .iter()
        .map(|config| format!("auditflow_bench_ceiling_{suffix:08x}_{}", config.name()))
        .collect();
    let pipeline_schema = format!("auditflow_bench_{suffix:08x}");
    // The schemas go whatever happens, so a failed run leaves nothing behind.
    let report: anyhow::Result<BenchReport> = async {
        tracing::info!(events = options.events, "generating events");
        let payloads = generate(options.events, u64::from(suffix));
        let (ceilings, ceiling_cpu_us_per_row) =
            measure_ceilings(&config, database_url.expose(), &ceiling_schemas, &payloads).await?;
        let ceiling = ceilings
            .get(&CeilingConfig::STORE.name())
            .copied()
            .context("the store's configuration was not measured")?;
        let (best_ceiling_config, best_ceiling) = ceilings
            .iter()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(name, rate)| (name.clone(), *rate))
            .context("no ceiling measured")?;

        tracing::info!(%topic, "producing the benchmark events");
        produce_payloads(&brokers, &config, &topic, options.partitions, &payloads).await?;
        let retained = retained_messages(&brokers, &config, &topic)?;
        anyhow::ensure!(
            retained == options.events,
            "the broker kept {retained} of {} events; use more --partitions",
            options.events
        );
        drop(payloads);

        let env = SinkEnv {
            brokers: brokers.clone(),
            database_url: database_url.expose().to_owned(),
            schema: pipeline_schema.clone(),
            dlq_topic: dlq_topic.clone(),
            redis_url: config.redis.redis_url.expose().to_owned(),
        };
        tracing::info!("running the sink over the backlog");
        let checkpointed = checkpoint(database_url.expose()).await;
        let cpu_before = CpuSample::now();
        let pipeline = env
            .run(&topic, &format!("bench-{suffix:08x}"), |_| async { Ok(()) })
            .await?;
        let pipeline_cpu = cpu_figures(cpu_before, &pipeline);
        anyhow::ensure!(
            pipeline.stored == options.events,
            "the sink stored {} of {} events",
            pipeline.stored,
            options.events
        );
        let pipeline_rate = pipeline.stored as f64 / pipeline.active_s.max(1e-6);

        let latency_rate = pipeline_rate / 2.0;
        let latency_events = (latency_rate * options.latency_duration.as_secs_f64()).ceil() as u64;
        tracing::info!(
            rate = latency_rate,
            events = latency_events,
            "measuring latency at half throughput"
        );
        let mut latency_config = config.clone();
        latency_config.kafka.kafka_topic = latency_topic.clone();
        let latency_run = env
            .run(
                &latency_topic,
                &format!("bench-latency-{suffix:08x}"),
                |pool| {
                    let config = latency_config.clone();
                    let brokers = brokers.clone();
                    let schema = pipeline_schema.clone();
                    async move {
                        // A small warm-up proves the sink joined the group before the timed feed starts.
                        let warm_up =
                            feed(&brokers, &config, 100, None, u64::from(suffix) + 1).await?;
                        wait_for_rows(&pool, &schema, options.events + warm_up).await?;
                        feed(
                            &brokers,
                            &config,
                            latency_events,
                            Some(latency_rate),
                            u64::from(suffix) + 2,
                        )
                        .await?;
                        Ok(())
                    }
                },
            )
            .await?;

        let pool = crate::db::connect(database_url.expose(), &config.database.pool_settings())
            .await
            .context("connecting to verify the chain")?;
        let verified = crate::ops::verify::verify(
            &pool,
            &pipeline_schema,
            &crate::ops::verify::VerifyOptions::default(),
        )
        .await
        .context("verifying the chain")?;
        pool.close().await;
        Ok(BenchReport {
            verify: VerifyFigures {
                intact: verified.is_intact(),
                chains: verified.chains,
                links: verified.links,
                rows: verified.rows,
                elapsed_s: verified.elapsed_s,
                rows_per_s: verified.rows_per_s,
            },
            events: options.events,
            ceiling_rows_per_s: ceiling,
            ceilings,
            best_ceiling_rows_per_s: best_ceiling,
            best_ceiling_config,
            pipeline_events_per_s: pipeline_rate,
            pipeline_to_ceiling: pipeline_rate / ceiling,
            pipeline_to_best_ceiling: pipeline_rate / best_ceiling,
            p99_latency_ms: latency_run.latency_p99_ms,
            p50_latency_ms: latency_run.latency_p50_ms,
            latency_rate_eps: latency_rate,
            peak_rss_mb: match (pipeline.peak_rss_mb, latency_run.peak_rss_mb) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
            pipeline,
            pipeline_cpu,
            ceiling_cpu_us_per_row,
            checkpointed,
        })
    }
    .await;
    let schemas: Vec<&str> = ceiling_schemas
        .iter()
        .map(String::as_str)
        .chain([pipeline_schema.as_str()])
        .collect();
    drop_schemas(database_url.expose(), &schemas).await;
    report
}

fn generate(count: u64, seed: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    EventGenerator::new(GeneratorConfig {
        count,
        duplicate_ratio: 0.0,
        invalid_ratio: 0.0,
        seed,
        now: Utc::now(),
    })
    .map(|record| (record.key, record.payload))
    .collect()
}

/// A COPY format and a number of concurrent connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CeilingConfig {
    binary: bool,
    streams: usize,
}

/// What the ceilings measure, in this order (text first: it is derived from the binary rows).
const CEILING_CONFIGS: [CeilingConfig; 4] = [
    CeilingConfig {
        binary: false,
        streams: 1,
    },
    CeilingConfig::STORE,
    CeilingConfig {
        binary: true,
        streams: 2,
    },
    CeilingConfig {
        binary: true,
        streams: 4,
    },
];

impl CeilingConfig {
    /// What one store task does: binary COPY over one connection.
    const STORE: CeilingConfig = CeilingConfig {
        binary: true,
        streams: 1,
    };

    /// The key in the report's `ceilings`, e.g. `binary_2_streams`.
    fn name(&self) -> String {
        let format = if self.binary { "binary" } else { "text" };
        let streams = if self.streams == 1 {
            "stream"
        } else {
            "streams"
        };
        format!("{format}_{}_{streams}", self.streams)
    }
}

/// The rows of the ceilings, per batch of the default size, in both formats.
struct CeilingRows {
    binary: Vec<CopyRows>,
    /// COPY text of the same rows.
    text: Vec<Vec<u8>>,
}

/// Measures every [`CEILING_CONFIGS`] entry, the i-th into a fresh table in `schemas[i]`.
async fn measure_ceilings(
    config: &Config,
    database_url: &str,
    schemas: &[String],
    payloads: &[(Vec<u8>, Vec<u8>)],
) -> anyhow::Result<(BTreeMap<String, f64>, BTreeMap<String, f64>)> {
    let binary = encode_batches(payloads, config.batch.batch_max_events)?;
    let rows = Arc::new(CeilingRows {
        text: to_copy_text(&config.database, database_url, &binary).await?,
        binary,
    });
    let mut ceilings = BTreeMap::new();
    let mut cpu = BTreeMap::new();
    for (ceiling, schema) in CEILING_CONFIGS.iter().zip(schemas) {
        checkpoint(database_url).await;
        let measured = measure_ceiling(config, database_url, schema, *ceiling, &rows).await;
        // Its rows are not needed again: dropped now, their pages are not written out while the
        // next phase runs.
        drop_schemas(database_url, &[schema.as_str()]).await;
        let (rate, cpu_us_per_row) = measured?;
        tracing::info!(config = %ceiling.name(), rows_per_s = rate, "ceiling measured");
        ceilings.insert(ceiling.name(), rate);
        if let Some(us) = cpu_us_per_row {
            cpu.insert(ceiling.name(), us);
        }
    }
    Ok((ceilings, cpu))
}

/// Splits the machine's CPU time since `before` between the sink, this process and the rest
/// (`None` where there is no /proc to read them from).
fn cpu_figures(before: Option<CpuSample>, pipeline: &RunSummary) -> Option<CpuFigures> {
    let after = CpuSample::now()?;
    let (before, sink_s) = (before?, pipeline.cpu_s?);
    let per_event = |seconds: f64| seconds * 1e6 / pipeline.stored.max(1) as f64;
    let machine_s = after.machine_s - before.machine_s;
    let own_s = after.own_s - before.own_s;
    Some(CpuFigures {
        sink_us_per_event: per_event(sink_s),
        bench_us_per_event: per_event(own_s),
        rest_us_per_event: per_event((machine_s - sink_s - own_s).max(0.0)),
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
    })
}

/// Decodes the payloads and encodes them as the sink does, one [`CopyRows`] per batch.
fn encode_batches(
    payloads: &[(Vec<u8>, Vec<u8>)],
    batch_size: usize,
) -> anyhow::Result<Vec<CopyRows>> {
    let decoder = Decoder::embedded();
    let mut batches = Vec::new();
    for (index, chunk) in payloads.chunks(batch_size.max(1)).enumerate() {
        let mut rows = CopyRows::new();
        for (position, (_, payload)) in chunk.iter().enumerate() {
            let decoded = decoder
                .decode(payload)
                .context("decoding a generated event")?;
            rows.push(
                &decoded.event,
                RowMeta {
                    content_hash: content_hash(&decoded.event),
                    schema_version: decoded.writer.file_version(),
                    writer_schema_id: Some(decoded.writer.number()),
                    topic: "bench",
                    partition: 0,
                    offset: (index * batch_size + position) as i64,
                    kafka_timestamp: Some(Utc::now()),
                },
            );
        }
        batches.push(rows);
    }
    Ok(batches)
}

/// The same rows in COPY text, as PostgreSQL itself writes them: each batch goes through the
/// connection's temporary staging table (binary in, text out) in a transaction that leaves
/// nothing behind (the table is emptied at commit). The sink has no text encoder any more.
async fn to_copy_text(
    database: &crate::config::DatabaseConfig,
    database_url: &str,
    batches: &[CopyRows],
) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut database = database.clone();
    database.db_max_connections = 1;
    let pool = store::connect(&database, database_url).await?;
    let mut conn = pool.acquire().await?;
    let mut texts = Vec::with_capacity(batches.len());
    for rows in batches {
        let mut tx = conn.begin().await?;
        store::copy_into(
            &mut tx,
            "pg_temp.auditflow_staging",
            rows.bytes_of(0..rows.len()),
        )
        .await?;
        let mut text = Vec::with_capacity(rows.num_bytes() * 2);
        let mut stream = tx
            .copy_out_raw(&format!(
                "COPY pg_temp.auditflow_staging ({}) TO STDOUT",
                store::COLUMNS
            ))
            .await?;
        while let Some(chunk) = stream.try_next().await? {
            text.extend_from_slice(&chunk);
        }
        drop(stream);
        tx.commit().await?;
        let num_lines = text.iter().filter(|&&byte| byte == b'\n').count();
        anyhow::ensure!(
            num_lines == rows.len(),
            "COPY text of a batch has {num_lines} lines for {} rows",
            rows.len()
        );
        texts.push(text);
    }
    Ok(texts)
}

/// COPYs every batch into a fresh copy of the table in `schema`, one transaction per batch, over
/// `ceiling.streams` connections at once (stream i takes batches i, i + streams, ...): rows per
/// second, and the machine's busy CPU per row over the same span.
async fn measure_ceiling(
    config: &Config,
    database_url: &str,
    schema: &str,
    ceiling: CeilingConfig,
    rows: &Arc<CeilingRows>,
) -> anyhow::Result<(f64, Option<f64>)> {
    let mut database = config.database.clone();
    database.db_schema = schema.to_owned();
    database.db_max_connections = u32::try_from(ceiling.streams).unwrap_or(u32::MAX);
    let pool = store::connect(&database, database_url).await?;
    crate::db::migrate(&pool, schema).await?;
    let store = Store::new(
        pool.clone(),
        schema,
        Arc::new(Breaker::new("postgres", BreakerConfig::INGEST)),
    );
    store
        .ensure_partitions(
            rows.binary
                .iter()
                .flat_map(|rows| rows.days().iter().copied()),
        )
        .await?;
    let table = format!("{}.events", quote_ident(schema));
    // Every connection is open before the clock starts.
    let mut connections = Vec::with_capacity(ceiling.streams);
    for _ in 0..ceiling.streams {
        connections.push(pool.acquire().await?);
    }
    let cpu_before = CpuSample::now();
    let started = Instant::now();
    let mut streams = tokio::task::JoinSet::new();
    for (stream, mut conn) in connections.into_iter().enumerate() {
        let rows = Arc::clone(rows);
        let table = table.clone();
        streams.spawn(async move {
            let num_batches = rows.binary.len();
            for batch in (stream..num_batches).step_by(ceiling.streams) {
                let mut tx = conn.begin().await?;
                if ceiling.binary {
                    let binary = &rows.binary[batch];
                    store::copy_into(&mut tx, &table, binary.bytes_of(0..binary.len())).await?;
                } else {
                    copy_text(&mut tx, &table, &rows.text[batch]).await?;
                }
                tx.commit().await?;
            }
            Ok::<(), sqlx::Error>(())
        });
    }
    while let Some(result) = streams.join_next().await {
        result.context("a COPY stream panicked")??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let num_rows: usize = rows.binary.iter().map(CopyRows::len).sum();
    let cpu_us_per_row = cpu_before.and_then(|before| before.machine_us_per_row_since(num_rows));
    Ok((num_rows as f64 / elapsed, cpu_us_per_row))
}

async fn copy_text(
    conn: &mut sqlx::PgConnection,
    table: &str,
    text: &[u8],
) -> Result<u64, sqlx::Error> {
    let mut copy = conn
        .copy_in_raw(&format!("COPY {table} ({}) FROM STDIN", store::COLUMNS))
        .await?;
    for chunk in text.chunks(1 << 20) {
        if let Err(err) = copy.send(chunk).await {
            let _ = copy.abort("send failed").await;
            return Err(err);
        }
    }
    copy.finish().await
}

async fn produce_payloads(
    brokers: &str,
    config: &Config,
    topic: &str,
    partitions: i32,
    payloads: &[(Vec<u8>, Vec<u8>)],
) -> anyhow::Result<()> {
    let producer = kafka::producer(
        kafka::durable_producer_config(brokers, &config.kafka)
            .set("linger.ms", "20")
            .set("batch.num.messages", "10000"),
        &config.kafka,
        "benchmark producer",
    )?;
    let mut deliveries = Vec::with_capacity(payloads.len());
    // Round-robin over the partitions: the generator keys by tenant (8 of them), and the sticky
    // partitioner fills one partition for 10 ms at a time; either piles megabytes onto single
    // partitions, past the mock broker's 5 MB per-partition retention.
    for (index, (_, payload)) in payloads.iter().enumerate() {
        let partition = (index % partitions.max(1) as usize) as i32;
        let mut record = rdkafka::producer::FutureRecord::<[u8], [u8]>::to(topic)
            .payload(&payload[..])
            .partition(partition);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((_, returned)) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    for delivery in deliveries {
        delivery
            .await
            .context("producer dropped a delivery")?
            .map_err(|(err, _)| err)
            .context("benchmark record not acknowledged")?;
    }
    Ok(())
}

/// Messages the broker holds in `topic` (high minus low watermark over all partitions).
fn retained_messages(brokers: &str, config: &Config, topic: &str) -> anyhow::Result<u64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer<kafka::QuietContext> = kafka::consumer(
        &kafka::client_config(brokers, &config.kafka),
        &config.kafka,
        "metadata consumer",
    )?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut total = 0;
    for topic_metadata in metadata.topics() {
        for partition in topic_metadata.partitions() {
            let (low, high) =
                consumer.fetch_watermarks(topic, partition.id(), Duration::from_secs(10))?;
            total += u64::try_from(high - low).unwrap_or(0);
        }
    }
    Ok(total)
}

async fn feed(
    brokers: &str,
    config: &Config,
    count: u64,
    rate: Option<f64>,
    seed: u64,
) -> anyhow::Result<u64> {
    let summary = produce::produce(
        brokers,
        config,
        &ProduceOptions {
            count,
            duplicate_ratio: 0.0,
            invalid_ratio: 0.0,
            rate,
            seed,
        },
    )
    .await?;
    Ok(summary.distinct_valid)
}

async fn wait_for_rows(pool: &sqlx::PgPool, schema: &str, rows: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let query = format!("SELECT count(*) FROM {}.events", quote_ident(schema));
    loop {
        let count: i64 = sqlx::query_scalar(&query)
            .fetch_one(pool)
            .await
            .unwrap_or(0);
        if count as u64 >= rows {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the sink did not store the warm-up events"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `CHECKPOINT`; false (and a warning) when the role may not or the database is not there.
async fn checkpoint(database_url: &str) -> bool {
    let result = async {
        let mut conn = sqlx::PgConnection::connect(database_url).await?;
        sqlx::query("CHECKPOINT").execute(&mut conn).await?;
        conn.close().await
    }
    .await;
    match result {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!(
                error = %err,
                "CHECKPOINT before a phase failed; phases may pay for each other's writes"
            );
            false
        }
    }
}

async fn drop_schemas(database_url: &str, schemas: &[&str]) {
    if let Ok(pool) = sqlx::PgPool::connect(database_url).await {
        for schema in schemas {
            let _ = sqlx::query(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                quote_ident(schema)
            ))
            .execute(&pool)
            .await;
        }
    }
}

/// How to start the sink as a child process with default settings.
struct SinkEnv {
    brokers: String,
    database_url: String,
    schema: String,
    dlq_topic: String,
    redis_url: String,
}

impl SinkEnv {
    /// Runs `auditflow run --until-idle 3` on `topic`, with `during` running alongside.
    async fn run<F, Fut>(&self, topic: &str, group: &str, during: F) -> anyhow::Result<RunSummary>
    where
        F: FnOnce(sqlx::PgPool) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let exe = std::env::current_exe().context("locating the auditflow binary")?;
        let child = tokio::process::Command::new(exe)
            .args(["run", "--until-idle", "3"])
            .env("AUDITFLOW_KAFKA_BROKERS", &self.brokers)
            .env("AUDITFLOW_KAFKA_TOPIC", topic)
            .env("AUDITFLOW_KAFKA_GROUP_ID", group)
            .env("AUDITFLOW_DLQ_TOPIC", &self.dlq_topic)
            .env("AUDITFLOW_DATABASE_URL", &self.database_url)
            .env("AUDITFLOW_DB_SCHEMA", &self.schema)
            .env("AUDITFLOW_REDIS_URL", &self.redis_url)
            .env("AUDITFLOW_METRICS_ADDR", METRICS_OFF)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the sink")?;
        let pool = sqlx::PgPool::connect(&self.database_url).await?;
        during(pool).await?;
        let output = child.wait_with_output().await?;
        anyhow::ensure!(
            output.status.success(),
            "the sink exited with {}",
            output.status
        );
        let line = String::from_utf8_lossy(&output.stdout);
        serde_json::from_str(line.trim()).context("parsing the sink's summary line")
    }
}
