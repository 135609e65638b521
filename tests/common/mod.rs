//! Shared set-up for the integration tests: a Kafka-protocol broker (librdkafka's in-process
//! mock cluster, or the real broker named by `AUDITFLOW_TEST_KAFKA_BROKERS`), a database schema,
//! topics, a consumer group and a Redis channel of the test's own, all with random suffixes.
#![allow(dead_code)]

pub mod db;
pub mod registry;
pub mod servers;

// Not every test crate uses each of them.
#[allow(unused_imports)]
pub use db::{database_url, drop_schema_blocking, redis_url, run_sql_blocking};

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use auditflow::config::Config;
use auditflow::tools::produce::{self, ProduceOptions, ProduceSummary};
use rand::Rng;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// A random lowercase suffix.
pub fn suffix() -> String {
    let mut rng = rand::rng();
    (0..10)
        .map(|_| rng.sample(rand::distr::Alphanumeric) as char)
        .collect::<String>()
        .to_lowercase()
}

/// The broker for one test.
pub enum TestKafka {
    /// librdkafka's mock cluster, owned by this test.
    Mock(MockCluster<'static, DefaultProducerContext>),
    /// A real broker shared by all tests; topics get random names.
    Real(String),
}

impl TestKafka {
    /// Starts a mock cluster, or uses `AUDITFLOW_TEST_KAFKA_BROKERS`.
    pub fn start() -> Self {
        match std::env::var("AUDITFLOW_TEST_KAFKA_BROKERS") {
            Ok(brokers) if !brokers.is_empty() => TestKafka::Real(brokers),
            _ => TestKafka::Mock(MockCluster::new(1).expect("mock cluster")),
        }
    }

    /// Bootstrap servers.
    pub fn brokers(&self) -> String {
        match self {
            TestKafka::Mock(cluster) => cluster.bootstrap_servers(),
            TestKafka::Real(brokers) => brokers.clone(),
        }
    }

    /// Creates a topic.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        match self {
            TestKafka::Mock(cluster) => cluster
                .create_topic(name, partitions, 1)
                .expect("create topic"),
            TestKafka::Real(brokers) => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", brokers)
                    .create()
                    .expect("admin");
                let results = admin
                    .create_topics(
                        &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
                        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
                    )
                    .await
                    .expect("create topics");
                for result in results {
                    result.expect("topic created");
                }
            }
        }
    }

    fn delete_topics(&self, names: &[&str]) {
        if let TestKafka::Real(brokers) = self {
            let brokers = brokers.clone();
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            db::block_on_own_thread(async move {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .create()
                    .expect("admin");
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                let _ = admin.delete_topics(&refs, &AdminOptions::new()).await;
            });
        }
    }
}

/// Confluent-framed bytes that are not an Avro datum: the sink dead-letters them as `decode`.
pub const GARBAGE: &[u8] = b"\x00\x00\x00\x00\x02not avro at all";

/// Everything one test owns.
pub struct TestEnv {
    /// The broker.
    pub kafka: TestKafka,
    /// Source topic.
    pub topic: String,
    /// Dead-letter topic.
    pub dlq_topic: String,
    /// Consumer group of the sink.
    pub group: String,
    /// Database schema.
    pub schema: String,
    /// Invalidation channel.
    pub channel: String,
    /// A pool on the test database (search_path is the test's schema).
    pub pool: PgPool,
}

/// The partition ids of `topic`, from the broker's metadata (the topic must exist).
pub fn partitions_of<C: ConsumerContext>(consumer: &impl Consumer<C>, topic: &str) -> Vec<i32> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let topic_metadata = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .expect("topic in metadata");
    assert!(topic_metadata.error().is_none(), "topic {topic} exists");
    topic_metadata.partitions().iter().map(|p| p.id()).collect()
}

