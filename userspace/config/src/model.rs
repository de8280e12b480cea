//! nodemesh's configuration model: what the data path reads.
//!
//! Built once per update from Envoy's resources (see [`crate::translate`]), validated as a
//! whole, then published as an immutable [`Snapshot`] (`Arc`-swapped, read without locks).
//! Every type here holds only what nodemesh implements; anything Envoy expresses that is not
//! here was either rejected with an error naming the field, or ignored with a warning.
use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

pub use crate::filters::{HttpFilterConfig, NetworkPolicy, PerRoute, ratelimit::RateLimitPolicy};
use crate::matcher::{HeaderMatcher, IpRange, QueryMatcher, StringMatcher};

/// A complete, validated configuration.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub listeners: Vec<Arc<Listener>>,
    /// Route configurations by name (inline ones are named after their listener).
    pub routes: HashMap<String, Arc<RouteConfig>>,
    pub clusters: HashMap<String, Arc<Cluster>>,
    /// The admin endpoint, when the bootstrap has one.
    pub admin: Option<SocketAddr>,
    /// Harmless differences from Envoy, each listed once.
    pub warnings: Vec<String>,
}

impl Snapshot {
    pub fn listener(&self, name: &str) -> Option<&Arc<Listener>> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

/// `envoy.config.listener.v3.Listener`.
#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// False for listeners that only receive connections handed over by another listener
    /// (Istio's `virtualInbound` style, `bind_to_port: false`).
    pub bind: bool,
    /// `use_original_dst`: hand the connection to the listener matching its original
    /// destination, if one exists. (The `original_dst` listener filter does not: it only
    /// restores the original destination, which nodemesh always knows from the kernel.)
    pub use_original_dst: bool,
    /// `http_inspector`: detect HTTP/1.x and h2c and set the application protocol.
    pub http_inspector: bool,
    /// The inspector's `filter_disabled`: destination ports it does not run on (Istio turns
    /// inspection off where the protocol is known, e.g. for server-first protocols).
    pub http_inspector_disabled: Option<PortPredicate>,
    /// `tls_inspector`: detect TLS and read SNI and ALPN.
    pub tls_inspector: bool,
    pub tls_inspector_disabled: Option<PortPredicate>,
    pub inspection_timeout: Duration,
    pub filter_chains: Vec<FilterChain>,
    pub default_chain: Option<FilterChain>,
}

impl Listener {
    /// The inspectors that run on a connection to `port` (its original destination port).
    pub fn inspectors_for(&self, port: u16) -> (bool, bool) {
        let on = |enabled: bool, disabled: &Option<PortPredicate>| {
            enabled && !disabled.as_ref().is_some_and(|p| p.matches(port))
        };
        (
            on(self.http_inspector, &self.http_inspector_disabled),
            on(self.tls_inspector, &self.tls_inspector_disabled),
        )
    }
}

/// `ListenerFilterChainMatchPredicate`: a condition on the connection's destination port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortPredicate {
    Any,
    /// Half-open `[start, end)`, as Envoy's `Int32Range`.
    Range(u32, u32),
    Not(Box<PortPredicate>),
    Or(Vec<PortPredicate>),
    And(Vec<PortPredicate>),
}

impl PortPredicate {
    pub fn matches(&self, port: u16) -> bool {
        self.holds(u32::from(port))
    }

    fn holds(&self, port: u32) -> bool {
        match self {
            Self::Any => true,
            Self::Range(start, end) => (*start..*end).contains(&port),
            Self::Not(p) => !p.holds(port),
            Self::Or(ps) => ps.iter().any(|p| p.holds(port)),
            Self::And(ps) => ps.iter().all(|p| p.holds(port)),
        }
    }
}

/// A filter chain and what selects it.
#[derive(Debug)]
pub struct FilterChain {
    pub name: String,
    pub matcher: ChainMatch,
    /// Network filters in front of the terminal one (network RBAC), in order.
    pub policies: Vec<NetworkPolicy>,
    pub filter: NetworkFilter,
}

/// `FilterChainMatch`: every set criterion must match; among matching chains the most
/// specific wins, in Envoy's order of criteria.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ChainMatch {
    pub destination_port: Option<u16>,
    pub destination_ranges: Vec<IpRange>,
    pub server_names: Vec<String>,
    /// `raw_buffer` or `tls`.
    pub transport_protocol: Option<String>,
    pub application_protocols: Vec<String>,
    pub direct_source_ranges: Vec<IpRange>,
    pub source_ranges: Vec<IpRange>,
    pub source_ports: Vec<u16>,
}

