//! Check and quota inside the proxy: every decision that must block a request is made here,
//! in-process, from compiled configuration, in microseconds.
//!
//! ```text
//! model (nodemesh-config: RBAC, local_ratelimit, global quota)
//!   -> compile ([`chain::HttpChain::compile`], [`rbac::Engine::compile`]): indexes, buckets
//!   -> per request: [`chain::HttpChain::check`] over [`Attributes`] -> [`Verdict`]
//!        rbac     (DENY / ALLOW / LOG filters in order, shadow rules reported)
//!        local    (token buckets by descriptor, filter_enabled / filter_enforced)
//!        quota    (tokens from this proxy's lease of the cluster-wide Redis counter)
//! ```
//!
//! Owns: RBAC evaluation (policies indexed by destination port and by exact principal, so
//! unrelated policies cost nothing), local token buckets, the leased global quota and its
//! background leasing from Redis ([`quota`]), and the counters of every decision.
//!
//! Must not: do I/O on the request path. A request only reads atomics and compiled
//! structures; Redis is talked to by a background task per quota, and a dead Redis is
//! noticed by that task (timeouts), never by a waiting request.
pub mod attrs;
pub mod chain;
pub mod quota;
pub mod ratelimit;
pub mod rbac;
pub mod stats;
mod verdict;

pub use attrs::{Attributes, HttpAttributes};
pub use chain::{ConnScope, HttpChain, NetworkChain};
pub use verdict::{Denial, Verdict};

/// What can go wrong in the policy crate (at start-up or in the background; never on the
/// request path, which only decides).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("redis {addr}: {source}")]
    Redis {
        addr: std::net::SocketAddr,
        #[source]
        source: redis::RedisError,
    },
    #[error("redis {addr}: no answer within {timeout:?}")]
    RedisTimeout {
        addr: std::net::SocketAddr,
        timeout: std::time::Duration,
    },
    #[error("redis {addr}: unexpected reply {reply}")]
    RedisReply {
        addr: std::net::SocketAddr,
        reply: String,
    },
}
