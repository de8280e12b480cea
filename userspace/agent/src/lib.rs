//! The node agent: the composition root of nodemesh on a node.
//!
//! Owns: the configuration file ([`config`]), the start-up order and the two runtimes
//! ([`app`]), the sockmap switch and its self-test ([`sockmap`]), the admin endpoint
//! ([`admin`]) with the status document ([`status`]) and kernel metrics ([`metrics`]), and the
//! restart handoff ([`handoff`]).
//!
//! Must not: implement data-path behaviour itself; that lives in `nodemesh-proxy`, the
//! kernel side in `nodemesh-loader`, pods in `nodemesh-workloads`.

pub mod admin;
pub mod app;
pub mod config;
pub mod handoff;
pub mod metrics;
pub mod sockmap;
pub mod status;

pub use config::AgentConfig;
