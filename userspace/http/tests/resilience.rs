//! Endpoint health and hostile or slow clients, through the real proxy on loopback: active
//! health checks, outlier ejection, HTTP/2 floods (rapid reset, PING and SETTINGS floods),
//! slow headers and slow bodies, idle connections, and upstream connection reuse limits.
//! Every test checks what the client got, what the metrics say, and that other
//! connections were served meanwhile.
mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use common::{Upstream, get};
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodemesh_http::{TenantLimits, server::Standalone, workers::Workers};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// Starts the proxy on `yaml` with `{name}` placeholders replaced by ports.
async fn proxy(yaml: &str, ports: &[(&str, u16)]) -> (Standalone, SocketAddr) {
    proxy_on(yaml, ports, Workers::current()).await
}

/// [`proxy`], serving its connections on `workers`.
async fn proxy_on(yaml: &str, ports: &[(&str, u16)], workers: Workers) -> (Standalone, SocketAddr) {
    let mut text = yaml.to_owned();
    for (name, port) in ports {
        text = text.replace(&format!("{{{name}}}"), &port.to_string());
    }
    let running = nodemesh_http::server::start_with(
        common::snapshot(&text),
        TenantLimits::default(),
        prometheus_client::registry::Registry::default(),
        workers,
    )
    .await
    .expect("proxy starts");
    let addr = running.listeners[0].1;
    (running, addr)
}

/// The admin's Prometheus text.
async fn metrics(running: &Standalone) -> String {
    let admin = running.admin.expect("admin");
    String::from_utf8_lossy(&get(admin, "admin", "/stats/prometheus", &[]).await.body).into_owned()
}

/// The value of the first series whose line starts with `prefix`.
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Cluster `c` with the one endpoint `{a}`.
const ONE_ENDPOINT: &str = r#"  - name: c
    connect_timeout: 1s
    load_assignment:
      cluster_name: c
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {a} } } }
"#;

