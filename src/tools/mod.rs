//! Tools around the service: the load generator ([`generate`], with the Avro encoder), the
//! `produce` command, the self-contained `demo`, and the end-to-end `bench`.
//!
//! Owns: test and benchmark traffic. May touch: anything, as a client would (topics, scratch
//! schemas); nothing on the ingest path depends on this folder.

pub mod bench;
pub mod demo;
pub mod generate;
pub mod produce;
