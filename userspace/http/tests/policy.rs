//! Check and quota through the real proxy (`nodemesh proxy -c`'s engine) on loopback: RBAC
//! (HTTP and network), local_ratelimit, and the global quota against a real redis-server
//! shared by two proxies, killed and restarted mid-test.
mod common;

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{Upstream, get, read, snapshot, start};
use http::Request;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const DEADLINE: Duration = Duration::from_secs(10);

/// A bootstrap with `filters` before the router and `routes` (YAML under route_config).
fn http_bootstrap(filters: &str, vhost_extra: &str, up: &Upstream) -> String {
    format!(
        r#"
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
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
{vhost_extra}
              routes:
              - match: {{ prefix: "/open" }}
                route: {{ cluster: up }}
                typed_per_filter_config:
                  envoy.filters.http.rbac:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute
                  nodemesh.filters.http.global_quota:
                    "@type": type.googleapis.com/xds.type.v3.TypedStruct
                    type_url: type.googleapis.com/nodemesh.filters.http.global_quota.v1.GlobalQuotaPerRoute
                    value: {{ disabled: true }}
              - match: {{ prefix: "/" }}
                route: {{ cluster: up }}
          http_filters:
{filters}
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
  - name: up
    connect_timeout: 1s
    load_assignment:
      cluster_name: up
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }} ] }} ]
"#,
        port = up.addr.port()
    )
}

const RBAC_DENY_ADMIN: &str = r#"
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: DENY
                policies:
                  ns[shop]-policy[no-admin]-rule[0]:
                    permissions: [ { url_path: { path: { prefix: /admin } } } ]
                    principals: [ { any: true } ]
"#;

const RBAC_ALLOW_GET: &str = r#"
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  ns[shop]-policy[readers]-rule[0]:
                    permissions: [ { header: { name: ":method", string_match: { exact: GET } } } ]
                    principals: [ { direct_remote_ip: { address_prefix: 127.0.0.0, prefix_len: 8 } } ]
"#;

/// One kept-alive HTTP/1.1 connection.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Self { sender }
    }

    async fn send(&mut self, method: &str, path: &str) -> common::Got {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "shop")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = tokio::time::timeout(DEADLINE, self.sender.send_request(req))
            .await
            .expect("no hang")
            .expect("response");
        read(resp).await
    }
}

#[tokio::test]
async fn rbac_denies_with_the_policy_named_and_updates_reach_kept_alive_connections() {
    let up = Upstream::start("up").await;
    let yaml = http_bootstrap(RBAC_DENY_ADMIN, "", &up);
    let (running, addr) = start(&yaml).await;
    let mut c = Client::connect(addr).await;
    assert_eq!(c.send("GET", "/shop").await.status, 200);
    let denied = c.send("GET", "/admin/users").await;
    assert_eq!(denied.status, 403);
    assert_eq!(&denied.body[..], b"RBAC: access denied");
    assert_eq!(up.count(), 1, "a denied request never reaches the upstream");
    let admin = get(addr, "shop", "/open/admin", &[]).await;
    assert_eq!(admin.status, 200, "RBACPerRoute without rbac turns it off");

    // DENY first, then ALLOW: what no ALLOW policy matches is denied from now on, on the
    // same connection.
    let both = http_bootstrap(&format!("{RBAC_DENY_ADMIN}{RBAC_ALLOW_GET}"), "", &up);
    running.engine.update(snapshot(&both));
    assert_eq!(c.send("GET", "/shop").await.status, 200);
    let post = c.send("POST", "/shop").await;
    assert_eq!(
        post.status, 403,
        "the kept-alive connection sees the new policy"
    );
    assert_eq!(c.send("GET", "/admin").await.status, 403);
}

