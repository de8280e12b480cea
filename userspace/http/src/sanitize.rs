//! What the HTTP connection manager does to every request before filters and routing see it,
//! as Envoy's connection manager does: the trusted client address, internal or external
//! origin, `x-forwarded-for`/`-proto`, `x-request-id`, the `x-envoy-*` headers a client may
//! not set, `x-forwarded-client-cert`, path normalization and the Host port.
//!
//! The rules, checked against Envoy 1.40 by the differential corpus
//! (`tests/corpus/l7/forwarding_headers.yaml`, `path_normalization.yaml`):
//!
//! - **Trusted client address.** With `use_remote_address`, the peer, or the
//!   `xff_num_trusted_hops`-th address from the right of `x-forwarded-for` when it has that
//!   many; without it, the (N+1)-th from the right, or the peer.
//! - **Internal** only if the trusted client address is in `internal_address_config` (empty by
//!   default: since Envoy 1.33 nothing is internal) and, with `use_remote_address`, there was
//!   no `x-forwarded-for`; without it, `x-forwarded-for` held exactly that one address.
//! - **External requests** lose the `x-envoy-*` headers that steer proxies (retries,
//!   timeouts, tracing); **edge requests** (external with `use_remote_address`) also lose the
//!   downstream-identity ones, get `x-envoy-external-address`, a new `x-request-id` (unless
//!   `preserve_external_request_id`), and the peer appended to `x-forwarded-for` (the node's
//!   own address when the peer is loopback, as Envoy does).
//! - `x-forwarded-proto` is set from the connection (plaintext: `http`) when absent, or always
//!   when `use_remote_address` trusts no hops.
//! - `normalize_path`: RFC 3986 dot segments removed and percent-encoded unreserved
//!   characters decoded (`%2e` counts as `.`); other escapes (`%2F` included) are kept as
//!   sent. `merge_slashes` then collapses runs of `/`. The query is never touched.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::OnceLock,
};

use http::{HeaderMap, HeaderValue, Uri, header, uri::PathAndQuery};
use nodemesh_config::model::{ClientCertDetails, HttpManager};

use crate::headers::{self, names};

/// Steering headers removed from external requests.
const EXTERNAL_STRIPPED: &[&str] = &[
    "x-envoy-internal",
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-force-trace",
    "x-envoy-ip-tags",
    "x-envoy-original-url",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
];

/// Identity headers removed from edge requests.
const EDGE_STRIPPED: &[&str] = &[
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
    "x-envoy-original-path",
];

/// Where a request comes from, as the connection manager decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The trusted client address (RBAC's `remote_ip`, access logs).
    pub client: IpAddr,
    pub internal: bool,
    /// External, seen by a proxy that trusts the connection (`use_remote_address`).
    pub edge: bool,
}

/// A request the connection manager refuses before routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub &'static str);

/// Applies every rule of the module to a request's head.
pub fn request(
    hcm: &HttpManager,
    parts: &mut http::request::Parts,
    peer: SocketAddr,
) -> Result<Origin, Refused> {
    let origin = forwarding(hcm, &mut parts.headers, peer.ip().to_canonical());
    if hcm.normalize_path || hcm.merge_slashes {
        normalize_uri(&mut parts.uri, hcm.normalize_path, hcm.merge_slashes)?;
    }
    if hcm.strip_any_host_port {
        strip_port(parts);
    }
    Ok(origin)
}

