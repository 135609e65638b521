//! auditflow: audit events from Kafka into a time-partitioned PostgreSQL table, stored exactly
//! once over at-least-once delivery.
//!
//! ```text
//!                    ┌───────────── ingest (one consumer task, one store task) ──────────────┐
//!  Kafka topic ──▶ consume ──▶ decode ──▶ batch ──▶ store ──▶ offsets ──▶ notify ──▶ Redis
//!  (consumer group)   │          │                    │   (stored only     (pub/sub,
//!                     │          └─ undecodable ──┐   │    when durable)    best effort)
//!                     │                           ▼   ▼
//!                     │                        dlq ◀── refused rows (isolate: bisected)
//!                     │                         │
//!                     └── rebalance: commit ──  └──▶ dead-letter topic ──▶ ops::replay
//!
//!  ops::partitions: premake, retire, hold, restore the `events` partitions (db::partition)
//!  observe: /metrics, /healthz, /readyz, /status of a running replica
//!  tools: generate, produce, demo, bench
//! ```
//!
//! Where each part lives, bottom to top (a module only uses those above it in this list):
//! - [`config`]: `AUDITFLOW_*` variables, validated at start-up; [`reload`]: live changes on
//!   SIGHUP. [`breaker`]: circuit breakers; [`kafka`] and [`redis_client`]: client settings;
//!   [`telemetry`]: logging and the metrics recorder's buckets.
//! - [`db`]: what every part shares with PostgreSQL: the pool, migrations, error
//!   classification ([`db::retry`]) and the partitions of `events` as the database sees them
//!   ([`db::partition`]).
//! - [`event`]: the decoded audit event and its identity digest; [`chain`]: the hash chain's
//!   digests (rows, days, links), shared by the store that appends and `verify` that checks.
//! - [`observe`]: the status board a running replica reports into, and the HTTP server that
//!   serves it.
//! - [`ingest`]: the running pipeline ([`ingest::Sink`]; start there): [`ingest::consume`],
//!   [`ingest::decode`] (with [`ingest::decode::registry`], the schema registry client),
//!   [`ingest::batch`], [`ingest::store`], [`ingest::isolate`],
//!   [`ingest::dlq`], [`ingest::offsets`], [`ingest::notify`], [`ingest::stats`].
//! - [`ops`]: operator commands: [`ops::partitions`] (plan, apply, holds, restore, and the
//!   maintenance loop `run` starts), [`ops::replay`] (redriving dead letters) and
//!   [`ops::schemas`] (can auditflow read a registry subject's versions).
//! - [`tools`]: the load generator ([`tools::generate`], with the Avro encoder), `produce`,
//!   `demo` and `bench`.
//! - [`serve`]: `auditflow serve`, the read side: the query API, its caches and their
//!   invalidation (reads the table and the committed-batch log; never touches `ingest`).
//! - [`service`]: `auditflow run`, one replica: the sink, partition upkeep beside it and the
//!   observability endpoints, built and stopped together.
//! - `main.rs`: the command line, which only parses, sets up telemetry and calls the library.

#![deny(missing_docs)]

pub mod breaker;
pub mod chain;
pub mod config;
pub mod db;
pub mod event;
pub mod ingest;
pub mod kafka;
pub mod observe;
pub mod ops;
pub mod redis_client;
pub mod reload;
pub mod serve;
pub mod service;
pub mod telemetry;
pub mod tools;

pub use config::Config;
pub use ingest::{RunSummary, Sink};
