//! The L7 proxy's statistics, exported on the admin port in Prometheus format.
//!
//! Named after Envoy's (`upstream_rq_*`, `upstream_cx_*`, `downstream_rq_*`) with a
//! `nodemesh_` prefix and labels instead of name mangling: `cluster`, `route`
//! (`<route config>/<virtual host>/<route name or index>`), `class` (`2xx` ... `5xx`),
//! `flag` (Envoy's response flag), `limit` (the circuit breaker or tenant limit).
use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use nodemesh_telemetry::series::SeriesCache;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// A circuit breaker (cluster) or tenant (source) limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    Connections,
    Pending,
    Requests,
    Retries,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::Pending => "pending_requests",
            Self::Requests => "requests",
            Self::Retries => "retries",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabel {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterClass {
    cluster: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLimit {
    cluster: String,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteClass {
    route: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlagLabel {
    flag: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLimit {
    source: String,
    limit: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 us .. ~26 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// Every family, registered once per engine.
#[derive(Debug, Clone)]
pub struct Stats {
    upstream_rq: Family<ClusterClass, Counter>,
    upstream_rq_time: Family<ClusterLabel, Histogram, fn() -> Histogram>,
    upstream_rq_retry: Family<ClusterLabel, Counter>,
    upstream_rq_timeout: Family<ClusterLabel, Counter>,
    upstream_rq_pending: Family<ClusterLabel, Gauge>,
    upstream_cx: Family<ClusterLabel, Counter>,
    upstream_cx_connect_fail: Family<ClusterLabel, Counter>,
    circuit_breaker_trips: Family<ClusterLimit, Counter>,
    outlier_ejections: Family<ClusterLabel, Counter>,
    lb_panic: Family<ClusterLabel, Counter>,
    membership: Family<ClusterLabel, Gauge>,
    route_rq: Family<RouteClass, Counter>,
    route_rq_time: Family<RouteLabel, Histogram, fn() -> Histogram>,
    /// Each route's series, resolved on its first request (see [`Stats::route`]).
    routes: Arc<SeriesCache<RouteStats>>,
    local_replies: Family<FlagLabel, Counter>,
    protocol_errors: Family<KindLabel, Counter>,
    downstream_cx: Family<KindLabel, Counter>,
    pub(crate) downstream_cx_active: Gauge,
    tenant_active_rq: Family<TenantLabel, Gauge>,
    tenant_active_cx: Family<TenantLabel, Gauge>,
    tenant_shed: Family<TenantLimit, Counter>,
}

impl Stats {
    pub fn register(registry: &mut Registry) -> Self {
        let stats = Self {
            upstream_rq: Family::default(),
            upstream_rq_time: Family::new_with_constructor(latency_histogram),
            upstream_rq_retry: Family::default(),
            upstream_rq_timeout: Family::default(),
            upstream_rq_pending: Family::default(),
            upstream_cx: Family::default(),
            upstream_cx_connect_fail: Family::default(),
            circuit_breaker_trips: Family::default(),
            outlier_ejections: Family::default(),
            lb_panic: Family::default(),
            membership: Family::default(),
            route_rq: Family::default(),
            route_rq_time: Family::new_with_constructor(latency_histogram),
            routes: Arc::default(),
            local_replies: Family::default(),
            protocol_errors: Family::default(),
            downstream_cx: Family::default(),
            downstream_cx_active: Gauge::default(),
            tenant_active_rq: Family::default(),
            tenant_active_cx: Family::default(),
            tenant_shed: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("nodemesh");
        let s = stats.clone();
        r.register(
            "upstream_rq",
            "Upstream requests by response class",
            s.upstream_rq,
        );
        r.register_with_unit(
            "upstream_rq_time",
            "Upstream request time, request start to response end",
            prometheus_client::registry::Unit::Seconds,
            s.upstream_rq_time,
        );
        r.register(
            "upstream_rq_retry",
            "Retried upstream requests",
            s.upstream_rq_retry,
        );
        r.register(
            "upstream_rq_timeout",
            "Upstream requests that timed out",
            s.upstream_rq_timeout,
        );
        r.register(
            "upstream_rq_pending_active",
            "Requests waiting for an upstream connection",
            s.upstream_rq_pending,
        );
        r.register("upstream_cx", "Upstream connections opened", s.upstream_cx);
        r.register(
            "upstream_cx_connect_fail",
            "Upstream connection failures",
            s.upstream_cx_connect_fail,
        );
        r.register(
            "circuit_breaker_trips",
            "Requests refused by a circuit breaker",
            s.circuit_breaker_trips,
        );
        r.register(
            "outlier_detection_ejections",
            "Endpoints ejected by outlier detection",
            s.outlier_ejections,
        );
        r.register(
            "lb_healthy_panic",
            "Picks made in panic mode (too few healthy endpoints)",
            s.lb_panic,
        );
        r.register("membership_total", "Endpoints of the cluster", s.membership);
        r.register(
            "route_rq",
            "Requests by route and response class",
            s.route_rq,
        );
        r.register_with_unit(
            "route_rq_time",
            "Request time by route, headers received to response end",
            prometheus_client::registry::Unit::Seconds,
            s.route_rq_time,
        );
        r.register(
            "downstream_rq_local_reply",
            "Responses the proxy generated, by response flag",
            s.local_replies,
        );
        r.register(
            "downstream_protocol_errors",
            "Malformed or abusive downstream input, by kind",
            s.protocol_errors,
        );
        r.register(
            "downstream_cx",
            "Downstream connections by detected protocol",
            s.downstream_cx,
        );
        r.register(
            "downstream_cx_active",
            "Open downstream connections",
            s.downstream_cx_active,
        );
        r.register(
            "tenant_rq_active",
            "In-flight requests per source",
            s.tenant_active_rq,
        );
        r.register(
            "tenant_cx_active",
            "Open connections per source",
            s.tenant_active_cx,
        );
        r.register(
            "tenant_shed",
            "Requests or connections refused by a per-source limit",
            s.tenant_shed,
        );
        stats
    }

    pub(crate) fn cluster(&self, name: &str) -> ClusterStats {
        let label = ClusterLabel {
            cluster: name.to_owned(),
        };
        let class = |class| {
            self.upstream_rq
                .get_or_create(&ClusterClass {
                    cluster: name.to_owned(),
                    class,
                })
                .clone()
        };
        let limit = |limit: Limit| {
            self.circuit_breaker_trips
                .get_or_create(&ClusterLimit {
                    cluster: name.to_owned(),
                    limit: limit.as_str(),
                })
                .clone()
        };
        ClusterStats {
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            time: self.upstream_rq_time.get_or_create(&label).clone(),
            retries: self.upstream_rq_retry.get_or_create(&label).clone(),
            timeouts: self.upstream_rq_timeout.get_or_create(&label).clone(),
            pending: self.upstream_rq_pending.get_or_create(&label).clone(),
            connections_total: self.upstream_cx.get_or_create(&label).clone(),
            connect_failures: self.upstream_cx_connect_fail.get_or_create(&label).clone(),
            trips: [
                limit(Limit::Connections),
                limit(Limit::Pending),
                limit(Limit::Requests),
                limit(Limit::Retries),
            ],
            ejections: self.outlier_ejections.get_or_create(&label).clone(),
            panic: self.lb_panic.get_or_create(&label).clone(),
            membership: self.membership.get_or_create(&label).clone(),
        }
    }

    /// The series of one route, labelled `config/virtual_host/route` (the route's name, or
    /// its index in the virtual host when it has none). Found without building the label:
    /// the label is formatted, and the families looked up, once per route.
    pub(crate) fn route(
        &self,
        config: &str,
        virtual_host: &str,
        route: RouteId<'_>,
    ) -> Arc<RouteStats> {
        self.routes.get_or_insert(
            (config, virtual_host, route),
            |s| s.is(config, virtual_host, route),
            || {
                let label = match route {
                    RouteId::Name(name) => format!("{config}/{virtual_host}/{name}"),
                    RouteId::Index(i) => format!("{config}/{virtual_host}/{i}"),
                };
                RouteStats {
                    config: config.to_owned(),
                    virtual_host: virtual_host.to_owned(),
                    route: route.into(),
                    time: self
                        .route_rq_time
                        .get_or_create(&RouteLabel {
                            route: label.clone(),
                        })
                        .clone(),
                    by_class: Default::default(),
                    family: self.route_rq.clone(),
                    label,
                }
            },
        )
    }

    pub(crate) fn local_reply(&self, flag: &'static str) {
        self.local_replies.get_or_create(&FlagLabel { flag }).inc();
    }

    pub(crate) fn protocol_error(&self, kind: &'static str) {
        self.protocol_errors
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    pub(crate) fn downstream_connection(&self, kind: &'static str) {
        self.downstream_cx.get_or_create(&KindLabel { kind }).inc();
    }

    pub(crate) fn tenant_gauges(&self, source: &str) -> (Gauge, Gauge) {
        let label = TenantLabel {
            source: source.to_owned(),
        };
        (
            self.tenant_active_rq.get_or_create(&label).clone(),
            self.tenant_active_cx.get_or_create(&label).clone(),
        )
    }

    pub(crate) fn tenant_shed(&self, source: &str, limit: Limit) {
        self.tenant_shed
            .get_or_create(&TenantLimit {
                source: source.to_owned(),
                limit: limit.as_str(),
            })
            .inc();
    }

    /// Forgets a source's series (the pod is gone).
    pub(crate) fn remove_tenant(&self, source: &str) {
        let label = TenantLabel {
            source: source.to_owned(),
        };
        self.tenant_active_rq.remove(&label);
        self.tenant_active_cx.remove(&label);
    }
}

/// `2xx` etc.
pub fn class_of(status: u16) -> &'static str {
    CLASSES[class_index(status)]
}

/// Which route of its virtual host: by name, or by index when it has none.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub(crate) enum RouteId<'a> {
    Name(&'a str),
    Index(usize),
}

#[derive(Debug)]
enum OwnedRouteId {
    Name(String),
    Index(usize),
}

impl From<RouteId<'_>> for OwnedRouteId {
    fn from(id: RouteId<'_>) -> Self {
        match id {
            RouteId::Name(n) => Self::Name(n.to_owned()),
            RouteId::Index(i) => Self::Index(i),
        }
    }
}

/// One route's series (`route_rq` by class, created on a class's first response, and
/// `route_rq_time`).
#[derive(Debug)]
pub(crate) struct RouteStats {
    config: String,
    virtual_host: String,
    route: OwnedRouteId,
    label: String,
    by_class: [OnceLock<Counter>; 5],
    time: Histogram,
    family: Family<RouteClass, Counter>,
}

impl RouteStats {
    fn is(&self, config: &str, virtual_host: &str, route: RouteId<'_>) -> bool {
        self.config == config
            && self.virtual_host == virtual_host
            && match (&self.route, route) {
                (OwnedRouteId::Name(a), RouteId::Name(b)) => a == b,
                (OwnedRouteId::Index(a), RouteId::Index(b)) => *a == b,
                _ => false,
            }
    }

    pub fn record(&self, status: u16, elapsed: Duration) {
        let i = class_index(status);
        self.by_class[i]
            .get_or_init(|| {
                self.family
                    .get_or_create(&RouteClass {
                        route: self.label.clone(),
                        class: CLASSES[i],
                    })
                    .clone()
            })
            .inc();
        self.time.observe(elapsed.as_secs_f64());
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// One cluster's series, resolved once.
#[derive(Debug, Clone)]
pub(crate) struct ClusterStats {
    by_class: [Counter; 5],
    pub time: Histogram,
    pub retries: Counter,
    pub timeouts: Counter,
    pub pending: Gauge,
    pub connections_total: Counter,
    pub connect_failures: Counter,
    trips: [Counter; 4],
    pub ejections: Counter,
    pub panic: Counter,
    membership: Gauge,
}

impl ClusterStats {
    pub fn response(&self, status: u16, elapsed: Duration) {
        self.by_class[class_index(status)].inc();
        self.time.observe(elapsed.as_secs_f64());
    }

    pub fn overflow(&self, limit: Limit) {
        let i = match limit {
            Limit::Connections => 0,
            Limit::Pending => 1,
            Limit::Requests => 2,
            Limit::Retries => 3,
        };
        self.trips[i].inc();
    }

    pub fn set_hosts(&self, n: usize) {
        self.membership.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_is_resolved_once_and_counted_under_its_label() {
        let mut registry = Registry::default();
        let stats = Stats::register(&mut registry);
        let named = stats.route("local", "api", RouteId::Name("orders"));
        assert!(Arc::ptr_eq(
            &named,
            &stats.route("local", "api", RouteId::Name("orders"))
        ));
        // A route named "0" is another entry than the unnamed first route (their labels
        // coincide, as they always did, so both count into one series).
        let first = stats.route("local", "api", RouteId::Index(0));
        assert!(!Arc::ptr_eq(
            &first,
            &stats.route("local", "api", RouteId::Name("0"))
        ));
        assert!(!Arc::ptr_eq(
            &first,
            &stats.route("local", "web", RouteId::Index(0))
        ));
        named.record(200, Duration::from_millis(3));
        named.record(503, Duration::from_millis(3));
        first.record(404, Duration::from_millis(1));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            r#"nodemesh_route_rq_total{route="local/api/orders",class="2xx"} 1"#,
            r#"nodemesh_route_rq_total{route="local/api/orders",class="5xx"} 1"#,
            r#"nodemesh_route_rq_total{route="local/api/0",class="4xx"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // Only the classes a route answered with are exposed.
        assert!(
            !text.contains(r#"route="local/api/orders",class="4xx""#),
            "{text}"
        );
        assert!(
            text.contains(r#"nodemesh_route_rq_time_seconds_count{route="local/api/orders"} 2"#),
            "{text}"
        );
    }
}
