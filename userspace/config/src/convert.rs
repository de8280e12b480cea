//! Envoy resources into the model: one translation for every source (a bootstrap's
//! `static_resources`, a `/config_dump`, and later xDS), so a resource means the same thing
//! wherever it comes from.
//!
//! Each resource is first checked field by field against [`crate::support`] (as a
//! `DynamicMessage`, so unknown extension fields are seen too), then read from its typed
//! prost form. Typed extensions (`Any`) are decoded by type URL and checked the same way.
//! Envoy's defaults are spelled out where they apply. The result is either a complete
//! [`Snapshot`] with warnings, or errors naming the resource and the field.

// Deprecated Envoy fields (`append`, `exact_match`, `dns_refresh_rate`, ...) are what many
// control planes and files still send; they are read on purpose.
#![allow(deprecated)]
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3 as cluster, core::v3 as core, endpoint::v3 as endpoint,
            listener::v3 as listener, route::v3 as route,
        },
        extensions::{
            filters::{
                http::router::v3::Router,
                network::{http_connection_manager::v3 as hcm, tcp_proxy::v3 as tcp},
            },
            upstreams::http::v3 as upstream_http,
        },
        r#type::matcher::v3 as matcher_pb,
    },
    google::protobuf::Any,
};
use prost_reflect::{DynamicMessage, ReflectMessage as _};

use crate::{
    ConfigError,
    filters::istio,
    matcher::{HeaderMatcher, HeaderRule, IpRange, QueryMatcher, StringMatch, StringMatcher},
    model::*,
    pool,
    support::{self, Diagnostics},
    tls,
};

/// Envoy resources as received, each as a message of its own type.
#[derive(Debug, Default, Clone)]
pub struct Resources {
    pub listeners: Vec<DynamicMessage>,
    pub routes: Vec<DynamicMessage>,
    pub clusters: Vec<DynamicMessage>,
    pub assignments: Vec<DynamicMessage>,
    pub admin: Option<SocketAddr>,
    /// Diagnostics from reading the container (the bootstrap's own fields).
    pub diagnostics: Diagnostics,
    /// Resources from xDS, which arrive type by type: a listener may name a route
    /// configuration that has not arrived yet (it is warming). Such names are listed in
    /// [`Translated::missing_routes`] instead of being errors, and the snapshot is still built
    /// so that the caller can see what else it needs; it must not serve it until they arrive.
    pub dynamic: bool,
    /// The bootstrap's `dynamic_resources.ads_config`: where the rest comes from.
    pub ads: Option<AdsSource>,
}

/// An aggregated xDS source from a bootstrap (`dynamic_resources.ads_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdsSource {
    /// The static cluster of the control plane (`grpc_services[0].envoy_grpc.cluster_name`).
    pub cluster: String,
    /// `api_type: DELTA_GRPC` (incremental) rather than `GRPC` (state of the world).
    pub delta: bool,
    /// The bootstrap's `node`: how the control plane recognises this proxy.
    pub node: core::Node,
    /// Send `node` on the first request of a stream only.
    pub node_on_first_message_only: bool,
    /// How long a subscribed resource may take before the proxy serves without it.
    pub initial_fetch_timeout: Duration,
}

/// The outcome of a translation.
#[derive(Debug)]
pub struct Translated {
    /// `None` exactly when there are errors.
    pub snapshot: Option<Snapshot>,
    pub diagnostics: Diagnostics,
    /// Route configurations named by listeners (RDS) but absent, when
    /// [`Resources::dynamic`]; otherwise each is an error.
    pub missing_routes: std::collections::BTreeSet<String>,
}

const HCM_URL: &str =
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_URL: &str = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const ROUTER_URL: &str = "envoy.extensions.filters.http.router.v3.Router";
const UPSTREAM_HTTP_URL: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Reads an Envoy bootstrap (YAML or JSON) and translates its static resources.
pub fn load_bootstrap(text: &str) -> Result<Translated, ConfigError> {
    Ok(translate_bootstrap(&read_bootstrap(text)?))
}

/// Translates what [`read_bootstrap`] read (its fields were checked as a whole, so its
/// resources are not checked twice).
pub fn translate_bootstrap(res: &Resources) -> Translated {
    translate_checked(res, false)
}

/// What a configuration file holds.
#[derive(Debug)]
pub enum Source {
    /// A bootstrap: its static resources, read but not translated.
    Bootstrap(Box<Resources>),
    /// A config dump (a JSON object with `configs`), translated.
    Dump(Box<Translated>),
}

/// Reads a bootstrap or a config dump.
pub fn read_source(text: &str) -> Result<Source, ConfigError> {
    let value: serde_json::Value =
        serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
    if value.get("configs").is_some() {
        load_config_dump(text).map(|t| Source::Dump(Box::new(t)))
    } else {
        read_bootstrap(text).map(|r| Source::Bootstrap(Box::new(r)))
    }
}

/// Reads an Envoy bootstrap (YAML or JSON) into its static resources, its ADS source and
/// the diagnostics of the bootstrap's own fields, without translating.
pub fn read_bootstrap(text: &str) -> Result<Resources, ConfigError> {
    let msg = pool::parse(text, "envoy.config.bootstrap.v3.Bootstrap")?;
    let mut res = Resources::default();
    support::check(&msg, "bootstrap", &mut res.diagnostics);
    let boot: envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap = transcode(&msg)?;
    if let Some(admin) = boot.admin.and_then(|a| a.address) {
        match socket_address(&admin) {
            Ok(addr) => res.admin = Some(addr),
            Err(e) => res
                .diagnostics
                .error(format!("bootstrap.admin.address: {e}")),
        }
    }
    if let Some(dynamic) = &boot.dynamic_resources {
        res.ads = ads_source(
            dynamic,
            boot.node.clone().unwrap_or_default(),
            &mut res.diagnostics,
        );
    }
    let statics = boot.static_resources.unwrap_or_default();
    res.listeners = statics
        .listeners
        .iter()
        .map(|l| to_dynamic(l, "envoy.config.listener.v3.Listener"))
        .collect::<Result<_, _>>()?;
    res.clusters = statics
        .clusters
        .iter()
        .map(|c| to_dynamic(c, "envoy.config.cluster.v3.Cluster"))
        .collect::<Result<_, _>>()?;
    Ok(res)
}

/// `dynamic_resources`: ADS over gRPC only; LDS and CDS, when given, must come from it.
fn ads_source(
    dynamic: &envoy_types::pb::envoy::config::bootstrap::v3::bootstrap::DynamicResources,
    node: core::Node,
    diags: &mut Diagnostics,
) -> Option<AdsSource> {
    use core::{
        api_config_source::ApiType, config_source::ConfigSourceSpecifier,
        grpc_service::TargetSpecifier,
    };
    let at = "bootstrap.dynamic_resources";
    for (field, source) in [
        ("lds_config", &dynamic.lds_config),
        ("cds_config", &dynamic.cds_config),
    ] {
        if let Some(source) = source
            && !matches!(
                source.config_source_specifier,
                Some(ConfigSourceSpecifier::Ads(_))
            )
        {
            diags.error(format!("{at}.{field}: only `ads: {{}}` is supported"));
        }
    }
    let Some(api) = &dynamic.ads_config else {
        diags.error(format!(
            "{at}.ads_config: required (nodemesh follows one aggregated control plane)"
        ));
        return None;
    };
    let delta = match api.api_type() {
        ApiType::Grpc => false,
        ApiType::DeltaGrpc => true,
        other => {
            diags.error(format!(
                "{at}.ads_config.api_type: {} is not supported (GRPC or DELTA_GRPC)",
                other.as_str_name()
            ));
            return None;
        }
    };
    let cluster = match api
        .grpc_services
        .first()
        .and_then(|g| g.target_specifier.as_ref())
    {
        Some(TargetSpecifier::EnvoyGrpc(e)) if !e.cluster_name.is_empty() => e.cluster_name.clone(),
        _ => {
            diags.error(format!(
                "{at}.ads_config.grpc_services[0].envoy_grpc.cluster_name: required"
            ));
            return None;
        }
    };
    if api.grpc_services.len() > 1 {
        diags.warn(format!(
            "{at}.ads_config.grpc_services: only the first is used, as in Envoy"
        ));
    }
    if node.id.is_empty() {
        diags.warn(
            "bootstrap.node.id is empty: a control plane cannot tell this proxy apart".to_owned(),
        );
    }
    let initial_fetch_timeout = dynamic
        .lds_config
        .as_ref()
        .and_then(|c| dur(c.initial_fetch_timeout.as_ref()))
        .unwrap_or(Duration::from_secs(15));
    Some(AdsSource {
        cluster,
        delta,
        node,
        node_on_first_message_only: api.set_node_on_first_message_only,
        initial_fetch_timeout,
    })
}