/// An upstream whose health endpoint and answers are switched by the test: it counts the
/// connections it accepted and answers `/health` with 200 or 503, and everything else
/// with `status`.
#[derive(Debug)]
struct Switchable {
    addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    status: Arc<AtomicU32>,
    connections: Arc<AtomicU32>,
    /// Connections the proxy has closed (or that failed).
    closed: Arc<AtomicU32>,
    requests: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Switchable {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Switchable {
    /// Waits until the proxy has closed one of the connections to this upstream.
    async fn closed_within(&self, limit: Duration, what: &str) {
        let closed = async {
            while self.closed.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(limit, closed)
            .await
            .unwrap_or_else(|_| panic!("{what}: not within {limit:?}"));
    }

    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let healthy = Arc::new(AtomicBool::new(true));
        let status = Arc::new(AtomicU32::new(200));
        let connections = Arc::new(AtomicU32::new(0));
        let requests = Arc::new(AtomicU32::new(0));
        let closed = Arc::new(AtomicU32::new(0));
        let (h, s, c, r, done) = (
            healthy.clone(),
            status.clone(),
            connections.clone(),
            requests.clone(),
            closed.clone(),
        );
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (h, s, r, done) = (h.clone(), s.clone(), r.clone(), done.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<_>| {
                        let code = if req.uri().path() == "/health" {
                            if h.load(Ordering::SeqCst) { 200 } else { 503 }
                        } else {
                            r.fetch_add(1, Ordering::SeqCst);
                            s.load(Ordering::SeqCst) as u16
                        };
                        async move {
                            let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                            *resp.status_mut() =
                                http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::OK);
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    done.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            healthy,
            status,
            connections,
            closed,
            requests,
            task,
        }
    }
}

const ADMIN: &str = "admin: { address: { socket_address: { address: 127.0.0.1, port_value: 0 } } }";

fn listener(hcm_extra: &str, cluster: &str) -> String {
    format!(
        r#"{ADMIN}
static_resources:
  listeners:
  - name: main
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main
{hcm_extra}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: c }}
  clusters:
{cluster}"#
    )
}

fn endpoints(ports: &[&str]) -> String {
    ports
        .iter()
        .map(|p| {
            format!("        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {{{p}}} }} }} }}\n")
        })
        .collect()
}

/// Polls `f` until it is true or `within` passes.
async fn eventually(within: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let until = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < until {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn active_health_checks_take_an_endpoint_out_and_back() {
    let a = Switchable::start().await;
    let b = Switchable::start().await;
    let cluster = format!(
        r#"  - name: c
    connect_timeout: 1s
    health_checks:
    - timeout: 0.2s
      interval: 0.05s
      healthy_threshold: 1
      unhealthy_threshold: 2
      http_health_check: {{ path: /health }}
    load_assignment:
      cluster_name: c
      endpoints:
      - lb_endpoints:
{}"#,
        endpoints(&["a", "b"])
    );
    let (_running, addr) = proxy(
        &listener("", &cluster),
        &[("a", a.addr.port()), ("b", b.addr.port())],
    )
    .await;
    // Endpoints under active checking start unhealthy until their first check passes.
    assert!(
        eventually(Duration::from_secs(5), async || get(addr, "h", "/", &[])
            .await
            .status
            == 200)
        .await
    );
    b.healthy.store(false, Ordering::SeqCst);
    let out = eventually(Duration::from_secs(5), async || {
        let before = b.requests.load(Ordering::SeqCst);
        for _ in 0..4 {
            get(addr, "h", "/", &[]).await;
        }
        b.requests.load(Ordering::SeqCst) == before
    })
    .await;
    assert!(out, "the failing endpoint is taken out of rotation");
    // Out of rotation: every request goes to a.
    let (a0, b0) = (
        a.requests.load(Ordering::SeqCst),
        b.requests.load(Ordering::SeqCst),
    );
    for _ in 0..10 {
        assert_eq!(get(addr, "h", "/", &[]).await.status, 200);
    }
    assert_eq!(b.requests.load(Ordering::SeqCst), b0);
    assert_eq!(a.requests.load(Ordering::SeqCst), a0 + 10);
    // Healthy again: back in rotation.
    b.healthy.store(true, Ordering::SeqCst);
    let back = eventually(Duration::from_secs(5), async || {
        let before = b.requests.load(Ordering::SeqCst);
        for _ in 0..4 {
            get(addr, "h", "/", &[]).await;
        }
        b.requests.load(Ordering::SeqCst) > before
    })
    .await;
    assert!(back, "the recovered endpoint is used again");
}

#[tokio::test]
async fn consecutive_5xx_eject_an_endpoint() {
    let a = Switchable::start().await;
    let b = Switchable::start().await;
    b.status.store(500, Ordering::SeqCst);
    let cluster = format!(
        r#"  - name: c
    connect_timeout: 1s
    outlier_detection:
      consecutive_5xx: 3
      interval: 1s
      base_ejection_time: 30s
      max_ejection_percent: 50
    load_assignment:
      cluster_name: c
      endpoints:
      - lb_endpoints:
{}"#,
        endpoints(&["a", "b"])
    );
    let (running, addr) = proxy(
        &listener("", &cluster),
        &[("a", a.addr.port()), ("b", b.addr.port())],
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(get(addr, "h", "/", &[]).await.status);
    }
    // Round robin sends every other request to b until its third 500 ejects it.
    assert_eq!(b.requests.load(Ordering::SeqCst), 3, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 500).count(), 3);
    assert!(statuses[statuses.len() - 10..].iter().all(|s| *s == 200));
    let text = metrics(&running).await;
    assert!(
        metric(
            &text,
            "nodemesh_outlier_detection_ejections_total{cluster=\"c\"}"
        ) >= 1.0,
        "{text}"
    );
}

#[tokio::test]
async fn upstream_connections_carry_at_most_max_requests_per_connection() {
    let a = Switchable::start().await;
    let cluster = r#"  - name: c
    connect_timeout: 1s
    max_requests_per_connection: 2
    load_assignment:
      cluster_name: c
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {a} } } }
"#;
    let (_running, addr) = proxy(&listener("", cluster), &[("a", a.addr.port())]).await;
    for _ in 0..6 {
        assert_eq!(get(addr, "h", "/", &[]).await.status, 200);
        // Let the finished connection return to the pool.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.requests.load(Ordering::SeqCst), 6);
    assert_eq!(a.connections.load(Ordering::SeqCst), 3, "two requests each");
}

