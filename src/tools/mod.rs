//! Tools around the service: the load generator ([`generate`], with the Avro encoder), the
//! `produce` command, the self-contained `demo`, the end-to-end `bench`, and `bench-serve` for the
//! read side.
//!
//! Owns: test and benchmark traffic. May touch: anything, as a client would (topics, scratch
//! schemas); nothing on the ingest path depends on this folder.

pub mod bench;
pub mod bench_serve;
pub mod demo;
pub mod generate;
pub mod produce;
