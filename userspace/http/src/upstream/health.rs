//! Active HTTP health checking and DNS refresh: the background tasks of a cluster.
//!
//! As in Envoy, an endpoint under active checking starts unhealthy and becomes healthy after
//! its first passing check; after that it takes `unhealthy_threshold` consecutive failures
//! to mark it unhealthy and `healthy_threshold` consecutive passes to bring it back. Checks
//! come from the node proxy itself (no source pod). The tasks hold only a weak reference
//! and are aborted when their cluster is retired (removed from or replaced in the
//! configuration) or dropped; a cluster an update keeps keeps its tasks and their streaks.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Weak, atomic::Ordering},
};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn;
use hyper_util::rt::TokioIo;
use nodemesh_config::model::{Discovery, Endpoint, HealthCheck};
use tracing::{info, warn};

use super::{ClusterState, DNS_RETRY};
use crate::{Connector, Source};

/// Starts the background tasks `cluster` needs (health checks, DNS), if any.
pub(crate) fn start(cluster: &Arc<ClusterState>, connector: &Arc<dyn Connector>) {
    for check in &cluster.config.health_checks {
        let weak = Arc::downgrade(cluster);
        let check = check.clone();
        let connector = connector.clone();
        let task = tokio::spawn(async move { check_loop(weak, check, connector).await });
        cluster.add_task(task.abort_handle());
    }
    if let Discovery::StrictDns { names, refresh } = &cluster.config.discovery {
        let weak = Arc::downgrade(cluster);
        let (names, refresh) = (names.clone(), *refresh);
        let task = tokio::spawn(async move { dns_loop(weak, names, refresh).await });
        cluster.add_task(task.abort_handle());
    }
}

async fn check_loop(
    cluster: Weak<ClusterState>,
    check: HealthCheck,
    connector: Arc<dyn Connector>,
) {
    // Per endpoint: consecutive passes (positive) or failures (negative); absent until the
    // endpoint's first check.
    let mut streaks: HashMap<SocketAddr, i64> = HashMap::new();
    loop {
        let Some(state) = cluster.upgrade() else {
            return;
        };
        let hosts = state.hosts();
        let name = state.name().to_owned();
        drop(state);
        for host in hosts.iter() {
            let ok = probe(&check, host.address, &host.hostname, &name, &connector).await;
            let first = !streaks.contains_key(&host.address);
            let streak = streaks.entry(host.address).or_insert(0);
            *streak = next_streak(*streak, ok);
            let was = host.active_ok.load(Ordering::Relaxed);
            let now = verdict(&check, was, first, *streak);
            if now != was {
                host.active_ok.store(now, Ordering::Relaxed);
                if now {
                    info!(cluster = %name, host = %host.address, "health check passed: healthy");
                } else {
                    warn!(cluster = %name, host = %host.address, "health check failed: unhealthy");
                }
            }
        }
        streaks.retain(|addr, _| hosts.iter().any(|h| h.address == *addr));
        tokio::time::sleep(check.interval).await;
    }
}

fn next_streak(streak: i64, ok: bool) -> i64 {
    match (ok, streak) {
        (true, s) if s > 0 => s + 1,
        (true, _) => 1,
        (false, s) if s < 0 => s - 1,
        (false, _) => -1,
    }
}

/// Envoy's thresholds; "during startup, only a single successful health check is required
/// to mark a host healthy" (the endpoint's first check).
fn verdict(check: &HealthCheck, was_healthy: bool, first_check: bool, streak: i64) -> bool {
    if was_healthy {
        streak > -i64::from(check.unhealthy_threshold.max(1))
    } else {
        streak > 0 && (first_check || streak >= i64::from(check.healthy_threshold.max(1)))
    }
}

/// One HTTP GET of the check's path.
async fn probe(
    check: &HealthCheck,
    addr: SocketAddr,
    hostname: &str,
    cluster: &str,
    connector: &Arc<dyn Connector>,
) -> bool {
    let attempt = async {
        let stream = connector.connect(addr, &Source::node()).await.ok()?;
        let (mut sender, connection) = conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
        tokio::spawn(connection);
        let host = check
            .host
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| {
                if hostname.is_empty() {
                    cluster.to_owned()
                } else {
                    hostname.to_owned()
                }
            });
        let req = Request::get(check.path.as_str())
            .header(http::header::HOST, host)
            .header(http::header::USER_AGENT, "Envoy/HC")
            .body(Empty::<Bytes>::new())
            .ok()?;
        let response = sender.send_request(req).await.ok()?;
        let status = response.status().as_u16();
        // Read the body so the connection closes cleanly.
        let _ = response.into_body().collect().await;
        Some(status)
    };
    match tokio::time::timeout(check.timeout, attempt).await {
        Ok(Some(status)) => check
            .expected_statuses
            .iter()
            .any(|(lo, hi)| status >= *lo && status < *hi),
        _ => false,
    }
}

async fn dns_loop(
    cluster: Weak<ClusterState>,
    names: Vec<(String, u16, u32)>,
    refresh: std::time::Duration,
) {
    loop {
        let mut endpoints = Vec::new();
        let mut failed = false;
        for (name, port, weight) in &names {
            match tokio::net::lookup_host((name.as_str(), *port)).await {
                Ok(addrs) => endpoints.extend(addrs.map(|address| Endpoint {
                    address,
                    hostname: name.clone(),
                    weight: *weight,
                    healthy: true,
                })),
                Err(e) => {
                    failed = true;
                    warn!(name = %name, error = %e, "DNS resolution failed; keeping the last endpoints");
                }
            }
        }
        let Some(state) = cluster.upgrade() else {
            return;
        };
        // A failed lookup keeps what was known (Envoy keeps the last good result).
        if !failed || !endpoints.is_empty() {
            state.set_endpoints(&endpoints);
        }
        drop(state);
        tokio::time::sleep(if failed {
            DNS_RETRY.min(refresh)
        } else {
            refresh
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn thresholds_follow_envoy() {
        let check = HealthCheck {
            timeout: Duration::from_secs(1),
            interval: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            path: "/healthz".into(),
            host: None,
            expected_statuses: vec![(200, 201)],
        };
        // Startup: one pass is enough.
        assert!(verdict(&check, false, true, next_streak(0, true)));
        // Healthy: two failures are not enough, three are.
        let mut s = 0;
        let mut healthy = true;
        for i in 1..=3 {
            s = next_streak(s, false);
            healthy = verdict(&check, healthy, false, s);
            assert_eq!(healthy, i < 3, "after {i} failures");
        }
        // Back: one pass is not enough any more, two are.
        s = next_streak(s, true);
        assert!(!verdict(&check, false, false, s));
        s = next_streak(s, true);
        assert!(verdict(&check, false, false, s));
    }
}
