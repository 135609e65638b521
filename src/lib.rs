//! auditflow: audit events from Kafka into a time-partitioned PostgreSQL table, stored exactly
//! once over at-least-once delivery.
//!
//! ```text
//!                    ┌──────────── sink (one consumer task, one store task) ─────────────┐
//!  Kafka topic ──▶ consume ──▶ decode ──▶ batch ──▶ store ──▶ offsets ──▶ notify ──▶ Redis
//!  (consumer group)   │          │                    │   (stored only     (pub/sub,
//!                     │          └─ undecodable ──┐   │    when durable)    best effort)
//!                     │                           ▼   ▼
//!                     │                        dlq ◀── refused rows (bisected)
//!                     │                         │
//!                     └── rebalance: commit ──  └──▶ dead-letter topic ──▶ (replay, later)
//! ```
//!
//! Which module owns each step:
//! - [`config`]: `AUDITFLOW_*` variables, validated at start-up; [`reload`]: live changes on
//!   SIGHUP.
//! - [`sink`]: the consumer loop and the store loop; pausing when the store falls behind,
//!   draining on shutdown. Start here.
//! - [`decode`]: Confluent-framed and single-object Avro, schema resolution into the v2 reader
//!   schema, validation (ids, JSON details, accepted time window).
//! - [`event`]: the decoded event.
//! - [`batch`]: flush limits (events, bytes, wait) and deduplication within a batch.
//! - [`store`]: COPY into the `events` table, deduplicated by primary key; error classification.
//! - [`partitions`]: the time partitions: created on demand by many replicas at once, premade,
//!   retired after retention (soft delete), held, restored.
//! - [`offsets`]: which offsets may be committed (every earlier message durable).
//! - [`dlq`]: the dead-letter record contract and its acknowledged producer.
//! - [`notify`]: the cache-invalidation publisher on Redis pub/sub, off the hot path.
//! - [`breaker`]: circuit breakers in front of Postgres, Redis and the dead-letter producer.
//! - [`kafka`]: Kafka client settings shared by consumer and producers.
//! - [`observe`]: `/metrics`, `/healthz`, `/readyz` and the live `/status` page, fed by a
//!   [`observe::StatusBoard`]; [`telemetry`]: logging and the metrics recorder's buckets.
//! - [`replay`]: `auditflow replay`, redriving dead letters to their source topic (filtered,
//!   resumable, parked after too many attempts).
//! - [`generate`] and [`produce`]: the load generator; [`demo`]: the self-contained demo;
//!   [`bench`]: the end-to-end benchmark.

pub mod breaker;
pub mod config;
pub mod db;
pub mod event;
pub mod ingest;
pub mod kafka;
pub mod observe;
pub mod ops;
pub mod reload;
pub mod telemetry;
pub mod tools;

pub use config::Config;
pub use ingest::{RunSummary, Sink};
