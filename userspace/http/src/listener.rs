//! Which listener and which filter chain serve a connection.
//!
//! Envoy's filter chain matching: the criteria are applied in a fixed order (destination
//! port, destination IP, server name, transport protocol, application protocols, direct
//! source IP, source IP, source port); at each step only the chains with the most specific
//! match survive, a chain that leaves a criterion unset matching anything but losing to any
//! chain that sets it and matches. No surviving chain: the default chain, or the connection
//! is closed.
use std::net::{IpAddr, SocketAddr};

use nodemesh_config::{
    matcher::IpRange,
    model::{FilterChain, Listener, Snapshot},
};

use crate::detect::Detected;

/// What chain matching knows about a connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionView<'a> {
    /// The destination: the original destination if the connection was redirected, else
    /// the local address.
    pub destination: SocketAddr,
    /// The peer (the pod, for the node proxy).
    pub source: SocketAddr,
    pub detected: &'a Detected,
}

/// The filter chain for a connection on `listener`.
pub fn select_chain<'a>(
    listener: &'a Listener,
    conn: &ConnectionView<'_>,
) -> Option<&'a FilterChain> {
    let mut candidates: Vec<&FilterChain> = listener.filter_chains.iter().collect();
    let dst_ip = conn.destination.ip();
    let src_ip = conn.source.ip();
    type Step<'s> = &'s dyn Fn(&FilterChain) -> Option<usize>;
    let steps: [Step<'_>; 8] = [
        &|c| {
            specificity_opt(
                c.matcher
                    .destination_port
                    .map(|p| p == conn.destination.port()),
            )
        },
        &|c| ip_specificity(&c.matcher.destination_ranges, dst_ip),
        &|c| {
            server_name_specificity(
                &c.matcher.server_names,
                conn.detected.server_name.as_deref(),
            )
        },
        &|c| {
            specificity_opt(
                c.matcher
                    .transport_protocol
                    .as_deref()
                    .map(|t| t == conn.detected.transport),
            )
        },
        &|c| {
            let m = &c.matcher.application_protocols;
            specificity_list(
                m.is_empty(),
                m.iter()
                    .any(|p| conn.detected.application_protocols.contains(p)),
            )
        },
        &|c| ip_specificity(&c.matcher.direct_source_ranges, src_ip),
        &|c| ip_specificity(&c.matcher.source_ranges, src_ip),
        &|c| {
            let m = &c.matcher.source_ports;
            specificity_list(m.is_empty(), m.contains(&conn.source.port()))
        },
    ];
    for step in steps {
        let scored: Vec<(usize, &FilterChain)> = candidates
            .iter()
            .filter_map(|c| step(c).map(|s| (s, *c)))
            .collect();
        let Some(best) = scored.iter().map(|(s, _)| *s).max() else {
            candidates.clear();
            break;
        };
        candidates = scored
            .into_iter()
            .filter(|(s, _)| *s == best)
            .map(|(_, c)| c)
            .collect();
    }
    candidates
        .first()
        .copied()
        .or(listener.default_chain.as_ref())
}

/// Unset: matches with the lowest specificity; set: 1 if it matches, else no match.
fn specificity_opt(matched: Option<bool>) -> Option<usize> {
    match matched {
        None => Some(0),
        Some(true) => Some(1),
        Some(false) => None,
    }
}

fn specificity_list(unset: bool, matched: bool) -> Option<usize> {
    specificity_opt((!unset).then_some(matched))
}

/// The longest matching prefix wins; unset ranges match anything with the lowest rank.
fn ip_specificity(ranges: &[IpRange], ip: IpAddr) -> Option<usize> {
    if ranges.is_empty() {
        return Some(0);
    }
    ranges
        .iter()
        .filter(|r| r.contains(ip))
        .map(|r| usize::from(r.prefix_len) + 1)
        .max()
}

/// Exact names beat wildcards (`*.example.com`), longer wildcards beat shorter ones.
fn server_name_specificity(names: &[String], sni: Option<&str>) -> Option<usize> {
    if names.is_empty() {
        return Some(0);
    }
    let sni = sni?;
    names
        .iter()
        .filter_map(|n| {
            if n == sni {
                Some(usize::MAX)
            } else {
                let suffix = n.strip_prefix('*')?;
                (sni.len() > suffix.len() && sni.ends_with(suffix)).then_some(suffix.len() + 1)
            }
        })
        .max()
}

