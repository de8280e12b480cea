//! The compiled filter chains: what an HTTP connection manager runs before the router
//! ([`HttpChain`]) and what a filter chain runs before `tcp_proxy` or the connection
//! manager ([`NetworkChain`]).
//!
//! Compiled once per configuration; a request reads the chain of the configuration in
//! force when it starts (the connection manager looks it up per request, so kept-alive
//! connections see a new policy at their next request). Per-route overrides
//! (`typed_per_filter_config`) are compiled on first use and kept with the chain.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use nodemesh_config::{
    filters::ratelimit::{LocalRateLimit, RateLimitPolicy},
    model::{HttpFilter, HttpFilterConfig, NetworkPolicy, PerRoute},
};

use crate::{
    Attributes, Verdict, quota,
    ratelimit::local::{Limiter, RouteLimits},
    rbac,
    stats::PolicyStats,
};

/// What outlives one configuration: the quota leases and the counters.
#[derive(Debug, Default)]
pub struct Policies {
    pub quotas: quota::Registry,
    pub stats: PolicyStats,
}

impl Policies {
    pub fn new(stats: PolicyStats) -> Self {
        Self {
            quotas: quota::Registry::default(),
            stats,
        }
    }
}

#[derive(Debug)]
enum Compiled {
    Rbac(Arc<rbac::Engine>),
    Local(Arc<Limiter>),
    /// `local_rate_limit_per_downstream_connection`: buckets live in the [`ConnScope`].
    LocalPerConnection(Arc<LocalRateLimit>),
    Quota(quota::Filter),
}

/// The route a request took, as the filters see it.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteView<'a> {
    pub route_overrides: &'a [(String, PerRoute)],
    pub virtual_host_overrides: &'a [(String, PerRoute)],
    pub route_limits: &'a [RateLimitPolicy],
    pub virtual_host_limits: &'a [RateLimitPolicy],
}

impl<'a> RouteView<'a> {
    /// The most specific override for `filter`: the route's, else the virtual host's.
    fn override_for(&self, filter: &str) -> Option<&'a PerRoute> {
        let find =
            |list: &'a [(String, PerRoute)]| list.iter().find(|(n, _)| n == filter).map(|(_, p)| p);
        find(self.route_overrides).or_else(|| find(self.virtual_host_overrides))
    }
}

/// Compiled objects by the address of the configuration they came from (which is kept).
type Cache<C, V> = Mutex<HashMap<usize, (Arc<C>, Arc<V>)>>;

/// Per-connection state of the filters (`local_rate_limit_per_downstream_connection`).
#[derive(Debug, Default)]
pub struct ConnScope {
    limiters: Cache<LocalRateLimit, Limiter>,
}

impl ConnScope {
    fn limiter(&self, config: &Arc<LocalRateLimit>, stats: &PolicyStats) -> Arc<Limiter> {
        let mut map = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(Arc::as_ptr(config) as usize)
            .or_insert_with(|| {
                (
                    config.clone(),
                    Arc::new(Limiter::new(config.clone(), stats.ratelimit.clone())),
                )
            })
            .1
            .clone()
    }
}

/// Per-route overrides compiled on first use (the `Arc` of the configuration is kept, so
/// its address cannot be reused by another one).
#[derive(Debug, Default)]
struct Overrides {
    rbac: Cache<nodemesh_config::filters::rbac::Rbac, rbac::Engine>,
    local: Cache<LocalRateLimit, Limiter>,
}

/// The HTTP filters of one connection manager, compiled.
#[derive(Debug)]
pub struct HttpChain {
    filters: Vec<(String, Compiled)>,
    overrides: Overrides,
    stats: PolicyStats,
}