#[tokio::test]
async fn idle_upstream_connections_close_at_the_cluster_idle_timeout() {
    let cluster = |timeout: &str| {
        format!(
            r#"  - name: c
    connect_timeout: 1s
    common_http_protocol_options: {{ idle_timeout: {timeout} }}
    load_assignment:
      cluster_name: c
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {{a}} }} }} }}
"#
        )
    };
    let a = Switchable::start().await;
    let (_running, addr) = proxy(&listener("", &cluster("0.3s")), &[("a", a.addr.port())]).await;
    assert_eq!(get(addr, "h", "/", &[]).await.status, 200);
    // Nothing else is sent: only the timeout can close the pooled connection.
    a.closed_within(
        Duration::from_secs(5),
        "the idle upstream connection is closed",
    )
    .await;
    assert_eq!(get(addr, "h", "/", &[]).await.status, 200);
    assert_eq!(a.connections.load(Ordering::SeqCst), 2, "a new connection");

    // 0 disables the timeout, as in Envoy: the connection is still reused later.
    let b = Switchable::start().await;
    let (_running, addr) = proxy(&listener("", &cluster("0s")), &[("a", b.addr.port())]).await;
    for _ in 0..2 {
        assert_eq!(get(addr, "h", "/", &[]).await.status, 200);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 1);
    assert_eq!(b.closed.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_upstream_connection_is_reused_after_read_and_bodiless_responses() {
    let a = Switchable::start().await;
    let (_running, addr) = proxy(&listener("", ONE_ENDPOINT), &[("a", a.addr.port())]).await;
    // A body read to its end returns the connection as its last frame passes; a 204's
    // body is never polled, and returns it when dropped.
    for status in [200, 204, 200, 204, 204, 200] {
        a.status.store(status, Ordering::SeqCst);
        assert_eq!(get(addr, "h", "/", &[]).await.status, status as u16);
    }
    assert_eq!(a.requests.load(Ordering::SeqCst), 6);
    assert_eq!(
        a.connections.load(Ordering::SeqCst),
        1,
        "one connection, reused"
    );
}

#[tokio::test]
async fn idle_http2_upstream_connections_close_at_the_cluster_idle_timeout() {
    let cluster = r#"  - name: c
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: { idle_timeout: 0.3s }
        explicit_http_config: { http2_protocol_options: {} }
    load_assignment:
      cluster_name: c
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {a} } } }
"#;
    let a = Switchable::start().await;
    let (_running, addr) = proxy(&listener("", cluster), &[("a", a.addr.port())]).await;
    // Requests within the timeout share the one connection.
    for _ in 0..3 {
        assert_eq!(get(addr, "h", "/", &[]).await.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        a.connections.load(Ordering::SeqCst),
        1,
        "one shared connection"
    );
    a.closed_within(
        Duration::from_secs(5),
        "the idle HTTP/2 upstream connection is closed",
    )
    .await;
    assert_eq!(get(addr, "h", "/", &[]).await.status, 200);
    assert_eq!(a.connections.load(Ordering::SeqCst), 2, "a new connection");
}

/// Raw HTTP/2 frames for the flood tests.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Writes `bytes` and reads until the proxy closes the connection or 5 s pass; returns
/// whether it closed and the frame types it sent.
async fn flood(addr: SocketAddr, bytes: Vec<u8>) -> (bool, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = s.split();
    let write = async {
        let _ = wr.write_all(&bytes).await;
    };
    let read = async {
        let mut got = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut got))
            .await
            .is_ok();
        (closed, got)
    };
    let ((), (closed, got)) = tokio::join!(write, read);
    let mut kinds = Vec::new();
    let mut i = 0;
    while i + 9 <= got.len() {
        let len =
            (usize::from(got[i]) << 16) | (usize::from(got[i + 1]) << 8) | usize::from(got[i + 2]);
        kinds.push(got[i + 3]);
        i += 9 + len;
    }
    (closed, kinds)
}

const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;

/// A HEADERS frame for `GET /` on `stream` (HPACK: static-table indexed fields only, plus
/// `:authority` as a literal without indexing).
fn get_headers(stream: u32) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x84]; // :method GET, :scheme http, :path /
    block.extend([0x01, 0x01, b'h']); // :authority h (literal, name index 1)
    frame(1, 0x05, stream, &block) // END_STREAM | END_HEADERS
}

