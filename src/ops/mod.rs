//! Operator commands: partition upkeep and dead-letter replay.

pub mod partitions;
pub mod replay;
