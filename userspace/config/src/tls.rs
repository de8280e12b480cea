//! Transport sockets: what nodemesh does with Envoy's TLS settings, which is not TLS yet.
//!
//! nodemesh neither terminates nor originates TLS. Each place Envoy would is decided so
//! that nothing is sent in plaintext that the configuration says must be encrypted without
//! a warning saying so, and nothing a TLS chain guards is reachable another way:
//!
//! - `raw_buffer` (plaintext) anywhere: what nodemesh does; accepted.
//! - A filter chain with `envoy.transport_sockets.tls` (`DownstreamTlsContext`; istiod's
//!   inbound mTLS chains): the chain is kept, so that filter chain matching picks exactly
//!   the chain Envoy would, but every connection it matches is closed (a deny-all network
//!   RBAC policy in front of its filters), with a warning naming the chain. Dropping the
//!   chain instead could hand its TLS connections to a less specific plaintext chain that
//!   lacks its authorization policies.
//! - A cluster's `transport_socket` with TLS (a DestinationRule `SIMPLE`, `MUTUAL` or
//!   explicit `ISTIO_MUTUAL`): an error, since the upstream requires TLS.
//! - A cluster's `transport_socket_matches` entry with TLS that matches endpoint metadata
//!   `tlsMode: istio` (istiod's automatic mTLS to workloads that have a sidecar): a warning
//!   that such endpoints are connected to in plaintext. Any other TLS match is an error.
use envoy_types::pb::envoy::config::{cluster::v3 as cluster, core::v3 as core};

use crate::{
    filters::{
        NetworkPolicy,
        rbac::{Action, Permission, Policy, Principal, Rbac, Rules},
    },
    support::Diagnostics,
};

const TLS_URL: &str = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const UPSTREAM_TLS_URL: &str = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const RAW_BUFFER_URL: &str = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";

/// The name of the policy that closes connections of a TLS-terminating chain (it appears
/// in the proxy's RBAC logs and counters).
pub const TLS_NOT_TERMINATED: &str = "nodemesh-tls-not-terminated";

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Plain,
    Tls,
    Other(String),
}

fn kind(socket: &core::TransportSocket, tls_url: &str) -> Kind {
    match &socket.config_type {
        // Envoy picks the socket by name when no typed_config is given.
        None => match socket.name.as_str() {
            "envoy.transport_sockets.raw_buffer" | "raw_buffer" => Kind::Plain,
            "envoy.transport_sockets.tls" | "tls" => Kind::Tls,
            other => Kind::Other(other.to_owned()),
        },
        Some(core::transport_socket::ConfigType::TypedConfig(any)) => {
            match crate::convert::type_name(any) {
                RAW_BUFFER_URL => Kind::Plain,
                url if url == tls_url => Kind::Tls,
                other => Kind::Other(other.to_owned()),
            }
        }
    }
}

/// A filter chain's `transport_socket`: the policy that closes its connections when it
/// terminates TLS.
pub fn downstream(
    socket: &core::TransportSocket,
    at: &str,
    diags: &mut Diagnostics,
) -> Option<NetworkPolicy> {
    match kind(socket, TLS_URL) {
        Kind::Plain => None,
        Kind::Tls => {
            diags.warn(format!(
                "{at}.transport_socket: terminates TLS (DownstreamTlsContext), which nodemesh \
                 does not do yet: connections this chain matches are closed (policy \
                 {TLS_NOT_TERMINATED})"
            ));
            Some(NetworkPolicy::Rbac(std::sync::Arc::new(Rbac {
                rules: Some(Rules {
                    action: Action::Deny,
                    policies: vec![Policy {
                        name: TLS_NOT_TERMINATED.to_owned(),
                        permissions: vec![Permission::Any],
                        principals: vec![Principal::Any],
                    }],
                }),
                shadow: None,
                stat_prefix: String::new(),
                shadow_stat_prefix: String::new(),
            })))
        }
        Kind::Other(t) => {
            diags.error(format!(
                "{at}.transport_socket: transport socket {t} is not supported"
            ));
            None
        }
    }
}

/// A cluster's `transport_socket` and `transport_socket_matches`.
pub fn upstream(c: &cluster::Cluster, at: &str, diags: &mut Diagnostics) {
    if let Some(socket) = &c.transport_socket {
        match kind(socket, UPSTREAM_TLS_URL) {
            Kind::Plain => {}
            Kind::Tls => diags.error(format!(
                "{at}.transport_socket: upstream TLS (UpstreamTlsContext) is not supported yet; \
                 nodemesh would connect in plaintext to an upstream that requires TLS"
            )),
            Kind::Other(t) => diags.error(format!(
                "{at}.transport_socket: transport socket {t} is not supported"
            )),
        }
    }
    for m in &c.transport_socket_matches {
        let mat = format!("{at}.transport_socket_matches[{}]", m.name);
        let Some(socket) = &m.transport_socket else {
            continue;
        };
        match kind(socket, UPSTREAM_TLS_URL) {
            Kind::Plain => {}
            Kind::Tls if is_istio_mtls_match(m.r#match.as_ref()) => diags.warn(format!(
                "cluster {:?}: endpoints with tlsMode=istio would get Istio mTLS ({}); nodemesh \
                 connects to them in plaintext (it does not originate mTLS yet)",
                c.name, m.name
            )),
            Kind::Tls => diags.error(format!(
                "{mat}: upstream TLS (UpstreamTlsContext) is not supported yet; only Istio's \
                 automatic mTLS (match tlsMode: istio) is accepted, with a warning"
            )),
            Kind::Other(t) => diags.error(format!("{mat}: transport socket {t} is not supported")),
        }
    }
}

/// `match: { tlsMode: istio }`: the endpoints istiod labels as having a sidecar.
fn is_istio_mtls_match(m: Option<&envoy_types::pb::google::protobuf::Struct>) -> bool {
    use envoy_types::pb::google::protobuf::value::Kind;
    let Some(m) = m else { return false };
    m.fields.len() == 1
        && m.fields
            .get("tlsMode")
            .and_then(|v| v.kind.as_ref())
            .is_some_and(|k| matches!(k, Kind::StringValue(s) if s == "istio"))
}