/// Reads an Envoy `/config_dump` (JSON): static and active dynamic listeners, routes,
/// clusters and endpoints, and the bootstrap's admin address.
pub fn load_config_dump(text: &str) -> Result<Translated, ConfigError> {
    let msg = pool::parse(text, "envoy.admin.v3.ConfigDump")?;
    let dump: envoy_types::pb::envoy::admin::v3::ConfigDump = transcode(&msg)?;
    let mut res = Resources::default();
    for any in &dump.configs {
        let name = type_name(any);
        let decoded = decode_dynamic(any).map_err(|message| ConfigError::Mapping {
            type_name: name.to_owned(),
            message,
        })?;
        let json =
            serde_json::to_value(&decoded).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        // Resources inside the dump sections are `Any`s under fixed keys.
        let pick = |section: &str, key: &str| -> Vec<serde_json::Value> {
            json.get(section)
                .and_then(|v| v.as_array())
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|item| {
                            let item = if key.contains('.') {
                                let (outer, inner) = key.split_once('.').unwrap_or((key, ""));
                                item.get(outer).and_then(|o| o.get(inner))
                            } else {
                                item.get(key)
                            };
                            item.cloned()
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let into = |values: Vec<serde_json::Value>,
                    out: &mut Vec<DynamicMessage>|
         -> Result<(), ConfigError> {
            for v in values {
                let any_type = v.get("@type").and_then(|t| t.as_str()).unwrap_or_default();
                let full = any_type.rsplit('/').next().unwrap_or_default().to_owned();
                let mut v = v;
                if let Some(o) = v.as_object_mut() {
                    o.remove("@type");
                }
                out.push(pool::from_json(v, &full)?);
            }
            Ok(())
        };
        match name {
            "envoy.admin.v3.BootstrapConfigDump" => {
                if let Some(addr) = json
                    .pointer("/bootstrap/admin/address/socketAddress")
                    .or_else(|| json.pointer("/bootstrap/admin/address/socket_address"))
                {
                    let address = addr
                        .get("address")
                        .and_then(|a| a.as_str())
                        .unwrap_or_default();
                    let port = addr
                        .get("portValue")
                        .or_else(|| addr.get("port_value"))
                        .and_then(|p| p.as_u64())
                        .unwrap_or(0);
                    match address.parse::<IpAddr>() {
                        Ok(ip) => {
                            res.admin = Some(SocketAddr::new(ip, u16::try_from(port).unwrap_or(0)))
                        }
                        Err(e) => res
                            .diagnostics
                            .error(format!("bootstrap.admin.address: {e}")),
                    }
                }
            }
            "envoy.admin.v3.ListenersConfigDump" => {
                into(pick("staticListeners", "listener"), &mut res.listeners)?;
                into(
                    pick("dynamicListeners", "activeState.listener"),
                    &mut res.listeners,
                )?;
            }
            "envoy.admin.v3.ClustersConfigDump" => {
                into(pick("staticClusters", "cluster"), &mut res.clusters)?;
                into(pick("dynamicActiveClusters", "cluster"), &mut res.clusters)?;
            }
            "envoy.admin.v3.RoutesConfigDump" => {
                into(pick("staticRouteConfigs", "routeConfig"), &mut res.routes)?;
                into(pick("dynamicRouteConfigs", "routeConfig"), &mut res.routes)?;
            }
            "envoy.admin.v3.EndpointsConfigDump" => {
                into(
                    pick("staticEndpointConfigs", "endpointConfig"),
                    &mut res.assignments,
                )?;
                into(
                    pick("dynamicEndpointConfigs", "endpointConfig"),
                    &mut res.assignments,
                )?;
            }
            other => res
                .diagnostics
                .warn(format!("config dump section {other} is ignored")),
        }
    }
    Ok(translate(&res))
}

/// Reads a bootstrap or a config dump (a JSON object with `configs`).
pub fn load_file(path: &std::path::Path) -> Result<Translated, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Syntax(format!("{}: {e}", path.display())))?;
    Ok(match read_source(&text)? {
        Source::Bootstrap(res) => translate_bootstrap(&res),
        Source::Dump(translated) => *translated,
    })
}

/// Translates resources from any source; each is checked against the support table.
pub fn translate(res: &Resources) -> Translated {
    translate_checked(res, true)
}

fn translate_checked(res: &Resources, check: bool) -> Translated {
    let mut cx = Cx {
        diags: res.diagnostics.clone(),
        assignments: HashMap::new(),
    };
    let mut snapshot = Snapshot {
        admin: res.admin,
        ..Snapshot::default()
    };
    let checked = |cx: &mut Cx, msg: &DynamicMessage, what: &str| {
        if check {
            support::check(msg, what, &mut cx.diags);
        }
    };
    for a in &res.assignments {
        checked(&mut cx, a, "cluster_load_assignment");
        if let Ok(cla) = transcode::<endpoint::ClusterLoadAssignment>(a) {
            cx.assignments.insert(cla.cluster_name.clone(), cla);
        }
    }
    for c in &res.clusters {
        let Ok(typed) = transcode::<cluster::Cluster>(c) else {
            continue;
        };
        let at = format!("cluster {:?}", typed.name);
        checked(&mut cx, c, &at);
        if snapshot.clusters.contains_key(&typed.name) {
            cx.diags.error(format!("{at}: duplicate cluster name"));
            continue;
        }
        if let Some(built) = cx.cluster(&typed, &at) {
            snapshot
                .clusters
                .insert(typed.name.clone(), Arc::new(built));
        }
    }
    for r in &res.routes {
        let Ok(typed) = transcode::<route::RouteConfiguration>(r) else {
            continue;
        };
        let at = format!("route_config {:?}", typed.name);
        checked(&mut cx, r, &at);
        if snapshot.routes.contains_key(&typed.name) {
            cx.diags
                .error(format!("{at}: duplicate route configuration name"));
            continue;
        }
        if let Some(built) = cx.route_config(&typed, &at) {
            snapshot.routes.insert(typed.name.clone(), Arc::new(built));
        }
    }
    let mut names = HashSet::new();
    for l in &res.listeners {
        let Ok(typed) = transcode::<listener::Listener>(l) else {
            continue;
        };
        let at = format!("listener {:?}", typed.name);
        checked(&mut cx, l, &at);
        if !names.insert(typed.name.clone()) {
            cx.diags.error(format!("{at}: duplicate listener name"));
            continue;
        }
        if let Some(built) = cx.listener(&typed, &at) {
            snapshot.listeners.push(Arc::new(built));
        }
    }
    let missing_routes = cross_check(&snapshot, res.dynamic, &mut cx.diags);
    let diagnostics = cx.diags;
    Translated {
        snapshot: diagnostics.is_ok().then(|| Snapshot {
            warnings: diagnostics.warnings.iter().cloned().collect(),
            ..snapshot
        }),
        diagnostics,
        missing_routes,
    }
}

/// References between resources: RDS names and clusters. Returns the route configurations
/// that are named but absent when `dynamic` allows that (they are still warming).
fn cross_check(
    s: &Snapshot,
    dynamic: bool,
    diags: &mut Diagnostics,
) -> std::collections::BTreeSet<String> {
    let mut missing = std::collections::BTreeSet::new();
    // Over xDS a reference to a cluster not (or no longer) there is not an error, as in
    // Envoy (RDS's `validate_clusters` defaults to false): types arrive one at a time, so a
    // cluster's removal reaches the proxy before the routes that stop using it, and refusing
    // it would leave the removed cluster in place. Such a route answers 503 `NC` and a
    // tcp_proxy closes the connection until the cluster arrives.
    let cluster = |name: &str, at: &str, diags: &mut Diagnostics| {
        if !s.clusters.contains_key(name) {
            if dynamic {
                diags.warn(format!(
                    "{at}: unknown cluster {name:?}: answered 503 NC until it arrives"
                ));
            } else {
                diags.error(format!("{at}: unknown cluster {name:?}"));
            }
        }
    };
    let target = |t: &ClusterTarget, at: &str, diags: &mut Diagnostics| match t {
        ClusterTarget::Named(n) => cluster(n, at, diags),
        ClusterTarget::Weighted(ws) => ws.iter().for_each(|w| cluster(&w.cluster, at, diags)),
        ClusterTarget::Header(_) => {}
    };
    let routes = |rc: &RouteConfig, diags: &mut Diagnostics| {
        for vh in rc.virtual_hosts() {
            for (i, r) in vh.routes.iter().enumerate() {
                if let RouteAction::Forward(f) = &r.action {
                    let at = format!(
                        "route_config {:?} virtual_hosts[{}].routes[{i}].route",
                        rc.name, vh.name
                    );
                    target(&f.target, &at, diags);
                }
            }
        }
    };
    for rc in s.routes.values() {
        routes(rc, diags);
    }
    for l in &s.listeners {
        for chain in l.filter_chains.iter().chain(l.default_chain.iter()) {
            let at = format!("listener {:?} filter_chain {:?}", l.name, chain.name);
            match &chain.filter {
                NetworkFilter::Tcp(t) => target(&t.target, &format!("{at} tcp_proxy"), diags),
                NetworkFilter::Http(h) => match &h.routes {
                    RouteSource::Inline(rc) => routes(rc, diags),
                    RouteSource::Named(name) if !s.routes.contains_key(name) => {
                        if dynamic {
                            missing.insert(name.clone());
                        } else {
                            diags.error(format!("{at} http_connection_manager.rds: unknown route configuration {name:?}"));
                        }
                    }
                    RouteSource::Named(_) => {}
                },
            }
        }
    }
    missing
}

struct Cx {
    diags: Diagnostics,
    assignments: HashMap<String, endpoint::ClusterLoadAssignment>,
}

fn transcode<T: prost::Message + Default>(msg: &DynamicMessage) -> Result<T, ConfigError> {
    msg.transcode_to().map_err(|e| ConfigError::Mapping {
        type_name: msg.descriptor().full_name().to_owned(),
        message: e.to_string(),
    })
}

fn to_dynamic<T: prost::Message>(msg: &T, full_name: &str) -> Result<DynamicMessage, ConfigError> {
    DynamicMessage::decode(pool::message(full_name)?, msg.encode_to_vec().as_slice()).map_err(|e| {
        ConfigError::Mapping {
            type_name: full_name.to_owned(),
            message: e.to_string(),
        }
    })
}

pub(crate) fn type_name(any: &Any) -> &str {
    any.type_url.rsplit('/').next().unwrap_or_default()
}