impl HttpChain {
    pub fn compile(filters: &[HttpFilter], policies: &Policies) -> Arc<Self> {
        let stats = &policies.stats;
        let compiled = filters
            .iter()
            .map(|f| {
                let c =
                    match &f.config {
                        HttpFilterConfig::Rbac(r) => {
                            Compiled::Rbac(rbac::Engine::compile(&f.name, r, stats.rbac.clone()))
                        }
                        HttpFilterConfig::LocalRateLimit(l) if l.per_connection => {
                            Compiled::LocalPerConnection(l.clone())
                        }
                        HttpFilterConfig::LocalRateLimit(l) => Compiled::Local(Arc::new(
                            Limiter::new(l.clone(), stats.ratelimit.clone()),
                        )),
                        HttpFilterConfig::GlobalQuota(q) => Compiled::Quota(
                            quota::Filter::compile(&f.name, q, &policies.quotas, &stats.quota),
                        ),
                    };
                (f.name.clone(), c)
            })
            .collect();
        Arc::new(Self {
            filters: compiled,
            overrides: Overrides::default(),
            stats: stats.clone(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Runs the filters in order; the first denial answers the request.
    pub async fn check(
        &self,
        a: &Attributes<'_>,
        route: Option<RouteView<'_>>,
        conn: &ConnScope,
        grpc: bool,
    ) -> Verdict {
        let route = route.unwrap_or_default();
        let mut request_headers = Vec::new();
        let mut response_headers = Vec::new();
        for (name, filter) in &self.filters {
            let over = route.override_for(name);
            let verdict = match (filter, over) {
                (Compiled::Rbac(_), Some(PerRoute::Rbac(None))) => Verdict::Continue,
                (Compiled::Rbac(_), Some(PerRoute::Rbac(Some(r)))) => {
                    rbac_verdict(&self.rbac_override(name, r).check(a))
                }
                (Compiled::Rbac(engine), _) => rbac_verdict(&engine.check(a)),
                (
                    Compiled::Local(_) | Compiled::LocalPerConnection(_),
                    Some(PerRoute::LocalRateLimit(l)),
                ) => {
                    let limiter = if l.per_connection {
                        conn.limiter(l, &self.stats)
                    } else {
                        self.local_override(l)
                    };
                    limiter.check(a, limits(&route), grpc)
                }
                (Compiled::Local(limiter), _) => limiter.check(a, limits(&route), grpc),
                (Compiled::LocalPerConnection(l), _) => {
                    conn.limiter(l, &self.stats).check(a, limits(&route), grpc)
                }
                (Compiled::Quota(_), Some(PerRoute::GlobalQuotaDisabled(true))) => {
                    Verdict::Continue
                }
                (Compiled::Quota(q), _) => {
                    q.check(a.http.as_ref().map_or("/", |h| h.url_path())).await
                }
            };
            match verdict {
                Verdict::Continue => {}
                Verdict::ContinueWith {
                    request_headers: rq,
                    response_headers: rs,
                } => {
                    request_headers.extend(rq);
                    response_headers.extend(rs);
                }
                Verdict::Deny(d) => {
                    if matches!(filter, Compiled::Quota(_))
                        && tracing::enabled!(tracing::Level::DEBUG)
                    {
                        tracing::debug!(filter = %name, flag = d.flag, details = %d.details, peer = %a.peer, "quota: denied");
                    }
                    return Verdict::Deny(d);
                }
            }
        }
        if request_headers.is_empty() && response_headers.is_empty() {
            Verdict::Continue
        } else {
            Verdict::ContinueWith {
                request_headers,
                response_headers,
            }
        }
    }

    fn rbac_override(
        &self,
        name: &str,
        r: &Arc<nodemesh_config::filters::rbac::Rbac>,
    ) -> Arc<rbac::Engine> {
        let mut map = self
            .overrides
            .rbac
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.entry(Arc::as_ptr(r) as usize)
            .or_insert_with(|| {
                (
                    r.clone(),
                    rbac::Engine::compile(name, r, self.stats.rbac.clone()),
                )
            })
            .1
            .clone()
    }

    fn local_override(&self, l: &Arc<LocalRateLimit>) -> Arc<Limiter> {
        let mut map = self
            .overrides
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.entry(Arc::as_ptr(l) as usize)
            .or_insert_with(|| {
                (
                    l.clone(),
                    Arc::new(Limiter::new(l.clone(), self.stats.ratelimit.clone())),
                )
            })
            .1
            .clone()
    }
}

fn limits<'a>(route: &RouteView<'a>) -> RouteLimits<'a> {
    RouteLimits {
        route: route.route_limits,
        virtual_host: route.virtual_host_limits,
    }
}

fn rbac_verdict(outcome: &rbac::Outcome) -> Verdict {
    match outcome.details() {
        None => Verdict::Continue,
        Some(details) => Verdict::Deny(crate::Denial {
            status: 403,
            body: "RBAC: access denied",
            flag: "RBAC",
            details,
            grpc_status: 7,
            headers: Vec::new(),
        }),
    }
}

/// The network filters of one filter chain, compiled.
#[derive(Debug)]
pub struct NetworkChain {
    rbac: Vec<Arc<rbac::Engine>>,
}

impl NetworkChain {
    pub fn compile(policies: &[NetworkPolicy], shared: &Policies) -> Arc<Self> {
        Arc::new(Self {
            rbac: policies
                .iter()
                .enumerate()
                .map(|(i, NetworkPolicy::Rbac(r))| {
                    let name = if r.stat_prefix.is_empty() {
                        format!("network_rbac[{i}]")
                    } else {
                        r.stat_prefix.clone()
                    };
                    rbac::Engine::compile(&name, r, shared.stats.rbac.clone())
                })
                .collect(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rbac.is_empty()
    }

    /// `None`: allowed; else Envoy's details naming the filter's matched policy.
    pub fn check(&self, a: &Attributes<'_>) -> Option<String> {
        self.rbac.iter().find_map(|e| e.check(a).details())
    }
}
