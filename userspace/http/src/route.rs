//! Route selection: which virtual host, route and cluster a request takes.
//!
//! Pure functions over the model, shared by the data path, `nodemesh config route` and the
//! admin port's `/route` explanation, so that what is explained is what is done.
//!
//! Envoy's rules, in order: the virtual host by domain (exact, then the longest `*.suffix`,
//! then the longest `prefix.*`, then `*`; the host is lower-cased, a port must match unless
//! the route configuration ignores ports), then the first route of that host whose path,
//! headers, query parameters and gRPC condition all match.
use std::borrow::Cow;

use http::HeaderMap;
use nodemesh_config::model::{
    ClusterTarget, PathMatch, Route, RouteConfig, RouteMatch, VirtualHost, WeightedTarget,
};

/// What the router needs to know about a request to select a route.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// `:authority` or `Host`, as received.
    pub host: &'a str,
    /// `:path` with the query string.
    pub path: &'a str,
    pub method: &'a str,
    /// `http` or `https` (`:scheme`).
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
}

/// The outcome of selection.
#[derive(Debug, Clone, Copy)]
pub struct Selected<'a> {
    pub virtual_host: &'a VirtualHost,
    pub route: &'a Route,
    /// The index of `route` in its virtual host (routes are often unnamed).
    pub index: usize,
}

/// Selects the virtual host and route for `req`, or `None` (Envoy's 404 `NR`).
pub fn select<'a>(config: &'a RouteConfig, req: &RequestView<'_>) -> Option<Selected<'a>> {
    let virtual_host = virtual_host(config, req.host)?;
    virtual_host
        .routes
        .iter()
        .enumerate()
        .find(|(_, route)| matches(&route.matcher, req))
        .map(|(index, route)| Selected {
            virtual_host,
            route,
            index,
        })
}

/// The virtual host for `host`.
pub fn virtual_host<'a>(config: &'a RouteConfig, host: &str) -> Option<&'a VirtualHost> {
    // Hosts arrive lower-cased nearly always; only allocate for the rest.
    let host: Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    };
    // As Envoy: with `ignore_port_in_host_matching` the port is removed before any domain
    // is compared, so `reviews:8080` takes the `reviews` host even when a `*` host exists
    // (istiod's outbound route configurations are exactly that shape).
    if config.ignore_port_in_host_matching {
        return config.best_domain(strip_port(&host));
    }
    config.best_domain(&host)
}

/// `host` without a trailing `:port` (IPv6 literals keep their brackets).
pub fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i)
            if !host[i + 1..].is_empty() && host[i + 1..].bytes().all(|b| b.is_ascii_digit()) =>
        {
            let name = &host[..i];
            // `::1` without brackets is an address, not a name with a port.
            if name.contains(':') && !name.ends_with(']') {
                host
            } else {
                name
            }
        }
        _ => host,
    }
}

/// Whether `m` matches the request.
pub fn matches(m: &RouteMatch, req: &RequestView<'_>) -> bool {
    let (path_only, query) = req.path.split_once('?').unwrap_or((req.path, ""));
    let path_ok = match &m.path {
        // Envoy compares a prefix with the whole `:path`, query string included.
        PathMatch::Prefix(p) => starts_with(req.path, p, m.case_sensitive),
        PathMatch::Exact(p) => {
            if m.case_sensitive {
                path_only == p
            } else {
                path_only.eq_ignore_ascii_case(p)
            }
        }
        PathMatch::Separated(p) => {
            starts_with(path_only, p, m.case_sensitive)
                && matches!(path_only.as_bytes().get(p.len()), None | Some(b'/'))
        }
        PathMatch::Regex(r) => r.matches(path_only),
    };
    path_ok
        && (!m.grpc || is_grpc(req.headers))
        && m.headers
            .iter()
            .all(|h| h.matches(header_value(req, &h.name).as_deref()))
        && m.query.iter().all(|q| q.matches(query))
}

fn starts_with(s: &str, prefix: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        s.starts_with(prefix)
    } else {
        s.len() >= prefix.len()
            && s.is_char_boundary(prefix.len())
            && s[..prefix.len()].eq_ignore_ascii_case(prefix)
    }
}

