//! The L7 proxy alone (`nodemesh proxy -c`'s engine) on loopback, configured with Envoy
//! bootstraps, in front of real hyper upstreams, driven by real HTTP/1.1 and h2c clients.
mod common;

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use common::{Got, Upstream, get, read};
use http::Request;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodemesh_http::{TenantLimits, server::Standalone};

/// Fills `{a}`, `{b}`, ... with upstream addresses and starts the proxy on the bootstrap.
async fn proxy(
    yaml: &str,
    upstreams: &[&Upstream],
    limits: TenantLimits,
) -> (Standalone, SocketAddr) {
    let mut text = yaml.to_owned();
    for u in upstreams {
        text = text.replace(&format!("{{{}}}", u.name), &u.addr.port().to_string());
    }
    let translated = nodemesh_config::load_bootstrap(&text).expect("bootstrap parses");
    assert!(
        translated.diagnostics.errors.is_empty(),
        "{:?}",
        translated.diagnostics.errors
    );
    let running = nodemesh_http::server::start(translated.snapshot.expect("snapshot"), limits)
        .await
        .expect("proxy starts");
    let addr = running.listeners[0].1;
    (running, addr)
}

const HEAD: &str = r#"
admin: { address: { socket_address: { address: 127.0.0.1, port_value: 0 } } }
static_resources:
  listeners:
  - name: main
    address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
    listener_filters:
    - name: envoy.filters.listener.http_inspector
      typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
"#;

fn cluster(name: &str, ports: &[&str], extra: &str) -> String {
    let endpoints: String = ports
        .iter()
        .map(|p| format!("        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }}\n"))
        .collect();
    format!(
        "  - name: {name}\n    connect_timeout: 1s\n{extra}    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n{endpoints}"
    )
}

fn bootstrap(routes: &str, clusters: &[String]) -> String {
    format!(
        "{HEAD}          route_config:\n            name: local\n{routes}  clusters:\n{}",
        clusters.concat()
    )
}

#[tokio::test]
async fn routes_rewrite_and_mutate_headers_like_envoy() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let routes = r#"            response_headers_to_add:
            - header: { key: x-rc, value: rc }
            virtual_hosts:
            - name: api
              domains: ["api.example.com", "*.api.example.com"]
              request_headers_to_add:
              - header: { key: x-vh, value: vh }
              routes:
              - match: { prefix: "/v1/" }
                route: { cluster: b, prefix_rewrite: "/" }
                request_headers_to_add:
                - header: { key: x-route, value: r1 }
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
                request_headers_to_remove: [x-secret]
                response_headers_to_add:
                - header: { key: x-served-by, value: route-v1 }
              - match:
                  prefix: "/"
                  headers:
                  - name: x-canary
                    string_match: { exact: "yes" }
                route: { cluster: b }
              - match: { prefix: "/" }
                route: { cluster: a }
            - name: other
              domains: ["*"]
              routes:
              - match: { path: "/gone" }
                direct_response: { status: 410, body: { inline_string: "gone\n" } }
              - match: { prefix: "/old/" }
                redirect: { prefix_rewrite: "/new/", response_code: FOUND }
