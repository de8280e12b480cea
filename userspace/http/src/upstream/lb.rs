//! Load balancing over a cluster's eligible hosts: ROUND_ROBIN, LEAST_REQUEST, RANDOM.
//!
//! Weighted like Envoy's: round robin walks a weight-expanded schedule; least request
//! compares `choice_count` random picks by active requests divided by weight; random picks
//! with probability proportional to weight.
use std::sync::{Arc, atomic::Ordering};

use nodemesh_config::model::LbPolicy;

use super::{ClusterState, Host};

/// Picks a host, or `None` when the cluster has no eligible host (Envoy's `UH`).
pub(crate) fn pick(cluster: &ClusterState) -> Option<Arc<Host>> {
    let hosts = cluster.eligible();
    if hosts.is_empty() {
        return None;
    }
    let total: u64 = hosts.iter().map(|h| u64::from(h.weight)).sum();
    let uniform = hosts.iter().all(|h| h.weight == hosts[0].weight);
    let chosen = match cluster.config.lb {
        LbPolicy::RoundRobin => {
            let n = cluster.rr.fetch_add(1, Ordering::Relaxed) as u64;
            if uniform {
                hosts[(n % hosts.len() as u64) as usize].clone()
            } else {
                by_weight(&hosts, n % total)
            }
        }
        LbPolicy::Random => {
            if uniform {
                hosts[fastrand::usize(..hosts.len())].clone()
            } else {
                by_weight(&hosts, fastrand::u64(..total))
            }
        }
        LbPolicy::LeastRequest { choice_count } => {
            let load = |h: &Host| {
                f64::from(h.active_requests.load(Ordering::Relaxed) + 1) / f64::from(h.weight)
            };
            let mut best = hosts[fastrand::usize(..hosts.len())].clone();
            for _ in 1..choice_count.max(2) {
                let other = &hosts[fastrand::usize(..hosts.len())];
                if load(other) < load(&best) {
                    best = other.clone();
                }
            }
            best
        }
    };
    Some(chosen)
}

/// The host whose cumulative weight range holds `point` (in `0..total`).
fn by_weight(hosts: &[Arc<Host>], mut point: u64) -> Arc<Host> {
    for h in hosts {
        let w = u64::from(h.weight);
        if point < w {
            return h.clone();
        }
        point -= w;
    }
    hosts[hosts.len() - 1].clone()
}
