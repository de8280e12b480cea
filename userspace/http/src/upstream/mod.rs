//! Upstream clusters: endpoints and their health, load balancing, circuit breakers, and
//! pooled connections.
//!
//! One [`ClusterState`] per configured cluster lives as long as the cluster's configuration
//! is unchanged. Endpoint health has three inputs: EDS health status (static), active health
//! checks ([`health`]) and passive outlier detection ([`Host::record`]). As in Envoy, when
//! fewer than half of the endpoints are healthy the balancer ignores health altogether
//! (panic mode) rather than piling every request onto the few that remain.
pub mod health;
pub mod lb;
pub mod pool;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use nodemesh_config::model::{Cluster, Discovery, Endpoint, OutlierDetection};
use tracing::{info, warn};

use crate::stats::{ClusterStats, Limit};

/// Envoy's default `healthy_panic_threshold`: 50 %.
const PANIC_THRESHOLD_PERCENT: usize = 50;

/// A cluster's live state.
#[derive(Debug)]
pub struct ClusterState {
    /// The configuration the state was built with. After an in-place endpoint update its
    /// endpoint list is the old one: the live set is [`Self::hosts`].
    pub config: Arc<Cluster>,
    /// The cluster's name, shared by every request's access log entry and metric labels.
    pub(crate) label: Arc<str>,
    hosts: ArcSwap<Vec<Arc<Host>>>,
    /// No longer in the configuration: connections are not pooled any more.
    retired: AtomicBool,
    /// Health check and DNS tasks, stopped on retirement and on drop.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    pub(crate) rr: AtomicUsize,
    pub(crate) stats: ClusterStats,
    pub(crate) circuit: Circuit,
    pub(crate) pool: pool::Pool,
}

/// One endpoint of a cluster.
#[derive(Debug)]
pub struct Host {
    pub address: SocketAddr,
    pub hostname: String,
    pub weight: u32,
    /// EDS said healthy.
    eds_healthy: bool,
    /// The last active health check verdict (true until one fails enough; a host under
    /// active checking starts unhealthy, see [`health`]).
    pub(crate) active_ok: AtomicBool,
    pub(crate) active_requests: AtomicU32,
    outlier: Mutex<OutlierState>,
}

#[derive(Debug, Default)]
struct OutlierState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// In-flight counts checked against the cluster's circuit breakers.
#[derive(Debug, Default)]
pub(crate) struct Circuit {
    pub connections: AtomicU32,
    pub pending: AtomicU32,
    pub requests: AtomicU32,
    pub retries: AtomicU32,
}

/// A slot in one of the circuit breaker counters, released on drop.
#[derive(Debug)]
pub(crate) struct Slot<'a>(&'a AtomicU32);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A slot that owns its cluster (held by connection tasks).
#[derive(Debug)]
pub(crate) struct OwnedSlot {
    cluster: Arc<ClusterState>,
    limit: Limit,
}

