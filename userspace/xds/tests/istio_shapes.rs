//! Configuration in the shape istiod produces (tests/corpus/istio), loaded from resource
//! files and translated as the ADS client translates what it receives (`dynamic`, on an
//! empty bootstrap), then routed with the data path's own selection functions: listener
//! hand-over, filter chain matching, route selection and RBAC.
//!
//! Each case folder is a set of DiscoveryResponse files; tests/corpus/istio/README.md
//! says what each one holds and why.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use nodemesh_config::{
    Translated,
    model::{
        ClusterTarget, Discovery, FilterChain, HttpFilterConfig, HttpManager, Listener,
        NetworkFilter, RouteAction, RouteSource, Snapshot, UpstreamProtocol,
    },
};
use nodemesh_http::{
    detect::{Detected, HttpVersion},
    listener::{ConnectionView, listener_for, select_chain},
    route::{RequestView, select},
};
use nodemesh_policy::{Attributes, HttpAttributes, NetworkChain, chain::Policies, rbac::Engine};

fn corpus(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/corpus/istio")
        .join(case)
}

/// What the ADS client does with a candidate set: `to_config` on the bootstrap's static
/// resources (none here) marks it dynamic, and `translate` decides ACK or NACK.
fn translate(dir: &Path) -> Translated {
    let loaded = nodemesh_xds::files::load_dir(dir, false)
        .unwrap_or_else(|e| panic!("{} does not load: {e}", dir.display()));
    let config = loaded.set.to_config(&nodemesh_config::Resources::default());
    assert!(config.dynamic);
    nodemesh_config::translate(&config)
}

/// A case that must be accepted whole: no errors, every RDS name present. It is also a
/// complete configuration `nodemesh controlplane` would serve (a checked load).
fn accepted(case: &str) -> (Snapshot, Vec<String>) {
    if let Err(e) = nodemesh_xds::files::load_dir(&corpus(case), true) {
        panic!("{case}: the control plane would not serve it: {e}");
    }
    let t = translate(&corpus(case));
    assert!(
        t.diagnostics.errors.is_empty(),
        "{case}: errors:\n{}",
        t.diagnostics.errors.join("\n")
    );
    assert!(
        t.missing_routes.is_empty(),
        "{case}: {:?}",
        t.missing_routes
    );
    let warnings = t.diagnostics.warnings.iter().cloned().collect();
    (t.snapshot.expect("no errors, so a snapshot"), warnings)
}

fn warned(warnings: &[String], all: &[&str]) -> bool {
    warnings.iter().any(|w| all.iter().all(|s| w.contains(s)))
}

fn assert_warned(warnings: &[String], all: &[&str]) {
    assert!(
        warned(warnings, all),
        "no warning contains all of {all:?}; warnings:\n{}",
        warnings.join("\n")
    );
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a socket address")
}

/// The listener a connection to `dst` ends up on: the one it arrived at, handed over by
/// original destination when that listener says so (what the proxy does on accept).
fn listener_of<'a>(s: &'a Snapshot, arrived: &str, dst: SocketAddr) -> &'a Listener {
    let first = s.listener(arrived).expect("the listener exists");
    if first.use_original_dst
        && let Some(target) = listener_for(s, dst)
    {
        return target;
    }
    first
}

fn detected(transport: &'static str, alpn: &[&str], http: Option<HttpVersion>) -> Detected {
    Detected {
        transport,
        application_protocols: alpn.iter().map(|a| (*a).to_owned()).collect(),
        server_name: None,
        http,
    }
}

fn chain<'a>(l: &'a Listener, dst: SocketAddr, src: &str, d: &Detected) -> &'a FilterChain {
    let view = ConnectionView {
        destination: dst,
        source: addr(src),
        detected: d,
    };
    select_chain(l, &view).unwrap_or_else(|| panic!("no chain of {} for {dst}", l.name))
}

fn hcm(c: &FilterChain) -> &HttpManager {
    match &c.filter {
        NetworkFilter::Http(h) => h,
        NetworkFilter::Tcp(_) => panic!("chain {:?} is TCP", c.name),
    }
}

fn tcp_cluster(c: &FilterChain) -> &str {
    match &c.filter {
        NetworkFilter::Tcp(t) => match &t.target {
            ClusterTarget::Named(n) => n,
            other => panic!("chain {:?}: {other:?}", c.name),
        },
        NetworkFilter::Http(_) => panic!("chain {:?} is HTTP", c.name),
    }
}

