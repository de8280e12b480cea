//! Real upstreams and clients for the L7 tests: hyper servers and clients on loopback.
#![allow(dead_code)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// An upstream that answers with JSON describing what it received.
///
/// Request headers steer it: `x-echo-status: N` answers N; `x-echo-delay-ms: N` waits
/// first; `x-echo-fail-first: N` answers 503 to the first N requests it sees.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// HTTP/1.1 and h2c (prior knowledge) on one port.
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicU32::new(0));
        let (name_owned, counter) = (name.to_owned(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (name, counter) = (name_owned.clone(), counter.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let (name, counter) = (name.clone(), counter.clone());
                        async move { Ok::<_, Infallible>(echo(&name, &counter, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            name: name.to_owned(),
            addr,
            requests,
            task,
        }
    }

    pub fn count(&self) -> u32 {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn echo(name: &str, counter: &AtomicU32, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
    let header = |k: &str| {
        req.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    if let Some(ms) = header("x-echo-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut status = header("x-echo-status").unwrap_or(200) as u16;
    if header("x-echo-fail-first").is_some_and(|f| u64::from(n) <= f) {
        status = 503;
    }
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::Value::from(v.to_str().unwrap_or("?")),
            )
        })
        .collect();
    let version = format!("{:?}", req.version());
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let authority = req.uri().authority().map(|a| a.to_string());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let doc = serde_json::json!({
        "upstream": name,
        "method": method,
        "path": path,
        "authority": authority,
        "version": version,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    let mut r = Response::new(Full::new(Bytes::from(doc.to_string())));
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    r.headers_mut().insert(
        "x-upstream",
        http::HeaderValue::from_str(name).expect("name"),
    );
    r
}

/// A response, read whole.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn upstream(&self) -> Option<String> {
        self.json()
            .get("upstream")
            .and_then(|u| u.as_str())
            .map(str::to_owned)
    }

    /// A request header as the upstream saw it.
    pub fn seen(&self, name: &str) -> Option<String> {
        self.json()
            .get("headers")
            .and_then(|h| h.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One HTTP/1.1 request on a new connection.
pub async fn get(proxy: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Got {
    let stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect proxy");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("response");
    read(resp).await
}

pub async fn read(resp: Response<Incoming>) -> Got {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The snapshot of a bootstrap that must translate without errors.
pub fn snapshot(yaml: &str) -> nodemesh_config::model::Snapshot {
    let t = nodemesh_config::load_bootstrap(yaml).expect("bootstrap parses");
    assert!(
        t.diagnostics.errors.is_empty(),
        "{:?}",
        t.diagnostics.errors
    );
    t.snapshot.expect("snapshot")
}

/// The proxy serving `yaml` with default tenant limits, and its first listener's address.
pub async fn start(yaml: &str) -> (nodemesh_http::server::Standalone, SocketAddr) {
    let running =
        nodemesh_http::server::start(snapshot(yaml), nodemesh_http::TenantLimits::default())
            .await
            .expect("proxy starts");
    let addr = running.listeners[0].1;
    (running, addr)
}
