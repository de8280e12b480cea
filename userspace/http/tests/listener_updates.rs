//! `Standalone::apply`: listeners added, removed (draining with a drain time) and kept
//! across a configuration update, on real loopback sockets with real upstreams.
mod common;

use std::{net::SocketAddr, time::Duration};

use common::{Upstream, get, snapshot};
use nodemesh_http::{TenantLimits, server};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

fn listener(name: &str, port: u16, routes: &[(&str, &str)]) -> String {
    let routes: String = routes
        .iter()
        .map(|(prefix, c)| {
            format!(
                "              - match: {{ prefix: \"{prefix}\" }}\n                route: {{ cluster: {c} }}\n"
            )
        })
        .collect();
    format!(
        r#"  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            name: {name}
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{routes}"#
    )
}

fn bootstrap(listeners: &[String], upstreams: &[&Upstream]) -> String {
    let clusters: String = upstreams
        .iter()
        .map(|u| {
            format!(
                "  - name: {n}\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: {n}\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }}\n",
                n = u.name,
                p = u.addr.port()
            )
        })
        .collect();
    format!(
        "admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }} }}\nstatic_resources:\n  listeners:\n{}  clusters:\n{clusters}",
        listeners.concat()
    )
}

/// A kept-alive HTTP/1.1 connection spoken by hand, to see exactly what the proxy sends
/// and when it closes.
struct Raw(TcpStream);

impl Raw {
    async fn connect(addr: SocketAddr) -> Self {
        Self(TcpStream::connect(addr).await.expect("connect"))
    }