pub(crate) fn decode_dynamic(any: &Any) -> Result<DynamicMessage, String> {
    let desc = pool::pool()
        .get_message_by_name(type_name(any))
        .ok_or_else(|| format!("type {:?} is not known to nodemesh", any.type_url))?;
    DynamicMessage::decode(desc, any.value.as_slice()).map_err(|e| e.to_string())
}

pub(crate) fn dur(d: Option<&envoy_types::pb::google::protobuf::Duration>) -> Option<Duration> {
    d.map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
}

/// Envoy's "0 disables" durations.
fn opt_timeout(
    d: Option<&envoy_types::pb::google::protobuf::Duration>,
    default: Option<Duration>,
) -> Option<Duration> {
    match dur(d) {
        None => default,
        Some(z) if z.is_zero() => None,
        Some(d) => Some(d),
    }
}

fn socket_address(addr: &core::Address) -> Result<SocketAddr, String> {
    match &addr.address {
        Some(core::address::Address::SocketAddress(sa)) => {
            let ip: IpAddr = sa
                .address
                .parse()
                .map_err(|_| format!("{:?} is not an IP address", sa.address))?;
            let port = match sa.port_specifier {
                Some(core::socket_address::PortSpecifier::PortValue(p)) => {
                    u16::try_from(p).map_err(|_| format!("port {p} out of range"))?
                }
                _ => return Err("a named port is not supported; use port_value".into()),
            };
            if sa.protocol != core::socket_address::Protocol::Tcp as i32 {
                return Err("only TCP socket addresses are supported".into());
            }
            Ok(SocketAddr::new(ip, port))
        }
        _ => Err("only socket_address is supported (no pipe or internal addresses)".into()),
    }
}

/// A listener filter's `filter_disabled`: conditions on the destination port only (all
/// that `ListenerFilterChainMatchPredicate` has).
fn port_predicate(
    p: &listener::ListenerFilterChainMatchPredicate,
) -> Result<PortPredicate, String> {
    use listener::listener_filter_chain_match_predicate::Rule;
    let all = |set: &listener::listener_filter_chain_match_predicate::MatchSet| {
        set.rules
            .iter()
            .map(port_predicate)
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match &p.rule {
        Some(Rule::AnyMatch(true)) => PortPredicate::Any,
        Some(Rule::DestinationPortRange(r)) => {
            let port = |v: i32| u32::try_from(v).map_err(|_| format!("port {v} is negative"));
            PortPredicate::Range(port(r.start)?, port(r.end)?)
        }
        Some(Rule::NotMatch(inner)) => PortPredicate::Not(Box::new(port_predicate(inner)?)),
        Some(Rule::OrMatch(set)) => PortPredicate::Or(all(set)?),
        Some(Rule::AndMatch(set)) => PortPredicate::And(all(set)?),
        Some(Rule::AnyMatch(false)) | None => {
            return Err(
                "a rule is required (any_match, destination_port_range, or/and/not)".into(),
            );
        }
    })
}

pub(crate) fn string_matcher(m: &matcher_pb::StringMatcher) -> Result<StringMatcher, String> {
    use matcher_pb::string_matcher::MatchPattern;
    let kind = match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => StringMatch::Exact(s.clone()),
        Some(MatchPattern::Prefix(s)) => StringMatch::Prefix(s.clone()),
        Some(MatchPattern::Suffix(s)) => StringMatch::Suffix(s.clone()),
        Some(MatchPattern::Contains(s)) => StringMatch::Contains(s.clone()),
        Some(MatchPattern::SafeRegex(r)) => return regex(&r.regex, m.ignore_case),
        _ => {
            return Err(
                "a string matcher needs exact, prefix, suffix, contains or safe_regex".into(),
            );
        }
    };
    Ok(StringMatcher {
        kind,
        ignore_case: m.ignore_case,
    })
}

/// `envoy.config.route.v3.HeaderMatcher` (routes and RBAC use the same one).
pub(crate) fn header_matcher(h: &route::HeaderMatcher) -> Result<HeaderMatcher, String> {
    use route::header_matcher::HeaderMatchSpecifier as S;
    let plain = |kind| {
        HeaderRule::String(StringMatcher {
            kind,
            ignore_case: false,
        })
    };
    let rule = match &h.header_match_specifier {
        None => HeaderRule::Present(true),
        Some(S::ExactMatch(v)) => HeaderRule::String(StringMatcher::exact(v.clone())),
        Some(S::PrefixMatch(v)) => plain(StringMatch::Prefix(v.clone())),
        Some(S::SuffixMatch(v)) => plain(StringMatch::Suffix(v.clone())),
        Some(S::ContainsMatch(v)) => plain(StringMatch::Contains(v.clone())),
        Some(S::PresentMatch(p)) => HeaderRule::Present(*p),
        Some(S::RangeMatch(r)) => HeaderRule::Range(r.start, r.end),
        Some(S::SafeRegexMatch(r)) => HeaderRule::String(regex(&r.regex, false)?),
        Some(S::StringMatch(s)) => HeaderRule::String(string_matcher(s)?),
    };
    Ok(HeaderMatcher {
        name: h.name.to_ascii_lowercase(),
        rule,
        invert: h.invert_match,
        treat_missing_as_empty: h.treat_missing_header_as_empty,
    })
}

fn regex(pattern: &str, ignore_case: bool) -> Result<StringMatcher, String> {
    let mut m = StringMatcher::regex(pattern)?;
    m.ignore_case = ignore_case;
    Ok(m)
}

pub(crate) fn cidr(c: &core::CidrRange) -> Result<IpRange, String> {
    let addr: IpAddr = c
        .address_prefix
        .parse()
        .map_err(|_| format!("{:?} is not an IP address", c.address_prefix))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = c.prefix_len.as_ref().map_or(0, |v| v.value);
    if len > max {
        return Err(format!("prefix_len {len} is longer than {max}"));
    }
    Ok(IpRange {
        addr,
        prefix_len: len as u8,
    })
}

pub(crate) fn header_options(
    opts: &[core::HeaderValueOption],
    at: &str,
    diags: &mut Diagnostics,
) -> Vec<HeaderValueOption> {
    let mut out = Vec::new();
    for o in opts {
        let Some(h) = &o.header else { continue };
        let name = h.key.to_ascii_lowercase();
        let value = if h.raw_value.is_empty() {
            h.value.clone()
        } else {
            String::from_utf8_lossy(&h.raw_value).into_owned()
        };
        if http_name_invalid(&name) {
            diags.error(format!("{at}: invalid header name {:?}", h.key));
            continue;
        }
        if value.replace("%%", "").contains('%') {
            diags.error(format!(
                "{at}: header {name:?}: value {value:?} uses a %VARIABLE% (header formatters are not supported)"
            ));
            continue;
        }
        let append = match (o.append.as_ref().map(|b| b.value), o.append_action) {
            // The deprecated `append` wins when set, as in Envoy.
            (Some(true), _) => AppendAction::AppendIfExistsOrAdd,
            (Some(false), _) => AppendAction::OverwriteIfExistsOrAdd,
            (None, 1) => AppendAction::AddIfAbsent,
            (None, 2) => AppendAction::OverwriteIfExistsOrAdd,
            (None, 3) => AppendAction::OverwriteIfExists,
            (None, _) => AppendAction::AppendIfExistsOrAdd,
        };
        out.push(HeaderValueOption {
            name,
            value: value.replace("%%", "%"),
            append,
            keep_empty_value: o.keep_empty_value,
        });
    }
    out
}

fn http_name_invalid(name: &str) -> bool {
    name.is_empty() || http_header_name_invalid_bytes(name)
}

