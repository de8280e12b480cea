//! Reporting through the real proxy on loopback: Istio's request metrics and the HCM's
//! access logs (JSON lines with Envoy's fields), and a sink too slow to keep up, which must
//! cost requests nothing (entries are dropped and counted instead).
mod common;

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use common::{Upstream, get, start};

const DEADLINE: Duration = Duration::from_secs(10);

/// One HCM logging to `log` (in `format`, YAML under `typed_config`), with an RBAC filter
/// that denies `/admin`.
fn bootstrap(log: &Path, format: &str, up: &Upstream) -> String {
    format!(
        r#"
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }} }}
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
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {path}
{format}
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - name: everything
                match: {{ prefix: "/" }}
                route: {{ cluster: up }}
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: DENY
                policies:
                  ns[shop]-policy[no-admin]-rule[0]:
                    permissions: [ {{ url_path: {{ path: {{ prefix: /admin }} }} }} ]
                    principals: [ {{ any: true }} ]
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
  - name: up
    connect_timeout: 1s
    load_assignment:
      cluster_name: up
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }} ] }} ]
"#,
        path = log.display(),
        port = up.addr.port()
    )
}

async fn metrics(admin: SocketAddr) -> String {
    let got = get(admin, "admin", "/metrics", &[]).await;
    String::from_utf8_lossy(&got.body).into_owned()
}

/// The value of the first sample whose line starts with `prefix`.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The file's lines once it has `n` (or whatever it has at the deadline).
async fn lines(path: &Path, n: usize) -> Vec<String> {
    let until = Instant::now() + DEADLINE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= n || Instant::now() > until {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn requests_are_logged_as_json_lines_and_counted_with_istio_labels() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let (running, addr) = start(&bootstrap(&log, "", &up)).await;
    assert_eq!(
        get(addr, "shop", "/shop?q=1", &[("user-agent", "nm-test")])
            .await
            .status,
        200
    );
    assert_eq!(get(addr, "shop", "/admin/users", &[]).await.status, 403);

    let lines = lines(&log, 2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    let entries: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect();
    let ok = entries
        .iter()
        .find(|e| e["path"] == "/shop?q=1")
        .expect("the allowed request is logged");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["response_code"], 200);
    assert_eq!(ok["response_flags"], serde_json::Value::Null);
    assert_eq!(ok["response_code_details"], "via_upstream");
    assert_eq!(ok["upstream_cluster"], "up");
    assert_eq!(ok["upstream_host"], up.addr.to_string());
    assert_eq!(ok["route_name"], "everything");
    assert_eq!(ok["user_agent"], "nm-test");
    assert_eq!(ok["protocol"], "HTTP/1.1");
    assert!(ok["bytes_sent"].as_u64().is_some_and(|b| b > 0), "{ok}");
    assert!(
        ok["request_id"].is_string(),
        "the generated x-request-id: {ok}"
    );
    let denied = entries
        .iter()
        .find(|e| e["path"] == "/admin/users")
        .expect("the denied request is logged");
    assert_eq!(denied["response_code"], 403);
    assert_eq!(denied["response_flags"], "RBAC");
    assert_eq!(
        denied["response_code_details"],
        "rbac_access_denied_matched_policy[ns[shop]-policy[no-admin]-rule[0]]",
        "the deny names its policy"
    );

    let text = metrics(running.admin.expect("admin")).await;
    for want in [
        "istio_requests_total{reporter=\"source\"",
        "destination_service=\"up\"",
        "response_code=\"200\"",
        "response_code=\"403\",grpc_response_status=\"\",response_flags=\"RBAC\"",
        "istio_request_duration_milliseconds_bucket{",
        "istio_response_bytes_sum{",
    ] {
        assert!(text.contains(want), "{want} in\n{text}");
    }
    let written = format!(
        "nodemesh_access_log_entries_total{{path=\"{}\",result=\"written\"}}",
        log.display()
    );
    assert_eq!(sample(&text, &written), Some(2.0), "{text}");
}

#[tokio::test]
async fn a_text_format_is_rendered_as_configured() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("text.log");
    let format = r#"              log_format:
                text_format_source:
                  inline_string: "%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_CLUSTER%\n""#;
    let (_running, addr) = start(&bootstrap(&log, format, &up)).await;
    assert_eq!(get(addr, "shop", "/admin", &[]).await.status, 403);
    assert_eq!(
        lines(&log, 1).await,
        vec!["GET /admin 403 RBAC -".to_owned()]
    );
}

