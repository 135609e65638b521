//! Tools around the service: the load generator, the demo and the benchmark.

pub mod bench;
pub mod demo;
pub mod generate;
pub mod produce;