/// The terminal network filter of a chain.
#[derive(Debug)]
pub enum NetworkFilter {
    Http(Arc<HttpManager>),
    Tcp(TcpProxy),
}

/// `envoy.filters.network.tcp_proxy`.
#[derive(Debug, Clone)]
pub struct TcpProxy {
    pub stat_prefix: String,
    pub target: ClusterTarget,
    pub idle_timeout: Duration,
    /// One entry per connection, written when it closes.
    pub access_logs: Vec<crate::access_log::AccessLog>,
}

/// Which codec the HTTP connection manager speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Auto,
    Http1,
    Http2,
}

/// `envoy.filters.network.http_connection_manager`.
#[derive(Debug)]
pub struct HttpManager {
    pub stat_prefix: String,
    pub codec: Codec,
    pub routes: RouteSource,
    pub filters: Vec<HttpFilter>,
    pub generate_request_id: bool,
    pub preserve_external_request_id: bool,
    pub always_set_request_id_in_response: bool,
    pub use_remote_address: bool,
    pub xff_num_trusted_hops: u32,
    pub skip_xff_append: bool,
    pub via: Option<String>,
    pub server_name: String,
    /// None: no timeout (Envoy's 0).
    pub stream_idle_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
    pub request_headers_timeout: Option<Duration>,
    /// Connection idle timeout (`common_http_protocol_options.idle_timeout`).
    pub idle_timeout: Option<Duration>,
    pub max_request_headers_kb: u32,
    pub max_headers_count: u32,
    /// `upgrade_configs` types allowed (lower case), e.g. `websocket`.
    pub upgrades: Vec<String>,
    pub http2: Http2Settings,
    pub normalize_path: bool,
    pub merge_slashes: bool,
    pub strip_any_host_port: bool,
    pub suppress_envoy_headers: bool,
    /// `internal_address_config.cidr_ranges`: trusted client addresses that make a request
    /// internal. Empty (Envoy's default since 1.33): no request is internal.
    pub internal_addresses: Vec<IpRange>,
    /// `forward_client_cert_details`.
    pub client_cert: ClientCertDetails,
    /// `access_log`: where and how every request is logged when it ends.
    pub access_logs: Vec<crate::access_log::AccessLog>,
}

/// What happens to a request's `x-forwarded-client-cert`. Downstream connections are
/// plaintext for now, and on plaintext Envoy forwards the header only in
/// `ALWAYS_FORWARD_ONLY` mode; every other mode removes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertDetails {
    /// `SANITIZE` (the default), `FORWARD_ONLY`, `APPEND_FORWARD`, `SANITIZE_SET`.
    Sanitize,
    /// `ALWAYS_FORWARD_ONLY`.
    AlwaysForward,
}

/// Where an HTTP connection manager gets its routes.
#[derive(Debug, Clone)]
pub enum RouteSource {
    Inline(Arc<RouteConfig>),
    /// By name (RDS), resolved in the snapshot.
    Named(String),
}

/// An HTTP filter before the router (authorization, rate limits, quota), in configured
/// order; `nodemesh-policy` compiles and runs them.
#[derive(Debug, Clone)]
pub struct HttpFilter {
    /// The filter's name: `typed_per_filter_config` entries are looked up by it.
    pub name: String,
    /// The extension's type URL.
    pub type_url: String,
    pub config: HttpFilterConfig,
}

/// HTTP/2 settings (`http2_protocol_options`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Settings {
    pub max_concurrent_streams: u32,
    pub initial_stream_window_size: u32,
    pub initial_connection_window_size: u32,
}

impl Default for Http2Settings {
    /// Envoy's defaults.
    fn default() -> Self {
        Self {
            max_concurrent_streams: 2_147_483_647,
            initial_stream_window_size: 268_435_456,
            initial_connection_window_size: 268_435_456,
        }
    }
}

/// `envoy.config.route.v3.RouteConfiguration`.
///
/// Built with [`RouteConfig::new`], which indexes the virtual hosts' domains: a mesh's
/// outbound route configuration has a virtual host per service (istiod gives each several
/// domains), and selecting one must not cost a scan of all of them per request.
#[derive(Debug)]
pub struct RouteConfig {
    pub name: String,
    virtual_hosts: Vec<VirtualHost>,
    domains: DomainIndex,
    pub headers: HeaderMutations,
    pub ignore_port_in_host_matching: bool,
}

