//! The HTTP filters before the router, run by the connection manager: the request's
//! attributes for `nodemesh-policy`, and a denial turned into Envoy's local reply.
use http::{HeaderName, HeaderValue, Request, Response};
use hyper::body::Incoming;
use nodemesh_policy::{Attributes, Denial, HttpAttributes, HttpChain, Verdict, chain::RouteView};

use crate::{
    hcm::ConnCtx,
    headers::names,
    local::{self, Flag},
    route::Selected,
    router::RespBody,
};

/// Runs the chain for one request (after route selection: per-route overrides need it).
#[expect(clippy::too_many_arguments, reason = "the request's parts, borrowed")]
pub(crate) async fn run(
    ctx: &ConnCtx,
    chain: &HttpChain,
    req: &Request<Incoming>,
    origin: &crate::sanitize::Origin,
    host: &str,
    path: &str,
    scheme: &str,
    cluster: Option<&str>,
    selected: Option<Selected<'_>>,
    grpc: bool,
) -> Verdict {
    let src = &ctx.accepted.source;
    // `remote_ip` is the trusted client address the connection manager decided on
    // (`use_remote_address`, `xff_num_trusted_hops`: see [`crate::sanitize`]), exactly as
    // Envoy's RBAC sees it; `direct_remote_ip` is the peer.
    let remote_ip = origin.client;
    let attrs = Attributes {
        peer: ctx.accepted.peer,
        remote_ip,
        destination: ctx.accepted.destination,
        principal: src.principal.as_deref(),
        namespace: src.namespace.as_deref(),
        server_name: None,
        http: Some(HttpAttributes {
            method: req.method().as_str(),
            authority: host,
            path,
            scheme,
            headers: req.headers(),
            cluster,
        }),
    };
    let view = selected.map(|s| RouteView {
        route_overrides: &s.route.per_filter,
        virtual_host_overrides: &s.virtual_host.per_filter,
        route_limits: &s.route.rate_limits,
        virtual_host_limits: &s.virtual_host.rate_limits,
    });
    chain.check(&attrs, view, &ctx.scope, grpc).await
}

/// Why the proxy answered, for the access log (`%RESPONSE_CODE_DETAILS%`).
#[derive(Debug, Clone)]
pub struct ResponseDetails(pub String);

/// The local reply for a denial.
pub(crate) fn deny_reply(d: &Denial, grpc: bool) -> Response<RespBody> {
    let flag = match d.flag {
        "RBAC" => Flag::RbacDenied,
        "RLSE" => Flag::RateLimitServiceError,
        _ => Flag::RateLimited,
    };
    let mut r = local::reply(d.status, flag, d.body, grpc);
    if grpc && let Ok(v) = HeaderValue::from_str(&d.grpc_status.to_string()) {
        r.headers_mut().insert(names::GRPC_STATUS, v);
    }
    add_response_headers(&mut r, &d.headers);
    r.extensions_mut()
        .insert(ResponseDetails(d.details.clone()));
    r
}

pub(crate) fn add_response_headers(r: &mut Response<RespBody>, headers: &[(String, String)]) {
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            r.headers_mut().append(k, v);
        }
    }
}