fn http_header_name_invalid_bytes(name: &str) -> bool {
    !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn mutations(
    req_add: &[core::HeaderValueOption],
    req_remove: &[String],
    resp_add: &[core::HeaderValueOption],
    resp_remove: &[String],
    at: &str,
    diags: &mut Diagnostics,
) -> HeaderMutations {
    HeaderMutations {
        request_add: header_options(req_add, &format!("{at}.request_headers_to_add"), diags),
        request_remove: req_remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
        response_add: header_options(resp_add, &format!("{at}.response_headers_to_add"), diags),
        response_remove: resp_remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
    }
}

impl Cx {
    /// Decodes and checks a typed extension.
    fn extension<T: prost::Message + Default>(
        &mut self,
        any: &Any,
        want: &str,
        at: &str,
    ) -> Option<T> {
        let got = type_name(any);
        let udpa = matches!(got, "udpa.type.v1.TypedStruct" | "xds.type.v3.TypedStruct");
        if got != want {
            let why = if udpa {
                "a TypedStruct (not supported)"
            } else {
                got
            };
            self.diags
                .error(format!("{at}: expected {want}, got {why}"));
            return None;
        }
        match decode_dynamic(any) {
            Ok(msg) => support::check(&msg, at, &mut self.diags),
            Err(e) => {
                self.diags.error(format!("{at}: {e}"));
                return None;
            }
        }
        match T::decode(any.value.as_slice()) {
            Ok(t) => Some(t),
            Err(e) => {
                self.diags.error(format!("{at}: {e}"));
                None
            }
        }
    }

    fn listener(&mut self, l: &listener::Listener, at: &str) -> Option<Listener> {
        let address = match l.address.as_ref().map(socket_address) {
            Some(Ok(a)) => a,
            Some(Err(e)) => {
                self.diags.error(format!("{at}.address: {e}"));
                return None;
            }
            None => {
                self.diags.error(format!("{at}.address: required"));
                return None;
            }
        };
        let mut out = Listener {
            name: l.name.clone(),
            address,
            bind: l.bind_to_port.as_ref().is_none_or(|b| b.value),
            use_original_dst: l.use_original_dst.as_ref().is_some_and(|b| b.value),
            http_inspector: false,
            http_inspector_disabled: None,
            tls_inspector: false,
            tls_inspector_disabled: None,
            // Envoy's default listener_filters_timeout.
            inspection_timeout: dur(l.listener_filters_timeout.as_ref())
                .unwrap_or(Duration::from_secs(15)),
            filter_chains: Vec::new(),
            default_chain: None,
        };
        if out.inspection_timeout.is_zero() {
            out.inspection_timeout = Duration::from_secs(u64::from(u32::MAX));
        }
        if !l.continue_on_listener_filters_timeout && !l.listener_filters.is_empty() {
            self.diags.warn(format!(
                "{at}: continue_on_listener_filters_timeout is false, but nodemesh always continues \
                 a connection whose inspection times out as raw TCP (Istio's setting)"
            ));
        }
        for (i, f) in l.listener_filters.iter().enumerate() {
            let fat = format!("{at}.listener_filters[{i}] {:?}", f.name);
            let Some(listener::listener_filter::ConfigType::TypedConfig(any)) = &f.config_type
            else {
                self.diags.error(format!("{fat}: typed_config is required"));
                continue;
            };
            let disabled = match &f.filter_disabled {
                None => None,
                Some(p) => match port_predicate(p) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        self.diags.error(format!("{fat}.filter_disabled: {e}"));
                        continue;
                    }
                },
            };
            match type_name(any) {
                // It restores the original destination, which nodemesh always has from the
                // kernel; unlike `use_original_dst` it hands nothing to another listener.
                "envoy.extensions.filters.listener.original_dst.v3.OriginalDst" => {
                    if disabled.is_some() {
                        self.diags.error(format!(
                            "{fat}.filter_disabled: not supported for original_dst"
                        ));
                    }
                }
                "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector" => {
                    out.http_inspector = true;
                    out.http_inspector_disabled = disabled;
                }
                "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" => {
                    out.tls_inspector = true;
                    out.tls_inspector_disabled = disabled;
                }
                other => {
                    self.diags.error(format!(
                        "{fat}: listener filter type {other} is not supported"
                    ));
                    continue;
                }
            }
            if let Ok(msg) = decode_dynamic(any) {
                support::check(&msg, &fat, &mut self.diags);
            }
        }
        for (i, chain) in l.filter_chains.iter().enumerate() {
            let cat = format!(
                "{at}.filter_chains[{}]",
                if chain.name.is_empty() {
                    i.to_string()
                } else {
                    chain.name.clone()
                }
            );
            if let Some(c) = self.chain(chain, &cat) {
                out.filter_chains.push(c);
            }
        }
        if let Some(chain) = &l.default_filter_chain {
            out.default_chain = self.chain(chain, &format!("{at}.default_filter_chain"));
        }
        Some(out)
    }

    fn chain(&mut self, c: &listener::FilterChain, at: &str) -> Option<FilterChain> {
        let m = c.filter_chain_match.clone().unwrap_or_default();
        let ranges = |cx: &mut Cx, rs: &[core::CidrRange], what: &str| -> Vec<IpRange> {
            rs.iter()
                .filter_map(|r| {
                    cidr(r)
                        .map_err(|e| {
                            cx.diags
                                .error(format!("{at}.filter_chain_match.{what}: {e}"))
                        })
                        .ok()
                })
                .collect()
        };
        let matcher = ChainMatch {
            destination_port: m
                .destination_port
                .as_ref()
                .and_then(|p| u16::try_from(p.value).ok()),
            destination_ranges: ranges(self, &m.prefix_ranges, "prefix_ranges"),
            server_names: m
                .server_names
                .iter()
                .map(|s| s.to_ascii_lowercase())
                .collect(),
            transport_protocol: (!m.transport_protocol.is_empty())
                .then(|| m.transport_protocol.clone()),
            application_protocols: m.application_protocols.clone(),
            direct_source_ranges: ranges(
                self,
                &m.direct_source_prefix_ranges,
                "direct_source_prefix_ranges",
            ),
            source_ranges: ranges(self, &m.source_prefix_ranges, "source_prefix_ranges"),
            source_ports: m
                .source_ports
                .iter()
                .filter_map(|p| u16::try_from(*p).ok())
                .collect(),
        };
        let Some((last, others)) = c.filters.split_last() else {
            self.diags.error(format!(
                "{at}.filters: a chain needs http_connection_manager or tcp_proxy"
            ));
            return None;
        };
        let mut policies = Vec::new();
        for f in others {
            let pat = format!("{at}.filters {:?}", f.name);
            match &f.config_type {
                Some(listener::filter::ConfigType::TypedConfig(any)) => {
                    if let Some(reason) = istio::ignored(any, istio::Place::Network) {
                        istio::warn("network", &f.name, any, reason, &mut self.diags);
                    } else if let Some(p) =
                        crate::filters::network_filter(any, &pat, &mut self.diags)
                    {
                        policies.push(p);
                    }
                }
                _ => self.diags.error(format!("{pat}: typed_config is required")),
            }
        }
        let fat = format!("{at}.filters {:?}", last.name);
        let Some(listener::filter::ConfigType::TypedConfig(any)) = &last.config_type else {
            self.diags.error(format!("{fat}: typed_config is required"));
            return None;
        };
        let filter = match type_name(any) {
            HCM_URL => {
                let config = self.extension::<hcm::HttpConnectionManager>(any, HCM_URL, &fat)?;
                NetworkFilter::Http(Arc::new(self.hcm(&config, &fat)?))
            }
            TCP_URL => {
                let config = self.extension::<tcp::TcpProxy>(any, TCP_URL, &fat)?;
                NetworkFilter::Tcp(self.tcp(&config, &fat)?)
            }
            other => {
                self.diags.error(format!(
                    "{fat}: network filter type {other} is not supported"
                ));
                return None;
            }
        };
        if let Some(socket) = &c.transport_socket
            && let Some(deny) = tls::downstream(socket, at, &mut self.diags)
        {
            policies.insert(0, deny);
        }
        Some(FilterChain {
            name: c.name.clone(),
            matcher,
            policies,
            filter,
        })
    }

    fn tcp(&mut self, t: &tcp::TcpProxy, at: &str) -> Option<TcpProxy> {
        let target = match &t.cluster_specifier {
            Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(c)) => ClusterTarget::Named(c.clone()),
            Some(tcp::tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => ClusterTarget::Weighted(
                w.clusters
                    .iter()
                    .map(|c| WeightedTarget {
                        cluster: c.name.clone(),
                        weight: c.weight,
                        headers: HeaderMutations::default(),
                        host_rewrite: None,
                    })
                    .collect(),
            ),
            None => {
                self.diags.error(format!(
                    "{at}: tcp_proxy needs cluster or weighted_clusters"
                ));
                return None;
            }
        };
        Some(TcpProxy {
            stat_prefix: t.stat_prefix.clone(),
            target,
            // Envoy's default: 1 hour; 0 disables.
            idle_timeout: opt_timeout(t.idle_timeout.as_ref(), Some(Duration::from_secs(3600)))
                .unwrap_or(Duration::ZERO),
            access_logs: crate::access_log::translate(&t.access_log, at, &mut self.diags),
        })
    }

    fn hcm(&mut self, h: &hcm::HttpConnectionManager, at: &str) -> Option<HttpManager> {
        use hcm::http_connection_manager::{CodecType, RouteSpecifier};
        let codec = match CodecType::try_from(h.codec_type) {
            Ok(CodecType::Auto) => Codec::Auto,
            Ok(CodecType::Http1) => Codec::Http1,
            Ok(CodecType::Http2) => Codec::Http2,
            _ => {
                self.diags.error(format!(
                    "{at}.codec_type: only AUTO, HTTP1 and HTTP2 are supported"
                ));
                return None;
            }
        };
        let routes = match &h.route_specifier {
            Some(RouteSpecifier::RouteConfig(rc)) => RouteSource::Inline(Arc::new(
                self.route_config(rc, &format!("{at}.route_config"))?,
            )),
            Some(RouteSpecifier::Rds(rds)) => RouteSource::Named(rds.route_config_name.clone()),
            _ => {
                self.diags
                    .error(format!("{at}: route_config or rds is required"));
                return None;
            }
        };
        let mut filters = Vec::new();
        let mut suppress = false;
        let mut router_seen = false;
        for (i, f) in h.http_filters.iter().enumerate() {
            let fat = format!("{at}.http_filters[{i}] {:?}", f.name);
            if f.disabled {
                continue;
            }
            let Some(hcm::http_filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                self.diags.error(format!("{fat}: typed_config is required"));
                continue;
            };
            if type_name(any) == ROUTER_URL {
                if let Some(router) = self.extension::<Router>(any, ROUTER_URL, &fat) {
                    suppress = router.suppress_envoy_headers;
                }
                router_seen = true;
                if i + 1 != h.http_filters.len() {
                    self.diags
                        .error(format!("{fat}: the router must be the last HTTP filter"));
                }
            } else if let Some(reason) = istio::ignored(any, istio::Place::Http) {
                istio::warn("HTTP", &f.name, any, reason, &mut self.diags);
            } else if istio::inert_http(any, &fat, &mut self.diags) {
                // istiod's empty fault and CORS filters: nothing to run.
            } else if crate::filters::is_http_policy(any) {
                if let Some(config) = crate::filters::http_filter(any, &fat, &mut self.diags) {
                    filters.push(HttpFilter {
                        name: f.name.clone(),
                        type_url: any.type_url.clone(),
                        config,
                    });
                }
            } else if f.is_optional {
                self.diags.warn(format!(
                    "optional HTTP filter {:?} ({}) is skipped: not supported",
                    f.name,
                    istio::describe(any)
                ));
            } else {
                self.diags.error(format!(
                    "{fat}: HTTP filter type {} is not supported",
                    istio::describe(any)
                ));
            }
        }
        if !router_seen {
            self.diags.error(format!(
                "{at}.http_filters: envoy.filters.http.router is required"
            ));
        }
        let common = h.common_http_protocol_options.unwrap_or_default();
        let http2 = h
            .http2_protocol_options
            .as_ref()
            .map(http2_settings)
            .unwrap_or_default();
        let mut upgrades = Vec::new();
        for u in &h.upgrade_configs {
            if !u.filters.is_empty() {
                self.diags.error(format!(
                    "{at}.upgrade_configs[{}].filters: not supported",
                    u.upgrade_type
                ));
            }
            if u.enabled.as_ref().is_none_or(|e| e.value) {
                upgrades.push(u.upgrade_type.to_ascii_lowercase());
            }
        }
        let mut internal_addresses = Vec::new();
        if let Some(cfg) = &h.internal_address_config {
            for (i, c) in cfg.cidr_ranges.iter().enumerate() {
                match cidr(c) {
                    Ok(range) => internal_addresses.push(range),
                    Err(e) => self.diags.error(format!(
                        "{at}.internal_address_config.cidr_ranges[{i}]: {e}"
                    )),
                }
            }
        }
        use hcm::http_connection_manager::ForwardClientCertDetails as Xfcc;
        let client_cert = match Xfcc::try_from(h.forward_client_cert_details) {
            Ok(Xfcc::AlwaysForwardOnly) => ClientCertDetails::AlwaysForward,
            Ok(_) => ClientCertDetails::Sanitize,
            Err(_) => {
                self.diags.error(format!(
                    "{at}.forward_client_cert_details: unknown value {}",
                    h.forward_client_cert_details
                ));
                ClientCertDetails::Sanitize
            }
        };
        Some(HttpManager {
            stat_prefix: h.stat_prefix.clone(),
            codec,
            routes,
            filters,
            generate_request_id: h.generate_request_id.as_ref().is_none_or(|b| b.value),
            preserve_external_request_id: h.preserve_external_request_id,
            always_set_request_id_in_response: h.always_set_request_id_in_response,
            use_remote_address: h.use_remote_address.as_ref().is_some_and(|b| b.value),
            xff_num_trusted_hops: h.xff_num_trusted_hops,
            skip_xff_append: h.skip_xff_append,
            via: (!h.via.is_empty()).then(|| h.via.clone()),
            server_name: if h.server_name.is_empty() {
                "envoy".into()
            } else {
                h.server_name.clone()
            },
            stream_idle_timeout: opt_timeout(
                h.stream_idle_timeout.as_ref(),
                Some(Duration::from_secs(300)),
            ),
            request_timeout: opt_timeout(h.request_timeout.as_ref(), None),
            request_headers_timeout: opt_timeout(h.request_headers_timeout.as_ref(), None),
            idle_timeout: opt_timeout(
                common.idle_timeout.as_ref(),
                Some(Duration::from_secs(3600)),
            ),
            max_request_headers_kb: h.max_request_headers_kb.as_ref().map_or(60, |v| v.value),
            max_headers_count: common.max_headers_count.as_ref().map_or(100, |v| v.value),
            upgrades,
            http2,
            normalize_path: h.normalize_path.as_ref().is_some_and(|b| b.value),
            merge_slashes: h.merge_slashes,
            strip_any_host_port: matches!(
                h.strip_port_mode,
                Some(hcm::http_connection_manager::StripPortMode::StripAnyHostPort(true))
            ),
            suppress_envoy_headers: suppress,
            internal_addresses,
            client_cert,
            access_logs: crate::access_log::translate(&h.access_log, at, &mut self.diags),
        })
    }

    fn route_config(&mut self, rc: &route::RouteConfiguration, at: &str) -> Option<RouteConfig> {
        let mut vhosts = Vec::new();
        for vh in &rc.virtual_hosts {
            vhosts.push(self.virtual_host(vh, &format!("{at}.virtual_hosts[{}]", vh.name))?);
        }
        let headers = mutations(
            &rc.request_headers_to_add,
            &rc.request_headers_to_remove,
            &rc.response_headers_to_add,
            &rc.response_headers_to_remove,
            at,
            &mut self.diags,
        );
        Some(RouteConfig::new(
            rc.name.clone(),
            vhosts,
            headers,
            rc.ignore_port_in_host_matching,
        ))
    }

    fn virtual_host(&mut self, vh: &route::VirtualHost, at: &str) -> Option<VirtualHost> {
        if vh.require_tls != 0 {
            self.diags
                .error(format!("{at}.require_tls: TLS is not supported"));
        }
        let domains = vh
            .domains
            .iter()
            .map(|d| {
                let d = d.to_ascii_lowercase();
                if d == "*" {
                    DomainMatch::Any
                } else if let Some(suffix) = d.strip_prefix('*') {
                    DomainMatch::Suffix(suffix.to_owned())
                } else if let Some(prefix) = d.strip_suffix('*') {
                    DomainMatch::Prefix(prefix.to_owned())
                } else {
                    DomainMatch::Exact(d)
                }
            })
            .collect();
        let mut routes = Vec::new();
        for (i, r) in vh.routes.iter().enumerate() {
            let rat = format!(
                "{at}.routes[{}]",
                if r.name.is_empty() {
                    i.to_string()
                } else {
                    r.name.clone()
                }
            );
            if let Some(r) = self.route(r, &rat) {
                routes.push(r);
            }
        }
        Some(VirtualHost {
            name: vh.name.clone(),
            domains,
            routes,
            headers: mutations(
                &vh.request_headers_to_add,
                &vh.request_headers_to_remove,
                &vh.response_headers_to_add,
                &vh.response_headers_to_remove,
                at,
                &mut self.diags,
            ),
            retry: vh
                .retry_policy
                .as_ref()
                .and_then(|p| self.retry(p, &format!("{at}.retry_policy"))),
            include_request_attempt_count: vh.include_request_attempt_count,
            include_attempt_count_in_response: vh.include_attempt_count_in_response,
            per_filter: self.per_filter(&vh.typed_per_filter_config, at),
            rate_limits: vh
                .rate_limits
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    crate::filters::ratelimit::rate_limit(
                        r,
                        &format!("{at}.rate_limits[{i}]"),
                        &mut self.diags,
                    )
                })
                .collect(),
        })
    }

    fn route(&mut self, r: &route::Route, at: &str) -> Option<Route> {
        use route::route::Action;
        let m = r.r#match.clone().unwrap_or_default();
        let matcher = self.route_match(&m, &format!("{at}.match"))?;
        let action = match &r.action {
            Some(Action::Route(a)) => {
                RouteAction::Forward(Box::new(self.forward(a, &format!("{at}.route"))?))
            }
            Some(Action::DirectResponse(d)) => {
                use core::data_source::Specifier;
                let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                    None => None,
                    Some(Specifier::InlineString(s)) => Some(s.clone()),
                    Some(Specifier::InlineBytes(b)) => {
                        Some(String::from_utf8_lossy(b).into_owned())
                    }
                    Some(_) => {
                        self.diags.error(format!("{at}.direct_response.body: only inline_string and inline_bytes are supported"));
                        return None;
                    }
                };
                let Ok(status) = u16::try_from(d.status).map_err(drop).and_then(|s| {
                    if (200..600).contains(&s) {
                        Ok(s)
                    } else {
                        Err(())
                    }
                }) else {
                    self.diags.error(format!(
                        "{at}.direct_response.status: {} is not in [200, 600)",
                        d.status
                    ));
                    return None;
                };
                RouteAction::DirectResponse { status, body }
            }
            Some(Action::Redirect(rd)) => {
                RouteAction::Redirect(self.redirect(rd, &format!("{at}.redirect"))?)
            }
            _ => {
                self.diags.error(format!(
                    "{at}: the action must be route, redirect or direct_response"
                ));
                return None;
            }
        };
        let rate_limits = match &r.action {
            Some(Action::Route(a)) => a
                .rate_limits
                .iter()
                .enumerate()
                .filter_map(|(i, x)| {
                    crate::filters::ratelimit::rate_limit(
                        x,
                        &format!("{at}.route.rate_limits[{i}]"),
                        &mut self.diags,
                    )
                })
                .collect(),
            _ => Vec::new(),
        };
        Some(Route {
            name: r.name.clone(),
            per_filter: self.per_filter(&r.typed_per_filter_config, at),
            rate_limits,
            matcher,
            action,
            headers: mutations(
                &r.request_headers_to_add,
                &r.request_headers_to_remove,
                &r.response_headers_to_add,
                &r.response_headers_to_remove,
                at,
                &mut self.diags,
            ),
        })
    }

    /// `typed_per_filter_config`, sorted by filter name.
    fn per_filter(
        &mut self,
        configs: &HashMap<String, Any>,
        at: &str,
    ) -> Vec<(String, crate::filters::PerRoute)> {
        let mut names: Vec<&String> = configs.keys().collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|name| {
                let pat = format!("{at}.typed_per_filter_config[{name:?}]");
                crate::filters::per_route(&configs[name], &pat, &mut self.diags)
                    .map(|p| (name.clone(), p))
            })
            .collect()
    }

    fn route_match(&mut self, m: &route::RouteMatch, at: &str) -> Option<RouteMatch> {
        use route::route_match::PathSpecifier;
        let path = match &m.path_specifier {
            Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
            Some(PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
            Some(PathSpecifier::PathSeparatedPrefix(p)) => PathMatch::Separated(p.clone()),
            Some(PathSpecifier::SafeRegex(r)) => match regex(&r.regex, false) {
                Ok(m) => PathMatch::Regex(m),
                Err(e) => {
                    self.diags.error(format!("{at}.safe_regex: {e}"));
                    return None;
                }
            },
            _ => {
                self.diags.error(format!(
                    "{at}: prefix, path, safe_regex or path_separated_prefix is required"
                ));
                return None;
            }
        };
        let case_sensitive = m.case_sensitive.as_ref().is_none_or(|b| b.value);
        let mut headers = Vec::new();
        for h in &m.headers {
            match header_matcher(h) {
                Ok(hm) => headers.push(hm),
                Err(e) => {
                    self.diags.error(format!("{at}.headers[{}]: {e}", h.name));
                    return None;
                }
            }
        }
        let mut query = Vec::new();
        for q in &m.query_parameters {
            use route::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
            let value = match &q.query_parameter_match_specifier {
                Some(Q::StringMatch(s)) => match string_matcher(s) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        self.diags
                            .error(format!("{at}.query_parameters[{}]: {e}", q.name));
                        return None;
                    }
                },
                _ => None,
            };
            query.push(QueryMatcher {
                name: q.name.clone(),
                value,
            });
        }
        Some(RouteMatch {
            path,
            case_sensitive,
            headers,
            query,
            grpc: m.grpc.is_some(),
        })
    }

    fn forward(&mut self, a: &route::RouteAction, at: &str) -> Option<Forward> {
        use route::route_action::{ClusterSpecifier, HostRewriteSpecifier};
        let target = match &a.cluster_specifier {
            Some(ClusterSpecifier::Cluster(c)) => ClusterTarget::Named(c.clone()),
            Some(ClusterSpecifier::ClusterHeader(h)) => {
                ClusterTarget::Header(h.to_ascii_lowercase())
            }
            Some(ClusterSpecifier::WeightedClusters(w)) => {
                let mut targets = Vec::new();
                for (i, c) in w.clusters.iter().enumerate() {
                    let cat = format!("{at}.weighted_clusters.clusters[{i}]");
                    targets.push(WeightedTarget {
                        cluster: c.name.clone(),
                        weight: c.weight.as_ref().map_or(0, |v| v.value),
                        headers: mutations(
                            &c.request_headers_to_add,
                            &c.request_headers_to_remove,
                            &c.response_headers_to_add,
                            &c.response_headers_to_remove,
                            &cat,
                            &mut self.diags,
                        ),
                        host_rewrite: c.host_rewrite_specifier.as_ref().map(|route::weighted_cluster::cluster_weight::HostRewriteSpecifier::HostRewriteLiteral(h)| h.clone()),
                    });
                }
                if targets.iter().all(|t| t.weight == 0) {
                    self.diags
                        .error(format!("{at}.weighted_clusters: the weights sum to 0"));
                    return None;
                }
                ClusterTarget::Weighted(targets)
            }
            _ => {
                self.diags.error(format!(
                    "{at}: cluster, cluster_header or weighted_clusters is required"
                ));
                return None;
            }
        };
        let regex_rewrite = match &a.regex_rewrite {
            Some(r) => match regex(
                &r.pattern
                    .as_ref()
                    .map(|p| p.regex.clone())
                    .unwrap_or_default(),
                false,
            ) {
                // The rewrite pattern is not anchored (it replaces every match).
                Ok(_) => match regex::Regex::new(
                    &r.pattern
                        .as_ref()
                        .map(|p| p.regex.clone())
                        .unwrap_or_default(),
                ) {
                    Ok(re) => Some((
                        StringMatcher {
                            kind: StringMatch::Regex(re),
                            ignore_case: false,
                        },
                        envoy_substitution(&r.substitution),
                    )),
                    Err(e) => {
                        self.diags.error(format!("{at}.regex_rewrite: {e}"));
                        return None;
                    }
                },
                Err(e) => {
                    self.diags.error(format!("{at}.regex_rewrite: {e}"));
                    return None;
                }
            },
            None => None,
        };
        let host_rewrite = match &a.host_rewrite_specifier {
            None => HostRewrite::None,
            Some(HostRewriteSpecifier::HostRewriteLiteral(h)) => HostRewrite::Literal(h.clone()),
            Some(HostRewriteSpecifier::AutoHostRewrite(b)) if b.value => HostRewrite::Auto,
            Some(HostRewriteSpecifier::AutoHostRewrite(_)) => HostRewrite::None,
            Some(HostRewriteSpecifier::HostRewriteHeader(h)) => {
                HostRewrite::Header(h.to_ascii_lowercase())
            }
            Some(_) => {
                self.diags
                    .error(format!("{at}: host_rewrite_path_regex is not supported"));
                return None;
            }
        };
        let (grpc_max, grpc_offset) = match &a.max_stream_duration {
            Some(m) => (
                dur(m.grpc_timeout_header_max.as_ref()),
                dur(m.grpc_timeout_header_offset.as_ref()),
            ),
            None => (
                dur(a.max_grpc_timeout.as_ref()),
                dur(a.grpc_timeout_offset.as_ref()),
            ),
        };
        // istiod sets 0s ("no limit", nodemesh's behaviour) on every inbound route.
        if a.max_stream_duration
            .as_ref()
            .and_then(|m| dur(m.max_stream_duration.as_ref()))
            .is_some_and(|d| !d.is_zero())
        {
            self.diags.error(format!(
                "{at}.max_stream_duration.max_stream_duration: not supported"
            ));
        }
        let mut upgrades = Vec::new();
        for u in &a.upgrade_configs {
            if u.enabled.as_ref().is_none_or(|e| e.value) {
                upgrades.push(u.upgrade_type.to_ascii_lowercase());
            }
        }
        let status = match a.cluster_not_found_response_code {
            1 => 404,
            2 => 500,
            _ => 503,
        };
        Some(Forward {
            target,
            cluster_not_found_status: status,
            timeout: opt_timeout(a.timeout.as_ref(), Some(Duration::from_secs(15))),
            idle_timeout: dur(a.idle_timeout.as_ref()).map(|d| (!d.is_zero()).then_some(d)),
            retry: a
                .retry_policy
                .as_ref()
                .and_then(|p| self.retry(p, &format!("{at}.retry_policy"))),
            prefix_rewrite: (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone()),
            regex_rewrite,
            host_rewrite,
            grpc_timeout_max: grpc_max,
            grpc_timeout_is_stream_duration: a.max_stream_duration.is_some(),
            grpc_timeout_offset: grpc_offset,
            upgrades,
        })
    }

    fn retry(&mut self, p: &route::RetryPolicy, at: &str) -> Option<RetryPolicy> {
        let retry_on = match RetryOn::parse(&p.retry_on) {
            Ok(on) => on,
            Err(unknown) => {
                self.diags
                    .error(format!("{at}.retry_on: {unknown:?} is not supported"));
                return None;
            }
        };
        let base = p
            .retry_back_off
            .as_ref()
            .and_then(|b| dur(b.base_interval.as_ref()))
            .unwrap_or(Duration::from_millis(25));
        let max = p
            .retry_back_off
            .as_ref()
            .and_then(|b| dur(b.max_interval.as_ref()))
            .unwrap_or(base * 10);
        Some(RetryPolicy {
            retry_on,
            num_retries: p.num_retries.as_ref().map_or(1, |v| v.value),
            per_try_timeout: opt_timeout(p.per_try_timeout.as_ref(), None),
            per_try_idle_timeout: opt_timeout(p.per_try_idle_timeout.as_ref(), None),
            retriable_status_codes: p
                .retriable_status_codes
                .iter()
                .filter_map(|c| u16::try_from(*c).ok())
                .collect(),
            backoff_base: base,
            backoff_max: max.max(base),
        })
    }

    fn redirect(&mut self, r: &route::RedirectAction, at: &str) -> Option<Redirect> {
        use route::redirect_action::{PathRewriteSpecifier, SchemeRewriteSpecifier};
        let scheme = match &r.scheme_rewrite_specifier {
            Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".to_owned()),
            Some(SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s.to_ascii_lowercase()),
            _ => None,
        };
        let (path, prefix_rewrite) = match &r.path_rewrite_specifier {
            Some(PathRewriteSpecifier::PathRedirect(p)) => (Some(p.clone()), None),
            Some(PathRewriteSpecifier::PrefixRewrite(p)) => (None, Some(p.clone())),
            Some(_) => {
                self.diags
                    .error(format!("{at}.regex_rewrite: not supported"));
                return None;
            }
            None => (None, None),
        };
        let status = match r.response_code {
            0 => 301,
            1 => 302,
            2 => 303,
            3 => 307,
            4 => 308,
            other => {
                self.diags.error(format!(
                    "{at}.response_code: {other} is not a redirect code"
                ));
                return None;
            }
        };
        Some(Redirect {
            scheme,
            host: (!r.host_redirect.is_empty()).then(|| r.host_redirect.clone()),
            port: (r.port_redirect != 0).then(|| u16::try_from(r.port_redirect).unwrap_or(0)),
            path,
            prefix_rewrite,
            status,
            strip_query: r.strip_query,
        })
    }

    fn cluster(&mut self, c: &cluster::Cluster, at: &str) -> Option<Cluster> {
        use cluster::cluster::{ClusterDiscoveryType, DiscoveryType, LbConfig, LbPolicy as Lb};
        tls::upstream(c, at, &mut self.diags);
        for (i, f) in c.filters.iter().enumerate() {
            let fat = format!("{at}.filters[{i}] {:?}", f.name);
            match f.typed_config.as_ref() {
                Some(any) => match istio::ignored(any, istio::Place::Cluster) {
                    Some(reason) => istio::warn("cluster", &f.name, any, reason, &mut self.diags),
                    None => self.diags.error(format!(
                        "{fat}: upstream network filter type {} is not supported",
                        type_name(any)
                    )),
                },
                None => self.diags.error(format!("{fat}: typed_config is required")),
            }
        }
        if let Some(bind) = &c.upstream_bind_config {
            self.upstream_bind(c, bind, at);
        }
        let kind = match &c.cluster_discovery_type {
            Some(ClusterDiscoveryType::Type(t)) => {
                DiscoveryType::try_from(*t).unwrap_or(DiscoveryType::Static)
            }
            None => DiscoveryType::Static,
            Some(_) => {
                self.diags.error(format!(
                    "{at}.cluster_type: custom cluster types are not supported"
                ));
                return None;
            }
        };
        let endpoints_of = |cx: &mut Cx, cla: &endpoint::ClusterLoadAssignment| -> Vec<Endpoint> {
            let mut out = Vec::new();
            for (li, locality) in cla.endpoints.iter().enumerate() {
                if locality.priority != 0 {
                    cx.diags.error(format!("{at}.load_assignment.endpoints[{li}].priority: only priority 0 is supported"));
                }
                for e in &locality.lb_endpoints {
                    let Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) =
                        &e.host_identifier
                    else {
                        cx.diags.error(format!(
                            "{at}.load_assignment: named endpoints are not supported"
                        ));
                        continue;
                    };
                    match ep.address.as_ref().map(socket_address) {
                        Some(Ok(address)) => out.push(Endpoint {
                            address,
                            hostname: ep.hostname.clone(),
                            weight: e
                                .load_balancing_weight
                                .as_ref()
                                .map_or(1, |w| w.value.max(1)),
                            // UNKNOWN (0), HEALTHY (1), DEGRADED (5) serve; the others do not.
                            healthy: matches!(e.health_status, 0 | 1 | 5),
                        }),
                        Some(Err(e)) => cx
                            .diags
                            .error(format!("{at}.load_assignment endpoint: {e}")),
                        None => cx
                            .diags
                            .error(format!("{at}.load_assignment endpoint: address required")),
                    }
                }
            }
            out
        };
        let discovery = match kind {
            DiscoveryType::Static => Discovery::Static(
                c.load_assignment
                    .as_ref()
                    .map(|l| endpoints_of(self, l))
                    .unwrap_or_default(),
            ),
            DiscoveryType::StrictDns => {
                let mut names = Vec::new();
                for locality in c.load_assignment.iter().flat_map(|l| &l.endpoints) {
                    for e in &locality.lb_endpoints {
                        if let Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) =
                            &e.host_identifier
                            && let Some(core::address::Address::SocketAddress(sa)) =
                                ep.address.as_ref().and_then(|a| a.address.as_ref())
                            && let Some(core::socket_address::PortSpecifier::PortValue(port)) =
                                sa.port_specifier
                        {
                            names.push((
                                sa.address.clone(),
                                u16::try_from(port).unwrap_or(0),
                                e.load_balancing_weight
                                    .as_ref()
                                    .map_or(1, |w| w.value.max(1)),
                            ));
                        }
                    }
                }
                Discovery::StrictDns {
                    names,
                    refresh: dur(c.dns_refresh_rate.as_ref()).unwrap_or(Duration::from_secs(5)),
                }
            }
            DiscoveryType::Eds => {
                let service = c
                    .eds_cluster_config
                    .as_ref()
                    .map(|e| e.service_name.clone())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| c.name.clone());
                let assignment = self
                    .assignments
                    .get(&service)
                    .cloned()
                    .or_else(|| c.load_assignment.clone());
                let endpoints = match assignment {
                    Some(cla) => endpoints_of(self, &cla),
                    None => {
                        self.diags.warn(format!("EDS cluster {:?} has no assignment yet: no endpoints until one arrives", c.name));
                        Vec::new()
                    }
                };
                Discovery::Eds {
                    service_name: service,
                    endpoints,
                }
            }
            DiscoveryType::OriginalDst => {
                let (use_http_header, header_name) = match &c.lb_config {
                    Some(LbConfig::OriginalDstLbConfig(o)) => (
                        o.use_http_header,
                        (!o.http_header_name.is_empty())
                            .then(|| o.http_header_name.to_ascii_lowercase()),
                    ),
                    _ => (false, None),
                };
                Discovery::OriginalDst {
                    use_http_header,
                    header_name,
                }
            }
            DiscoveryType::LogicalDns => {
                self.diags.error(format!(
                    "{at}.type: LOGICAL_DNS is not supported (use STRICT_DNS)"
                ));
                return None;
            }
        };
        let lb = match Lb::try_from(c.lb_policy) {
            Ok(Lb::RoundRobin) => LbPolicy::RoundRobin,
            Ok(Lb::LeastRequest) => LbPolicy::LeastRequest {
                choice_count: match &c.lb_config {
                    Some(LbConfig::LeastRequestLbConfig(l)) => {
                        l.choice_count.as_ref().map_or(2, |v| v.value)
                    }
                    _ => 2,
                },
            },
            Ok(Lb::Random) => LbPolicy::Random,
            Ok(Lb::ClusterProvided) if kind == DiscoveryType::OriginalDst => LbPolicy::RoundRobin,
            _ => {
                self.diags.error(format!(
                    "{at}.lb_policy: only ROUND_ROBIN, LEAST_REQUEST and RANDOM are supported"
                ));
                return None;
            }
        };
        let mut limits = CircuitBreakers::default();
        for t in c.circuit_breakers.iter().flat_map(|cb| &cb.thresholds) {
            if t.priority != 0 {
                self.diags.warn("circuit breaker thresholds of HIGH priority are ignored (no route uses HIGH priority)".to_owned());
                continue;
            }
            let v = |w: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u32| {
                w.as_ref().map_or(d, |w| w.value)
            };
            limits = CircuitBreakers {
                max_connections: v(&t.max_connections, 1024),
                max_pending_requests: v(&t.max_pending_requests, 1024),
                max_requests: v(&t.max_requests, 1024),
                max_retries: v(&t.max_retries, 3),
            };
        }
        // Upstream protocol: typed_extension_protocol_options, else the deprecated fields.
        let mut protocol = if c.http2_protocol_options.is_some() {
            UpstreamProtocol::Http2
        } else {
            UpstreamProtocol::Http1
        };
        let mut http2 = c
            .http2_protocol_options
            .as_ref()
            .map(http2_settings)
            .unwrap_or_default();
        let mut common = c.common_http_protocol_options;
        for (key, any) in &c.typed_extension_protocol_options {
            let eat = format!("{at}.typed_extension_protocol_options[{key:?}]");
            if key != "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" {
                self.diags.error(format!("{eat}: not supported"));
                continue;
            }
            let Some(o) =
                self.extension::<upstream_http::HttpProtocolOptions>(any, UPSTREAM_HTTP_URL, &eat)
            else {
                continue;
            };
            use upstream_http::http_protocol_options::{
                UpstreamProtocolOptions as U, explicit_http_config::ProtocolConfig as P,
            };
            match &o.upstream_protocol_options {
                Some(U::ExplicitHttpConfig(e)) => match &e.protocol_config {
                    Some(P::Http2ProtocolOptions(h)) => {
                        protocol = UpstreamProtocol::Http2;
                        http2 = http2_settings(h);
                    }
                    Some(P::HttpProtocolOptions(_)) => protocol = UpstreamProtocol::Http1,
                    _ => {
                        self.diags.error(format!(
                            "{eat}.explicit_http_config: HTTP/3 is not supported"
                        ));
                    }
                },
                Some(U::UseDownstreamProtocolConfig(d)) => {
                    protocol = UpstreamProtocol::Downstream;
                    if let Some(h) = &d.http2_protocol_options {
                        http2 = http2_settings(h);
                    }
                }
                Some(_) => self.diags.error(format!(
                    "{eat}.auto_config: ALPN selection needs TLS, which is not supported"
                )),
                None => {}
            }
            if o.common_http_protocol_options.is_some() {
                common = o.common_http_protocol_options;
            }
        }
        let mut health_checks = Vec::new();
        for (i, h) in c.health_checks.iter().enumerate() {
            let hat = format!("{at}.health_checks[{i}]");
            let Some(envoy_types::pb::envoy::config::core::v3::health_check::HealthChecker::HttpHealthCheck(http)) = &h.health_checker else {
                self.diags.error(format!("{hat}: only http_health_check is supported"));
                continue;
            };
            let (Some(timeout), Some(interval), Some(healthy), Some(unhealthy)) = (
                dur(h.timeout.as_ref()),
                dur(h.interval.as_ref()),
                h.healthy_threshold.as_ref().map(|v| v.value),
                h.unhealthy_threshold.as_ref().map(|v| v.value),
            ) else {
                self.diags.error(format!("{hat}: timeout, interval, healthy_threshold and unhealthy_threshold are required"));
                continue;
            };
            let mut expected: Vec<(u16, u16)> = http
                .expected_statuses
                .iter()
                .map(|r| {
                    (
                        u16::try_from(r.start).unwrap_or(0),
                        u16::try_from(r.end).unwrap_or(0),
                    )
                })
                .collect();
            if expected.is_empty() {
                expected.push((200, 201));
            }
            health_checks.push(HealthCheck {
                timeout,
                interval,
                healthy_threshold: healthy,
                unhealthy_threshold: unhealthy,
                path: if http.path.is_empty() {
                    "/".into()
                } else {
                    http.path.clone()
                },
                host: (!http.host.is_empty()).then(|| http.host.clone()),
                expected_statuses: expected,
            });
        }
        let outlier = c.outlier_detection.as_ref().map(|o| OutlierDetection {
            consecutive_5xx: o.consecutive_5xx.as_ref().map_or(5, |v| v.value),
            // Envoy tracks gateway failures but enforces them only when
            // `enforcing_consecutive_gateway_failure` (default 0, not supported) is set.
            consecutive_gateway_failure: 0,
            interval: dur(o.interval.as_ref()).unwrap_or(Duration::from_secs(10)),
            base_ejection_time: dur(o.base_ejection_time.as_ref())
                .unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: o.max_ejection_percent.as_ref().map_or(10, |v| v.value),
        });
        let common = common.unwrap_or_default();
        Some(Cluster {
            name: c.name.clone(),
            discovery,
            lb,
            connect_timeout: dur(c.connect_timeout.as_ref()).unwrap_or(Duration::from_secs(5)),
            limits,
            protocol,
            http2,
            idle_timeout: opt_timeout(
                common.idle_timeout.as_ref(),
                Some(Duration::from_secs(3600)),
            ),
            max_requests_per_connection: c
                .max_requests_per_connection
                .as_ref()
                .map(|v| v.value)
                .or(common.max_requests_per_connection.as_ref().map(|v| v.value)),
            health_checks,
            outlier,
        })
    }
}

