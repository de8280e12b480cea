//! `envoy.filters.http.router`: a routed request to its cluster, with Envoy's timeouts,
//! retries, rewrites, header handling and failure statuses.
//!
//! Timeouts: the route timeout (default 15 s, or the request's `grpc-timeout` where the
//! route allows it) bounds the whole exchange, response body included; the per-try timeout
//! bounds each attempt up to the response headers. Envoy starts the route timeout when the
//! request has been received completely; nodemesh starts it when the request headers
//! arrive, so a client that uploads slowly has less time (documented in ARCHITECTURE.md).
//!
//! Retries: the request body is streamed to the first attempt while a copy is kept, up to
//! [`RETRY_BUFFER_LIMIT`]; a retry replays the copy, and a request whose body outgrew the
//! copy (or had not been sent completely) is not retried — as Envoy does with its
//! per-request buffer limit.
use std::{
    pin::Pin,
    sync::{Arc, Mutex, atomic::Ordering},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, Uri, header, uri::PathAndQuery};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use nodemesh_config::model::{Forward, HostRewrite, PathMatch, RetryOn, RetryPolicy, RouteConfig};
use tokio::io::copy_bidirectional;
use tracing::{debug, warn};

use crate::{
    BoxError, State,
    hcm::ConnCtx,
    headers::{self, Side, names},
    idle::{Activity, IdleTimer, Touching},
    local::{self, Flag},
    route::{self, Selected},
    sanitize::Origin,
    steering::{self, Steering},
    upstream::{
        ClusterState, Host, Outcome, lb,
        pool::{ReqBody, UpstreamBody, UpstreamError, use_h2},
    },
};

/// The body type of responses sent downstream.
pub type RespBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Where a request was sent, for the access log.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamInfo {
    pub cluster: Arc<str>,
    pub host: Option<std::net::SocketAddr>,
}

/// How much of a request body is kept for retries (Envoy's default buffer limit).
pub const RETRY_BUFFER_LIMIT: usize = 1 << 20;

/// What the connection manager selected.
#[derive(Debug)]
pub(crate) struct Target<'a> {
    pub routes: &'a RouteConfig,
    pub selected: Selected<'a>,
    pub forward: &'a Forward,
    pub host: &'a str,
    /// Where the request comes from, as the connection manager decided.
    pub origin: Origin,
}

/// Why an attempt produced no usable response.
enum Failure {
    Upstream(UpstreamError),
    NoHost,
    /// The per-try timeout, the per-try idle timeout or the route timeout (`UT`).
    PerTryTimeout,
    /// Nothing moved on the stream for the stream (or route) idle timeout (`SI`).
    StreamIdle,
    /// The request was not received completely within `request_timeout`.
    RequestTimeout,
    /// The stream outlived its maximum duration (the gRPC deadline, `DT`).
    StreamDuration,
}

/// The timers that bound one request's attempts.
struct Timers {
    /// The route timeout (or gRPC deadline), from the request's start.
    deadline: Option<Instant>,
    per_try: Option<Duration>,
    per_try_idle: Option<Duration>,
    stream_idle: Option<Duration>,
    /// `request_timeout`: the request must be received completely by then.
    request_deadline: Option<Instant>,
    /// The gRPC deadline as the stream's maximum duration.
    stream_deadline: Option<Instant>,
    activity: Activity,
}