"#;
    let yaml = bootstrap(
        routes,
        &[cluster("a", &["{a}"], ""), cluster("b", &["{b}"], "")],
    );
    let (running, addr) = proxy(&yaml, &[&a, &b], TenantLimits::default()).await;

    let got = get(
        addr,
        "api.example.com",
        "/v1/users?id=3",
        &[("x-secret", "s"), ("x-route", "old")],
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.upstream().as_deref(), Some("b"));
    assert_eq!(got.json()["path"], "/users?id=3");
    assert_eq!(
        got.seen("x-envoy-original-path").as_deref(),
        Some("/v1/users?id=3")
    );
    assert_eq!(got.seen("x-route").as_deref(), Some("r1"));
    assert_eq!(got.seen("x-vh").as_deref(), Some("vh"));
    assert_eq!(got.seen("x-secret"), None);
    assert_eq!(got.seen("x-forwarded-proto").as_deref(), Some("http"));
    assert!(got.seen("x-request-id").is_some_and(|id| id.len() == 36));
    assert_eq!(
        got.seen("x-envoy-expected-rq-timeout-ms").as_deref(),
        Some("15000")
    );
    assert_eq!(got.header("x-served-by"), Some("route-v1"));
    assert_eq!(got.header("x-rc"), Some("rc"));
    assert_eq!(got.header("server"), Some("envoy"));
    assert!(got.header("x-envoy-upstream-service-time").is_some());

    let got = get(addr, "x.api.example.com", "/", &[("x-canary", "yes")]).await;
    assert_eq!(got.upstream().as_deref(), Some("b"));
    let got = get(addr, "api.example.com:80", "/", &[]).await;
    assert_eq!(got.status, 404, "a port must match unless ignored");
    let got = get(addr, "api.example.com", "/", &[]).await;
    assert_eq!(got.upstream().as_deref(), Some("a"));

    let got = get(addr, "elsewhere", "/gone", &[]).await;
    assert_eq!((got.status, &got.body[..]), (410, &b"gone\n"[..]));
    let got = get(addr, "elsewhere:8080", "/old/x?q=1", &[]).await;
    assert_eq!(got.status, 302);
    assert_eq!(
        got.header("location"),
        Some("http://elsewhere:8080/new/x?q=1")
    );
    let got = get(addr, "elsewhere", "/nothing", &[]).await;
    assert_eq!(got.status, 404);

    // Statistics by route and cluster on the admin port.
    let admin = running.admin.expect("admin");
    let stats = get(admin, "admin", "/stats/prometheus", &[]).await;
    let text = String::from_utf8_lossy(&stats.body);
    assert!(
        text.contains(r#"nodemesh_upstream_rq_total{cluster="b",class="2xx"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"nodemesh_route_rq_total{route="local/api/0",class="2xx"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"nodemesh_downstream_rq_local_reply_total{flag="NR"} 2"#),
        "{text}"
    );
    let explained = get(
        admin,
        "admin",
        "/route?listener=main&host=api.example.com&path=/v1/x",
        &[],
    )
    .await;
    let e = explained.json();
    assert_eq!(
        (e["virtual_host"].as_str(), e["route"].as_str()),
        (Some("api"), Some("0"))
    );
    assert_eq!(e["clusters"][0][0], "b");
}

#[tokio::test]
async fn retries_timeouts_and_failures_map_to_envoys_statuses() {
    let a = Upstream::start("a").await;
    let dead = common::free_port().to_string();
    let routes = r#"            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/retry" }
                route:
                  cluster: a
                  retry_policy: { retry_on: "5xx", num_retries: 2, retry_back_off: { base_interval: 0.001s } }
              - match: { prefix: "/slow" }
                route: { cluster: a, timeout: 0.2s }
              - match: { prefix: "/dead" }
                route: { cluster: dead }
              - match: { prefix: "/by-header" }
                route: { cluster_header: x-cluster }
              - match: { prefix: "/" }
                route: { cluster: a }
"#;
    let yaml = bootstrap(
        routes,
        &[cluster("a", &["{a}"], ""), cluster("dead", &[&dead], "")],
    );
    let (running, addr) = proxy(&yaml, &[&a], TenantLimits::default()).await;

    let got = get(addr, "h", "/retry", &[("x-echo-fail-first", "2")]).await;
    assert_eq!(got.status, 200, "two 503s retried: {:?}", got.body);
    assert_eq!(a.count(), 3);
    let got = get(addr, "h", "/slow", &[("x-echo-delay-ms", "2000")]).await;
    assert_eq!(got.status, 504);
    assert_eq!(&got.body[..], b"upstream request timeout");
    let got = get(addr, "h", "/dead", &[]).await;
    assert_eq!(got.status, 503);
    assert!(
        String::from_utf8_lossy(&got.body).contains("connection failure"),
        "{:?}",
        got.body
    );
    let got = get(addr, "h", "/by-header", &[("x-cluster", "nope")]).await;
    assert_eq!(got.status, 503);
    let got = get(addr, "h", "/by-header", &[("x-cluster", "a")]).await;
    assert_eq!(got.upstream().as_deref(), Some("a"));
    let got = get(
        addr,
        "h",
        "/",
        &[
            ("content-type", "application/grpc"),
            ("x-echo-status", "200"),
        ],
    )
    .await;
    assert_eq!(got.status, 200);

    let admin = running.admin.expect("admin");
    let text = String::from_utf8_lossy(&get(admin, "admin", "/stats/prometheus", &[]).await.body)
        .into_owned();
    assert!(
        text.contains(r#"nodemesh_upstream_rq_retry_total{cluster="a"} 2"#),
        "{text}"
    );
    for flag in ["UT", "UF", "NC"] {
        assert!(
            text.contains(&format!(
                r#"nodemesh_downstream_rq_local_reply_total{{flag="{flag}"}} 1"#
            )),
            "{flag}: {text}"
        );
    }
}

#[tokio::test]
async fn h2c_clients_multiplex_to_an_http2_upstream() {
    let a = Upstream::start("a").await;
    let h2 = r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
"#;
    let routes = r#"            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: a }
"#;
    let yaml = bootstrap(routes, &[cluster("a", &["{a}"], h2)]);
    let (_running, addr) = proxy(&yaml, &[&a], TenantLimits::default()).await;
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::get(format!("http://svc.local/item/{i}"))
                .header("x-echo-delay-ms", "50")
                .body(Full::new(Bytes::new()))
                .expect("request");
            read(sender.send_request(req).await.expect("response")).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let got: Got = t.await.expect("task");
        assert_eq!(got.status, 200);
        assert_eq!(got.json()["path"], format!("/item/{i}"));
        assert_eq!(got.json()["version"], "HTTP/2.0");
        assert_eq!(got.json()["authority"], "svc.local");
    }
}

