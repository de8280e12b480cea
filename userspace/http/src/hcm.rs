//! `envoy.filters.network.http_connection_manager`: HTTP/1.1 and HTTP/2 (prior knowledge)
//! downstream connections on hyper, and what happens to each request before the router:
//! per-source admission, route selection, direct responses and redirects.
//!
//! Protection against hostile clients comes from the codecs, configured from the HCM:
//! HTTP/1 header size (`max_request_headers_kb` → 431) and count, the header read timeout
//! (`request_headers_timeout`, 30 s when unset, where Envoy has none: a client that never
//! finishes its headers must not hold a connection forever), conflicting
//! `Content-Length`/`Transfer-Encoding` and invalid chunking (400, connection closed);
//! HTTP/2 stream limits and window sizes from `http2_protocol_options`, and h2's limits on
//! rapid resets, pending resets and header list size.
use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use nodemesh_config::model::{HttpManager, Redirect, RouteAction, RouteConfig, RouteSource};
use tokio::net::TcpStream;
use tracing::{Instrument as _, debug, debug_span};

use crate::{
    Accepted, Engine,
    detect::Rewind,
    downstream,
    headers::{self, Side, names},
    local::{self, Flag},
    report,
    route::{self, RequestView},
    router::{self, RespBody},
    sanitize,
};

/// Envoy has no default request header timeout; nodemesh uses this one.
pub(crate) const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Streams an HTTP/2 client may reset before the connection is closed (rapid reset,
/// CVE-2023-44487).
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// What every request of a connection shares.
#[derive(Debug)]
pub(crate) struct ConnCtx {
    pub engine: Arc<Engine>,
    pub hcm: Arc<HttpManager>,
    pub accepted: Accepted,
    pub downstream_h2: bool,
    tracker: Arc<downstream::Tracker>,
    /// This connection's filter chain, to find its compiled HTTP filters per request.
    pub chain_key: crate::policy::ChainKey,
    /// The filters compiled when the connection started (used if its chain is gone).
    pub filters: Option<Arc<nodemesh_policy::HttpChain>>,
    pub scope: nodemesh_policy::ConnScope,
    /// Set when the connection's listener drains (see [`crate::Drain`]).
    pub drain: crate::Drain,
    /// The `server` response header (`server_name`), made once per connection rather than
    /// copied and checked for every response.
    server: Option<HeaderValue>,
}

/// Serves an HTTP connection (`h2`: HTTP/2 with prior knowledge) until the client closes
/// it or it fails.
#[allow(clippy::too_many_arguments)] // one call site (Engine::serve_draining), all distinct
pub async fn serve(
    engine: Arc<Engine>,
    hcm: Arc<HttpManager>,
    io: Rewind<TcpStream>,
    h2: bool,
    accepted: Accepted,
    chain_key: crate::policy::ChainKey,
    filters: Option<Arc<nodemesh_policy::HttpChain>>,
    drain: crate::Drain,
) {
    engine
        .stats()
        .downstream_connection(if h2 { "http2" } else { "http1" });
    let tracker = downstream::Tracker::new();
    let ctx = Arc::new(ConnCtx {
        engine: engine.clone(),
        hcm: hcm.clone(),
        accepted,
        downstream_h2: h2,
        tracker: tracker.clone(),
        chain_key,
        filters,
        scope: nodemesh_policy::ConnScope::default(),
        drain: drain.clone(),
        server: HeaderValue::from_str(&hcm.server_name).ok(),
    });
    let io = TokioIo::new(downstream::Watched::new(io, tracker.clone()));
    let header_timeout = hcm
        .request_headers_timeout
        .unwrap_or(DEFAULT_HEADER_TIMEOUT);
    let timers = tracker.expired(hcm.idle_timeout, header_timeout);
    let result = if h2 {
        // Each stream's future (~7 KiB) is boxed once: hyper spawns a task per HTTP/2
        // stream, and the spawn copies the whole state several times over (-7.5% of the
        // instructions per h2c request); a box moves as a pointer. HTTP/1.1 keeps it
        // unboxed: there hyper moves it once per request, cheaper than a box's malloc.
        let service = service_fn(move |req: Request<Incoming>| {
            let request = Box::pin(handle(ctx.clone(), req));
            async move { Ok::<_, Infallible>(request.await) }
        });
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        let settings = &hcm.http2;
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(settings.max_concurrent_streams)
            .initial_stream_window_size(settings.initial_stream_window_size)
            .initial_connection_window_size(settings.initial_connection_window_size)
            .max_header_list_size(hcm.max_request_headers_kb.saturating_mul(1024))
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
            .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS);
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            expired = timers => {
                conn.as_mut().graceful_shutdown();
                on_expired(&engine, expired);
                conn.await
            }
            () = drain.started() => {
                // GOAWAY: streams open now finish, no new ones start.
                conn.as_mut().graceful_shutdown();
                debug!("listener draining: HTTP/2 connection sent GOAWAY");
                conn.await
            }
        }
    } else {
        let service = service_fn(move |req: Request<Incoming>| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(handle(ctx, req).await) }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        // The header timeout is this module's own (it starts at the first byte, where
        // hyper's starts when it waits for the next request); hyper's, on by default with a
        // timer, would arm a second timer for every request.
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .keep_alive(true)
            .max_buf_size((hcm.max_request_headers_kb as usize * 1024).max(8192))
            .max_headers(hcm.max_headers_count as usize)
            .pipeline_flush(true);
        let conn = builder.serve_connection(io, service).with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            expired = timers => match expired {
                downstream::Expired::Idle => {
                    conn.as_mut().graceful_shutdown();
                    on_expired(&engine, expired);
                    conn.await
                }
                // Headers still incomplete: nothing to finish gracefully.
                downstream::Expired::Headers => {
                    on_expired(&engine, expired);
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        let kind = classify(&e);
        engine.stats().protocol_error(kind);
        debug!(error = %e, kind, "downstream connection ended with an error");
    }
}

/// Counts a connection its timers ended.
fn on_expired(engine: &Engine, expired: downstream::Expired) {
    match expired {
        downstream::Expired::Idle => {
            engine.stats().downstream_connection("idle_timeout");
            debug!("downstream connection idle: shutting it down");
        }
        downstream::Expired::Headers => {
            engine.stats().protocol_error("header_timeout");
            debug!("request headers not complete in time: closing the connection");
        }
    }
}

/// A metric label for why a downstream connection failed.
fn classify(e: &hyper::Error) -> &'static str {
    if e.is_timeout() {
        "header_timeout"
    } else if e.is_parse_too_large() {
        "headers_too_large"
    } else if e.is_parse() {
        "malformed_request"
    } else if e.is_incomplete_message() {
        "incomplete_message"
    } else if e.is_closed() || e.is_canceled() {
        "closed"
    } else {
        "protocol_error"
    }
}