fn forwarding(hcm: &HttpManager, h: &mut HeaderMap, peer: IpAddr) -> Origin {
    let xff: Vec<String> = h
        .get_all(names::X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
        .collect();
    let hops = hcm.xff_num_trusted_hops as usize;
    let from_right = if hcm.use_remote_address {
        hops
    } else {
        hops + 1
    };
    let client = (from_right > 0 && xff.len() >= from_right)
        .then(|| xff[xff.len() - from_right].parse::<IpAddr>().ok())
        .flatten()
        .map_or(peer, |ip| ip.to_canonical());
    let in_ranges = |ip: IpAddr| hcm.internal_addresses.iter().any(|r| r.contains(ip));
    let internal = if hcm.use_remote_address {
        xff.is_empty() && in_ranges(peer)
    } else {
        xff.len() == 1 && xff[0].parse::<IpAddr>().is_ok_and(in_ranges)
    };
    let edge = hcm.use_remote_address && !internal;

    // Every stripped name is an `x-envoy-` one, and most requests carry none: one pass over
    // the head's few names instead of a hashed lookup per stripped name.
    let envoy_headers = h.keys().any(|k| k.as_str().starts_with("x-envoy-"));
    if envoy_headers {
        h.remove(names::X_ENVOY_INTERNAL);
        if !internal {
            for name in EXTERNAL_STRIPPED {
                h.remove(*name);
            }
        }
    }
    if edge {
        if envoy_headers {
            for name in EDGE_STRIPPED {
                h.remove(*name);
            }
        }
        if let Ok(v) = HeaderValue::from_str(&client.to_string()) {
            h.insert(names::X_ENVOY_EXTERNAL_ADDRESS, v);
        }
    }
    if internal {
        h.insert(names::X_ENVOY_INTERNAL, HeaderValue::from_static("true"));
    }
    if hcm.use_remote_address && !hcm.skip_xff_append {
        let appended = if peer.is_loopback() {
            node_address()
        } else {
            peer
        };
        let value = match h.get(names::X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(existing) if !existing.is_empty() => format!("{existing},{appended}"),
            _ => appended.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(names::X_FORWARDED_FOR, v);
        }
    }
    if !h.contains_key(names::X_FORWARDED_PROTO) || (hcm.use_remote_address && hops == 0) {
        h.insert(names::X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if hcm.generate_request_id
        && (!h.contains_key(names::X_REQUEST_ID) || (edge && !hcm.preserve_external_request_id))
    {
        h.insert(names::X_REQUEST_ID, headers::request_id());
    }
    if hcm.client_cert == ClientCertDetails::Sanitize {
        h.remove(names::X_FORWARDED_CLIENT_CERT);
    }
    Origin {
        client,
        internal,
        edge,
    }
}

/// The address Envoy reports for itself: the first non-loopback IPv4 address of the
/// machine's interfaces (loopback if there is none), looked up once.
fn node_address() -> IpAddr {
    static ADDRESS: OnceLock<IpAddr> = OnceLock::new();
    *ADDRESS.get_or_init(|| {
        nix::ifaddrs::getifaddrs()
            .ok()
            .and_then(|mut ifaces| {
                ifaces.find_map(|iface| {
                    let ip = iface.address?.as_sockaddr_in()?.ip();
                    (!ip.is_loopback()).then_some(IpAddr::V4(ip))
                })
            })
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    })
}

#[cfg(test)]
#[test]
fn every_stripped_name_is_an_envoy_one() {
    for name in EXTERNAL_STRIPPED.iter().chain(EDGE_STRIPPED) {
        assert!(
            name.starts_with("x-envoy-"),
            "{name}: the fast path in `forwarding` misses it"
        );
    }
}

fn normalize_uri(uri: &mut Uri, normalize: bool, merge: bool) -> Result<(), Refused> {
    let Some(pq) = uri.path_and_query() else {
        return Ok(());
    };
    let mut path = pq.path().to_owned();
    if normalize {
        path = normalize_path(&path);
    }
    if merge {
        path = merge_slashes(&path);
    }
    if path == pq.path() {
        return Ok(());
    }
    let full = match pq.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let new_pq = PathAndQuery::try_from(full).map_err(|_| Refused("invalid path"))?;
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(new_pq);
    *uri = Uri::from_parts(parts).map_err(|_| Refused("invalid path"))?;
    Ok(())
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes percent-encoded unreserved characters, then removes dot segments (RFC 3986
/// §6.2.2.2 and §5.2.4). A `%` that starts no valid escape is kept, unless the decoded
/// characters after it would make it one (`%%32%65` would become `%2e`, a dot for whoever
/// decodes next): then it is written `%25`, as Envoy's canonicalizer does, so that
/// normalizing twice changes nothing.
pub fn normalize_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut literal_percents = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            match path
                .get(i + 1..i + 3)
                .map(|hex| u8::from_str_radix(hex, 16))
            {
                Some(Ok(b)) if is_unreserved(b) => {
                    decoded.push(b as char);
                    i += 3;
                    continue;
                }
                Some(Ok(_)) => {}
                _ => literal_percents.push(decoded.len()),
            }
        }
        // Multi-byte characters are copied whole.
        let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
        decoded.push(ch);
        i += ch.len_utf8().max(1);
    }
    for at in literal_percents.into_iter().rev() {
        let forms_escape = decoded
            .get(at + 1..at + 3)
            .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()));
        if forms_escape {
            decoded.replace_range(at..=at, "%25");
        }
    }
    remove_dot_segments(&decoded)
}

fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    // `segments[0]` is what precedes the first slash: empty for an absolute path.
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate().skip(1) {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(path.len());
    result.push_str(segments[0]);
    for seg in out {
        result.push('/');
        result.push_str(seg);
    }
    if result.is_empty() {
        result.push('/');
    }
    result
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut prev_slash = false;
    for c in path.chars() {
        if c == '/' && prev_slash {
            continue;
        }
        prev_slash = c == '/';
        out.push(c);
    }
    out
}

/// `strip_any_host_port`: the port leaves `Host` (HTTP/1.1) or the `:authority`.
fn strip_port(parts: &mut http::request::Parts) {
    if let Some(host) = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    {
        let stripped = crate::route::strip_port(host).to_owned();
        if stripped.len() != host.len()
            && let Ok(v) = HeaderValue::from_str(&stripped)
        {
            parts.headers.insert(header::HOST, v);
        }
    }
    if let Some(authority) = parts.uri.authority() {
        let stripped = crate::route::strip_port(authority.as_str()).to_owned();
        if stripped.len() != authority.as_str().len() {
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.authority = stripped.parse().ok();
            if let Ok(u) = Uri::from_parts(uri) {
                parts.uri = u;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_and_unreserved_escapes_are_normalized() {
        for (input, want) in [
            ("/x/./y", "/x/y"),
            ("/x/../b/c", "/b/c"),
            ("/../b", "/b"),
            ("/x/%2e%2e/b", "/b"),
            ("/x/%2E/y", "/x/y"),
            ("/x//y", "/x//y"),
            ("/x/%7ey", "/x/~y"),
            ("/x/b%2Fc", "/x/b%2Fc"),
            ("/x/b%2fc", "/x/b%2fc"),
            ("/x/y/..", "/x/"),
            ("/x/y/.", "/x/y/"),
            ("/x/%41%42", "/x/AB"),
            ("/x/%zz", "/x/%zz"),
            ("/x/%3a", "/x/%3a"),
            ("/x/y/../../../b", "/b"),
            ("/x/..%2fb", "/x/..%2fb"),
            ("/x/%252e", "/x/%252e"),
            ("/x/%%32%65%%32%65/b", "/x/%252e%252e/b"),
            ("/x/%%zz", "/x/%%zz"),
            ("/", "/"),
            ("/..", "/"),
        ] {
            assert_eq!(normalize_path(input), want, "{input}");
        }
    }

    #[test]
    fn runs_of_slashes_collapse() {
        assert_eq!(merge_slashes("//b//c"), "/b/c");
        assert_eq!(merge_slashes("/x///y/"), "/x/y/");
    }
}