impl Cx {
    /// `upstream_bind_config`: istiod binds the upstream connections of its inbound
    /// passthrough clusters to 127.0.0.6 (::6 for IPv6) so that its iptables rules do not capture
    /// them again. nodemesh's capture recognises its own sockets by `SO_MARK`, so that
    /// binding has no purpose here and is not done (a warning says so). Any other source
    /// address is what the upstream sees, and is refused.
    fn upstream_bind(&mut self, c: &cluster::Cluster, bind: &core::BindConfig, at: &str) {
        let source = bind.source_address.as_ref().and_then(|a| {
            let ip: IpAddr = a.address.parse().ok()?;
            let port = match a.port_specifier {
                Some(core::socket_address::PortSpecifier::PortValue(p)) => p,
                None => 0,
                Some(_) => return None,
            };
            Some((ip, port))
        });
        let istio_guard =
            |ip: IpAddr| ip.is_loopback() || ip == IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 6]);
        match source {
            Some((ip, 0)) if istio_guard(ip) => self.diags.warn(format!(
                "cluster {:?}: upstream_bind_config source {ip} (Istio's guard against \
                 re-capturing its own connections) is not bound: nodemesh's capture skips its \
                 own sockets by SO_MARK, and the upstream sees the usual source address",
                c.name
            )),
            _ => self.diags.error(format!(
                "{at}.upstream_bind_config: only a loopback (or ::6) source address with \
                 port 0 (Istio's inbound passthrough binding) is accepted"
            )),
        }
    }
}