    /// Sends a GET and reads its response: (lowercased head, body).
    async fn get(&mut self, path: &str, headers: &str) -> (String, String) {
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n{headers}\r\n");
        self.0.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = self.0.read(&mut chunk).await.expect("read");
            assert!(
                n > 0,
                "closed before the response: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().expect("content-length"))
            .expect("content-length in the response");
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 4096];
            let n = self.0.read(&mut chunk).await.expect("read body");
            assert!(n > 0, "closed in the body");
            buf.extend_from_slice(&chunk[..n]);
        }
        (head, String::from_utf8_lossy(&buf[head_end..]).into_owned())
    }

    /// Waits (up to `limit`) for the proxy to close the connection; false if it did not.
    async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut chunk = [0u8; 64];
        matches!(
            tokio::time::timeout(limit, self.0.read(&mut chunk)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

async fn refused(addr: SocketAddr) -> bool {
    // The accept task is aborted asynchronously: give it a moment to drop the socket.
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn an_added_listener_is_bound_and_served() {
    let a = Upstream::start("a").await;
    let one = listener("one", 0, &[("/", "a")]);
    let mut running = server::start(
        snapshot(&bootstrap(std::slice::from_ref(&one), &[&a])),
        TenantLimits::default(),
    )
    .await
    .expect("starts");
    let first = running.listener("one").expect("one bound");
    let mut open = Raw::connect(first).await;
    assert!(open.get("/", "").await.0.starts_with("http/1.1 200"));

    let two = listener("two", 0, &[("/", "a")]);
    let applied = running
        .apply(
            snapshot(&bootstrap(&[one, two], &[&a])),
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(applied.kept, ["one"]);
    assert_eq!(applied.bound.len(), 1);
    assert!(applied.failed.is_empty() && applied.draining.is_empty());
    let second = running.listener("two").expect("two bound");
    assert_eq!(
        running.listener("one"),
        Some(first),
        "kept listener not rebound"
    );
    assert_eq!(
        get(second, "x", "/", &[]).await.upstream().as_deref(),
        Some("a")
    );
    // The first listener's open connection is untouched.
    let (head, _) = open.get("/", "").await;
    assert!(
        head.starts_with("http/1.1 200") && !head.contains("connection: close"),
        "{head}"
    );
}

#[tokio::test]
async fn a_removed_listener_stops_accepting_and_drains_its_connections() {
    let a = Upstream::start("a").await;
    let keep = listener("keep", 0, &[("/", "a")]);
    let gone = listener("gone", 0, &[("/", "a")]);
    let mut running = server::start(
        snapshot(&bootstrap(&[keep.clone(), gone], &[&a])),
        TenantLimits::default(),
    )
    .await
    .expect("starts");
    let gone_addr = running.listener("gone").expect("bound");
    // Three kept-alive connections: one with a request in flight during the update, one
    // that sends its next request during the drain, one that stays idle.
    let mut busy = Raw::connect(gone_addr).await;
    let mut next = Raw::connect(gone_addr).await;
    let mut idle = Raw::connect(gone_addr).await;
    for c in [&mut busy, &mut next, &mut idle] {
        assert!(c.get("/", "").await.0.starts_with("http/1.1 200"));
    }
    let in_flight = tokio::spawn(async move {
        let got = busy.get("/", "x-echo-delay-ms: 300\r\n").await;
        (busy, got)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let drain = Duration::from_secs(2);
    let applied = running
        .apply(snapshot(&bootstrap(&[keep], &[&a])), drain)
        .await;
    assert_eq!(applied.draining, ["gone"]);
    assert_eq!(applied.kept, ["keep"]);
    assert_eq!(running.listener("gone"), None);
    assert!(
        refused(gone_addr).await,
        "the removed listener's port still accepts"
    );

    // The request in flight finishes, told that the connection closes.
    let (mut busy, (head, _)) = in_flight.await.expect("in flight");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(busy.closed_within(Duration::from_secs(5)).await);
    // A kept-alive connection is still served during the drain, its response is its last.
    let (head, _) = next.get("/", "").await;
    assert!(
        head.starts_with("http/1.1 200") && head.contains("connection: close"),
        "{head}"
    );
    assert!(next.closed_within(Duration::from_secs(5)).await);
    // An idle one stays open until the drain time is over, then is closed.
    assert!(
        !idle.closed_within(Duration::from_millis(200)).await,
        "closed before the drain time"
    );
    assert!(
        idle.closed_within(drain * 3).await,
        "still open after the drain time"
    );
    // The kept listener serves on.
    let keep_addr = running.listener("keep").expect("kept");
    assert_eq!(get(keep_addr, "x", "/", &[]).await.status, 200);
}

#[tokio::test]
async fn a_kept_listeners_open_connection_gets_the_new_routes() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let v1 = listener("main", 0, &[("/", "a")]);
    let mut running = server::start(
        snapshot(&bootstrap(&[v1], &[&a, &b])),
        TenantLimits::default(),
    )
    .await
    .expect("starts");
    let addr = running.listener("main").expect("bound");
    let mut open = Raw::connect(addr).await;
    let (_, body) = open.get("/", "").await;
    assert!(body.contains(r#""upstream":"a""#), "{body}");

    let v2 = listener("main", 0, &[("/", "b")]);
    let applied = running
        .apply(
            snapshot(&bootstrap(&[v2], &[&a, &b])),
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(applied.kept, ["main"]);
    assert_eq!(running.listener("main"), Some(addr));
    // Same connection, next request: the new route.
    let (head, body) = open.get("/", "").await;
    assert!(!head.contains("connection: close"), "{head}");
    assert!(body.contains(r#""upstream":"b""#), "{body}");
    // And new connections.
    assert_eq!(
        get(addr, "x", "/", &[]).await.upstream().as_deref(),
        Some("b")
    );
}

#[tokio::test]
async fn a_bind_failure_is_reported_and_the_rest_applied() {
    let a = Upstream::start("a").await;
    // A port someone else holds.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let one = listener("one", 0, &[("/", "a")]);
    let mut running = server::start(
        snapshot(&bootstrap(std::slice::from_ref(&one), &[&a])),
        TenantLimits::default(),
    )
    .await
    .expect("starts");
    let bad = listener("bad", taken_port, &[("/", "a")]);
    let good = listener("good", 0, &[("/", "a")]);
    let applied = running
        .apply(
            snapshot(&bootstrap(&[one, bad, good], &[&a])),
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(applied.failed.len(), 1);
    assert_eq!(applied.failed[0].0, "bad");
    assert_eq!(applied.failed[0].2.kind(), std::io::ErrorKind::AddrInUse);
    assert_eq!(applied.kept, ["one"]);
    let good_addr = running.listener("good").expect("good bound despite bad");
    assert_eq!(get(good_addr, "x", "/", &[]).await.status, 200);
    assert_eq!(running.listener("bad"), None);
    // Counted on the admin port.
    let admin = running.admin.expect("admin");
    let metrics = get(admin, "x", "/stats/prometheus", &[]).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains(r#"nodemesh_listener_bind_failures_total{listener="bad"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn http2_connections_of_a_removed_listener_get_a_goaway() {
    let a = Upstream::start("a").await;
    let gone = listener("gone", 0, &[("/", "a")]);
    let mut running = server::start(
        snapshot(&bootstrap(std::slice::from_ref(&gone), &[&a])),
        TenantLimits::default(),
    )
    .await
    .expect("starts");
    let addr = running.listener("gone").expect("bound");
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2c handshake");
    let conn = tokio::spawn(conn);
    let req = || {
        http::Request::get(format!("http://{addr}/"))
            .header("x-echo-delay-ms", "300")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request")
    };
    let in_flight = sender.send_request(req());
    let in_flight = tokio::spawn(in_flight);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A drain time far longer than the test: only a GOAWAY can end the connection early.
    let applied = running
        .apply(snapshot(&bootstrap(&[], &[&a])), Duration::from_secs(600))
        .await;
    assert_eq!(applied.draining, ["gone"]);
    let response = in_flight
        .await
        .expect("task")
        .expect("the open stream finishes");
    assert_eq!(response.status(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(
        ended.is_ok(),
        "the HTTP/2 connection did not end after GOAWAY"
    );
    assert!(
        sender.send_request(req()).await.is_err(),
        "no new stream after GOAWAY"
    );
}

#[tokio::test]
async fn a_listener_that_moves_is_rebound_and_its_old_socket_drains() {
    let a = Upstream::start("a").await;
    let (p1, p2) = (common::free_port(), common::free_port());
    let mut running = server::start(
        snapshot(&bootstrap(&[listener("main", p1, &[("/", "a")])], &[&a])),
        TenantLimits::default(),
    )
    .await
    .expect("starts");
    let old = running.listener("main").expect("bound");
    let mut open = Raw::connect(old).await;
    assert!(open.get("/", "").await.0.starts_with("http/1.1 200"));
    let applied = running
        .apply(
            snapshot(&bootstrap(&[listener("main", p2, &[("/", "a")])], &[&a])),
            Duration::from_millis(300),
        )
        .await;
    assert_eq!(applied.draining, ["main"]);
    assert_eq!(applied.bound.len(), 1);
    let new = running.listener("main").expect("rebound");
    assert_eq!(new.port(), p2);
    assert!(refused(old).await, "the old address still accepts");
    assert_eq!(get(new, "x", "/", &[]).await.status, 200);
    // The connection on the old socket drains like a removed listener's.
    let (head, _) = open.get("/", "").await;
    assert!(head.contains("connection: close"), "{head}");
}

/// The xDS client applies updates from its own task: `apply`'s future must be `Send`.
#[allow(dead_code)]
fn apply_can_run_on_another_task(
    running: &mut server::Standalone,
    snapshot: nodemesh_config::model::Snapshot,
) {
    fn send<T: Send>(_: &T) {}
    let apply = running.apply(snapshot, Duration::ZERO);
    send(&apply);
}