/// Sends `n` requests, `parallel` at a time; returns how many were answered 200.
async fn burst(addr: SocketAddr, n: usize, parallel: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n / parallel {
        let statuses = futures_util::future::join_all(
            (0..parallel).map(|_| async { get(addr, "shop", "/shop", &[]).await.status }),
        )
        .await;
        ok += statuses.iter().filter(|s| **s == 200).count();
    }
    ok
}

#[tokio::test]
async fn a_stuck_log_sink_drops_and_counts_entries_and_requests_go_on() {
    const N: usize = 400;
    const PARALLEL: usize = 8;
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().expect("tempdir");

    // Baseline: a file that keeps up. Every request is answered and logged.
    let file = dir.path().join("fast.log");
    let (fast, addr) = start(&bootstrap(&file, "", &up)).await;
    let baseline = tokio::time::timeout(DEADLINE * 3, burst(addr, N, PARALLEL))
        .await
        .expect("the baseline finishes");
    assert_eq!(baseline, N);
    assert_eq!(lines(&file, N).await.len(), N);
    let text = metrics(fast.admin.expect("admin")).await;
    let dropped = |path: &Path| {
        format!(
            "nodemesh_access_log_entries_total{{path=\"{}\",result=\"dropped\"}}",
            path.display()
        )
    };
    assert_eq!(sample(&text, &dropped(&file)).unwrap_or(0.0), 0.0);

    // A FIFO nobody reads: the writer blocks once the pipe is full. A small queue (16)
    // makes the overflow certain; the requests must not notice.
    let fifo = dir.path().join("stuck.fifo");
    nix::unistd::mkfifo(
        &fifo,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .expect("mkfifo");
    // Held open (not read) so the writer's open() succeeds and its writes fill the pipe.
    let reader = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(&fifo)
            .expect("open the FIFO for reading")
    };
    let (slow, addr) = start(&bootstrap(&fifo, "", &up)).await;
    slow.engine.set_access_log_queue(16);
    let before = up.count();
    let answered = tokio::time::timeout(DEADLINE * 3, burst(addr, N, PARALLEL))
        .await
        .expect("requests are not held up by the stuck sink");
    assert_eq!(
        answered, baseline,
        "as many answered as with a sink that keeps up"
    );
    assert_eq!(up.count() - before, N as u32);
    let text = metrics(slow.admin.expect("admin")).await;
    let lost = sample(&text, &dropped(&fifo)).unwrap_or(0.0);
    assert!(
        lost > 0.0,
        "a stuck sink drops entries (and counts them):\n{text}"
    );

    // Reading the FIFO lets the writer go on: what was not dropped arrives, whole lines.
    let written = format!(
        "nodemesh_access_log_entries_total{{path=\"{}\",result=\"written\"}}",
        fifo.display()
    );
    let drain = tokio::task::spawn_blocking(move || {
        use std::io::Read as _;
        let mut reader = reader;
        let mut got = Vec::new();
        let until = Instant::now() + DEADLINE;
        let mut buf = [0u8; 65536];
        while Instant::now() < until {
            match reader.read(&mut buf) {
                Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
            if got.ends_with(b"\n")
                && got.iter().filter(|b| **b == b'\n').count() as f64 + lost >= N as f64
            {
                break;
            }
        }
        got
    });
    let got = drain.await.expect("drain");
    let read_lines = got.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count();
    assert_eq!(
        read_lines as f64 + lost,
        N as f64,
        "every entry is written or counted as dropped"
    );
    for l in got.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        serde_json::from_slice::<serde_json::Value>(l).expect("whole JSON lines");
    }
    let text = metrics(slow.admin.expect("admin")).await;
    assert_eq!(sample(&text, &written), Some(read_lines as f64));
}