/// Forwards the request and returns the downstream response; where it went is left in
/// `upstream` for the access log.
pub(crate) async fn forward(
    ctx: &ConnCtx,
    state: &State,
    target: Target<'_>,
    mut req: Request<Incoming>,
    grpc: bool,
    upstream: &mut Option<UpstreamInfo>,
) -> Response<RespBody> {
    let start = Instant::now();
    let fwd = target.forward;
    let Some((cluster_name, weighted)) = route::pick_cluster(&fwd.target, req.headers()) else {
        return local::reply(fwd.cluster_not_found_status, Flag::NoCluster, "", grpc);
    };
    let Some(cluster) = state.clusters.get(&*cluster_name).cloned() else {
        debug!(cluster = %cluster_name, "route names a cluster that does not exist");
        return local::reply(fwd.cluster_not_found_status, Flag::NoCluster, "", grpc);
    };
    let Some(_request_slot) = cluster.try_slot(crate::stats::Limit::Requests) else {
        return local::reply(
            503,
            Flag::UpstreamOverflow,
            &local::reset_text("overflow"),
            grpc,
        );
    };
    let Some(_pending) = ctx.engine.tenants().pending(&ctx.accepted.source) else {
        return local::reply(503, Flag::Overloaded, "overloaded", grpc);
    };
    let vh = target.selected.virtual_host;
    // An internal client may steer timeouts and retries with x-envoy-* headers (external
    // requests had them removed by the connection manager).
    let steering = if target.origin.internal {
        steering::take(req.headers_mut())
    } else {
        Steering::default()
    };
    let retry_policy = steering.retry_policy(fwd.retry.as_ref().or(vh.retry.as_ref()));
    let retry = retry_policy.as_ref();
    // Header mutations, most specific first (the weighted cluster's, when it has some).
    let shared = [
        &target.selected.route.headers,
        &vh.headers,
        &target.routes.headers,
    ];
    let with_weighted;
    let levels: &[&nodemesh_config::model::HeaderMutations] = match weighted {
        Some(w) => {
            with_weighted = [&w.headers, shared[0], shared[1], shared[2]];
            &with_weighted
        }
        None => &shared,
    };

    // The route timeout, and the client's gRPC deadline where the route honours it: as the
    // stream's maximum duration (max_stream_duration), or instead of the route timeout.
    let mut timeout = fwd.timeout;
    let mut stream_deadline = None;
    if let Some(max) = fwd.grpc_timeout_max
        && let Some(deadline) = req
            .headers()
            .get(names::GRPC_TIMEOUT)
            .and_then(|v| parse_grpc_timeout(v.as_bytes()))
    {
        let capped = if max.is_zero() {
            deadline
        } else {
            deadline.min(max)
        };
        let grpc = capped.saturating_sub(fwd.grpc_timeout_offset.unwrap_or_default());
        if fwd.grpc_timeout_is_stream_duration {
            stream_deadline = Some(start + grpc);
        } else {
            timeout = Some(grpc);
        }
    }
    if let Some(t) = steering.timeout {
        timeout = t;
    }
    let deadline = timeout.map(|t| start + t);
    let per_try = retry.and_then(|r| r.per_try_timeout);

    let upgrade = headers::upgrade_of(req.headers());
    if let Some(kind) = &upgrade {
        let allowed = fwd
            .upgrades
            .iter()
            .chain(ctx.hcm.upgrades.iter())
            .any(|u| u == kind);
        if !allowed || ctx.downstream_h2 {
            return local::reply(403, Flag::UpgradeRefused, "upgrade not allowed", grpc);
        }
    }

    let received = req.extensions().get::<crate::report::BodyBytes>().cloned();
    let (mut parts, body) = req.into_parts();
    let downstream_upgrade = upgrade.as_ref().map(|_| {
        let mut shell = Request::new(());
        *shell.extensions_mut() = std::mem::take(&mut parts.extensions);
        hyper::upgrade::on(shell)
    });
    prepare_request(
        ctx,
        &mut parts,
        &target,
        weighted.and_then(|w| w.host_rewrite.as_deref()),
        upgrade.is_some(),
    );
    headers::apply(&mut parts.headers, levels, Side::Request);
    let expected = match (timeout, per_try) {
        (Some(t), Some(p)) => Some(t.min(p)),
        (t, p) => t.or(p),
    };
    if !ctx.hcm.suppress_envoy_headers
        && let Some(ms) = expected
    {
        parts.headers.insert(
            names::X_ENVOY_EXPECTED_RQ_TIMEOUT_MS,
            HeaderValue::from(ms.as_millis() as u64),
        );
    }

    // The body: streamed to the first attempt, with a copy kept for retries.
    let retries_allowed = retry.map_or(0, |r| r.num_retries);
    let copy =
        (retries_allowed > 0 && upgrade.is_none()).then(|| Arc::new(Mutex::new(Copy::default())));
    if let Some(copy) = &copy
        && body.is_end_stream()
    {
        copy.lock().unwrap_or_else(|p| p.into_inner()).complete = true;
    }
    let activity = Activity::new();
    if body.is_end_stream() {
        activity.set_request_complete();
    }
    let first = match &copy {
        Some(copy) => Tee {
            inner: body,
            copy: copy.clone(),
        }
        .boxed(),
        None => body.map_err(|e| -> BoxError { Box::new(e) }).boxed(),
    };
    let mut first_body = Some(Touching::new(first, activity.clone(), received).boxed());
    let timers = Timers {
        deadline,
        per_try,
        per_try_idle: retry.and_then(|r| r.per_try_idle_timeout),
        // The route's idle timeout replaces the connection manager's stream idle timeout.
        stream_idle: fwd.idle_timeout.unwrap_or(ctx.hcm.stream_idle_timeout),
        request_deadline: ctx.hcm.request_timeout.map(|t| start + t),
        stream_deadline,
        activity: activity.clone(),
    };

    let h2 = use_h2(&cluster, ctx.downstream_h2) && upgrade.is_none();
    // A request that may be retried keeps its head for the next attempt; one that may not
    // gives it to its only attempt (no copy of the header map).
    let mut head = Some(parts);
    let mut attempt: u32 = 0;
    let result = loop {
        attempt += 1;
        let body = match first_body.take() {
            Some(body) => body,
            None => match copy
                .as_ref()
                .and_then(|c| c.lock().unwrap_or_else(|p| p.into_inner()).replay())
            {
                Some(body) => body,
                None => break Err(Failure::Upstream(UpstreamError::Overflow)),
            },
        };
        let parts = if retries_allowed == 0 {
            let mut only = head
                .take()
                .expect("without retries the first attempt is the only one");
            only.extensions.clear();
            only
        } else {
            clone_parts(head.as_ref().expect("the head is kept for retries"))
        };
        let mut req = Request::from_parts(parts, body);
        if target.selected.virtual_host.include_request_attempt_count {
            req.headers_mut()
                .insert(names::X_ENVOY_ATTEMPT_COUNT, HeaderValue::from(attempt));
        }
        set_uri(&mut req, h2);
        let auto_host = fwd.host_rewrite == HostRewrite::Auto;
        let outcome = attempt_once(ctx, &cluster, req, h2, &timers, auto_host).await;
        let retry_on = retry.map_or(RetryOn::empty(), |r| r.retry_on);
        let can_retry = attempt <= retries_allowed
            && deadline.is_none_or(|d| Instant::now() < d)
            && copy
                .as_ref()
                .is_some_and(|c| c.lock().unwrap_or_else(|p| p.into_inner()).replayable());
        let wants_retry = match &outcome {
            Ok((response, _)) => retriable_response(retry, retry_on, response),
            Err(f) => retriable_failure(retry_on, f),
        };
        if !(can_retry && wants_retry) {
            break outcome;
        }
        let Some(_retry_slot) = cluster.try_slot(crate::stats::Limit::Retries) else {
            break outcome;
        };
        cluster.stats.retries.inc();
        let Some(policy) = retry else { break outcome };
        let wait = backoff(policy, attempt);
        debug!(attempt, ?wait, cluster = %cluster.name(), "retrying");
        match deadline {
            Some(d) if Instant::now() + wait >= d => break outcome,
            _ => tokio::time::sleep(wait).await,
        }
    };
    let elapsed = start.elapsed();
    match result {
        Ok((mut response, host)) => {
            *upstream = Some(UpstreamInfo {
                cluster: cluster.label.clone(),
                host: Some(host.address),
            });
            cluster.stats.response(response.status().as_u16(), elapsed);
            cluster.record(&host, Outcome::of_status(response.status().as_u16()));
            let upgraded = response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
            if upgraded && let Some(downstream) = downstream_upgrade {
                let upstream = hyper::upgrade::on(&mut response);
                tokio::spawn(async move {
                    match tokio::try_join!(downstream, upstream) {
                        Ok((down, up)) => {
                            let mut down = hyper_util::rt::TokioIo::new(down);
                            let mut up = hyper_util::rt::TokioIo::new(up);
                            if let Err(e) = copy_bidirectional(&mut down, &mut up).await {
                                debug!(error = %e, "upgraded connection ended");
                            }
                        }
                        Err(e) => warn!(error = %e, "upgrade failed"),
                    }
                });
            }
            let (mut parts, body) = response.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers, upgraded);
            if !ctx.hcm.suppress_envoy_headers {
                parts.headers.insert(
                    names::X_ENVOY_UPSTREAM_SERVICE_TIME,
                    HeaderValue::from(elapsed.as_millis() as u64),
                );
            }
            if target
                .selected
                .virtual_host
                .include_attempt_count_in_response
            {
                parts
                    .headers
                    .insert(names::X_ENVOY_ATTEMPT_COUNT, HeaderValue::from(attempt));
            }
            headers::apply(&mut parts.headers, levels, Side::Response);
            let idle = match (timers.stream_idle, timers.per_try_idle) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let body = Deadline {
                inner: body,
                sleep: match (deadline, timers.stream_deadline) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
                .map(|d| Box::pin(tokio::time::sleep_until(d.into()))),
                idle: idle.map(IdleTimer::new),
                cluster: cluster.clone(),
            };
            Response::from_parts(parts, body.boxed())
        }
        Err(failure) => {
            let (status, flag, text) = match &failure {
                Failure::NoHost => (
                    503,
                    Flag::NoHealthyUpstream,
                    "no healthy upstream".to_owned(),
                ),
                Failure::PerTryTimeout => {
                    cluster.stats.timeouts.inc();
                    (
                        504,
                        Flag::UpstreamTimeout,
                        "upstream request timeout".to_owned(),
                    )
                }
                Failure::StreamIdle => (504, Flag::StreamIdleTimeout, "stream timeout".to_owned()),
                Failure::RequestTimeout => {
                    (408, Flag::RequestTimeout, "request timeout".to_owned())
                }
                Failure::StreamDuration => (
                    504,
                    Flag::StreamDurationTimeout,
                    "downstream duration timeout".to_owned(),
                ),
                Failure::Upstream(UpstreamError::Overflow) => {
                    (503, Flag::UpstreamOverflow, local::reset_text("overflow"))
                }
                Failure::Upstream(UpstreamError::ConnectTimeout) => (
                    503,
                    Flag::UpstreamConnectFailure,
                    local::reset_text("connection timeout"),
                ),
                Failure::Upstream(UpstreamError::ConnectFailure(e)) => (
                    503,
                    Flag::UpstreamConnectFailure,
                    // Envoy's reset reasons: refused or reset by the peer is remote.
                    local::reset_text(match e.kind() {
                        std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted => "remote connection failure",
                        _ => "local connection failure",
                    }),
                ),
                Failure::Upstream(UpstreamError::Reset(e)) => {
                    if e.is_canceled() || e.is_closed() || e.is_incomplete_message() {
                        (
                            503,
                            Flag::UpstreamConnectionTermination,
                            local::reset_text("connection termination"),
                        )
                    } else {
                        (
                            503,
                            Flag::UpstreamRemoteReset,
                            local::reset_text("remote reset"),
                        )
                    }
                }
            };
            let mut response = local::reply(status, flag, &text, grpc);
            *upstream = Some(UpstreamInfo {
                cluster: cluster.label.clone(),
                host: None,
            });
            if target
                .selected
                .virtual_host
                .include_attempt_count_in_response
            {
                response
                    .headers_mut()
                    .insert(names::X_ENVOY_ATTEMPT_COUNT, HeaderValue::from(attempt));
            }
            headers::apply(response.headers_mut(), levels, Side::Response);
            response
        }
    }
}

