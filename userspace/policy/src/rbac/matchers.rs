//! One permission or principal against one request or connection.
use nodemesh_config::filters::rbac::{MetadataMatcher, Permission, Principal, ValueMatch};

use crate::Attributes;

pub fn permission(p: &Permission, a: &Attributes<'_>) -> bool {
    match p {
        Permission::Any => true,
        Permission::And(rules) => rules.iter().all(|r| permission(r, a)),
        Permission::Or(rules) => rules.iter().any(|r| permission(r, a)),
        Permission::Not(r) => !permission(r, a),
        Permission::Header(h) => {
            // A connection (network RBAC) has no headers: Envoy matches against none.
            let value = a.http.as_ref().and_then(|r| r.header(&h.name));
            h.matches(value.as_deref())
        }
        Permission::UrlPath(m) => a.http.as_ref().is_some_and(|r| m.matches(r.url_path())),
        Permission::DestinationIp(range) => range.contains(a.destination.ip()),
        Permission::DestinationPort(port) => a.destination.port() == *port,
        Permission::DestinationPortRange(start, end) => {
            let p = u32::from(a.destination.port());
            p >= *start && p < *end
        }
        Permission::RequestedServerName(m) => m.matches(a.server_name.unwrap_or("")),
        Permission::Metadata(m) => metadata(m, a),
    }
}

pub fn principal(p: &Principal, a: &Attributes<'_>) -> bool {
    match p {
        Principal::Any => true,
        Principal::And(ids) => ids.iter().all(|i| principal(i, a)),
        Principal::Or(ids) => ids.iter().any(|i| principal(i, a)),
        Principal::Not(i) => !principal(i, a),
        // Envoy: a connection without an authenticated peer never matches `authenticated`.
        Principal::Authenticated(name) => match (a.principal, name) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(id), Some(m)) => m.matches(id),
        },
        Principal::DirectRemoteIp(range) => range.contains(a.peer.ip()),
        Principal::RemoteIp(range) => range.contains(a.remote_ip),
        Principal::Header(h) => {
            let value = a.http.as_ref().and_then(|r| r.header(&h.name));
            h.matches(value.as_deref())
        }
        Principal::UrlPath(m) => a.http.as_ref().is_some_and(|r| m.matches(r.url_path())),
        Principal::Metadata(m) => metadata(m, a),
    }
}

/// Dynamic metadata: nodemesh has the `istio_authn` values istiod's policies read
/// (`source.principal`, `source.namespace`); everything else is absent.
fn metadata(m: &MetadataMatcher, a: &Attributes<'_>) -> bool {
    let value = match (m.filter.as_str(), m.path.as_slice()) {
        ("istio_authn", [key]) if key == "source.principal" => a.principal,
        ("istio_authn", [key]) if key == "source.namespace" => a.namespace,
        _ => None,
    };
    value_matches(&m.value, value) != m.invert
}

fn value_matches(v: &ValueMatch, value: Option<&str>) -> bool {
    match (v, value) {
        (ValueMatch::Present(want), value) => value.is_some() == *want,
        (_, None) => false,
        (ValueMatch::String(s), Some(value)) => s.matches(value),
        (ValueMatch::Bool(_), Some(_)) => false,
        // A single string value is not a list.
        (ValueMatch::OneOf(_), Some(_)) => false,
    }
}
