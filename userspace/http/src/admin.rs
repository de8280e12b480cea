//! The admin endpoints, as Envoy's admin port offers them: `/ready`, `/stats/prometheus`,
//! `/clusters`, `/listeners`, `/config_dump` (with xDS), nodemesh's `/xds` (the xDS client)
//! and `/route` explanation (query parameters
//! `listener`, `host`, `path`, `method`, `destination`, and `header=name:value` repeated).
use std::{convert::Infallible, fmt::Write as _, net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::{Engine, explain, local::full, router::RespBody};

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>, registry: Arc<Registry>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                continue;
            }
        };
        let (engine, registry) = (engine.clone(), registry.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let (engine, registry) = (engine.clone(), registry.clone());
                async move { Ok::<_, Infallible>(handle(&engine, &registry, &req)) }
            });
            let result = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = result {
                debug!(%peer, error = %e, "admin connection failed");
            }
        });
    }
}

fn text(status: StatusCode, body: String) -> Response<RespBody> {
    let mut r = Response::new(full(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A JSON answer, or 404 when the proxy is not configured dynamically.
fn json_or_404(value: Option<serde_json::Value>) -> Response<RespBody> {
    match value {
        Some(v) => {
            let mut r = text(StatusCode::OK, format!("{v:#}\n"));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        None => text(
            StatusCode::NOT_FOUND,
            "no xDS: the configuration is static (the bootstrap file is the config)\n".into(),
        ),
    }
}

/// Answers one admin request.
pub fn handle<B>(engine: &Engine, registry: &Registry, req: &Request<B>) -> Response<RespBody> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/ready" => text(StatusCode::OK, "LIVE\n".into()),
        "/stats/prometheus" | "/metrics" | "/stats" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, registry) {
                Ok(()) => text(StatusCode::OK, out),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding failed: {e}\n"),
                ),
            }
        }
        "/clusters" => text(StatusCode::OK, clusters(engine)),
        "/listeners" => {
            let state = engine.state();
            let mut out = String::new();
            for l in &state.snapshot.listeners {
                let _ = writeln!(out, "{}::{}", l.name, l.address);
            }
            text(StatusCode::OK, out)
        }
        "/route" => route(engine, req.uri().query().unwrap_or("")),
        "/xds" => json_or_404(engine.xds_status()),
        "/config_dump" => json_or_404(engine.config_dump()),
        _ => text(
            StatusCode::NOT_FOUND,
            "endpoints: /ready /stats/prometheus /clusters /listeners /route /xds /config_dump\n"
                .into(),
        ),
    }
}

/// Envoy's `/clusters` text format: `cluster::address::field::value`.
pub fn clusters(engine: &Engine) -> String {
    let state = engine.state();
    let mut names: Vec<&String> = state.clusters.keys().collect();
    names.sort();
    let mut out = String::new();
    let now = Instant::now();
    for name in names {
        let cluster = &state.clusters[name];
        for host in cluster.hosts().iter() {
            let _ = writeln!(
                out,
                "{name}::{}::health_flags::{}",
                host.address,
                host.health_label()
            );
            let _ = writeln!(out, "{name}::{}::weight::{}", host.address, host.weight);
            let _ = writeln!(
                out,
                "{name}::{}::rq_active::{}",
                host.address,
                host.active_requests
                    .load(std::sync::atomic::Ordering::Relaxed)
            );
            let _ = host.is_healthy(now);
        }
    }
    out
}

fn route(engine: &Engine, query: &str) -> Response<RespBody> {
    let (status, json, body) = explain_query(engine, query);
    let mut r = text(status, body);
    if json {
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    r
}

/// `/route?...`: the status, whether the body is JSON, and the body.
pub fn explain_query(engine: &Engine, query: &str) -> (StatusCode, bool, String) {
    let text = |status, body: String| (status, false, body);
    let mut q = explain::Query {
        listener: String::new(),
        destination: None,
        host: String::new(),
        path: "/".into(),
        method: "GET".into(),
        headers: HeaderMap::new(),
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "listener" => q.listener = v,
            "host" => q.host = v,
            "path" => q.path = v,
            "method" => q.method = v,
            "destination" => match v.parse::<SocketAddr>() {
                Ok(a) => q.destination = Some(a),
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("destination: {e}\n")),
            },
            "header" => {
                let Some((name, value)) = v.split_once(':') else {
                    return text(StatusCode::BAD_REQUEST, "header=name:value\n".into());
                };
                match (
                    HeaderName::from_bytes(name.trim().as_bytes()),
                    HeaderValue::from_str(value.trim()),
                ) {
                    (Ok(n), Ok(v)) => {
                        q.headers.append(n, v);
                    }
                    _ => return text(StatusCode::BAD_REQUEST, format!("invalid header {v:?}\n")),
                }
            }
            other => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {other:?}\n"),
                );
            }
        }
    }
    let state = engine.state();
    match explain::explain(&state.snapshot, &q) {
        Ok(e) => (
            StatusCode::OK,
            true,
            serde_json::to_string_pretty(&e).unwrap_or_default() + "\n",
        ),
        Err(e) => text(StatusCode::NOT_FOUND, format!("{e}\n")),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_decoding_is_total() {
        assert_eq!(super::percent_decode("a%2Fb+c"), "a/b c");
        assert_eq!(super::percent_decode("%"), "%");
        assert_eq!(super::percent_decode("%4"), "%4");
        assert_eq!(super::percent_decode("%zz"), "%zz");
    }
}