/// One attempt: a host, a connection, the response headers.
async fn attempt_once(
    ctx: &ConnCtx,
    cluster: &Arc<ClusterState>,
    mut req: Request<ReqBody>,
    h2: bool,
    timers: &Timers,
    auto_host: bool,
) -> Result<(Response<UpstreamBody>, Arc<Host>), Failure> {
    let (per_try, deadline) = (timers.per_try, timers.deadline);
    let host = match &cluster.config.discovery {
        nodemesh_config::model::Discovery::OriginalDst {
            use_http_header,
            header_name,
        } => {
            let from_header = use_http_header.then(|| {
                let name = header_name
                    .as_deref()
                    .unwrap_or("x-envoy-original-dst-host");
                req.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
            });
            match from_header {
                Some(Some(addr)) => Some(Host::transient(addr)),
                Some(None) => None,
                None => Some(Host::transient(ctx.accepted.destination)),
            }
        }
        _ => lb::pick(cluster),
    };
    let Some(host) = host else {
        return Err(Failure::NoHost);
    };
    let limit = match (per_try, deadline) {
        (Some(p), Some(d)) => Some((Instant::now() + p).min(d)),
        (Some(p), None) => Some(Instant::now() + p),
        (None, d) => d,
    };
    host.active_requests.fetch_add(1, Ordering::Relaxed);
    let _pending = PendingGuard::new(cluster);
    if auto_host && !host.hostname.is_empty() {
        set_host(&mut req, &host.hostname, h2);
    }
    let send = cluster.send(&host, req, h2, &ctx.accepted.source, ctx.engine.connector());
    let result = wait_response(std::pin::pin!(send), limit, timers).await;
    host.active_requests.fetch_sub(1, Ordering::Relaxed);
    match &result {
        Err(Failure::Upstream(UpstreamError::Overflow)) | Err(Failure::NoHost) | Ok(_) => {}
        Err(_) => cluster.record(&host, Outcome::GatewayError),
    }
    result.map(|r| (r, host))
}