/// One request, from admission to the response head.
async fn handle(ctx: Arc<ConnCtx>, mut req: Request<Incoming>) -> Response<RespBody> {
    let stream = ctx.tracker.stream_started();
    let started = Instant::now();
    let grpc = route::is_grpc(req.headers());
    let keep_headers = !ctx.hcm.access_logs.is_empty();
    // Only access logs read the request line: without one it is not copied.
    let (method, path, authority) = if keep_headers {
        (
            req.method().as_str(),
            req.uri().path_and_query().map_or("/", |p| p.as_str()),
            authority(&req).unwrap_or_default(),
        )
    } else {
        ("", "", String::new())
    };
    let content_length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let mut entry = report::entry(
        method,
        path,
        &authority,
        req.version(),
        ctx.accepted.peer.ip(),
        ctx.accepted.peer,
        ctx.accepted.destination,
        ctx.accepted.source.principal.clone(),
    );
    let request_head = report::head_size(req.headers());
    // Only a body of undeclared length is counted as it is forwarded (chunked, HTTP/2,
    // gRPC streams): the common bodiless or sized request costs no counter.
    let declared = req.headers().contains_key(header::CONTENT_LENGTH);
    let received = (!declared && !hyper::body::Body::is_end_stream(req.body())).then(|| {
        let counter = report::BodyBytes::default();
        req.extensions_mut().insert(counter.clone());
        counter
    });
    let mut facts = Facts::default();
    let (mut response, sanitized) = handle_stream(&ctx, req, grpc, keep_headers, &mut facts).await;
    if !ctx.downstream_h2 && ctx.drain.is_draining() {
        // HTTP/1.1 on a draining listener: this response is the connection's last.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let (parts, body) = response.into_parts();
    if let Some((client, headers)) = sanitized {
        // Envoy: the peer's address, or the forwarded client's with port 0.
        if client != ctx.accepted.peer.ip().to_canonical() {
            entry.remote = std::net::SocketAddr::new(client, 0);
        }
        if let Some(h) = headers {
            entry.request_headers = h;
        }
    }
    entry.response_code = parts.status.as_u16();
    entry.response_flags = parts.extensions.get::<Flag>().and_then(|f| f.log_flag());
    entry.details = parts
        .extensions
        .get::<crate::filters::ResponseDetails>()
        .map(|d| d.0.clone());
    if let Some(up) = facts.upstream {
        entry.upstream_cluster = Some(up.cluster);
        entry.upstream_host = up.host;
    }
    entry.route_name = facts.route_name;
    if keep_headers {
        entry.response_headers = parts.headers.clone();
    }
    let pending = report::Pending {
        engine: ctx.engine.clone(),
        hcm: ctx.hcm.clone(),
        source: ctx.accepted.source.clone(),
        started,
        entry,
        grpc,
        request_head,
        content_length,
        received,
    };
    let head = report::head_size(&parts.headers);
    let body = report::Reported::new(downstream::Guarded::new(body, stream), pending, head);
    Response::from_parts(parts, body.boxed())
}

/// What routing learnt about a request, for its access log entry. Kept beside the
/// response rather than in its extensions: the first insert into an empty extension map
/// allocates the map, its table and a box.
#[derive(Debug, Default)]
struct Facts {
    /// The route's name (`%ROUTE_NAME%`).
    route_name: Option<String>,
    /// The cluster and host the request went to.
    upstream: Option<router::UpstreamInfo>,
}

/// The trusted client address and (for the access log) the request headers as the
/// connection manager left them.
type Sanitized = (std::net::IpAddr, Option<http::HeaderMap>);

/// The response, and what the connection manager made of the request when it got that far.
async fn handle_stream(
    ctx: &Arc<ConnCtx>,
    req: Request<Incoming>,
    grpc: bool,
    keep_headers: bool,
    facts: &mut Facts,
) -> (Response<RespBody>, Option<Sanitized>) {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    let origin = match sanitize::request(&ctx.hcm, &mut parts, ctx.accepted.peer) {
        Ok(origin) => origin,
        Err(sanitize::Refused(why)) => {
            ctx.engine.stats().protocol_error("invalid_request");
            let mut response = local::reply(400, Flag::ProtocolError, why, grpc);
            finish(ctx, &mut response, None, false);
            return (response, None);
        }
    };
    let sanitized = (origin.client, keep_headers.then(|| parts.headers.clone()));
    // x-envoy-force-trace from an internal client: the request id goes back in the response.
    let force_trace = origin.internal && parts.headers.contains_key(names::X_ENVOY_FORCE_TRACE);
    let req = Request::from_parts(parts, body);
    let request_id = req.headers().get(names::X_REQUEST_ID).cloned();
    // At debug level: an info span would be formatted for every request even when nothing
    // inside it logs (the fmt layer records span fields at creation), a measurable cost.
    let span = debug_span!("request", method = %req.method(), path = %req.uri().path(), source = %ctx.accepted.source.name);
    let (mut response, route) = async {
        let Some(_slot) = ctx.engine.tenants().request(&ctx.accepted.source) else {
            return (
                local::reply(503, Flag::Overloaded, "overloaded", grpc),
                None,
            );
        };
        dispatch(ctx, req, grpc, origin, facts).await
    }
    .instrument(span)
    .await;
    finish(ctx, &mut response, request_id, force_trace);
    let status = response.status().as_u16();
    if let Some(flag) = response.extensions().get::<Flag>() {
        ctx.engine.stats().local_reply(flag.as_str());
    }
    if let Some(route) = route {
        route.record(status, start.elapsed());
    }
    (response, Some(sanitized))
}

/// The connection manager's last word on every response.
fn finish(
    ctx: &ConnCtx,
    response: &mut Response<RespBody>,
    request_id: Option<HeaderValue>,
    force_trace: bool,
) {
    let h = response.headers_mut();
    if let Some(server) = &ctx.server {
        h.insert(header::SERVER, server.clone());
    }
    if (ctx.hcm.always_set_request_id_in_response || force_trace)
        && let Some(id) = request_id.or_else(|| h.get(names::X_REQUEST_ID).cloned())
    {
        h.insert(names::X_REQUEST_ID, id);
    }
}

/// Selects the route and runs its action. Returns the response and the route's stats label.
/// `origin` travels beside the request, not in its extensions: inserting into an empty
/// extension map allocates the map, its table and a box.
async fn dispatch(
    ctx: &ConnCtx,
    mut req: Request<Incoming>,
    grpc: bool,
    origin: sanitize::Origin,
    facts: &mut Facts,
) -> (Response<RespBody>, Option<Arc<crate::stats::RouteStats>>) {
    let state = ctx.engine.state();
    let routes: Option<Arc<RouteConfig>> = match &ctx.hcm.routes {
        // The chain's routes as configured now (an update may have changed them; an open
        // connection's next request uses the new ones), or the connection's own if its
        // chain is gone.
        RouteSource::Inline(rc) => Some(
            state
                .policies
                .inline_routes(&ctx.chain_key)
                .unwrap_or_else(|| rc.clone()),
        ),
        RouteSource::Named(name) => state.snapshot.routes.get(name).cloned(),
    };
    let Some(routes) = routes else {
        return (local::reply(404, Flag::NoRoute, "", grpc), None);
    };
    let Some(host) = authority(&req) else {
        return (
            local::reply(
                400,
                Flag::ProtocolError,
                "missing required header: host",
                grpc,
            ),
            None,
        );
    };
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let scheme = if req.uri().scheme_str() == Some("https") {
        "https"
    } else {
        "http"
    };
    let view = RequestView {
        host: &host,
        path: &path,
        method: req.method().as_str(),
        scheme,
        headers: req.headers(),
    };
    let selected = route::select(&routes, &view);
    // The HTTP filters before the router, from the configuration in force now (a new
    // policy applies to the next request of a kept-alive connection).
    let filters = state.policies.http(&ctx.chain_key).or_else(|| {
        state
            .policies
            .is_empty()
            .then(|| ctx.filters.clone())
            .flatten()
    });
    let mut added_response_headers = Vec::new();
    if let Some(filters) = filters {
        let cluster = selected.and_then(|s| match &s.route.action {
            RouteAction::Forward(f) => match &f.target {
                nodemesh_config::model::ClusterTarget::Named(n) => Some(n.as_str()),
                _ => None,
            },
            _ => None,
        });
        let verdict = crate::filters::run(
            ctx, &filters, &req, &origin, &host, &path, scheme, cluster, selected, grpc,
        )
        .await;
        match verdict {
            nodemesh_policy::Verdict::Continue => {}
            nodemesh_policy::Verdict::ContinueWith {
                request_headers,
                response_headers,
            } => {
                headers::apply_options(req.headers_mut(), &request_headers);
                added_response_headers = response_headers;
            }
            nodemesh_policy::Verdict::Deny(denial) => {
                return (
                    crate::filters::deny_reply(&denial, grpc),
                    selected.map(|s| route_stats(ctx, &routes, &s)),
                );
            }
        }
    }
    let Some(selected) = selected else {
        return (local::reply(404, Flag::NoRoute, "", grpc), None);
    };
    let label = route_stats(ctx, &routes, &selected);
    let route_name = (!selected.route.name.is_empty()).then(|| selected.route.name.clone());
    let mutations = [
        &selected.route.headers,
        &selected.virtual_host.headers,
        &routes.headers,
    ];
    let response = match &selected.route.action {
        RouteAction::DirectResponse { status, body } => {
            let mut r = local::reply(
                *status,
                Flag::DirectResponse,
                body.as_deref().unwrap_or(""),
                false,
            );
            headers::apply(r.headers_mut(), &mutations, Side::Response);
            r
        }
        RouteAction::Redirect(redirect) => {
            let mut r = redirect_response(redirect, &host, &path, scheme, &selected);
            headers::apply(r.headers_mut(), &mutations, Side::Response);
            r
        }
        RouteAction::Forward(forward) => {
            let target = router::Target {
                routes: &routes,
                selected,
                forward,
                host: &host,
                origin,
            };
            router::forward(ctx, &state, target, req, grpc, &mut facts.upstream).await
        }
    };
    let mut response = response;
    crate::filters::add_response_headers(&mut response, &added_response_headers);
    facts.route_name = route_name;
    (response, Some(label))
}

/// `:authority` (HTTP/2, absolute-form) or `Host`.
fn authority(req: &Request<Incoming>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .filter(|h| !h.is_empty())
}

/// `<route config>/<virtual host>/<route name or index>`.
fn route_stats(
    ctx: &ConnCtx,
    routes: &RouteConfig,
    selected: &route::Selected<'_>,
) -> Arc<crate::stats::RouteStats> {
    use crate::stats::RouteId;
    let id = if selected.route.name.is_empty() {
        RouteId::Index(selected.index)
    } else {
        RouteId::Name(&selected.route.name)
    };
    ctx.engine
        .stats()
        .route(&routes.name, &selected.virtual_host.name, id)
}

/// Envoy's `RedirectAction`.
fn redirect_response(
    redirect: &Redirect,
    host: &str,
    path: &str,
    scheme: &str,
    selected: &route::Selected<'_>,
) -> Response<RespBody> {
    let new_scheme = redirect.scheme.as_deref().unwrap_or(scheme);
    let original_host = route::strip_port(host);
    let original_port = host
        .get(original_host.len()..)
        .and_then(|p| p.strip_prefix(':'))
        .filter(|p| !p.is_empty());
    let new_host = redirect.host.as_deref().unwrap_or(original_host);
    let port = match (redirect.port, original_port) {
        (Some(p), _) => Some(p.to_string()),
        // A scheme change drops the old scheme's port.
        (None, Some(_)) if new_scheme != scheme => None,
        (None, p) if redirect.host.is_none() => p.map(str::to_owned),
        (None, _) => None,
    };
    let (path_only, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let mut new_path = match (&redirect.path, &redirect.prefix_rewrite) {
        (Some(p), _) => p.clone(),
        (None, Some(prefix)) => match &selected.route.matcher.path {
            nodemesh_config::model::PathMatch::Prefix(matched)
            | nodemesh_config::model::PathMatch::Separated(matched) => {
                format!("{prefix}{}", path_only.get(matched.len()..).unwrap_or(""))
            }
            _ => path_only.to_owned(),
        },
        (None, None) => path_only.to_owned(),
    };
    // A path_redirect with its own query replaces the query; strip_query drops it.
    if !new_path.contains('?')
        && !redirect.strip_query
        && let Some(q) = query
    {
        new_path.push('?');
        new_path.push_str(q);
    }
    let location = match port {
        Some(p) => format!("{new_scheme}://{new_host}:{p}{new_path}"),
        None => format!("{new_scheme}://{new_host}{new_path}"),
    };
    let mut r = Response::new(local::full(Bytes::new()));
    *r.status_mut() =
        StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.extensions_mut().insert(Flag::Redirect);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, F: Future>(_: impl FnOnce(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A request's whole state is one future: hyper moves it into place for every HTTP/1.1
    /// request and boxes it for every HTTP/2 stream, so each byte of it is copied per
    /// request. Rare paths (opening an upstream connection) keep their state boxed, and an
    /// `async fn` does not move a large argument into a local it then awaits beside (both
    /// copies would stay in the state). 11.5 KiB before those two rules were applied,
    /// 7 KiB after (the same in debug and release builds).
    #[test]
    fn a_request_future_stays_small() {
        const LIMIT: usize = 8 * 1024;
        let size = future_size(handle);
        println!("hcm::handle future: {size} bytes");
        assert!(
            size <= LIMIT,
            "a request's future grew to {size} bytes (limit {LIMIT}): box what a rare path awaits"
        );
    }
}