impl RouteConfig {
    pub fn new(
        name: String,
        virtual_hosts: Vec<VirtualHost>,
        headers: HeaderMutations,
        ignore_port_in_host_matching: bool,
    ) -> Self {
        let domains = DomainIndex::new(&virtual_hosts);
        Self {
            name,
            virtual_hosts,
            domains,
            headers,
            ignore_port_in_host_matching,
        }
    }

    pub fn virtual_hosts(&self) -> &[VirtualHost] {
        &self.virtual_hosts
    }

    /// The virtual host whose domains best match `host` (already lower-cased), by Envoy's
    /// precedence: exact, then the longest `*.suffix`, then the longest `prefix.*`, then `*`;
    /// at equal rank and length the first in the configuration.
    pub fn best_domain(&self, host: &str) -> Option<&VirtualHost> {
        self.domains.best(host).map(|i| &self.virtual_hosts[i])
    }
}

/// The domains of a route configuration's virtual hosts, by kind: exact ones hashed, wildcards
/// longest first (a stable sort keeps the configuration's order at equal length), so a lookup
/// costs one hash and a walk of the wildcards only.
#[derive(Debug, Default)]
struct DomainIndex {
    exact: HashMap<String, usize>,
    suffixes: Vec<(String, usize)>,
    prefixes: Vec<(String, usize)>,
    any: Option<usize>,
}

impl DomainIndex {
    fn new(virtual_hosts: &[VirtualHost]) -> Self {
        let mut index = Self::default();
        for (i, vh) in virtual_hosts.iter().enumerate() {
            for domain in &vh.domains {
                match domain {
                    DomainMatch::Exact(d) => {
                        index.exact.entry(d.clone()).or_insert(i);
                    }
                    DomainMatch::Suffix(s) => index.suffixes.push((s.clone(), i)),
                    DomainMatch::Prefix(p) => index.prefixes.push((p.clone(), i)),
                    DomainMatch::Any => {
                        index.any.get_or_insert(i);
                    }
                }
            }
        }
        index
            .suffixes
            .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        index
            .prefixes
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        index
    }

    fn best(&self, host: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(host) {
            return Some(i);
        }
        // A wildcard matches at least one character.
        let suffix = self
            .suffixes
            .iter()
            .find(|(s, _)| host.len() > s.len() && host.ends_with(s.as_str()));
        let prefix = || {
            self.prefixes
                .iter()
                .find(|(p, _)| host.len() > p.len() && host.starts_with(p.as_str()))
        };
        suffix.or_else(prefix).map(|&(_, i)| i).or(self.any)
    }
}

/// Request and response header changes at one level (route config, virtual host, route,
/// weighted cluster). Envoy applies the route's first, then the virtual host's, then the
/// route configuration's (`most_specific_header_mutations_wins: false`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderMutations {
    pub request_add: Vec<HeaderValueOption>,
    pub request_remove: Vec<String>,
    pub response_add: Vec<HeaderValueOption>,
    pub response_remove: Vec<String>,
}

/// How an added header combines with existing values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderValueOption {
    /// Lower case.
    pub name: String,
    pub value: String,
    pub append: AppendAction,
    pub keep_empty_value: bool,
}

/// `VirtualHost`.
#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<DomainMatch>,
    pub routes: Vec<Route>,
    pub headers: HeaderMutations,
    pub retry: Option<RetryPolicy>,
    pub include_request_attempt_count: bool,
    pub include_attempt_count_in_response: bool,
    /// `typed_per_filter_config`, by filter name.
    pub per_filter: Vec<(String, PerRoute)>,
    /// `rate_limits`: descriptor actions for the rate limit filters.
    pub rate_limits: Vec<RateLimitPolicy>,
}

/// A virtual host domain, with Envoy's precedence: exact, then the longest `*.suffix`, then
/// the longest `prefix.*`, then `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainMatch {
    Exact(String),
    /// `*.example.com` keeps `.example.com`; `*-bar.foo` keeps `-bar.foo`.
    Suffix(String),
    /// `foo.*` keeps `foo.`.
    Prefix(String),
    Any,
}