impl TestEnv {
    /// Creates topics (source with `partitions` partitions) and picks names.
    pub async fn new(partitions: i32) -> Self {
        // In-process sinks log into the test output (shown for failed tests).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("AUDITFLOW_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .with_test_writer()
            .try_init();
        let id = suffix();
        let kafka = TestKafka::start();
        let topic = format!("audit-events-{id}");
        let dlq_topic = format!("audit-events-{id}.dlq");
        kafka.create_topic(&topic, partitions).await;
        kafka.create_topic(&dlq_topic, 1).await;
        let schema = format!("audit_test_{id}");
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&database_url())
            .await
            .expect("connect to test database");
        TestEnv {
            kafka,
            topic,
            dlq_topic,
            group: format!("auditflow-{id}"),
            schema,
            channel: format!("auditflow.invalidations.{id}"),
            pool,
        }
    }

    /// The `AUDITFLOW_*` variables a sink of this test runs with.
    pub fn vars(&self) -> Vec<(String, String)> {
        [
            ("AUDITFLOW_KAFKA_BROKERS", self.kafka.brokers()),
            ("AUDITFLOW_KAFKA_TOPIC", self.topic.clone()),
            ("AUDITFLOW_DLQ_TOPIC", self.dlq_topic.clone()),
            ("AUDITFLOW_KAFKA_GROUP_ID", self.group.clone()),
            ("AUDITFLOW_DATABASE_URL", database_url()),
            ("AUDITFLOW_DB_SCHEMA", self.schema.clone()),
            ("AUDITFLOW_REDIS_URL", redis_url()),
            ("AUDITFLOW_INVALIDATION_CHANNEL", self.channel.clone()),
            ("AUDITFLOW_BATCH_MAX_EVENTS", "500".into()),
            ("AUDITFLOW_BATCH_MAX_WAIT_MS", "100".into()),
            ("AUDITFLOW_METRICS_ADDR", "off".into()),
            ("AUDITFLOW_DRAIN_TIMEOUT_MS", "15000".into()),
            ("AUDITFLOW_KAFKA_OPT_SESSION_TIMEOUT_MS", "6000".into()),
            ("AUDITFLOW_KAFKA_OPT_HEARTBEAT_INTERVAL_MS", "500".into()),
            (
                "AUDITFLOW_SCHEMA_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/schemas").into(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The sink configuration, with `overrides` applied.
    pub fn config(&self, overrides: &[(&str, &str)]) -> Config {
        let mut vars = self.vars();
        for (key, value) in overrides {
            vars.retain(|(k, _)| k != key);
            vars.push((key.to_string(), value.to_string()));
        }
        Config::from_vars(vars).expect("test config")
    }

    /// Writes generated traffic to the source topic.
    pub async fn produce(
        &self,
        count: u64,
        duplicate_ratio: f64,
        invalid_ratio: f64,
        seed: u64,
    ) -> ProduceSummary {
        self.produce_at(count, duplicate_ratio, invalid_ratio, seed, None)
            .await
    }

    /// Writes generated traffic at `rate` records per second.
    pub async fn produce_at(
        &self,
        count: u64,
        duplicate_ratio: f64,
        invalid_ratio: f64,
        seed: u64,
        rate: Option<f64>,
    ) -> ProduceSummary {
        let config = self.config(&[]);
        produce::produce(
            &self.kafka.brokers(),
            &config,
            &ProduceOptions {
                count,
                duplicate_ratio,
                invalid_ratio,
                rate,
                seed,
            },
        )
        .await
        .expect("produce")
    }

    /// Writes [`GARBAGE`] keyed `tenant-x` with a text and a binary header to the source topic;
    /// returns its partition and offset.
    pub async fn produce_garbage_with_headers(&self) -> (i32, i64) {
        use rdkafka::message::{Header, OwnedHeaders};
        let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", self.kafka.brokers())
            .create()
            .expect("producer");
        let delivered = producer
            .send(
                rdkafka::producer::FutureRecord::to(&self.topic)
                    .key("tenant-x")
                    .payload(GARBAGE)
                    .headers(
                        OwnedHeaders::new()
                            .insert(Header {
                                key: "traceparent",
                                value: Some("00-4bf92f-01"),
                            })
                            .insert(Header {
                                key: "binary",
                                value: Some(&[0u8, 255, 1][..]),
                            }),
                    ),
                Duration::from_secs(5),
            )
            .await
            .expect("produce garbage");
        (delivered.partition, delivered.offset)
    }

    /// Writes `(key, payload)` records to the source topic, in order, and waits for every
    /// acknowledgement.
    pub async fn produce_payloads(&self, records: &[(Vec<u8>, Vec<u8>)]) {
        let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", self.kafka.brokers())
            .set("linger.ms", "5")
            .create()
            .expect("producer");
        let deliveries: Vec<_> = records
            .iter()
            .map(|(key, payload)| {
                producer.send(
                    rdkafka::producer::FutureRecord::to(&self.topic)
                        .key(key)
                        .payload(payload),
                    Duration::from_secs(10),
                )
            })
            .collect();
        for delivery in futures::future::join_all(deliveries).await {
            delivery.expect("record acknowledged");
        }
    }

    /// Rows in the events table.
    pub async fn count_rows(&self) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\".events", self.schema))
            .fetch_one(&self.pool)
            .await
            .unwrap_or(0)
    }

    /// Verifies the schema's hash chain (`auditflow verify`): every link, every row; asserts
    /// that it is intact and that every stored row is in a link. Returns the report.
    pub async fn assert_chain_intact(&self) -> auditflow::ops::verify::VerifyReport {
        let report = auditflow::ops::verify::verify(
            &self.pool,
            &self.schema,
            &auditflow::ops::verify::VerifyOptions::default(),
        )
        .await
        .expect("verify");
        println!("chain: {}", report.to_string().trim_end());
        assert!(report.is_intact(), "the chain must verify: {report}");
        assert_eq!(report.rows_before_chain, 0, "every row is in a link");
        assert_eq!(report.rows as i64, self.count_rows().await, "{report}");
        report
    }

    /// Distinct event ids in the events table.
    pub async fn count_distinct_ids(&self) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(DISTINCT event_id) FROM \"{}\".events",
            self.schema
        ))
        .fetch_one(&self.pool)
        .await
        .expect("count distinct")
    }

    /// Reads the dead-letter topic from the start until `expected` records arrived or `timeout`.
    ///
    /// The reader is assigned every partition of the topic rather than subscribed: it needs no
    /// group, and a group join takes 10-20 s on some brokers, which would eat the timeout (and
    /// let a check that nothing was dead-lettered pass without reading anything).
    pub async fn read_dlq(&self, expected: usize, timeout: Duration) -> Vec<OwnedMessage> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.kafka.brokers())
            .set("group.id", format!("dlq-reader-{}", suffix()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("dlq consumer");
        let mut assignment = TopicPartitionList::new();
        for partition in partitions_of(&consumer, &self.dlq_topic) {
            assignment
                .add_partition_offset(&self.dlq_topic, partition, Offset::Beginning)
                .expect("dlq partition");
        }
        assert!(
            assignment.count() > 0,
            "the dead-letter topic {} has no partitions",
            self.dlq_topic
        );
        consumer.assign(&assignment).expect("assign dlq partitions");
        let mut messages = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while messages.len() < expected {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(message)) => messages.push(message.detach()),
                Ok(Err(err)) => panic!("dlq read failed: {err}"),
                Err(_) => break,
            }
        }
        // Anything beyond `expected` would be a defect: give it a moment to show up.
        if let Ok(Ok(message)) =
            tokio::time::timeout(Duration::from_millis(1500), consumer.recv()).await
        {
            messages.push(message.detach());
        }
        messages
    }

    /// Starts the `auditflow` binary with this test's variables plus `extra`.
    pub fn spawn_sink(&self, args: &[&str], extra: &[(&str, &str)]) -> SinkProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_auditflow"));
        command.args(args).env_clear();
        if let Ok(path) = std::env::var("PATH") {
            command.env("PATH", path);
        }
        command.env(
            "RUST_LOG",
            std::env::var("AUDITFLOW_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        );
        for (key, value) in self.vars() {
            command.env(key, value);
        }
        for (key, value) in extra {
            command.env(key, value);
        }
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map(SinkProcess)
            .expect("spawn auditflow")
    }

    /// Like [`TestEnv::spawn_sink`], with stderr captured into the returned buffer (read by a
    /// thread until the process exits).
    pub fn spawn_sink_captured(
        &self,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> (SinkProcess, std::sync::Arc<std::sync::Mutex<String>>) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_auditflow"));
        command.args(args).env_clear();
        if let Ok(path) = std::env::var("PATH") {
            command.env("PATH", path);
        }
        for (key, value) in self.vars() {
            command.env(key, value);
        }
        for (key, value) in extra {
            command.env(key, value);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn auditflow");
        let captured = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut stderr = child.stderr.take().expect("stderr");
        let sink = std::sync::Arc::clone(&captured);
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buffer = [0u8; 8192];
            while let Ok(read) = stderr.read(&mut buffer) {
                if read == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..read]));
            }
        });
        (SinkProcess(child), captured)
    }

    /// Waits until the table holds at least `rows` rows.
    pub async fn wait_for_rows(&self, rows: i64, timeout: Duration) -> i64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let count = self.count_rows().await;
            if count >= rows || tokio::time::Instant::now() >= deadline {
                return count;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        drop_schema_blocking(&self.schema);
        self.kafka.delete_topics(&[&self.topic, &self.dlq_topic]);
    }
}