/// The cluster a request takes, by the route configuration `h` names.
fn routed(
    s: &Snapshot,
    h: &HttpManager,
    host: &str,
    path: &str,
    headers: &[(&'static str, &str)],
) -> ClusterTarget {
    let rc = match &h.routes {
        RouteSource::Named(name) => s.routes.get(name).expect("the RDS name arrived").clone(),
        RouteSource::Inline(rc) => rc.clone(),
    };
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        map.insert(*k, v.parse().expect("a header value"));
    }
    let req = RequestView {
        host,
        path,
        method: "GET",
        scheme: "http",
        headers: &map,
    };
    let selected = select(&rc, &req).unwrap_or_else(|| panic!("no route for {host}{path}"));
    match &selected.route.action {
        RouteAction::Forward(f) => f.target.clone(),
        other => panic!("{host}{path}: not forwarded: {other:?}"),
    }
}

fn named(n: &str) -> ClusterTarget {
    ClusterTarget::Named(n.to_owned())
}

/// Runs the chain's HTTP RBAC filters in order on a request; the first denial's details.
fn http_rbac(c: &FilterChain, peer: &str, method: &str, path: &str) -> Option<String> {
    let headers = http::HeaderMap::new();
    let peer = addr(peer);
    let attrs = Attributes {
        peer,
        remote_ip: peer.ip(),
        destination: addr("198.18.20.10:9080"),
        principal: None,
        namespace: None,
        server_name: None,
        http: Some(HttpAttributes {
            method,
            authority: "productpage:9080",
            path,
            scheme: "http",
            headers: &headers,
            cluster: None,
        }),
    };
    hcm(c).filters.iter().find_map(|f| match &f.config {
        HttpFilterConfig::Rbac(r) => Engine::compile(&f.name, r, Default::default())
            .check(&attrs)
            .details(),
        _ => None,
    })
}

/// The chain's network filters on a connection from `peer`: the denial's details.
fn network_rbac(c: &FilterChain, peer: &str, dst: SocketAddr) -> Option<String> {
    let peer = addr(peer);
    let attrs = Attributes {
        peer,
        remote_ip: peer.ip(),
        destination: dst,
        principal: None,
        namespace: None,
        server_name: None,
        http: None,
    };
    NetworkChain::compile(&c.policies, &Policies::new(Default::default())).check(&attrs)
}

const REVIEWS: &str = "outbound|8080||reviews.default.svc.cluster.local";
const MONGODB: &str = "outbound|27017||mongodb.default.svc.cluster.local";

#[test]
fn sidecar_is_accepted_and_istios_own_filters_are_named_in_warnings() {
    let (_, w) = accepted("sidecar");
    for (kind, name, ty) in [
        (
            "HTTP",
            "istio.metadata_exchange",
            "io.istio.http.peer_metadata.Config",
        ),
        ("HTTP", "istio.stats", "stats.PluginConfig"),
        (
            "HTTP",
            "istio.alpn",
            "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
        ),
        (
            "HTTP",
            "envoy.filters.http.grpc_stats",
            "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
        ),
        (
            "network",
            "istio.metadata_exchange",
            "envoy.tcp.metadataexchange.config.MetadataExchange",
        ),
        ("network", "istio.stats", "stats.PluginConfig"),
        (
            "cluster",
            "istio.metadata_exchange",
            "envoy.tcp.metadataexchange.config.MetadataExchange",
        ),
    ] {
        assert_warned(
            &w,
            &[&format!("{kind} filter \"{name}\" ({ty}) is ignored")],
        );
    }
    // istiod's empty fault and CORS filters do nothing in Envoy either: no warning.
    assert!(
        !warned(&w, &["envoy.filters.http.fault"]) && !warned(&w, &["envoy.filters.http.cors"]),
        "{w:#?}"
    );
    // What nodemesh cannot do yet is said, per cluster and per chain.
    assert_warned(
        &w,
        &[REVIEWS, "tlsMode=istio", "connects to them in plaintext"],
    );
    assert_warned(
        &w,
        &[
            "listener \"virtualInbound\".filter_chains[0.0.0.0_9080].transport_socket",
            "terminates TLS",
            "are closed",
        ],
    );
    assert_warned(
        &w,
        &[
            "cluster \"inbound|9080||\"",
            "upstream_bind_config",
            "127.0.0.6",
        ],
    );
}

#[test]
fn sidecar_outbound_routes_each_service_to_its_cluster() {
    let (s, _) = accepted("sidecar");
    let reviews_vip = addr("198.18.30.11:8080");
    let http1 = detected("raw_buffer", &["http/1.1"], Some(HttpVersion::Http1));

    // virtualOutbound hands the connection to 0.0.0.0_8080, which detects HTTP.
    let l = listener_of(&s, "virtualOutbound", reviews_vip);
    assert_eq!(l.name, "0.0.0.0_8080");
    assert!(!l.bind, "bind_to_port: false");
    assert_eq!(l.inspectors_for(8080), (true, true));
    let h = hcm(chain(l, reviews_vip, "198.18.20.10:40000", &http1));
    assert!(
        h.filters.is_empty(),
        "Istio's outbound filters are all no-ops: {:?}",
        h.filters
    );
    for host in [
        "reviews:8080",
        "reviews.default.svc.cluster.local:8080",
        "198.18.30.11:8080",
    ] {
        assert_eq!(
            routed(&s, h, host, "/reviews/0", &[]),
            named(REVIEWS),
            "{host}"
        );
    }
    assert_eq!(
        routed(&s, h, "example.com:8080", "/", &[]),
        named("PassthroughCluster")
    );
    // Not HTTP: the passthrough default chain.
    let raw = detected("raw_buffer", &[], None);
    assert_eq!(
        tcp_cluster(chain(l, reviews_vip, "198.18.20.10:40000", &raw)),
        "PassthroughCluster"
    );

    // The service cluster: its EDS endpoints, the downstream protocol upstream.
    let reviews = &s.clusters[REVIEWS];
    let Discovery::Eds { endpoints, .. } = &reviews.discovery else {
        panic!("EDS: {:?}", reviews.discovery)
    };
    let mut ips: Vec<String> = endpoints.iter().map(|e| e.address.to_string()).collect();
    ips.sort();
    assert_eq!(ips, ["198.18.20.11:8080", "198.18.20.12:8080"]);
    assert_eq!(reviews.protocol, UpstreamProtocol::Downstream);

    // A TCP service: its VIP listener, straight to its cluster.
    let mongo_vip = addr("198.18.30.12:27017");
    let l = listener_of(&s, "virtualOutbound", mongo_vip);
    assert_eq!(l.name, "198.18.30.12_27017");
    assert_eq!(
        tcp_cluster(chain(l, mongo_vip, "198.18.20.10:40001", &raw)),
        MONGODB
    );
    assert!(
        matches!(&s.clusters[MONGODB].discovery, Discovery::Eds { endpoints, .. } if endpoints.len() == 1)
    );

    // Anything else passes through; the capture port itself goes to the black hole.
    let elsewhere = addr("198.18.99.1:443");
    let l = listener_of(&s, "virtualOutbound", elsewhere);
    assert_eq!(l.name, "virtualOutbound");
    assert_eq!(
        tcp_cluster(chain(l, elsewhere, "198.18.20.10:40002", &raw)),
        "PassthroughCluster"
    );
    let itself = addr("198.18.20.10:15001");
    assert_eq!(
        tcp_cluster(chain(l, itself, "198.18.20.10:40003", &raw)),
        "BlackHoleCluster"
    );
    assert!(matches!(
        &s.clusters["PassthroughCluster"].discovery,
        Discovery::OriginalDst { .. }
    ));
    assert!(
        matches!(&s.clusters["BlackHoleCluster"].discovery, Discovery::Static(e) if e.is_empty())
    );
}

#[test]
fn sidecar_inbound_keeps_per_port_chains_rbac_and_closes_mtls() {
    let (s, _) = accepted("sidecar");
    let l = s.listener("virtualInbound").expect("virtualInbound");
    // The original_dst listener filter does not hand connections to the outbound
    // listeners of the same port (only `use_original_dst` does).
    assert!(!l.use_original_dst);
    assert_eq!(
        listener_of(&s, "virtualInbound", addr("198.18.20.10:8080")).name,
        "virtualInbound"
    );
    // No HTTP detection on the declared ports (3306 is server-first); TLS detection on all.
    assert_eq!(l.inspectors_for(3306), (false, true));
    assert_eq!(l.inspectors_for(9080), (false, true));
    assert_eq!(l.inspectors_for(8000), (true, true));

    let pod = addr("198.18.20.10:9080");
    let plain = detected("raw_buffer", &[], None);
    let c = chain(l, pod, "198.18.20.33:50000", &plain);
    assert_eq!(c.name, "0.0.0.0_9080");
    assert_eq!(network_rbac(c, "198.18.99.7:50000", pod), None);
    let h = hcm(c);
    assert_eq!(
        routed(&s, h, "productpage:9080", "/", &[]),
        named("inbound|9080||")
    );
    assert!(matches!(
        &s.clusters["inbound|9080||"].discovery,
        Discovery::OriginalDst { .. }
    ));
    // The AuthorizationPolicy: DELETE is denied from outside 198.18.20.0/24.
    assert_eq!(h.filters.len(), 1, "only RBAC runs: {:?}", h.filters);
    let denied = http_rbac(c, "198.18.99.7:50000", "DELETE", "/products/1");
    assert_eq!(
        denied.as_deref(),
        Some(
            "rbac_access_denied_matched_policy[ns[default]-policy[deny-delete-from-outside]-rule[0]]"
        )
    );
    assert_eq!(
        http_rbac(c, "198.18.20.33:50000", "DELETE", "/products/1"),
        None
    );
    assert_eq!(
        http_rbac(c, "198.18.99.7:50000", "GET", "/products/1"),
        None
    );

    // The mTLS chain of the same port is the one a TLS connection matches, and it is
    // closed rather than served or handed to the plaintext chain.
    let mtls = detected("tls", &["istio-http/1.1"], None);
    let c = chain(l, pod, "198.18.20.33:50001", &mtls);
    assert_eq!(c.name, "0.0.0.0_9080");
    let closed = network_rbac(c, "198.18.20.33:50001", pod).expect("closed");
    assert!(
        closed.contains(nodemesh_config::tls::TLS_NOT_TERMINATED),
        "{closed}"
    );

    // A TCP port, the passthrough chains and the black hole.
    let db = addr("198.18.20.10:3306");
    assert_eq!(
        tcp_cluster(chain(l, db, "198.18.20.33:50002", &plain)),
        "inbound|3306||"
    );
    let other = addr("198.18.20.10:8000");
    assert_eq!(
        tcp_cluster(chain(l, other, "198.18.20.33:50003", &plain)),
        "InboundPassthroughCluster"
    );
    let http1 = detected("raw_buffer", &["http/1.1"], Some(HttpVersion::Http1));
    let c = chain(l, other, "198.18.20.33:50004", &http1);
    assert_eq!(c.name, "virtualInbound-catchall-http");
    assert_eq!(
        routed(&s, hcm(c), "198.18.20.10:8000", "/", &[]),
        named("InboundPassthroughCluster")
    );
    let itself = addr("198.18.20.10:15006");
    assert_eq!(
        tcp_cluster(chain(l, itself, "198.18.20.33:50005", &plain)),
        "BlackHoleCluster"
    );
}

#[test]
fn waypoint_like_node_proxy_routes_by_vip_and_applies_its_policies() {
    let (s, w) = accepted("waypoint_like");
    // The older Wasm null-VM shapes and the TypedStruct-wrapped stats are recognised too.
    assert_warned(
        &w,
        &[
            "HTTP filter \"istio.metadata_exchange\" (envoy.extensions.filters.http.wasm.v3.Wasm) is ignored",
        ],
    );
    assert_warned(
        &w,
        &[
            "network filter \"istio.stats\" (envoy.extensions.filters.network.wasm.v3.Wasm) is ignored",
        ],
    );
    assert_warned(
        &w,
        &["HTTP filter \"istio.stats\" (stats.PluginConfig) is ignored"],
    );

    let l = s.listener("node_inbound").expect("node_inbound");
    assert_eq!(l.inspectors_for(9080), (false, false));
    assert_eq!(l.inspectors_for(8080), (true, false));
    let vip = addr("198.18.30.11:9080");
    let plain = detected("raw_buffer", &[], None);
    let c = chain(l, vip, "198.18.20.10:41000", &plain);
    assert_eq!(
        c.name,
        "inbound-vip|9080|http|reviews.default.svc.cluster.local"
    );
    let h = hcm(c);
    // RBAC DENY, RBAC ALLOW and the local rate limit run; the rest are no-ops.
    let kinds: Vec<&str> = h
        .filters
        .iter()
        .map(|f| match f.config {
            HttpFilterConfig::Rbac(_) => "rbac",
            HttpFilterConfig::LocalRateLimit(_) => "local_ratelimit",
            HttpFilterConfig::GlobalQuota(_) => "quota",
        })
        .collect();
    assert_eq!(kinds, ["rbac", "rbac", "local_ratelimit"]);
    assert!(
        !h.access_logs.is_empty(),
        "Istio's access log format is read"
    );
    let v2 = named("inbound-vip|9080|http|v2|reviews.default.svc.cluster.local");
    assert_eq!(
        routed(
            &s,
            h,
            "reviews:9080",
            "/reviews/1",
            &[("end-user", "jason")]
        ),
        v2
    );
    let ClusterTarget::Weighted(split) = routed(&s, h, "reviews:9080", "/reviews/1", &[]) else {
        panic!("the default route is a traffic split")
    };
    let weights: Vec<u32> = split.iter().map(|t| t.weight).collect();
    assert_eq!(weights, [80, 20]);
    assert_eq!(
        s.clusters["inbound-vip|9080|http|v2|reviews.default.svc.cluster.local"].protocol,
        UpstreamProtocol::Http2
    );

    let deny_admin = http_rbac(c, "198.18.20.10:41000", "GET", "/admin/users");
    assert!(deny_admin.is_some_and(|d| d.contains("reviews-no-admin")));
    assert_eq!(
        http_rbac(c, "198.18.20.10:41000", "GET", "/reviews/1"),
        None
    );
    assert_eq!(
        http_rbac(c, "198.18.20.10:41000", "POST", "/reviews/1").as_deref(),
        Some("rbac_access_denied_matched_policy[none]"),
        "not allowed by the ALLOW policy"
    );
    assert!(http_rbac(c, "198.18.99.7:41000", "GET", "/reviews/1").is_some());

    let mongo = addr("198.18.30.12:27017");
    let c = chain(l, mongo, "198.18.20.10:41001", &plain);
    assert_eq!(
        tcp_cluster(c),
        "inbound-vip|27017|tcp|mongodb.default.svc.cluster.local"
    );
    assert_eq!(network_rbac(c, "198.18.20.10:41001", mongo), None);
    assert!(
        network_rbac(c, "198.18.99.7:41001", mongo)
            .is_some_and(|d| d.contains("mongodb-from-frontend-only"))
    );
}

#[test]
fn an_unknown_optional_filter_is_skipped_and_a_required_one_is_refused_by_name() {
    let (s, w) = accepted("optional_filter");
    assert_warned(
        &w,
        &[
            "optional HTTP filter \"default.header-injector\"",
            "envoy.extensions.filters.http.wasm.v3.Wasm",
            "skipped",
        ],
    );
    assert!(
        hcm(&s.listener("0.0.0.0_8080").expect("listener").filter_chains[0])
            .filters
            .is_empty()
    );

    let dir = tempfile::tempdir().expect("a temporary folder");
    for file in ["listeners.yaml", "clusters.yaml"] {
        let text = std::fs::read_to_string(corpus("optional_filter").join(file)).expect("read");
        std::fs::write(
            dir.path().join(file),
            text.replace("          is_optional: true\n", ""),
        )
        .expect("write");
    }
    let t = translate(dir.path());
    assert!(t.snapshot.is_none());
    assert!(
        t.diagnostics
            .errors
            .iter()
            .any(|e| e.contains("\"default.header-injector\"")
                && e.contains(
                    "HTTP filter type envoy.extensions.filters.http.wasm.v3.Wasm is not supported"
                )),
        "{:?}",
        t.diagnostics.errors
    );
}

#[test]
fn what_nodemesh_cannot_do_is_refused_with_the_reason() {
    for (case, expected) in [
        (
            "refused/upstream_tls",
            "cluster \"outbound|443||api.example.com\".transport_socket: upstream TLS (UpstreamTlsContext) is not supported yet",
        ),
        (
            "refused/fault_injection",
            "typed_per_filter_config[\"envoy.filters.http.fault\"]: fault injection (a VirtualService `fault`) is not implemented",
        ),
        (
            "refused/waypoint_hbone",
            "listener \"main_internal\".internal_listener: not supported by nodemesh",
        ),
    ] {
        let t = translate(&corpus(case));
        assert!(t.snapshot.is_none(), "{case} is accepted");
        assert!(
            t.diagnostics.errors.iter().any(|e| e.contains(expected)),
            "{case}: no error contains {expected:?}: {:#?}",
            t.diagnostics.errors
        );
    }
}