/// Waits for the response headers of one attempt under every timer that applies.
///
/// `send` comes pinned by the caller so that its state lives once, in the caller's future
/// (an `async fn` that moves its argument into a `select!` keeps both copies).
async fn wait_response<F>(
    send: Pin<&mut F>,
    limit: Option<Instant>,
    timers: &Timers,
) -> Result<Response<UpstreamBody>, Failure>
where
    F: Future<Output = Result<Response<UpstreamBody>, UpstreamError>>,
{
    tokio::select! {
        biased;
        r = send => r.map_err(Failure::Upstream),
        failure = first_expiry(limit, timers, tokio::time::Instant::now()) => Err(failure),
    }
}

/// Resolves with the first of an attempt's timers to expire (never, with none armed).
///
/// One tokio timer serves them all, re-armed for whichever deadline comes next: a request
/// registers one timer entry instead of one per kind, and pushing an idle deadline later is
/// an update in place, not a new registration.
async fn first_expiry(
    limit: Option<Instant>,
    timers: &Timers,
    attempt_started: tokio::time::Instant,
) -> Failure {
    // Registered only when first reset to a deadline below.
    let sleep = tokio::time::sleep_until(attempt_started);
    tokio::pin!(sleep);
    loop {
        let Some((due, failure)) = next_expiry(limit, timers, attempt_started) else {
            return std::future::pending().await;
        };
        if tokio::time::Instant::now() >= due {
            return failure;
        }
        if sleep.deadline() != due {
            sleep.as_mut().reset(due);
        }
        sleep.as_mut().await;
    }
}

