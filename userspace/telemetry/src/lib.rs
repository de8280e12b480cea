//! How nodemesh reports: logging setup ([`logging`]) and the metric families whose names
//! and labels follow Istio's standard metrics, so that existing dashboards work
//! ([`istio`]).
//!
//! Must not: do I/O on the request path. Metrics are in-memory atomics, encoded only when
//! the admin endpoint is scraped.

pub mod access_log;
pub mod istio;
pub mod logging;
pub mod series;