/// A request header's value as Envoy's matchers see it: repeated headers joined with `,`,
/// and the pseudo-headers `:authority`, `:path`, `:method` answered from the request.
fn header_value(req: &RequestView<'_>, name: &str) -> Option<String> {
    match name {
        ":authority" => return Some(req.host.to_owned()),
        ":path" => return Some(req.path.to_owned()),
        ":method" => return Some(req.method.to_owned()),
        ":scheme" => return Some(req.scheme.to_owned()),
        _ => {}
    }
    let mut values = req.headers.get_all(name).iter();
    let first = values.next()?;
    let mut joined = String::from_utf8_lossy(first.as_bytes()).into_owned();
    for v in values {
        joined.push(',');
        joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
    Some(joined)
}

/// `content-type: application/grpc` or `application/grpc+...`.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.strip_prefix("application/grpc").is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('+') || rest.starts_with(';')
            })
        })
}

/// The cluster a target names for this request (`None`: `cluster_header` absent). For
/// weighted targets also the chosen weighted entry, whose header changes apply.
pub fn pick_cluster<'a>(
    target: &'a ClusterTarget,
    headers: &HeaderMap,
) -> Option<(Cow<'a, str>, Option<&'a WeightedTarget>)> {
    match target {
        ClusterTarget::Named(name) => Some((Cow::Borrowed(name), None)),
        ClusterTarget::Header(header) => headers
            .get(header.as_str())
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(|v| (Cow::Owned(v.to_owned()), None)),
        ClusterTarget::Weighted(targets) => {
            let total: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
            if total == 0 {
                return None;
            }
            let mut point = fastrand::u64(0..total);
            targets
                .iter()
                .find(|t| {
                    let w = u64::from(t.weight);
                    if point < w {
                        true
                    } else {
                        point -= w;
                        false
                    }
                })
                .map(|t| (Cow::Borrowed(t.cluster.as_str()), Some(t)))
        }
    }
}

#[cfg(test)]
mod tests {
    use nodemesh_config::{
        matcher::{HeaderMatcher, HeaderRule, QueryMatcher, StringMatcher},
        model::{DomainMatch, HeaderMutations, RouteAction},
    };

    use super::*;

    fn route(name: &str, path: PathMatch) -> Route {
        Route {
            name: name.into(),
            matcher: RouteMatch {
                path,
                case_sensitive: true,
                headers: vec![],
                query: vec![],
                grpc: false,
            },
            action: RouteAction::DirectResponse {
                status: 200,
                body: None,
            },
            headers: HeaderMutations::default(),
            per_filter: vec![],
            rate_limits: vec![],
        }
    }

    fn vhost(name: &str, domains: Vec<DomainMatch>, routes: Vec<Route>) -> VirtualHost {
        VirtualHost {
            name: name.into(),
            domains,
            routes,
            headers: HeaderMutations::default(),
            retry: None,
            include_request_attempt_count: false,
            include_attempt_count_in_response: false,
            per_filter: vec![],
            rate_limits: vec![],
        }
    }

    fn config(virtual_hosts: Vec<VirtualHost>) -> RouteConfig {
        RouteConfig::new(
            "rc".into(),
            virtual_hosts,
            HeaderMutations::default(),
            false,
        )
    }

    fn host_of(rc: &RouteConfig, host: &str) -> Option<String> {
        virtual_host(rc, host).map(|vh| vh.name.clone())
    }

