//! Operator commands: partition upkeep ([`partitions`]) and dead-letter replay ([`replay`]).
//!
//! Owns: the `partitions` and `replay` subcommands and the maintenance loop `auditflow run`
//! starts. May touch: DDL on the `events` table's partitions and the lifecycle tables (through
//! [`crate::db::partition`] and their own statements), the dead-letter and source topics. Never
//! writes rows into `events`: replayed records go back through Kafka and the sink.

pub mod partitions;
pub mod replay;