/// The earliest armed deadline of an attempt and the failure it means. The idle deadlines
/// move with the stream's activity; `request_timeout` is disarmed once the request is in.
fn next_expiry(
    limit: Option<Instant>,
    timers: &Timers,
    attempt_started: tokio::time::Instant,
) -> Option<(tokio::time::Instant, Failure)> {
    let activity = &timers.activity;
    let at = |i: Option<Instant>| i.map(tokio::time::Instant::from_std);
    let request = timers
        .request_deadline
        .filter(|_| !activity.request_complete());
    [
        (at(limit), Failure::PerTryTimeout),
        (at(timers.stream_deadline), Failure::StreamDuration),
        (
            activity.idle_due(attempt_started, timers.per_try_idle),
            Failure::PerTryTimeout,
        ),
        (
            activity.idle_due(activity.epoch(), timers.stream_idle),
            Failure::StreamIdle,
        ),
        (at(request), Failure::RequestTimeout),
    ]
    .into_iter()
    .filter_map(|(due, failure)| Some((due?, failure)))
    .min_by_key(|(due, _)| *due)
}

/// Counts a request waiting on upstream in the cluster's pending gauge.
struct PendingGuard<'a>(&'a ClusterState);

impl<'a> PendingGuard<'a> {
    fn new(cluster: &'a ClusterState) -> Self {
        cluster.stats.pending.inc();
        Self(cluster)
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.stats.pending.dec();
    }
}