    #[test]
    fn domains_follow_envoys_precedence() {
        let rc = config(vec![
            vhost("any", vec![DomainMatch::Any], vec![]),
            vhost("prefix", vec![DomainMatch::Prefix("api.".into())], vec![]),
            vhost(
                "short-suffix",
                vec![DomainMatch::Suffix(".com".into())],
                vec![],
            ),
            vhost(
                "suffix",
                vec![DomainMatch::Suffix(".example.com".into())],
                vec![],
            ),
            vhost(
                "exact",
                vec![DomainMatch::Exact("www.example.com".into())],
                vec![],
            ),
        ]);
        assert_eq!(host_of(&rc, "WWW.example.com").as_deref(), Some("exact"));
        assert_eq!(host_of(&rc, "api.example.com").as_deref(), Some("suffix"));
        assert_eq!(host_of(&rc, "x.org.com").as_deref(), Some("short-suffix"));
        assert_eq!(host_of(&rc, "api.local").as_deref(), Some("prefix"));
        assert_eq!(host_of(&rc, "other").as_deref(), Some("any"));
        // The wildcard never matches the empty string.
        assert_eq!(
            host_of(&rc, ".example.com").as_deref(),
            Some("short-suffix")
        );
        // A port must match unless ports are ignored.
        assert_eq!(host_of(&rc, "www.example.com:80").as_deref(), Some("any"));
        let without_catch_alls = |ignore_port| {
            let vhosts = vec![
                vhost("prefix", vec![DomainMatch::Prefix("api.".into())], vec![]),
                vhost(
                    "suffix",
                    vec![DomainMatch::Suffix(".example.com".into())],
                    vec![],
                ),
                vhost(
                    "exact",
                    vec![DomainMatch::Exact("www.example.com".into())],
                    vec![],
                ),
            ];
            RouteConfig::new("rc".into(), vhosts, HeaderMutations::default(), ignore_port)
        };
        assert_eq!(
            host_of(&without_catch_alls(false), "www.example.com:80"),
            None
        );
        assert_eq!(
            host_of(&without_catch_alls(true), "www.example.com:80").as_deref(),
            Some("exact")
        );
        // Ignoring ports, the port goes before matching: a catch-all does not win over the
        // host's own domain (istiod's `allow_any`), and a domain with a port never matches.
        let with_catch_all = RouteConfig::new(
            "rc".into(),
            vec![
                vhost("any", vec![DomainMatch::Any], vec![]),
                vhost("exact", vec![DomainMatch::Exact("reviews".into())], vec![]),
                vhost(
                    "ported",
                    vec![DomainMatch::Exact("ratings:9080".into())],
                    vec![],
                ),
            ],
            HeaderMutations::default(),
            true,
        );
        assert_eq!(
            host_of(&with_catch_all, "reviews:8080").as_deref(),
            Some("exact")
        );
        assert_eq!(
            host_of(&with_catch_all, "ratings:9080").as_deref(),
            Some("any")
        );
    }