#[tokio::test]
async fn http2_floods_end_the_flooding_connection_only() {
    let a = Upstream::start("a").await;
    let cluster = ONE_ENDPOINT;
    let (running, addr) = proxy(&listener("", cluster), &[("a", a.addr.port())]).await;

    // Rapid reset (CVE-2023-44487): open streams and cancel them at once.
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(4, 0, 0, &[]));
    for i in 0..2000u32 {
        let stream = 2 * i + 1;
        bytes.extend(get_headers(stream));
        bytes.extend(frame(3, 0, stream, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    let (closed, kinds) = flood(addr, bytes).await;
    assert!(closed, "the proxy ends a rapid-reset connection");
    assert!(kinds.contains(&GOAWAY), "with a GOAWAY: {kinds:?}");
    assert!(
        a.count() < 2000,
        "not every reset stream reached the upstream ({})",
        a.count()
    );

    // PING flood: answered in order (the codec keeps at most one pong pending, so a flooder
    // that does not read is held back by TCP, not buffered for); it must not starve others.
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(4, 0, 0, &[]));
    for i in 0..50_000u64 {
        bytes.extend(frame(6, 0, 0, &i.to_be_bytes()));
    }
    let pinger = tokio::spawn(flood(addr, bytes));
    assert_eq!(
        get(addr, "h", "/", &[]).await.status,
        200,
        "others are served"
    );
    let (_, kinds) = pinger.await.expect("ping flood");
    let pongs = kinds.iter().filter(|k| **k == PING).count();
    assert!((1..=50_000).contains(&pongs), "pongs: {pongs}");

    // SETTINGS flood.
    let mut bytes = PREFACE.to_vec();
    for _ in 0..50_000 {
        bytes.extend(frame(4, 0, 0, &[0, 3, 0, 0, 0, 100])); // MAX_CONCURRENT_STREAMS 100
    }
    let settings = tokio::spawn(flood(addr, bytes));
    assert_eq!(
        get(addr, "h", "/", &[]).await.status,
        200,
        "others are served"
    );
    let (_, kinds) = settings.await.expect("settings flood");
    let acks = kinds.iter().filter(|k| **k == SETTINGS).count();
    assert!(acks >= 1, "settings are acknowledged: {kinds:?}");

    // A garbage preface is a protocol error, counted.
    let (closed, _) = flood(
        addr,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff".to_vec(),
    )
    .await;
    assert!(closed);
    assert_eq!(get(addr, "h", "/", &[]).await.status, 200);
    let text = metrics(&running).await;
    assert!(
        metric(&text, "nodemesh_downstream_protocol_errors_total") >= 1.0,
        "the floods are counted: {text}"
    );
}

#[tokio::test]
async fn slow_headers_are_cut_but_idle_keep_alive_waits_for_the_idle_timeout() {
    let a = Upstream::start("a").await;
    let cluster = ONE_ENDPOINT;
    let hcm = "          request_headers_timeout: 0.3s\n          common_http_protocol_options: { idle_timeout: 1.2s }";
    let (running, addr) = proxy(&listener(hcm, cluster), &[("a", a.addr.port())]).await;

    // A client that starts its headers and never finishes them is closed.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "closed after the header timeout");

    // A kept-alive connection idle for longer than the header timeout is still usable ...
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let conn = tokio::spawn(conn);
    let req = || {
        Request::get("/")
            .header("host", "h")
            .body(Full::new(Bytes::new()))
            .expect("request")
    };
    assert_eq!(
        sender.send_request(req()).await.expect("first").status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    sender.ready().await.expect("still open after 0.6 s idle");
    assert_eq!(
        sender.send_request(req()).await.expect("second").status(),
        200
    );
    // ... until the idle timeout closes it.
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "the idle timeout closed the connection");
    let text = metrics(&running).await;
    assert!(
        metric(
            &text,
            "nodemesh_downstream_protocol_errors_total{kind=\"header_timeout\"}"
        ) >= 1.0,
        "{text}"
    );
}

#[tokio::test]
async fn a_request_body_slower_than_request_timeout_gets_408() {
    let a = Upstream::start("a").await;
    let cluster = ONE_ENDPOINT;
    let hcm = "          request_timeout: 0.3s";
    let (_running, addr) = proxy(&listener(hcm, cluster), &[("a", a.addr.port())]).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n12345")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("answered before the test deadline")
        .expect("read");
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.ends_with("request timeout"), "{reply}");
    // A request sent in time is not affected.
    assert_eq!(get(addr, "h", "/", &[]).await.status, 200);
}

/// Connections served by different workers keep to their own upstream pools: a pooled
/// connection never carries a request of another worker's thread (which would wake that
/// thread for every request), and within a worker it is reused.
#[tokio::test]
async fn each_worker_reuses_its_own_upstream_connections() {
    let a = Switchable::start().await;
    let cluster = ONE_ENDPOINT;
    let workers = Workers::start(2, "nm-t-pool").expect("workers");
    let (running, addr) = proxy_on(
        &listener("", cluster),
        &[("a", a.addr.port())],
        workers.clone(),
    )
    .await;
    // Two kept-alive client connections, open together: one on each worker.
    let mut clients = Vec::new();
    for _ in 0..2 {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        clients.push(sender);
    }
    for _ in 0..3 {
        for sender in &mut clients {
            let req = Request::get("/")
                .header("host", "h")
                .body(Full::new(Bytes::new()))
                .expect("request");
            let got = common::read(sender.send_request(req).await.expect("response")).await;
            assert_eq!(got.status, 200);
            // Let the upstream connection return to its pool.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(workers.connections(), vec![1, 1]);
    assert_eq!(a.requests.load(Ordering::SeqCst), 6);
    // One shared pool would have carried all six on one connection.
    assert_eq!(a.connections.load(Ordering::SeqCst), 2, "one per worker");
    let text = metrics(&running).await;
    assert!(
        text.contains("nodemesh_worker_connections{worker=\"1\"} 1"),
        "{text}"
    );
    // Every accepted socket moved to its worker.
    assert!(
        text.contains("nodemesh_worker_handoff_failures_total 0"),
        "{text}"
    );
    drop(clients);
    drop(running);
    workers.shutdown(Duration::from_secs(1));
}