/// The events as COPY rows, as the sink would encode them: source partition 1, offsets from 0.
pub fn copy_rows(events: &[auditflow::event::AuditEvent]) -> auditflow::ingest::store::CopyRows {
    copy_rows_at(events, 1, 0)
}

/// The events as COPY rows from source `partition`, offsets from `first_offset`.
pub fn copy_rows_at(
    events: &[auditflow::event::AuditEvent],
    partition: i32,
    first_offset: i64,
) -> auditflow::ingest::store::CopyRows {
    let mut rows = auditflow::ingest::store::CopyRows::new();
    for (index, event) in events.iter().enumerate() {
        rows.push(
            event,
            auditflow::ingest::store::RowMeta {
                content_hash: auditflow::event::content_hash(event),
                schema_version: Some(2),
                writer_schema_id: Some(2),
                topic: "audit-events",
                partition,
                offset: first_offset + index as i64,
                kafka_timestamp: Some(chrono::Utc::now()),
            },
        );
    }
    rows
}

/// An `auditflow` child process that is killed when dropped, so a failing test leaves no sink
/// running behind it.
pub struct SinkProcess(pub Child);

impl std::ops::Deref for SinkProcess {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for SinkProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for SinkProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Sends SIGTERM or SIGKILL to a child.
pub fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} failed");
}

/// Waits for a child to exit, at most `timeout`, without blocking the runtime.
pub async fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    match try_wait_exit(child, timeout).await {
        Some(status) => status,
        None => {
            let _ = child.kill();
            panic!("process did not exit within {timeout:?}");
        }
    }
}

/// Waits for a child to exit, at most `timeout`; `None` if it is still running then.
pub async fn try_wait_exit(
    child: &mut Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of header `name` of a message, as text.
pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    headers
        .iter()
        .filter(|h| h.key == name)
        .last()
        .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
}

/// A plain HTTP/1.0 GET; returns the status code and the body.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())?;
    Some((status, body))
}
