//! The running pipeline: Kafka in, Postgres out, dead letters and invalidations on the side.

pub mod batch;
pub mod decode;
pub mod dlq;
pub mod notify;
pub mod offsets;
pub mod sink;
pub mod store;

pub use sink::{RunSummary, Sink};