/// The listener a redirected connection belongs to: the one bound to exactly its original
/// destination, else the one on the wildcard address with its port (Envoy's
/// `use_original_dst` hand-over).
pub fn listener_for(snapshot: &Snapshot, dst: SocketAddr) -> Option<&std::sync::Arc<Listener>> {
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    snapshot
        .listeners
        .iter()
        .find(|l| l.address == dst)
        .or_else(|| {
            snapshot
                .listeners
                .iter()
                .find(|l| l.address.port() == dst.port() && l.address.ip().is_unspecified())
        })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nodemesh_config::model::{ChainMatch, ClusterTarget, NetworkFilter, TcpProxy};

    use super::*;

    fn chain(name: &str, matcher: ChainMatch) -> FilterChain {
        FilterChain {
            name: name.into(),
            matcher,
            policies: vec![],
            filter: NetworkFilter::Tcp(TcpProxy {
                stat_prefix: name.into(),
                target: ClusterTarget::Named(name.into()),
                idle_timeout: Duration::from_secs(3600),
                access_logs: vec![],
            }),
        }
    }

    fn listener(chains: Vec<FilterChain>, default: Option<FilterChain>) -> Listener {
        Listener {
            name: "l".into(),
            address: "0.0.0.0:15001".parse().expect("addr"),
            bind: true,
            use_original_dst: false,
            http_inspector: true,
            http_inspector_disabled: None,
            tls_inspector: false,
            tls_inspector_disabled: None,
            inspection_timeout: Duration::from_secs(1),
            filter_chains: chains,
            default_chain: default,
        }
    }

    fn pick(l: &Listener, dst: &str, alpn: &[&str]) -> Option<String> {
        let detected = Detected {
            transport: "raw_buffer",
            application_protocols: alpn.iter().map(|s| (*s).to_owned()).collect(),
            ..Detected::default()
        };
        let view = ConnectionView {
            destination: dst.parse().expect("dst"),
            source: "198.18.0.9:40000".parse().expect("src"),
            detected: &detected,
        };
        select_chain(l, &view).map(|c| c.name.clone())
    }

    #[test]
    fn the_most_specific_chain_wins_criterion_by_criterion() {
        let l = listener(
            vec![
                chain("any", ChainMatch::default()),
                chain(
                    "port-8080",
                    ChainMatch {
                        destination_port: Some(8080),
                        ..ChainMatch::default()
                    },
                ),
                chain(
                    "port-8080-http",
                    ChainMatch {
                        destination_port: Some(8080),
                        application_protocols: vec!["http/1.1".into(), "h2c".into()],
                        ..ChainMatch::default()
                    },
                ),
                chain(
                    "net-24",
                    ChainMatch {
                        destination_ranges: vec![IpRange {
                            addr: "198.18.1.0".parse().expect("ip"),
                            prefix_len: 24,
                        }],
                        ..ChainMatch::default()
                    },
                ),
                chain(
                    "host-32",
                    ChainMatch {
                        destination_ranges: vec![IpRange {
                            addr: "198.18.1.7".parse().expect("ip"),
                            prefix_len: 32,
                        }],
                        ..ChainMatch::default()
                    },
                ),
            ],
            None,
        );
        assert_eq!(pick(&l, "198.18.0.1:80", &[]).as_deref(), Some("any"));
        assert_eq!(
            pick(&l, "198.18.0.1:8080", &[]).as_deref(),
            Some("port-8080")
        );
        assert_eq!(
            pick(&l, "198.18.0.1:8080", &["h2c"]).as_deref(),
            Some("port-8080-http")
        );
        assert_eq!(pick(&l, "198.18.1.9:80", &[]).as_deref(), Some("net-24"));
        assert_eq!(pick(&l, "198.18.1.7:80", &[]).as_deref(), Some("host-32"));
        // The port decides before the address does.
        assert_eq!(
            pick(&l, "198.18.1.7:8080", &[]).as_deref(),
            Some("port-8080")
        );
    }

    #[test]
    fn no_match_falls_back_to_the_default_chain() {
        let only_443 = ChainMatch {
            destination_port: Some(443),
            ..ChainMatch::default()
        };
        let l = listener(
            vec![chain("tls", only_443.clone())],
            Some(chain("default", ChainMatch::default())),
        );
        assert_eq!(pick(&l, "198.18.0.1:80", &[]).as_deref(), Some("default"));
        let l = listener(vec![chain("tls", only_443)], None);
        assert_eq!(pick(&l, "198.18.0.1:80", &[]), None);
    }

    #[test]
    fn server_names_prefer_exact_then_longest_wildcard() {
        let names = |n: &[&str]| n.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let exact = server_name_specificity(&names(&["a.b.c"]), Some("a.b.c"));
        let long = server_name_specificity(&names(&["*.b.c"]), Some("a.b.c"));
        let short = server_name_specificity(&names(&["*.c"]), Some("a.b.c"));
        assert!(exact > long && long > short && short > Some(0));
        assert_eq!(
            server_name_specificity(&names(&["*.b.c"]), Some("b.c")),
            None
        );
        assert_eq!(server_name_specificity(&names(&["x"]), None), None);
    }
}