const RBAC_REMOTE_IP: &str = r#"
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: DENY
                policies:
                  ns[shop]-policy[no-direct]-rule[0]:
                    permissions: [ { url_path: { path: { prefix: /direct } } } ]
                    principals: [ { direct_remote_ip: { address_prefix: 127.0.0.1, prefix_len: 32 } } ]
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  ns[shop]-policy[clients]-rule[0]:
                    permissions: [ { any: true } ]
                    principals: [ { remote_ip: { address_prefix: 198.18.5.0, prefix_len: 24 } } ]
"#;

/// The admin's Prometheus text.
async fn metrics(admin: SocketAddr) -> String {
    let got = get(admin, "admin", "/metrics", &[]).await;
    String::from_utf8_lossy(&got.body).into_owned()
}

#[tokio::test]
async fn rbac_remote_ip_is_the_trusted_client_address_and_direct_remote_ip_the_peer() {
    let up = Upstream::start("up").await;
    let with = |hcm_extra: &str| {
        let yaml = http_bootstrap(RBAC_REMOTE_IP, "", &up).replace(
            "          stat_prefix: main\n",
            &format!("          stat_prefix: main\n{hcm_extra}"),
        );
        format!(
            "admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }} }}\n{yaml}"
        )
    };
    let client = [("x-forwarded-for", "198.18.5.7")];
    let two_hops = [("x-forwarded-for", "198.18.5.7, 198.19.0.1")];

    // Without use_remote_address, the client is the last x-forwarded-for address.
    let (mesh, addr) = start(&with("")).await;
    assert_eq!(get(addr, "shop", "/x", &client).await.status, 200);
    assert_eq!(get(addr, "shop", "/x", &two_hops).await.status, 403);
    let peer_only = get(addr, "shop", "/x", &[]).await;
    assert_eq!(
        peer_only.status, 403,
        "no x-forwarded-for: the peer, 127.0.0.1"
    );
    // direct_remote_ip is the peer whatever x-forwarded-for says.
    assert_eq!(get(addr, "shop", "/direct", &client).await.status, 403);
    let text = metrics(mesh.admin.expect("admin")).await;
    for want in [
        r#"policy="ns[shop]-policy[clients]-rule[0]",result="allowed"} 1"#,
        r#"policy="none",result="denied"} 2"#,
        r#"policy="ns[shop]-policy[no-direct]-rule[0]",result="denied"} 1"#,
    ] {
        assert!(
            text.contains(want),
            "a counter per policy: {want} in\n{text}"
        );
    }

    // use_remote_address with one trusted hop: the address that hop appended.
    let (_edge, addr) = start(&with(
        "          use_remote_address: true\n          xff_num_trusted_hops: 1\n",
    ))
    .await;
    assert_eq!(get(addr, "shop", "/x", &client).await.status, 200);
    assert_eq!(get(addr, "shop", "/x", &two_hops).await.status, 403);
    assert_eq!(get(addr, "shop", "/x", &[]).await.status, 403);

    // use_remote_address trusting no hops: the peer, x-forwarded-for is ignored.
    let (_edge0, addr) = start(&with("          use_remote_address: true\n")).await;
    assert_eq!(get(addr, "shop", "/x", &client).await.status, 403);
}