impl Drop for OwnedSlot {
    fn drop(&mut self) {
        self.cluster
            .counter(self.limit)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl ClusterState {
    pub(crate) fn new(config: Arc<Cluster>, stats: ClusterStats) -> Arc<Self> {
        let active_hc = !config.health_checks.is_empty();
        let hosts = match &config.discovery {
            Discovery::Static(endpoints) | Discovery::Eds { endpoints, .. } => {
                endpoints.iter().map(|e| Host::new(e, active_hc)).collect()
            }
            Discovery::StrictDns { .. } | Discovery::OriginalDst { .. } => Vec::new(),
        };
        let state = Arc::new(Self {
            label: config.name.as_str().into(),
            config,
            hosts: ArcSwap::from_pointee(hosts),
            retired: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            rr: AtomicUsize::new(0),
            stats,
            circuit: Circuit::default(),
            pool: pool::Pool::default(),
        });
        state.stats.set_hosts(state.hosts.load().len());
        state
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn hosts(&self) -> Arc<Vec<Arc<Host>>> {
        self.hosts.load_full()
    }

    /// Removed from (or replaced in) the configuration: stops the health check and DNS
    /// tasks and closes idle pooled connections. Requests in flight finish; their
    /// connections are not pooled again.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.stop_tasks();
        self.pool.clear();
    }

    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    pub(crate) fn add_task(&self, task: tokio::task::AbortHandle) {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    fn stop_tasks(&self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }

    /// Replaces the endpoint set (DNS refresh, EDS update), keeping the state (health,
    /// outlier ejection) of endpoints that remain unchanged. An endpoint whose weight,
    /// hostname or EDS health changed is a new host that keeps its active-check verdict.
    pub fn set_endpoints(&self, endpoints: &[Endpoint]) {
        let active_hc = !self.config.health_checks.is_empty();
        let old = self.hosts.load();
        let hosts: Vec<Arc<Host>> = endpoints
            .iter()
            .map(|e| match old.iter().find(|h| h.address == e.address) {
                Some(h) if h.is(e) => h.clone(),
                Some(h) => {
                    let host = Host::new(e, active_hc);
                    host.active_ok
                        .store(h.active_ok.load(Ordering::Relaxed), Ordering::Relaxed);
                    host
                }
                None => Host::new(e, active_hc),
            })
            .collect();
        if hosts.len() != old.len()
            || hosts
                .iter()
                .zip(old.iter())
                .any(|(a, b)| !Arc::ptr_eq(a, b))
        {
            info!(cluster = %self.name(), endpoints = hosts.len(), "endpoints changed");
        }
        self.stats.set_hosts(hosts.len());
        self.hosts.store(Arc::new(hosts));
    }

    /// The hosts a balancer may pick from: the healthy ones, or all of them in panic mode.
    pub(crate) fn eligible(&self) -> Vec<Arc<Host>> {
        let hosts = self.hosts.load();
        let now = Instant::now();
        let healthy: Vec<Arc<Host>> = hosts
            .iter()
            .filter(|h| h.is_healthy(now))
            .cloned()
            .collect();
        if hosts.is_empty() || healthy.len() * 100 >= hosts.len() * PANIC_THRESHOLD_PERCENT {
            healthy
        } else {
            self.stats.panic.inc();
            hosts.iter().cloned().collect()
        }
    }

    pub(crate) fn counter(&self, limit: Limit) -> &AtomicU32 {
        match limit {
            Limit::Connections => &self.circuit.connections,
            Limit::Pending => &self.circuit.pending,
            Limit::Requests => &self.circuit.requests,
            Limit::Retries => &self.circuit.retries,
        }
    }

    fn max(&self, limit: Limit) -> u32 {
        let l = &self.config.limits;
        match limit {
            Limit::Connections => l.max_connections,
            Limit::Pending => l.max_pending_requests,
            Limit::Requests => l.max_requests,
            Limit::Retries => l.max_retries,
        }
    }

    /// Takes a slot under `limit`, or counts a trip and returns `None` (Envoy's overflow).
    pub(crate) fn try_slot(&self, limit: Limit) -> Option<Slot<'_>> {
        self.take(limit).then(|| Slot(self.counter(limit)))
    }

    /// [`Self::try_slot`] for holders that outlive a borrow (connection tasks).
    pub(crate) fn try_owned_slot(self: &Arc<Self>, limit: Limit) -> Option<OwnedSlot> {
        self.take(limit).then(|| OwnedSlot {
            cluster: self.clone(),
            limit,
        })
    }

    fn take(&self, limit: Limit) -> bool {
        let max = self.max(limit);
        let taken = self
            .counter(limit)
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            self.stats.overflow(limit);
        }
        taken
    }

    /// Passive outlier detection: the outcome of one request to `host`.
    pub(crate) fn record(&self, host: &Host, outcome: Outcome) {
        let Some(od) = &self.config.outlier else {
            return;
        };
        let mut state = host.outlier.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Outcome::Success => {
                state.consecutive_5xx = 0;
                state.consecutive_gateway = 0;
                return;
            }
            Outcome::ServerError => {
                state.consecutive_5xx += 1;
                state.consecutive_gateway = 0;
            }
            Outcome::GatewayError => {
                state.consecutive_5xx += 1;
                state.consecutive_gateway += 1;
            }
        }
        let tripped = (od.consecutive_5xx > 0 && state.consecutive_5xx >= od.consecutive_5xx)
            || (od.consecutive_gateway_failure > 0
                && state.consecutive_gateway >= od.consecutive_gateway_failure);
        let now = Instant::now();
        if !tripped || state.ejected_until.is_some_and(|t| t > now) {
            return;
        }
        drop(state);
        if !self.may_eject(od, now) {
            warn!(cluster = %self.name(), host = %host.address, "outlier not ejected: max_ejection_percent reached");
            return;
        }
        let mut state = host.outlier.lock().unwrap_or_else(|p| p.into_inner());
        state.ejections += 1;
        // Envoy: base_ejection_time multiplied by the number of times the host was ejected.
        let time = od.base_ejection_time.saturating_mul(state.ejections);
        state.ejected_until = Some(now + time);
        state.consecutive_5xx = 0;
        state.consecutive_gateway = 0;
        self.stats.ejections.inc();
        warn!(cluster = %self.name(), host = %host.address, ejected_for = ?time, "outlier ejected");
    }

    /// At most `max_ejection_percent` of the hosts are ejected at once (at least one may be).
    fn may_eject(&self, od: &OutlierDetection, now: Instant) -> bool {
        let hosts = self.hosts.load();
        let ejected = hosts.iter().filter(|h| h.is_ejected(now)).count();
        ejected == 0 && od.max_ejection_percent > 0
            || (ejected + 1) * 100 <= hosts.len() * od.max_ejection_percent as usize
    }
}

