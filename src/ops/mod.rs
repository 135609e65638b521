//! Operator commands: partition upkeep ([`partitions`]), dead-letter replay ([`replay`]) and
//! the schema registry check ([`schemas`]).
//!
//! Owns: the `partitions`, `replay` and `schemas` subcommands and the maintenance loop
//! `auditflow run` starts. `schemas` only reads the schema registry. May touch: DDL on the `events` table's partitions and the lifecycle tables (through
//! [`crate::db::partition`] and their own statements), the dead-letter and source topics. Never
//! writes rows into `events`: replayed records go back through Kafka and the sink.

pub mod partitions;
pub mod replay;
pub mod schemas;
pub mod verify;