#[tokio::test]
async fn local_ratelimit_answers_429_after_the_bucket_and_per_route_overrides_apply() {
    let up = Upstream::start("up").await;
    let filters = r#"
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: rl
              token_bucket: { max_tokens: 3, tokens_per_fill: 1, fill_interval: 60s }
              filter_enabled: { default_value: { numerator: 100, denominator: HUNDRED } }
              filter_enforced: { default_value: { numerator: 100, denominator: HUNDRED } }
              response_headers_to_add: [ { header: { key: x-local-rate-limit, value: "true" } } ]
"#;
    let vh = r#"              typed_per_filter_config:
                envoy.filters.http.local_ratelimit:
                  "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
                  stat_prefix: vh
                  token_bucket: { max_tokens: 1, tokens_per_fill: 1, fill_interval: 60s }
                  filter_enabled: { default_value: { numerator: 100, denominator: HUNDRED } }
                  filter_enforced: { default_value: { numerator: 100, denominator: HUNDRED } }
"#;
    let (_running, addr) = start(&http_bootstrap(filters, "", &up)).await;
    let statuses: Vec<u16> = futures_util::future::join_all(
        (0..5).map(|_| async { get(addr, "shop", "/x", &[]).await.status }),
    )
    .await;
    let mut sorted = statuses.clone();
    sorted.sort();
    assert_eq!(sorted, [200, 200, 200, 429, 429], "{statuses:?}");
    let limited = get(addr, "shop", "/x", &[]).await;
    assert_eq!(limited.status, 429);
    assert_eq!(&limited.body[..], b"local_rate_limited");
    assert_eq!(limited.header("x-local-rate-limit"), Some("true"));

    // The virtual host's own bucket replaces the filter's: one request, then 429.
    let (_running, addr) = start(&http_bootstrap(filters, vh, &up)).await;
    assert_eq!(get(addr, "shop", "/y", &[]).await.status, 200);
    assert_eq!(get(addr, "shop", "/y", &[]).await.status, 429);
}

/// A TCP echo server on loopback.
async fn echo_server() -> SocketAddr {
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let echo_addr = echo.local_addr().expect("addr");
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
    echo_addr
}

/// A tcp_proxy listener to `echo_addr` behind a network RBAC with `action` on loopback peers.
fn tcp(action: &str, echo_addr: SocketAddr) -> String {
    format!(
        r#"
static_resources:
  listeners:
  - name: tcp
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.rbac
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC
          stat_prefix: tcp
          rules:
            action: {action}
            policies:
              loopback:
                permissions: [ {{ any: true }} ]
                principals: [ {{ direct_remote_ip: {{ address_prefix: 127.0.0.1, prefix_len: 32 }} }} ]
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
    )
}

/// Sends `ping` and expects it back.
async fn ping(s: &mut tokio::net::TcpStream) {
    s.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
        .await
        .expect("no hang")
        .expect("echo");
    assert_eq!(&buf, b"ping");
}

/// Whether a fresh connection is closed without a byte (refused by policy).
async fn refused(addr: SocketAddr) -> bool {
    let mut fresh = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = fresh.write_all(b"ping").await;
    let mut got = Vec::new();
    let r = tokio::time::timeout(DEADLINE, fresh.read_to_end(&mut got)).await;
    r.is_ok() && got.is_empty()
}