impl Drop for ClusterState {
    fn drop(&mut self) {
        self.stop_tasks();
    }
}

/// A request's outcome, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    /// A 5xx response other than a gateway error.
    ServerError,
    /// 502, 503, 504, or no response (connect failure, reset, timeout).
    GatewayError,
}

impl Outcome {
    pub(crate) fn of_status(status: u16) -> Self {
        match status {
            502..=504 => Self::GatewayError,
            500..=599 => Self::ServerError,
            _ => Self::Success,
        }
    }
}

impl Host {
    fn new(e: &Endpoint, active_hc: bool) -> Arc<Self> {
        Arc::new(Self {
            address: e.address,
            hostname: e.hostname.clone(),
            weight: e.weight.max(1),
            eds_healthy: e.healthy,
            active_ok: AtomicBool::new(!active_hc),
            active_requests: AtomicU32::new(0),
            outlier: Mutex::new(OutlierState::default()),
        })
    }

    /// An endpoint that exists for one request (ORIGINAL_DST).
    pub(crate) fn transient(address: SocketAddr) -> Arc<Self> {
        Host::new(
            &Endpoint {
                address,
                hostname: String::new(),
                weight: 1,
                healthy: true,
            },
            false,
        )
    }

    /// Whether this host is `e` (as configured).
    fn is(&self, e: &Endpoint) -> bool {
        self.address == e.address
            && self.hostname == e.hostname
            && self.weight == e.weight.max(1)
            && self.eds_healthy == e.healthy
    }

    fn is_ejected(&self, now: Instant) -> bool {
        let state = self.outlier.lock().unwrap_or_else(|p| p.into_inner());
        state.ejected_until.is_some_and(|t| t > now)
    }

    pub fn is_healthy(&self, now: Instant) -> bool {
        self.eds_healthy && self.active_ok.load(Ordering::Relaxed) && !self.is_ejected(now)
    }

    /// `healthy`, `failed_active_hc`, `failed_eds_health`, `ejected`: as `/clusters` shows it.
    pub fn health_label(&self) -> &'static str {
        if !self.eds_healthy {
            "failed_eds_health"
        } else if !self.active_ok.load(Ordering::Relaxed) {
            "failed_active_hc"
        } else if self.is_ejected(Instant::now()) {
            "failed_outlier_check"
        } else {
            "healthy"
        }
    }
}

/// How long until a DNS cluster is resolved again after a failure.
pub(crate) const DNS_RETRY: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use nodemesh_config::model::{CircuitBreakers, Http2Settings, LbPolicy, UpstreamProtocol};

    use super::*;

    fn endpoint(port: u16, weight: u32, healthy: bool) -> Endpoint {
        Endpoint {
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            hostname: String::new(),
            weight,
            healthy,
        }
    }

    fn cluster(endpoints: Vec<Endpoint>) -> Cluster {
        Cluster {
            name: "c".into(),
            discovery: Discovery::Eds {
                service_name: "c".into(),
                endpoints,
            },
            lb: LbPolicy::RoundRobin,
            connect_timeout: Duration::from_secs(1),
            limits: CircuitBreakers::default(),
            protocol: UpstreamProtocol::Http1,
            http2: Http2Settings::default(),
            idle_timeout: None,
            max_requests_per_connection: None,
            health_checks: Vec::new(),
            outlier: None,
        }
    }

    #[test]
    fn an_eds_update_keeps_unchanged_hosts_and_replaces_changed_ones() {
        let mut registry = prometheus_client::registry::Registry::default();
        let stats = crate::stats::Stats::register(&mut registry);
        let v1 = cluster(vec![endpoint(1, 1, true), endpoint(2, 1, true)]);
        let v2 = cluster(vec![
            endpoint(1, 1, true),
            endpoint(2, 1, false),
            endpoint(3, 5, true),
        ]);
        assert!(v1.same_except_endpoints(&v2) && v1 != v2);
        let state = ClusterState::new(Arc::new(v1), stats.cluster("c"));
        let before = state.hosts();
        state.set_endpoints(v2.endpoints().expect("eds"));
        let after = state.hosts();
        assert_eq!(after.len(), 3);
        assert!(
            Arc::ptr_eq(&before[0], &after[0]),
            "unchanged endpoint keeps its state"
        );
        assert!(!Arc::ptr_eq(&before[1], &after[1]));
        assert_eq!(after[1].health_label(), "failed_eds_health");
        assert_eq!(after[2].weight, 5);
        let now = Instant::now();
        let eligible: Vec<u16> = state.eligible().iter().map(|h| h.address.port()).collect();
        assert_eq!(eligible, [1, 3]);
        assert!(after[0].is_healthy(now));
    }
}
