//! Per-source limits: one node proxy serves every pod of the node, and one pod's burst must
//! not raise every other pod's latency.
//!
//! Each source (pod) holds at most `max_connections` downstream connections,
//! `max_requests` requests in flight and `max_pending` requests waiting on upstream. Past a
//! limit the proxy sheds that source's excess — a connection is closed, a request gets
//! `503` with response flag `OM` (Envoy's overload flag) — and counts it per source; other
//! sources are not touched. In-flight gauges per source are the saturation signal.
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use prometheus_client::metrics::gauge::Gauge;

use crate::{
    Source,
    stats::{Limit, Stats},
};

/// The per-source limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    pub max_connections: u32,
    pub max_requests: u32,
    pub max_pending: u32,
}

impl Default for TenantLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_requests: 1024,
            max_pending: 256,
        }
    }
}

#[derive(Debug)]
struct Tenant {
    connections: AtomicU32,
    requests: AtomicU32,
    pending: AtomicU32,
    requests_gauge: Gauge,
    connections_gauge: Gauge,
}

/// Every source's counters.
#[derive(Debug)]
pub(crate) struct Tenants {
    limits: TenantLimits,
    stats: Stats,
    by_source: Mutex<foldhash::HashMap<u64, Arc<Tenant>>>,
}

/// A held slot, released on drop.
#[derive(Debug)]
pub(crate) struct TenantSlot {
    tenant: Arc<Tenant>,
    limit: Limit,
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        self.tenant
            .counter(self.limit)
            .fetch_sub(1, Ordering::Relaxed);
        match self.limit {
            Limit::Connections => self.tenant.connections_gauge.dec(),
            Limit::Requests => self.tenant.requests_gauge.dec(),
            _ => 0,
        };
    }
}

impl Tenant {
    fn counter(&self, limit: Limit) -> &AtomicU32 {
        match limit {
            Limit::Connections => &self.connections,
            Limit::Pending => &self.pending,
            Limit::Requests | Limit::Retries => &self.requests,
        }
    }
}

impl Tenants {
    pub fn new(limits: TenantLimits, stats: Stats) -> Self {
        Self {
            limits,
            stats,
            by_source: Mutex::new(HashMap::default()),
        }
    }

    fn tenant(&self, source: &Source) -> Arc<Tenant> {
        let mut map = self.by_source.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(source.key)
            .or_insert_with(|| {
                let (requests_gauge, connections_gauge) = self.stats.tenant_gauges(&source.name);
                Arc::new(Tenant {
                    connections: AtomicU32::new(0),
                    requests: AtomicU32::new(0),
                    pending: AtomicU32::new(0),
                    requests_gauge,
                    connections_gauge,
                })
            })
            .clone()
    }

    fn take(&self, source: &Source, limit: Limit) -> Option<TenantSlot> {
        let max = match limit {
            Limit::Connections => self.limits.max_connections,
            Limit::Pending => self.limits.max_pending,
            Limit::Requests | Limit::Retries => self.limits.max_requests,
        };
        let tenant = self.tenant(source);
        let taken = tenant
            .counter(limit)
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            self.stats.tenant_shed(&source.name, limit);
            return None;
        }
        match limit {
            Limit::Connections => tenant.connections_gauge.inc(),
            Limit::Requests => tenant.requests_gauge.inc(),
            _ => 0,
        };
        Some(TenantSlot { tenant, limit })
    }

    pub fn connection(&self, source: &Source) -> Option<TenantSlot> {
        self.take(source, Limit::Connections)
    }

    pub fn request(&self, source: &Source) -> Option<TenantSlot> {
        self.take(source, Limit::Requests)
    }

    pub fn pending(&self, source: &Source) -> Option<TenantSlot> {
        self.take(source, Limit::Pending)
    }

    /// Forgets a source with nothing in flight (its pod is gone).
    pub fn remove(&self, source: &Source) {
        let mut map = self.by_source.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = map.get(&source.key)
            && Arc::strong_count(t) == 1
        {
            map.remove(&source.key);
            self.stats.remove_tenant(&source.name);
        }
    }
}