/// Rewrites and the headers Envoy's router adds before a request leaves.
fn prepare_request(
    ctx: &ConnCtx,
    parts: &mut http::request::Parts,
    target: &Target<'_>,
    weighted_host: Option<&str>,
    upgrade: bool,
) {
    let fwd = target.forward;
    let hcm = &ctx.hcm;
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    if upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let h = &mut parts.headers;
    if let Some(via) = &hcm.via
        && let Ok(v) = HeaderValue::from_str(via)
    {
        h.append(header::VIA, v);
    }
    // Path rewrites (the path is read in place: most routes rewrite nothing).
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let rewritten = match (
        &fwd.prefix_rewrite,
        &fwd.regex_rewrite,
        &target.selected.route.matcher.path,
    ) {
        (Some(prefix), _, PathMatch::Prefix(matched) | PathMatch::Separated(matched)) => Some(
            format!("{prefix}{}", path.get(matched.len()..).unwrap_or("")),
        ),
        (Some(prefix), _, PathMatch::Exact(_) | PathMatch::Regex(_)) => {
            // Envoy: with a path match, the whole path (not the query) is replaced.
            let query = path.split_once('?').map(|(_, q)| q);
            Some(match query {
                Some(q) => format!("{prefix}?{q}"),
                None => prefix.clone(),
            })
        }
        (None, Some((pattern, substitution)), _) => {
            let (only, query) = path
                .split_once('?')
                .map_or((path, None), |(p, q)| (p, Some(q)));
            let nodemesh_config::matcher::StringMatch::Regex(re) = &pattern.kind else {
                unreachable_regex();
                return;
            };
            let replaced = re.replace_all(only, substitution.as_str()).into_owned();
            Some(match query {
                Some(q) => format!("{replaced}?{q}"),
                None => replaced,
            })
        }
        _ => None,
    };
    if let Some(new_path) = rewritten
        && let Ok(pq) = PathAndQuery::try_from(new_path)
    {
        if !hcm.suppress_envoy_headers
            && let Some(original) = parts.uri.path_and_query()
            && let Ok(v) = HeaderValue::from_str(original.as_str())
        {
            parts.headers.insert(names::X_ENVOY_ORIGINAL_PATH, v);
        }
        let mut uri = parts.uri.clone().into_parts();
        uri.path_and_query = Some(pq);
        if let Ok(u) = Uri::from_parts(uri) {
            parts.uri = u;
        }
    }
    // Host rewrites.
    let new_host: Option<std::borrow::Cow<'_, str>> = match (weighted_host, &fwd.host_rewrite) {
        (Some(h), _) => Some(h.into()),
        (None, HostRewrite::Literal(h)) => Some(h.as_str().into()),
        (None, HostRewrite::Header(name)) => parts
            .headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .map(|v| v.to_owned().into()),
        // Auto host rewrite needs the chosen endpoint; applied at send time for STRICT_DNS.
        (None, HostRewrite::Auto | HostRewrite::None) => None,
    };
    let host = new_host.unwrap_or(target.host.into());
    // Usually the one Host the client sent, already in place: not copied again.
    let mut sent = parts.headers.get_all(header::HOST).iter();
    let unchanged =
        sent.next().is_some_and(|v| v.as_bytes() == host.as_bytes()) && sent.next().is_none();
    if !unchanged && let Ok(v) = HeaderValue::from_str(&host) {
        parts.headers.insert(header::HOST, v);
    }
}