/// A TCP echo server on loopback (until the test's runtime ends).
async fn echo_server() -> SocketAddr {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = echo.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn tcp_proxy_connections_are_counted_in_istio_tcp_metrics() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let echo_addr = echo_server().await;
    let yaml = format!(
        r#"
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }} }}
static_resources:
  listeners:
  - name: tcp
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: echo
  clusters:
  - name: echo
    connect_timeout: 1s
    load_assignment:
      cluster_name: echo
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }} ] }} ]
"#,
        port = echo_addr.port()
    );
    let (running, addr) = start(&yaml).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"hello").await.expect("write");
    let mut buf = [0u8; 5];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
        .await
        .expect("no hang")
        .expect("echo");
    s.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await;
    let admin = running.admin.expect("admin");
    let until = Instant::now() + DEADLINE;
    let text = loop {
        let text = metrics(admin).await;
        if text.contains("istio_tcp_connections_closed_total{") || Instant::now() > until {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(
        value("istio_tcp_connections_opened_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value("istio_tcp_connections_closed_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(value("istio_tcp_received_bytes_total"), Some(5.0), "{text}");
    assert_eq!(value("istio_tcp_sent_bytes_total"), Some(5.0), "{text}");
}

type Frames =
    std::vec::IntoIter<Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>>;

/// A body of `n` bytes in 1000-byte frames with no declared length (chunked over
/// HTTP/1.1, DATA frames without `content-length` over HTTP/2).
fn streamed(n: usize) -> http_body_util::StreamBody<futures_util::stream::Iter<Frames>> {
    let frames: Vec<_> = (0..n.div_ceil(1000))
        .map(|i| {
            let len = (n - i * 1000).min(1000);
            Ok(hyper::body::Frame::data(bytes::Bytes::from(vec![
                b'x';
                len
            ])))
        })
        .collect();
    http_body_util::StreamBody::new(futures_util::stream::iter(frames))
}

#[tokio::test]
async fn bodies_without_a_length_are_counted_as_forwarded() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let (running, addr) = start(&bootstrap(&log, "", &up)).await;

    // HTTP/1.1, chunked.
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::post("/chunked")
        .header("host", "shop")
        .body(streamed(3000))
        .expect("request");
    let got = common::read(h1.send_request(req).await.expect("response")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["body"].as_str().map(str::len), Some(3000));

    // HTTP/2 (h2c), DATA frames without content-length.
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::post("http://shop/h2")
        .body(streamed(5000))
        .expect("request");
    let got = common::read(h2.send_request(req).await.expect("response")).await;
    assert_eq!(got.status, 200);

    let entries: Vec<serde_json::Value> = lines(&log, 2)
        .await
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let received = |path: &str| {
        entries
            .iter()
            .find(|e| e["path"] == path)
            .map(|e| e["bytes_received"].clone())
    };
    assert_eq!(received("/chunked"), Some(3000.into()), "{entries:?}");
    assert_eq!(received("/h2"), Some(5000.into()), "{entries:?}");
    // istio_request_bytes: heads and bodies of both requests.
    let text = metrics(running.admin.expect("admin")).await;
    let sum: f64 = text
        .lines()
        .filter(|l| l.starts_with("istio_request_bytes_sum{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(sum >= 8000.0, "istio_request_bytes_sum {sum}:\n{text}");
}

#[tokio::test]
async fn tcp_proxy_connections_are_logged_when_they_close() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let echo_addr = echo_server().await;
    let closed = common::free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("tcp.log");
    let listener = |name: &str, cluster: &str| {
        format!(
            r#"  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {path}
"#,
            path = log.display()
        )
    };
    let cluster = |name: &str, port: u16| {
        format!(
            "  - name: {name}\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: {name}\n      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }} ] }} ]\n"
        )
    };
    let yaml = format!(
        "static_resources:\n  listeners:\n{}{}  clusters:\n{}{}",
        listener("tcp", "echo"),
        listener("dead", "closed"),
        cluster("echo", echo_addr.port()),
        cluster("closed", closed),
    );
    let (running, addr) = start(&yaml).await;
    let dead = running.listeners[1].1;

    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"hello").await.expect("write");
    let mut buf = [0u8; 5];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
        .await
        .expect("no hang")
        .expect("echo");
    s.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await;
    // The upstream refuses: the connection is closed and logged with UF.
    let mut s = tokio::net::TcpStream::connect(dead).await.expect("connect");
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await;

    let entries: Vec<serde_json::Value> = lines(&log, 2)
        .await
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let by_cluster = |c: &str| {
        entries
            .iter()
            .find(|e| e["upstream_cluster"] == c)
            .cloned()
            .unwrap_or_else(|| panic!("no entry for {c}: {entries:?}"))
    };
    let ok = by_cluster("echo");
    assert_eq!(ok["bytes_received"], 5, "{ok}");
    assert_eq!(ok["bytes_sent"], 5, "{ok}");
    assert_eq!(ok["upstream_host"], echo_addr.to_string(), "{ok}");
    assert_eq!(ok["response_flags"], serde_json::Value::Null, "{ok}");
    assert_eq!(
        ok["method"],
        serde_json::Value::Null,
        "no request line: {ok}"
    );
    assert_eq!(ok["protocol"], serde_json::Value::Null, "{ok}");
    let refused = by_cluster("closed");
    assert_eq!(refused["response_flags"], "UF", "{refused}");
    assert_eq!(refused["bytes_sent"], 0, "{refused}");
}
