//! The Convoy agent as a library: the daemon, its admin API and client, the dev cluster
//! and the CLI. The `convoy` binary (`main.rs`) only parses arguments and dispatches;
//! tests and benchmarks use the client and the API types from here.

pub mod api;
pub mod certs;
pub mod cli;
pub mod client;
pub mod config;
pub mod data;
pub mod dev;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod qemu;
pub mod units;
