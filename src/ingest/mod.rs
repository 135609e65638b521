//! The running pipeline: Kafka in, Postgres out, dead letters and invalidations on the side.
//!
//! ```text
//!  consume ──▶ decode ──▶ batch ──▶ store ──────────▶ offsets ──▶ notify
//!  (rebalance,  (schema     (limits,  (COPY, dedup,    (stored only  (Redis pub/sub,
//!   pausing)     plan)       dedup)    isolate refused  when durable)  best effort)
//!                  │                   rows)
//!                  └─ undecodable ──▶ dlq ◀── refused rows
//! ```
//!
//! [`sink::Sink`] wires the steps: [`consume`] owns the consumer and its rebalance hooks,
//! [`decode`] turns payloads into events, [`batch`] collects them (and [`sources`] the records
//! they came from, for the dead-letter topic), [`store`] writes a batch in one
//! transaction, [`isolate`] finds the rows the database refuses, [`dlq`] produces dead letters,
//! `hold` keeps messages waiting for a schema from the registry ([`decode::registry`]),
//! [`offsets`] decides which offsets may be committed, [`notify`] publishes invalidations, and
//! [`stats`] measures the run.
//!
//! May touch: Kafka (its own consumer and the dead-letter producer), the `events` table through
//! [`store`] (DDL only through [`crate::db::partition`]), Redis through [`notify`]. Never runs
//! operator commands; partition upkeep runs beside it ([`crate::ops::partitions`]).

pub mod batch;
pub mod consume;
pub mod decode;
pub mod dlq;
mod hold;
pub mod isolate;
pub mod notify;
pub mod offsets;
pub mod sink;
pub mod sources;
pub mod stats;
pub mod store;

pub use sink::Sink;
pub use stats::RunSummary;