/// `Route`.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub matcher: RouteMatch,
    pub action: RouteAction,
    pub headers: HeaderMutations,
    /// `typed_per_filter_config`, by filter name.
    pub per_filter: Vec<(String, PerRoute)>,
    /// The route action's `rate_limits`.
    pub rate_limits: Vec<RateLimitPolicy>,
}

/// `RouteMatch`.
#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub case_sensitive: bool,
    pub headers: Vec<HeaderMatcher>,
    pub query: Vec<QueryMatcher>,
    /// Only requests with `content-type: application/grpc*`.
    pub grpc: bool,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    /// `path_separated_prefix`: the prefix followed by end, `/`, `?` or `#`.
    Separated(String),
    Regex(StringMatcher),
}

#[derive(Debug, Clone)]
pub enum RouteAction {
    Forward(Box<Forward>),
    DirectResponse { status: u16, body: Option<String> },
    Redirect(Redirect),
}

/// Where a route sends a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterTarget {
    Named(String),
    /// Weights over named clusters, with their own header mutations.
    Weighted(Vec<WeightedTarget>),
    /// The cluster named by this request header.
    Header(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedTarget {
    pub cluster: String,
    pub weight: u32,
    pub headers: HeaderMutations,
    pub host_rewrite: Option<String>,
}

/// `RouteAction` (forwarding).
#[derive(Debug, Clone)]
pub struct Forward {
    pub target: ClusterTarget,
    pub cluster_not_found_status: u16,
    /// None: no timeout (Envoy's 0); Envoy's default is 15 s.
    pub timeout: Option<Duration>,
    /// `idle_timeout`: None when unset (the connection manager's stream idle timeout
    /// applies), `Some(None)` when 0 (no idle timeout for this route).
    pub idle_timeout: Option<Option<Duration>>,
    pub retry: Option<RetryPolicy>,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(StringMatcher, String)>,
    pub host_rewrite: HostRewrite,
    /// Honour `grpc-timeout`, capped at this (Some(0) = uncapped).
    pub grpc_timeout_max: Option<Duration>,
    /// Whether the gRPC deadline comes from `max_stream_duration` (it then bounds the whole
    /// stream besides the route timeout, and expires as `DT`, DEADLINE_EXCEEDED) or from the
    /// legacy `max_grpc_timeout` (it replaces the route timeout).
    pub grpc_timeout_is_stream_duration: bool,
    pub grpc_timeout_offset: Option<Duration>,
    pub upgrades: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRewrite {
    None,
    Literal(String),
    /// The upstream endpoint's hostname (STRICT_DNS clusters).
    Auto,
    /// The value of this request header.
    Header(String),
}

/// `RedirectAction`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub prefix_rewrite: Option<String>,
    pub status: u16,
    pub strip_query: bool,
}

bitflags::bitflags! {
    /// `retry_on` conditions (Envoy's names in [`RetryOn::parse`]).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct RetryOn: u32 {
        const FIVE_XX = 1 << 0;
        const GATEWAY_ERROR = 1 << 1;
        const RESET = 1 << 2;
        const CONNECT_FAILURE = 1 << 3;
        const RETRIABLE_4XX = 1 << 4;
        const REFUSED_STREAM = 1 << 5;
        const RETRIABLE_STATUS_CODES = 1 << 6;
        const RESET_BEFORE_REQUEST = 1 << 7;
        const GRPC_CANCELLED = 1 << 8;
        const GRPC_DEADLINE_EXCEEDED = 1 << 9;
        const GRPC_INTERNAL = 1 << 10;
        const GRPC_RESOURCE_EXHAUSTED = 1 << 11;
        const GRPC_UNAVAILABLE = 1 << 12;
    }
}

impl RetryOn {
    /// Envoy's `retry_on` string (comma-separated names); unknown names are returned.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut on = Self::empty();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            on |= match name {
                "5xx" => Self::FIVE_XX,
                "gateway-error" => Self::GATEWAY_ERROR,
                "reset" => Self::RESET,
                "connect-failure" => Self::CONNECT_FAILURE,
                "retriable-4xx" => Self::RETRIABLE_4XX,
                "refused-stream" => Self::REFUSED_STREAM,
                "retriable-status-codes" => Self::RETRIABLE_STATUS_CODES,
                "reset-before-request" => Self::RESET_BEFORE_REQUEST,
                "cancelled" => Self::GRPC_CANCELLED,
                "deadline-exceeded" => Self::GRPC_DEADLINE_EXCEEDED,
                "internal" => Self::GRPC_INTERNAL,
                "resource-exhausted" => Self::GRPC_RESOURCE_EXHAUSTED,
                "unavailable" => Self::GRPC_UNAVAILABLE,
                other => return Err(other.to_owned()),
            };
        }
        Ok(on)
    }
}