#[tokio::test]
async fn network_rbac_refuses_connections_and_closes_open_ones_after_an_update() {
    let echo_addr = echo_server().await;
    let (running, addr) = start(&tcp("ALLOW", echo_addr)).await;
    let mut open = tokio::net::TcpStream::connect(addr).await.expect("connect");
    ping(&mut open).await;

    running.engine.update(snapshot(&tcp("DENY", echo_addr)));
    // The open connection is closed by the proxy: the read ends (EOF or reset).
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(DEADLINE, open.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the denied connection was closed");
    assert!(refused(addr).await, "denied: closed without a byte");
}

#[tokio::test]
async fn with_closing_off_open_connections_keep_their_decision_and_new_ones_are_refused() {
    let echo_addr = echo_server().await;
    let (running, addr) = start(&tcp("ALLOW", echo_addr)).await;
    running.engine.set_close_denied_on_update(false);
    let mut open = tokio::net::TcpStream::connect(addr).await.expect("connect");
    ping(&mut open).await;
    running.engine.update(snapshot(&tcp("DENY", echo_addr)));
    assert!(refused(addr).await, "new connections see the new policy");
    // The refused connection above was handled after the update: the open one was
    // re-checked by then, and kept.
    ping(&mut open).await;
}

/// A redis-server of our own on a free loopback port, killed by pid on drop.
struct Redis {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Redis {
    fn start_on(port: u16, dir: &std::path::Path) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (cargo xtask setup installs it)");
        let deadline = Instant::now() + DEADLINE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            dir: dir.to_owned(),
        }
    }

    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "nodemesh-redis-{}-{}",
            std::process::id(),
            common::free_port()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        Self::start_on(common::free_port(), &dir)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn quota_filter(redis_port: u16, limit: u64, batch: u64, failure: &str) -> String {
    format!(
        r#"
          - name: nodemesh.filters.http.global_quota
            typed_config:
              "@type": type.googleapis.com/xds.type.v3.TypedStruct
              type_url: type.googleapis.com/nodemesh.filters.http.global_quota.v1.GlobalQuota
              value:
                redis: 127.0.0.1:{redis_port}
                domain: test{redis_port}
                failure_mode: {failure}
                timeout: 100ms
                quotas:
                - {{ name: api, limit: {limit}, window: 60s, batch: {batch} }}
"#
    )
}

#[tokio::test]
async fn the_global_quota_is_shared_by_two_proxies_and_never_exceeded() {
    let redis = Redis::start();
    let up = Upstream::start("up").await;
    let yaml = http_bootstrap(&quota_filter(redis.port, 40, 5, "open"), "", &up);
    let (_a, addr_a) = start(&yaml).await;
    let (_b, addr_b) = start(&yaml).await;
    let mut allowed = 0;
    let mut limited = 0;
    for i in 0..60 {
        let addr = if i % 2 == 0 { addr_a } else { addr_b };
        let got = tokio::time::timeout(DEADLINE, get(addr, "shop", "/api", &[]))
            .await
            .expect("no request hangs");
        match got.status {
            200 => allowed += 1,
            429 => {
                assert_eq!(got.header("x-envoy-ratelimited"), Some("true"));
                limited += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    // The bound: never more than the limit per window; at most one batch per proxy
    // stranded in a lease (here: none, the requests alternate and drain both leases).
    assert!(allowed <= 40, "admitted {allowed} of a limit of 40");
    assert!(allowed >= 40 - 2 * 5, "admitted only {allowed}");
    assert_eq!(allowed + limited, 60);
    let open = get(addr_a, "shop", "/open", &[]).await;
    assert_eq!(open.status, 200, "the route turned the quota off");
    // A window can be this close to the minute's end; the bound holds per window anyway.
}

#[tokio::test]
async fn a_dead_redis_is_decided_by_failure_mode_at_once_and_a_restarted_one_is_used_again() {
    let mut redis = Redis::start();
    let up = Upstream::start("up").await;
    let open_yaml = http_bootstrap(&quota_filter(redis.port, 1000, 2, "open"), "", &up);
    let closed_yaml = http_bootstrap(&quota_filter(redis.port, 1000, 2, "closed"), "", &up);
    let (_open, open_addr) = start(&open_yaml).await;
    let (_closed, closed_addr) = start(&closed_yaml).await;
    assert_eq!(get(open_addr, "shop", "/a", &[]).await.status, 200);
    assert_eq!(get(closed_addr, "shop", "/a", &[]).await.status, 200);

    redis.kill();
    let mut open_statuses = Vec::new();
    let mut closed_statuses = Vec::new();
    for _ in 0..10 {
        for (addr, out) in [
            (open_addr, &mut open_statuses),
            (closed_addr, &mut closed_statuses),
        ] {
            let got = tokio::time::timeout(Duration::from_secs(2), get(addr, "shop", "/a", &[]))
                .await
                .expect("no request hangs on a dead Redis");
            out.push(got.status);
        }
    }
    assert!(open_statuses.iter().all(|s| *s == 200), "{open_statuses:?}");
    assert!(
        closed_statuses.iter().skip(4).all(|s| *s == 500),
        "fail closed once the lease is spent: {closed_statuses:?}"
    );

    let dir = redis.dir.clone();
    let _restarted = Redis::start_on(redis.port, &dir);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let got = get(closed_addr, "shop", "/a", &[]).await;
        if got.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted Redis is used again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