/// The model only builds regex rewrites from regexes.
fn unreachable_regex() {
    warn!("regex rewrite without a regex: configuration model violated");
}

/// The parts of a request, for another attempt (extensions are not carried).
fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

/// HTTP/1.1 upstreams get origin-form with `Host`; HTTP/2 upstreams an absolute URI (the
/// `:authority`).
fn set_uri(req: &mut Request<ReqBody>, h2: bool) {
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let uri = if h2 {
        *req.version_mut() = http::Version::HTTP_2;
        req.headers_mut().remove(header::HOST);
        Uri::builder()
            .scheme("http")
            .authority(host.as_deref().unwrap_or("localhost"))
            .path_and_query(path)
            .build()
    } else {
        *req.version_mut() = http::Version::HTTP_11;
        Uri::builder().path_and_query(path).build()
    };
    if let Ok(uri) = uri {
        *req.uri_mut() = uri;
    }
}

/// `auto_host_rewrite`: the endpoint's DNS name becomes the host.
fn set_host(req: &mut Request<ReqBody>, hostname: &str, h2: bool) {
    if h2 {
        let mut parts = req.uri().clone().into_parts();
        if let Ok(authority) = http::uri::Authority::try_from(hostname) {
            parts.authority = Some(authority);
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    } else if let Ok(v) = HeaderValue::from_str(hostname) {
        req.headers_mut().insert(header::HOST, v);
    }
}

fn retriable_response(
    policy: Option<&RetryPolicy>,
    on: RetryOn,
    response: &Response<UpstreamBody>,
) -> bool {
    let status = response.status().as_u16();
    if on.contains(RetryOn::FIVE_XX) && status >= 500
        || on.contains(RetryOn::GATEWAY_ERROR) && (502..=504).contains(&status)
        || on.contains(RetryOn::RETRIABLE_4XX) && status == 409
        || on.contains(RetryOn::RETRIABLE_STATUS_CODES)
            && policy.is_some_and(|p| p.retriable_status_codes.contains(&status))
    {
        return true;
    }
    // gRPC: a trailers-only response carries grpc-status in its headers.
    let grpc = response
        .headers()
        .get(names::GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u8>().ok());
    matches!(
        (grpc, on),
        (Some(1), o) if o.contains(RetryOn::GRPC_CANCELLED)
    ) || matches!((grpc, on), (Some(4), o) if o.contains(RetryOn::GRPC_DEADLINE_EXCEEDED))
        || matches!((grpc, on), (Some(13), o) if o.contains(RetryOn::GRPC_INTERNAL))
        || matches!((grpc, on), (Some(8), o) if o.contains(RetryOn::GRPC_RESOURCE_EXHAUSTED))
        || matches!((grpc, on), (Some(14), o) if o.contains(RetryOn::GRPC_UNAVAILABLE))
}

fn retriable_failure(on: RetryOn, failure: &Failure) -> bool {
    let any_5xx = on.intersects(RetryOn::FIVE_XX | RetryOn::GATEWAY_ERROR);
    match failure {
        Failure::NoHost
        | Failure::StreamIdle
        | Failure::RequestTimeout
        | Failure::StreamDuration => false,
        Failure::PerTryTimeout => any_5xx,
        Failure::Upstream(UpstreamError::Overflow) => false,
        Failure::Upstream(UpstreamError::ConnectTimeout | UpstreamError::ConnectFailure(_)) => {
            any_5xx
                || on.intersects(
                    RetryOn::CONNECT_FAILURE | RetryOn::RESET | RetryOn::RESET_BEFORE_REQUEST,
                )
        }
        Failure::Upstream(UpstreamError::Reset(_)) => {
            any_5xx || on.intersects(RetryOn::RESET | RetryOn::REFUSED_STREAM)
        }
    }
}

/// Envoy's fully jittered exponential back-off: uniform in `[0, base * 2^(n-1))`, capped.
fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let base = policy.backoff_base.as_micros() as u64;
    let ceiling = base.saturating_mul(1u64 << (attempt.saturating_sub(1)).min(20));
    let cap = policy.backoff_max.as_micros() as u64;
    Duration::from_micros(fastrand::u64(0..=ceiling.min(cap).max(1)))
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The copy of a request body kept for retries.
#[derive(Debug, Default)]
struct Copy {
    data: BytesMut,
    trailers: Option<HeaderMap>,
    complete: bool,
    overflow: bool,
}

impl Copy {
    fn replayable(&self) -> bool {
        self.complete && !self.overflow
    }

    fn replay(&self) -> Option<ReqBody> {
        if !self.replayable() {
            return None;
        }
        let data = self.data.clone().freeze();
        Some(match &self.trailers {
            None => Full::new(data)
                .map_err(|never| -> BoxError { match never {} })
                .boxed(),
            Some(trailers) => {
                let frames = [Ok(Frame::data(data)), Ok(Frame::trailers(trailers.clone()))];
                http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// Streams a body while copying it for a retry.
    struct Tee {
        #[pin]
        inner: Incoming,
        copy: Arc<Mutex<Copy>>,
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let frame = match this.inner.poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(f) => f,
        };
        let mut copy = this.copy.lock().unwrap_or_else(|p| p.into_inner());
        match &frame {
            None => copy.complete = true,
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if copy.data.len() + data.len() > RETRY_BUFFER_LIMIT {
                        copy.overflow = true;
                        copy.data = BytesMut::new();
                    } else if !copy.overflow {
                        copy.data.extend_from_slice(data);
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    copy.trailers = Some(trailers.clone());
                }
            }
            Some(Err(_)) => copy.overflow = true,
        }
        drop(copy);
        Poll::Ready(frame.map(|f| f.map_err(|e| -> BoxError { Box::new(e) })))
    }

    fn is_end_stream(&self) -> bool {
        // The codec may stop polling once the body says it is done (an empty body, or all
        // of a Content-Length sent): the copy is complete then too.
        let end = self.inner.is_end_stream();
        if end {
            self.copy.lock().unwrap_or_else(|p| p.into_inner()).complete = true;
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A response body that fails when the route timeout expires.
    struct Deadline {
        #[pin]
        inner: UpstreamBody,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
        idle: Option<IdleTimer>,
        cluster: Arc<ClusterState>,
    }
}

impl Body for Deadline {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(sleep) = this.sleep
            && sleep.as_mut().poll(cx).is_ready()
        {
            this.cluster.stats.timeouts.inc();
            return Poll::Ready(Some(Err(
                "upstream request timeout during the response body".into(),
            )));
        }
        match this.inner.poll_frame(cx) {
            Poll::Pending => {
                if let Some(idle) = this.idle
                    && idle.poll_expired(cx)
                {
                    return Poll::Ready(Some(Err(
                        "stream idle timeout during the response body".into()
                    )));
                }
                Poll::Pending
            }
            Poll::Ready(f) => {
                if let Some(idle) = this.idle {
                    idle.reset();
                }
                Poll::Ready(f.map(|f| f.map_err(|e| -> BoxError { Box::new(e) })))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_like_the_spec_says() {
        assert_eq!(
            parse_grpc_timeout(b"100m"),
            Some(Duration::from_millis(100))
        );
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"5n"), Some(Duration::from_nanos(5)));
        assert_eq!(parse_grpc_timeout(b"123456789S"), None, "at most 8 digits");
        assert_eq!(parse_grpc_timeout(b"S"), None);
        assert_eq!(parse_grpc_timeout(b""), None);
        assert_eq!(parse_grpc_timeout(b"1x"), None);
        assert_eq!(parse_grpc_timeout(b"-1S"), None);
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let policy = RetryPolicy {
            retry_on: RetryOn::FIVE_XX,
            num_retries: 3,
            per_try_timeout: None,
            per_try_idle_timeout: None,
            retriable_status_codes: vec![],
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
        };
        for attempt in 1..10 {
            let ceiling =
                Duration::from_millis(25 * (1 << (attempt - 1))).min(Duration::from_millis(250));
            for _ in 0..50 {
                assert!(backoff(&policy, attempt) <= ceiling);
            }
        }
    }
}