fn http2_settings(h: &core::Http2ProtocolOptions) -> Http2Settings {
    let d = Http2Settings::default();
    Http2Settings {
        max_concurrent_streams: h
            .max_concurrent_streams
            .as_ref()
            .map_or(d.max_concurrent_streams, |v| v.value),
        initial_stream_window_size: h
            .initial_stream_window_size
            .as_ref()
            .map_or(d.initial_stream_window_size, |v| v.value),
        initial_connection_window_size: h
            .initial_connection_window_size
            .as_ref()
            .map_or(d.initial_connection_window_size, |v| v.value),
    }
}

/// Envoy's substitution uses `\1` for groups; the regex crate uses `${1}`.
fn envoy_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                let d = chars.next().unwrap_or('0');
                out.push_str(&format!("${{{d}}}"));
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
static_resources:
  listeners:
  - name: out
    address: { socket_address: { address: 0.0.0.0, port_value: 15001 } }
    use_original_dst: true
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: out
          rds: { route_config_name: r }
          http_filters:
          - name: router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  clusters:
  - name: web
    type: STRICT_DNS
    lb_policy: LEAST_REQUEST
    circuit_breakers: { thresholds: [ { max_requests: 10 } ] }
    outlier_detection: {}
    load_assignment:
      cluster_name: web
      endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: web.local, port_value: 80 } } } } ] } ]