#[tokio::test]
async fn a_flooding_source_is_shed_while_a_quiet_one_is_served() {
    let a = Upstream::start("a").await;
    let routes = r#"            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: a }
"#;
    let yaml = bootstrap(routes, &[cluster("a", &["{a}"], "")]);
    let limits = TenantLimits {
        max_connections: 64,
        max_requests: 4,
        max_pending: 4,
    };
    let (running, addr) = proxy(&yaml, &[&a], limits).await;
    // The flood: 16 slow requests from 127.0.0.2.
    let mut flood = Vec::new();
    for _ in 0..16 {
        flood.push(tokio::spawn(async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .bind("127.0.0.2:0".parse().expect("addr"))
                .expect("bind");
            let stream = socket.connect(addr).await.expect("connect");
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("hs");
            tokio::spawn(conn);
            let req = Request::get("/")
                .header("host", "h")
                .header("x-echo-delay-ms", "500")
                .body(Full::new(Bytes::new()))
                .expect("req");
            read(sender.send_request(req).await.expect("resp"))
                .await
                .status
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The quiet source (127.0.0.1) is untouched by the flood's limit.
    let got = get(addr, "h", "/", &[]).await;
    assert_eq!(got.status, 200);
    let mut statuses = Vec::new();
    for f in flood {
        statuses.push(f.await.expect("flood task"));
    }
    let shed = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(shed, 12, "{statuses:?}");
    let admin = running.admin.expect("admin");
    let text = String::from_utf8_lossy(&get(admin, "admin", "/stats/prometheus", &[]).await.body)
        .into_owned();
    assert!(
        text.contains(r#"nodemesh_tenant_shed_total{source="127.0.0.2",limit="requests"} 12"#),
        "{text}"
    );
}

#[tokio::test]
async fn malformed_requests_get_errors_and_leave_other_connections_alone() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let a = Upstream::start("a").await;
    let routes = r#"            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: a }
"#;
    let yaml = bootstrap(routes, &[cluster("a", &["{a}"], "")]);
    let (running, addr) = proxy(&yaml, &[&a], TenantLimits::default()).await;
    let raw = |bytes: Vec<u8>| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(&bytes).await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    // Content-Length and Transfer-Encoding together: the chunked framing wins (RFC 9112
    // 6.3) and the request is re-framed upstream, so the smuggled request after it is never
    // seen as one. (Envoy answers 400 here; see ARCHITECTURE.md.)
    let smuggle = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n".to_vec();
    let before = a.count();
    let reply = raw(smuggle).await;
    assert!(!reply.contains("/smuggled"), "{reply}");
    assert!(
        a.count() - before <= 1,
        "the smuggled request reached the upstream: {reply}"
    );
    let bad_chunk =
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec();
    let reply = raw(bad_chunk).await;
    assert!(
        !reply.contains("200 OK"),
        "invalid chunking never reaches a 200: {reply}"
    );
    let mut huge = b"GET / HTTP/1.1\r\nHost: h\r\nx-big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 100 * 1024));
    huge.extend(b"\r\n\r\n");
    // hyper answers 431 and closes; the unread rest of the head makes the kernel reset the
    // connection, which may discard the 431 before the client reads it. Either way the
    // request never reaches the upstream, and the metric says why.
    let before = a.count();
    let reply = raw(huge).await;
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 431"),
        "{reply:?}"
    );
    assert_eq!(a.count(), before);
    let garbage = raw(b"\x00\x01garbage\r\n\r\n".to_vec()).await;
    assert!(
        garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
        "{garbage}"
    );
    // Still serving.
    assert_eq!(get(addr, "h", "/", &[]).await.status, 200);
    let admin = running.admin.expect("admin");
    let text = String::from_utf8_lossy(&get(admin, "admin", "/stats/prometheus", &[]).await.body)
        .into_owned();
    assert!(
        text.contains(r#"nodemesh_downstream_protocol_errors_total{kind="headers_too_large"} 1"#),
        "{text}"
    );
}