/// `RetryPolicy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub per_try_idle_timeout: Option<Duration>,
    pub retriable_status_codes: Vec<u16>,
    /// Envoy's defaults: 25 ms base, 10 x base max.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

/// `Cluster`. Compared whole (`==`) by the engine to decide whether an update keeps a
/// cluster's live state (pooled connections, health, outlier state).
#[derive(Debug, PartialEq, Eq)]
pub struct Cluster {
    pub name: String,
    pub discovery: Discovery,
    pub lb: LbPolicy,
    pub connect_timeout: Duration,
    pub limits: CircuitBreakers,
    pub protocol: UpstreamProtocol,
    pub http2: Http2Settings,
    /// Upstream connection idle timeout.
    pub idle_timeout: Option<Duration>,
    pub max_requests_per_connection: Option<u32>,
    pub health_checks: Vec<HealthCheck>,
    pub outlier: Option<OutlierDetection>,
}

impl Cluster {
    /// The endpoints the configuration lists (`STATIC` and `EDS`); none for clusters that
    /// find them at run time (DNS, original destination).
    pub fn endpoints(&self) -> Option<&[Endpoint]> {
        match &self.discovery {
            Discovery::Static(e) | Discovery::Eds { endpoints: e, .. } => Some(e),
            Discovery::StrictDns { .. } | Discovery::OriginalDst { .. } => None,
        }
    }

    /// Equal in everything but the listed endpoints: an EDS update of the same cluster,
    /// which the engine applies to the live host set in place.
    pub fn same_except_endpoints(&self, other: &Self) -> bool {
        // Destructured so that a new field must be considered here.
        let Self {
            name,
            discovery,
            lb,
            connect_timeout,
            limits,
            protocol,
            http2,
            idle_timeout,
            max_requests_per_connection,
            health_checks,
            outlier,
        } = self;
        let discovery_kind = match (discovery, &other.discovery) {
            (Discovery::Static(_), Discovery::Static(_)) => true,
            (
                Discovery::Eds {
                    service_name: a, ..
                },
                Discovery::Eds {
                    service_name: b, ..
                },
            ) => a == b,
            (a, b) => a == b,
        };
        discovery_kind
            && *name == other.name
            && *lb == other.lb
            && *connect_timeout == other.connect_timeout
            && *limits == other.limits
            && *protocol == other.protocol
            && *http2 == other.http2
            && *idle_timeout == other.idle_timeout
            && *max_requests_per_connection == other.max_requests_per_connection
            && *health_checks == other.health_checks
            && *outlier == other.outlier
    }
}

/// How a cluster finds its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// `STATIC`, and `EDS` once its assignment is known.
    Static(Vec<Endpoint>),
    /// `STRICT_DNS`: every address of every name, re-resolved every `refresh`.
    StrictDns {
        names: Vec<(String, u16, u32)>,
        refresh: Duration,
    },
    /// `EDS`: endpoints from the `ClusterLoadAssignment` named `service_name`.
    Eds {
        service_name: String,
        endpoints: Vec<Endpoint>,
    },
    /// `ORIGINAL_DST`: the connection's original destination (or `use_http_header`).
    OriginalDst {
        use_http_header: bool,
        header_name: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub hostname: String,
    pub weight: u32,
    /// From EDS `health_status`: unhealthy endpoints are not used.
    pub healthy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest { choice_count: u32 },
    Random,
}

/// Circuit breaker thresholds (default priority). Envoy's defaults: 1024 each, 3 retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreakers {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

impl Default for CircuitBreakers {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// The downstream request's protocol.
    Downstream,
}

/// Active HTTP health checking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub timeout: Duration,
    pub interval: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub path: String,
    pub host: Option<String>,
    /// Half-open ranges; default `[200, 201)`.
    pub expected_statuses: Vec<(u16, u16)>,
}

/// Passive outlier detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierDetection {
    pub consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
}
