//! The global quota: cluster-wide limits counted in Redis, enforced by each proxy from its
//! own lease of tokens ([`lease`]), leased in batches by a background task ([`redis`]).
//!
//! A request takes a token from the lease of the current window: a compare-and-swap, no
//! I/O. When the lease runs low the task is woken to lease more; before a window turns the
//! task leases for the next one. Only when the lease is empty and a lease is under way does
//! a request wait, at most the Redis `timeout`; a Redis known to be unreachable is never
//! waited for: `failure_mode` decides at once (open: allow; closed: 500, flag `RLSE`).
pub mod lease;
pub mod redis;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use nodemesh_config::filters::quota::{GlobalQuota, Quota as QuotaConfig};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::sync::Notify;

use crate::{Denial, Verdict, stats::QuotaStats};

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The window index of a wall-clock time: every proxy computes the same one (up to its
/// clock's skew), which is what makes the Redis counter per window shared.
pub fn window_at(now_ms: u64, window: Duration) -> u64 {
    now_ms / (window.as_millis() as u64).max(1)
}

/// One quota's lease and health, shared by every chain that uses it.
#[derive(Debug)]
pub struct Quota {
    pub config: QuotaConfig,
    pub redis: SocketAddr,
    pub domain: String,
    pub fail_open: bool,
    pub timeout: Duration,
    current: lease::Slot,
    next: lease::Slot,
    /// The window Redis said is spent (no tokens left cluster-wide).
    exhausted: AtomicU64,
    healthy: AtomicBool,
    low_water: u64,
    wake: Arc<Notify>,
    refilled: Notify,
    stats: QuotaStats,
    tokens: Gauge,
    allowed: Counter,
    denied: Counter,
    fail_open_count: Counter,
    fail_closed_count: Counter,
}

/// The outcome of [`Quota::take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Allowed,
    /// The window's quota is spent (cluster-wide).
    Exhausted,
    /// Redis is unreachable and no token is left: `failure_mode` decides.
    Unavailable,
}

impl Quota {
    fn new(g: &GlobalQuota, config: &QuotaConfig, stats: QuotaStats) -> Arc<Self> {
        let q = Arc::new(Self {
            config: config.clone(),
            redis: g.redis,
            domain: g.domain.clone(),
            fail_open: g.fail_open,
            timeout: g.timeout,
            current: lease::Slot::default(),
            next: lease::Slot::default(),
            exhausted: AtomicU64::new(u64::MAX),
            // Healthy until a lease fails: the first requests wait (at most `timeout`) for
            // the first lease rather than failing open or closed.
            healthy: AtomicBool::new(true),
            low_water: (config.batch / 2).max(1),
            wake: Arc::new(Notify::new()),
            refilled: Notify::new(),
            tokens: stats.tokens(&config.name),
            allowed: stats.decision(&config.name, "allowed"),
            denied: stats.decision(&config.name, "denied"),
            fail_open_count: stats.decision(&config.name, "fail_open"),
            fail_closed_count: stats.decision(&config.name, "fail_closed"),
            stats,
        });
        redis::spawn(&q);
        q
    }

    /// Returns whether the health changed.
    fn mark_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::AcqRel) != healthy
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// A token from the lease, without waiting.
    fn try_take(&self) -> Option<Take> {
        let window = window_at(now_ms(), self.config.window);
        self.current.promote(&self.next, window);
        if let Some(left) = self.current.take(window) {
            self.tokens.set(i64::try_from(left).unwrap_or(i64::MAX));
            if left < self.low_water {
                self.wake.notify_one();
            }
            return Some(Take::Allowed);
        }
        self.wake.notify_one();
        if self.exhausted.load(Ordering::Acquire) == window {
            return Some(Take::Exhausted);
        }
        if !self.healthy() {
            return Some(Take::Unavailable);
        }
        None
    }

    /// Takes a token; waits only while a lease is under way, at most `timeout`.
    pub async fn take(&self) -> Take {
        if let Some(t) = self.try_take() {
            return self.count(t);
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let refilled = self.refilled.notified();
            if let Some(t) = self.try_take() {
                return self.count(t);
            }
            if tokio::time::timeout_at(deadline, refilled).await.is_err() {
                // The lease did not come in time: as if Redis were away.
                return self.count(self.try_take().unwrap_or(Take::Unavailable));
            }
        }
    }

    fn count(&self, t: Take) -> Take {
        match t {
            Take::Allowed => self.allowed.inc(),
            Take::Exhausted => self.denied.inc(),
            Take::Unavailable if self.fail_open => self.fail_open_count.inc(),
            Take::Unavailable => self.fail_closed_count.inc(),
        };
        t
    }
}

/// Quotas by identity, so that a configuration update keeps the leases (and their tasks)
/// of the quotas it does not change.
#[derive(Debug, Default)]
pub struct Registry {
    quotas: Mutex<HashMap<String, Weak<Quota>>>,
}

impl Registry {
    pub fn get(&self, g: &GlobalQuota, config: &QuotaConfig, stats: &QuotaStats) -> Arc<Quota> {
        let key = format!(
            "{}|{}|{}|{}|{:?}|{}|{}|{:?}",
            g.redis,
            g.domain,
            config.name,
            config.limit,
            config.window,
            config.batch,
            g.fail_open,
            g.timeout
        );
        let mut map = self.quotas.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(q) = map.get(&key).and_then(Weak::upgrade) {
            return q;
        }
        let q = Quota::new(g, config, stats.clone());
        map.insert(key, Arc::downgrade(&q));
        q
    }
}

/// One global quota filter, compiled.
#[derive(Debug)]
pub struct Filter {
    pub name: String,
    pub config: Arc<GlobalQuota>,
    quotas: Vec<Arc<Quota>>,
}

impl Filter {
    pub fn compile(
        name: &str,
        config: &Arc<GlobalQuota>,
        registry: &Registry,
        stats: &QuotaStats,
    ) -> Self {
        Self {
            name: name.to_owned(),
            quotas: config
                .quotas
                .iter()
                .map(|q| registry.get(config, q, stats))
                .collect(),
            config: config.clone(),
        }
    }

    /// Takes a token from every quota whose prefix the path has.
    pub async fn check(&self, path: &str) -> Verdict {
        for q in &self.quotas {
            if q.config
                .prefix
                .as_deref()
                .is_some_and(|p| !path.starts_with(p))
            {
                continue;
            }
            match q.take().await {
                Take::Allowed => {}
                Take::Exhausted => {
                    return Verdict::Deny(Denial {
                        status: self.config.status,
                        body: "quota exceeded",
                        flag: "RL",
                        details: format!("quota_exhausted[{}]", q.config.name),
                        grpc_status: 8,
                        headers: vec![("x-envoy-ratelimited".into(), "true".into())],
                    });
                }
                Take::Unavailable if q.fail_open => {}
                Take::Unavailable => {
                    return Verdict::Deny(Denial {
                        status: 500,
                        body: "quota service unavailable",
                        flag: "RLSE",
                        details: format!("quota_service_unavailable[{}]", q.config.name),
                        grpc_status: 14,
                        headers: Vec::new(),
                    });
                }
            }
        }
        Verdict::Continue
    }
}