    /// Envoy's precedence written as plainly as possible: every domain of every virtual host
    /// ranked, the best kept, the first at a tie.
    fn reference<'a>(rc: &'a RouteConfig, host: &str) -> Option<&'a str> {
        let mut best: Option<((u8, usize), &str)> = None;
        for vh in rc.virtual_hosts() {
            for domain in &vh.domains {
                let rank = match domain {
                    DomainMatch::Exact(d) if d == host => (3, d.len()),
                    DomainMatch::Suffix(s)
                        if host.len() > s.len() && host.ends_with(s.as_str()) =>
                    {
                        (2, s.len())
                    }
                    DomainMatch::Prefix(p)
                        if host.len() > p.len() && host.starts_with(p.as_str()) =>
                    {
                        (1, p.len())
                    }
                    DomainMatch::Any => (0, 0),
                    _ => continue,
                };
                if best.is_none_or(|(r, _)| rank > r) {
                    best = Some((rank, vh.name.as_str()));
                }
            }
        }
        best.map(|(_, name)| name)
    }

    #[test]
    fn the_domain_index_agrees_with_a_scan_of_every_domain() {
        // Overlapping exact names, suffixes and prefixes of every length, duplicates across
        // virtual hosts (the first must win), with and without a catch-all.
        let labels = ["a", "b", "ab", "svc", "ns"];
        let mut rng = fastrand::Rng::with_seed(7);
        for round in 0..200 {
            let vhosts = (0..rng.usize(1..12))
                .map(|v| {
                    let domains = (0..rng.usize(1..4))
                        .map(|_| {
                            let name = (0..rng.usize(1..4))
                                .map(|_| labels[rng.usize(..labels.len())])
                                .collect::<Vec<_>>()
                                .join(".");
                            match rng.u8(..10) {
                                0..=4 => DomainMatch::Exact(name),
                                5..=6 => DomainMatch::Suffix(format!(".{name}")),
                                7..=8 => DomainMatch::Prefix(format!("{name}.")),
                                _ => DomainMatch::Any,
                            }
                        })
                        .collect();
                    vhost(&format!("vh{v}"), domains, vec![])
                })
                .collect();
            let rc = config(vhosts);
            for _ in 0..50 {
                let host = (0..rng.usize(1..5))
                    .map(|_| labels[rng.usize(..labels.len())])
                    .collect::<Vec<_>>()
                    .join(".");
                assert_eq!(
                    rc.best_domain(&host).map(|vh| vh.name.as_str()),
                    reference(&rc, &host),
                    "round {round}, host {host:?}, config {:?}",
                    rc.virtual_hosts()
                        .iter()
                        .map(|vh| &vh.domains)
                        .collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn strip_port_handles_ipv6() {
        assert_eq!(strip_port("a:80"), "a");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("a:"), "a:");
    }

    #[test]
    fn first_matching_route_wins() {
        let mut with_header = route("header", PathMatch::Prefix("/".into()));
        with_header.matcher.headers.push(HeaderMatcher {
            name: "x-canary".into(),
            rule: HeaderRule::String(StringMatcher::exact("1")),
            invert: false,
            treat_missing_as_empty: false,
        });
        let mut with_query = route("query", PathMatch::Prefix("/".into()));
        with_query.matcher.query.push(QueryMatcher {
            name: "debug".into(),
            value: None,
        });
        let mut insensitive = route("insensitive", PathMatch::Exact("/Upper".into()));
        insensitive.matcher.case_sensitive = false;
        let rc = config(vec![vhost(
            "all",
            vec![DomainMatch::Any],
            vec![
                route("exact", PathMatch::Exact("/exact".into())),
                route("sep", PathMatch::Separated("/api".into())),
                route(
                    "regex",
                    PathMatch::Regex(StringMatcher::regex("/v[0-9]+").expect("regex")),
                ),
                insensitive,
                with_header,
                with_query,
                route("prefix", PathMatch::Prefix("/static".into())),
            ],
        )]);
        let pick = |path: &str, headers: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                map.append(*k, http::HeaderValue::from_static(v));
            }
            let req = RequestView {
                host: "h",
                path,
                method: "GET",
                scheme: "http",
                headers: &map,
            };
            select(&rc, &req).map(|s| s.route.name.clone())
        };
        assert_eq!(pick("/exact?x=1", &[]).as_deref(), Some("exact"));
        assert_eq!(pick("/api/users", &[]).as_deref(), Some("sep"));
        assert_eq!(pick("/api?q", &[]).as_deref(), Some("sep"));
        assert_eq!(pick("/apix", &[]), None);
        assert_eq!(pick("/v12?y", &[]).as_deref(), Some("regex"));
        assert_eq!(pick("/upper", &[]).as_deref(), Some("insensitive"));
        assert_eq!(pick("/x", &[("x-canary", "1")]).as_deref(), Some("header"));
        assert_eq!(pick("/x", &[("x-canary", "2")]), None);
        assert_eq!(pick("/x?a=1&debug", &[]).as_deref(), Some("query"));
        assert_eq!(pick("/static/a.css", &[]).as_deref(), Some("prefix"));
    }

    #[test]
    fn weighted_targets_respect_zero_weights() {
        let target = ClusterTarget::Weighted(vec![
            WeightedTarget {
                cluster: "never".into(),
                weight: 0,
                headers: HeaderMutations::default(),
                host_rewrite: None,
            },
            WeightedTarget {
                cluster: "always".into(),
                weight: 7,
                headers: HeaderMutations::default(),
                host_rewrite: None,
            },
        ]);
        for _ in 0..100 {
            let (name, _) = pick_cluster(&target, &HeaderMap::new()).expect("picked");
            assert_eq!(name, "always");
        }
        let by_header = ClusterTarget::Header("x-cluster".into());
        assert!(pick_cluster(&by_header, &HeaderMap::new()).is_none());
    }

    #[test]
    fn grpc_content_types() {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
        h.insert(
            "content-type",
            http::HeaderValue::from_static("application/grpcx"),
        );
        assert!(!is_grpc(&h));
    }
}
