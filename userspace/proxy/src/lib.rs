//! The node proxy.
//!
//! Owns: the outbound listener and what happens to each connection the kernel redirects to
//! it ([`outbound`]): recovering the original destination ([`orig_dst`]), attributing it to
//! its source pod, per-pod limits, opening the upstream socket inside the pod's network
//! namespace (the destination sees the pod's own address), the byte relay with half-close,
//! backpressure and idle timeout ([`relay`]), its metrics, and passing live connections to a
//! new agent process ([`handoff`]).
//!
//! Must not: write kernel maps (only consume original destinations), or block a runtime
//! worker (everything here is async; the namespace switch around `socket()` is one syscall).

pub mod config;
pub mod handoff;
mod limits;
pub mod metrics;
pub mod orig_dst;
pub mod outbound;
pub mod relay;

pub use config::ProxyConfig;
pub use outbound::{Connection, ConnectionMeta, Outbound};