"#;

    fn errors(yaml: &str) -> Vec<String> {
        load_bootstrap(yaml).expect("parses").diagnostics.errors
    }

    #[test]
    fn a_good_bootstrap_gets_envoys_defaults() {
        // The RDS name is unknown in a bootstrap without that route configuration.
        let t = load_bootstrap(GOOD).expect("parses");
        assert_eq!(t.diagnostics.errors.len(), 1, "{:?}", t.diagnostics.errors);
        assert!(t.diagnostics.errors[0].contains("unknown route configuration \"r\""));
        let fixed = GOOD.replace("rds: { route_config_name: r }", "route_config: { name: r, virtual_hosts: [ { name: v, domains: ['*'], routes: [ { match: { prefix: / }, route: { cluster: web, retry_policy: { retry_on: 5xx } } } ] } ] }");
        let t = load_bootstrap(&fixed).expect("parses");
        assert!(
            t.diagnostics.errors.is_empty(),
            "{:?}",
            t.diagnostics.errors
        );
        let s = t.snapshot.expect("snapshot");
        let web = &s.clusters["web"];
        assert_eq!(web.connect_timeout, Duration::from_secs(5));
        assert_eq!(web.lb, LbPolicy::LeastRequest { choice_count: 2 });
        assert_eq!(web.limits.max_requests, 10);
        assert_eq!(web.limits.max_pending_requests, 1024);
        assert_eq!(
            web.outlier
                .as_ref()
                .map(|o| (o.consecutive_5xx, o.max_ejection_percent)),
            Some((5, 10))
        );
        assert!(
            matches!(&web.discovery, Discovery::StrictDns { names, .. } if names[0] == ("web.local".into(), 80, 1))
        );
        let l = &s.listeners[0];
        assert!(l.use_original_dst && l.bind);
        let NetworkFilter::Http(h) = &l.filter_chains[0].filter else {
            panic!("hcm")
        };
        assert_eq!(
            (h.max_request_headers_kb, h.server_name.as_str()),
            (60, "envoy")
        );
        assert_eq!(h.stream_idle_timeout, Some(Duration::from_secs(300)));
        let RouteSource::Inline(rc) = &h.routes else {
            panic!("inline")
        };
        let RouteAction::Forward(f) = &rc.virtual_hosts()[0].routes[0].action else {
            panic!("forward")
        };
        assert_eq!(f.timeout, Some(Duration::from_secs(15)));
        let retry = f.retry.as_ref().expect("retry");
        assert_eq!(
            (retry.num_retries, retry.backoff_base, retry.backoff_max),
            (1, Duration::from_millis(25), Duration::from_millis(250))
        );
    }

    #[test]
    fn unsupported_input_is_an_error_naming_where() {
        let unknown_field = GOOD.replace(
            "lb_policy: LEAST_REQUEST",
            "lb_policy: LEAST_REQUEST\n    lrs_server: { ads: {} }",
        );
        assert!(
            errors(&unknown_field)
                .iter()
                .any(|e| e.contains("clusters[web].lrs_server")),
            "{:?}",
            errors(&unknown_field)
        );
        let unknown_filter = GOOD.replace(
            "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        );
        let e = errors(&unknown_filter);
        assert!(
            e.iter()
                .any(|e| e.contains("http_filters[0]") && e.contains("wasm.v3.Wasm")),
            "{e:?}"
        );
        assert!(e.iter().any(|e| e.contains("router is required")), "{e:?}");
        let bad_regex = GOOD.replace("rds: { route_config_name: r }", "route_config: { virtual_hosts: [ { name: v, domains: ['*'], routes: [ { match: { safe_regex: { regex: '(' } }, route: { cluster: nope } } ] } ] }");
        let e = errors(&bad_regex);
        assert!(
            e.iter().any(|e| e.contains("routes[0].match.safe_regex")),
            "{e:?}"
        );
        let missing_cluster = GOOD.replace("rds: { route_config_name: r }", "route_config: { virtual_hosts: [ { name: v, domains: ['*'], routes: [ { match: { prefix: / }, route: { cluster: nope } } ] } ] }");
        assert!(
            errors(&missing_cluster)
                .iter()
                .any(|e| e.contains("unknown cluster \"nope\""))
        );
        let duplicate = GOOD.replace(
            "  clusters:\n",
            "  clusters:\n  - { name: web, connect_timeout: 1s }\n",
        );
        assert!(
            errors(&duplicate)
                .iter()
                .any(|e| e.contains("duplicate cluster name"))
        );
        let variable = GOOD.replace("rds: { route_config_name: r }", "route_config: { request_headers_to_add: [ { header: { key: x-a, value: '%DOWNSTREAM_REMOTE_ADDRESS%' } } ], virtual_hosts: [] }");
        assert!(errors(&variable).iter().any(|e| e.contains("%VARIABLE%")));
    }

    #[test]
    fn config_dumps_are_read_section_by_section() {
        let dump = r#"{"configs": [
  {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
   "static_clusters": [{"cluster": {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "c", "connect_timeout": "2s"}}]},
  {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
   "dynamic_listeners": [{"name": "l", "active_state": {"listener": {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
     "name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 9000}},
     "filter_chains": [{"filters": [{"name": "tcp", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": "t", "cluster": "c"}}]}]}}}]}
]}"#;
        let t = load_config_dump(dump).expect("parses");
        assert!(
            t.diagnostics.errors.is_empty(),
            "{:?}",
            t.diagnostics.errors
        );
        let s = t.snapshot.expect("snapshot");
        assert_eq!(s.clusters["c"].connect_timeout, Duration::from_secs(2));
        assert!(
            matches!(&s.listeners[0].filter_chains[0].filter, NetworkFilter::Tcp(t) if t.target == ClusterTarget::Named("c".into()))
        );
    }
}
