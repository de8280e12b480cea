//! What check, quota and report cost per request, against the same route with none of them.
//!
//! - `decide/*`: one `HttpChain::check` (RBAC with 10 or 1,000 policies in Istio's shape,
//!   one per workload, plus a local token bucket), in-process. The two must cost about the
//!   same: policies of other ports and principals are never looked at.
//! - `report/*`: one request's Istio metrics and an access log entry queued for a writer
//!   (the writer thread renders and writes to /dev/null off the measured path).
//! - `request/*`: a full request through `nodemesh proxy -c`'s engine on loopback (kept-alive
//!   HTTP/1.1 client, hyper upstream): `none` has no filters and no access log;
//!   `check_quota_report` has RBAC with 1,000 policies, local_ratelimit, the global quota
//!   leased from a real redis-server (when one is on PATH) and a JSON access log. The ratio
//!   of the two is the number to watch (see ARCHITECTURE.md, "Check and quota"); it is also
//!   printed from an interleaved run (one request of each variant in turn), which load from
//!   elsewhere on the machine cannot skew.
//!
//! Run: `cargo bench -p nodemesh-policy --bench check`.
use std::{
    convert::Infallible,
    hint::black_box,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodemesh_config::model::{HttpFilter, NetworkFilter, Snapshot};
use nodemesh_policy::{
    Attributes, ConnScope, HttpAttributes, HttpChain, chain::Policies, stats::PolicyStats,
};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";

/// An ALLOW RBAC with `n` policies the way istiod writes them (one per workload: its port and
/// its callers), one of which lets the benchmark's client call `port`.
fn rbac(n: usize, port: u16) -> String {
    let mut policies = String::new();
    for i in 0..n.saturating_sub(1) {
        policies.push_str(&format!(
            r#"
                  ns[ns{i}]-policy[p{i}]-rule[0]:
                    permissions: [ {{ and_rules: {{ rules: [ {{ destination_port: {port} }}, {{ url_path: {{ path: {{ prefix: /api }} }} }} ] }} }} ]
                    principals: [ {{ authenticated: {{ principal_name: {{ exact: "spiffe://cluster.local/ns/ns{i}/sa/caller" }} }} }} ]"#,
            port = 10_000 + i
        ));
    }
    policies.push_str(&format!(
        r#"
                  ns[shop]-policy[client]-rule[0]:
                    permissions: [ {{ and_rules: {{ rules: [ {{ destination_port: {port} }}, {{ header: {{ name: ":method", string_match: {{ exact: GET }} }} }} ] }} }} ]
                    principals: [ {{ authenticated: {{ principal_name: {{ exact: "{CLIENT}" }} }} }}, {{ remote_ip: {{ address_prefix: 127.0.0.1, prefix_len: 32 }} }} ]"#
    ));
    format!(
        r#"
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:{policies}
"#
    )
}

const LOCAL: &str = r#"
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: bench
              token_bucket: { max_tokens: 1000000000, tokens_per_fill: 1000000000, fill_interval: 1s }
              filter_enabled: { default_value: { numerator: 100, denominator: HUNDRED } }
              filter_enforced: { default_value: { numerator: 100, denominator: HUNDRED } }
"#;

fn quota(redis: u16) -> String {
    format!(
        r#"
          - name: nodemesh.filters.http.global_quota
            typed_config:
              "@type": type.googleapis.com/xds.type.v3.TypedStruct
              type_url: type.googleapis.com/nodemesh.filters.http.global_quota.v1.GlobalQuota
              value:
                redis: 127.0.0.1:{redis}
                domain: bench{redis}
                failure_mode: open
                timeout: 100ms
                quotas:
                - {{ name: api, limit: 1000000000, window: 60s, batch: 100000 }}
"#
    )
}

const ACCESS_LOG: &str = r#"          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: /dev/null
"#;

fn bootstrap(listen: u16, upstream: u16, filters: &str, log: &str) -> String {
    format!(
        r#"
static_resources:
  listeners:
  - name: main
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main
{log}          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
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
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream} }} }} }} }} ] }} ]
"#
    )
}

fn snapshot(yaml: &str) -> Snapshot {
    let t = nodemesh_config::load_bootstrap(yaml).expect("bootstrap parses");
    assert!(
        t.diagnostics.errors.is_empty(),
        "{:?}",
        t.diagnostics.errors
    );
    t.snapshot.expect("snapshot")
}

fn http_filters(s: &Snapshot) -> Vec<HttpFilter> {
    match &s.listeners[0].filter_chains[0].filter {
        NetworkFilter::Http(h) => h.filters.clone(),
        NetworkFilter::Tcp(_) => panic!("an HTTP listener"),
    }
}

fn decide(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let headers = http::HeaderMap::new();
    let attrs = Attributes {
        peer: "127.0.0.1:40000".parse().expect("addr"),
        remote_ip: "127.0.0.1".parse().expect("ip"),
        destination: "127.0.0.1:8080".parse().expect("addr"),
        principal: Some(CLIENT),
        namespace: Some("shop"),
        server_name: None,
        http: Some(HttpAttributes {
            method: "GET",
            authority: "api.shop",
            path: "/api/items?page=2",
            scheme: "http",
            headers: &headers,
            cluster: Some("up"),
        }),
    };
    let mut group = c.benchmark_group("decide");
    for n in [10, 1000] {
        let s = snapshot(&bootstrap(0, 1, &format!("{}{LOCAL}", rbac(n, 8080)), ""));
        let chain: Arc<HttpChain> =
            HttpChain::compile(&http_filters(&s), &Policies::new(PolicyStats::default()));
        let scope = ConnScope::default();
        let verdict = rt.block_on(chain.check(&attrs, None, &scope, false));
        assert!(
            !matches!(verdict, nodemesh_policy::Verdict::Deny(_)),
            "the client is allowed: {verdict:?}"
        );
        group.bench_function(format!("rbac_{n}_policies_and_local_ratelimit"), |b| {
            b.iter(|| rt.block_on(chain.check(black_box(&attrs), None, &scope, false)))
        });
    }
    group.finish();
}

fn report(c: &mut Criterion) {
    use nodemesh_telemetry::{
        access_log::{Entry, LogStats, Writer},
        istio::{HttpMetrics, RequestLabels, Workload},
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = HttpMetrics::register(&mut registry);
    let stats = LogStats::register(&mut registry);
    let writer = Writer::file("/dev/null", 65536, &stats).expect("writer");
    let format = Arc::new(nodemesh_config::access_log::default_format());
    let mut request_headers = http::HeaderMap::new();
    request_headers.insert("user-agent", "bench".parse().expect("value"));
    request_headers.insert(
        "x-request-id",
        "7b7e0f3c-4d8a-4c4e-9d0b-0c1f9f0e8a11"
            .parse()
            .expect("value"),
    );
    let source = Workload {
        name: "client",
        namespace: "shop",
        principal: CLIENT,
    };
    c.bench_function("report/istio_metrics_and_access_log_entry", |b| {
        b.iter(|| {
            let labels = RequestLabels::new(
                source,
                Workload::UNKNOWN,
                Some("up"),
                false,
                200,
                None,
                None,
            );
            metrics.record(&labels, 0.4, 120, 300);
            let entry = Entry {
                start: SystemTime::now(),
                method: "GET".into(),
                path: "/api/items?page=2".into(),
                authority: "api.shop".into(),
                protocol: "HTTP/1.1",
                request_headers: request_headers.clone(),
                response_headers: http::HeaderMap::new(),
                response_code: 200,
                response_flags: None,
                details: None,
                bytes_received: 0,
                bytes_sent: 2,
                duration: Duration::from_micros(400),
                upstream_host: Some("127.0.0.1:9000".parse().expect("addr")),
                upstream_cluster: Some("up".into()),
                route_name: None,
                remote: "127.0.0.1:40000".parse().expect("addr"),
                direct_remote: "127.0.0.1:40000".parse().expect("addr"),
                local: "127.0.0.1:8080".parse().expect("addr"),
                principal: None,
            };
            writer.log(format.clone(), Arc::new(entry));
        })
    });
}

/// A redis-server on a free port, killed by pid on drop.
struct Redis(Child, u16);

impl Redis {
    fn start() -> Option<Self> {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--dir", "/tmp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Self(child, port))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// One request on the kept-alive connection, read to its end.
async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
) -> hyper::StatusCode {
    sender.ready().await.expect("connection ready");
    let req = hyper::Request::get("/api/items?page=2")
        .header("host", "api.shop")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    status
}

fn request(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let redis = Redis::start();
    if redis.is_none() {
        eprintln!("no redis-server on PATH: request/check_quota_report runs without the quota");
    }
    let up = rt.block_on(upstream());
    let listen = free_port();
    let filters = format!(
        "{}{LOCAL}{}",
        rbac(1000, listen),
        redis.as_ref().map(|r| quota(r.1)).unwrap_or_default()
    );
    let listen2 = free_port();
    let filters2 = format!(
        "{}{LOCAL}{}",
        rbac(1000, listen2),
        redis.as_ref().map(|r| quota(r.1)).unwrap_or_default()
    );
    let variants = [
        ("none", free_port(), String::new(), ""),
        ("check_quota", listen2, filters2, ""),
        ("check_quota_report", listen, filters, ACCESS_LOG),
    ];
    let names: Vec<&str> = variants.iter().map(|v| v.0).collect();
    let mut group = c.benchmark_group("request");
    let mut keep = Vec::new();
    let mut senders = Vec::new();
    for (name, port, filters, log) in variants {
        let yaml = bootstrap(port, up.port(), &filters, log);
        let running = rt
            .block_on(nodemesh_http::server::start(
                snapshot(&yaml),
                nodemesh_http::TenantLimits::default(),
            ))
            .expect("proxy");
        let addr = running.listeners[0].1;
        let mut sender = rt.block_on(async {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            sender
        });
        // Warm the lease and the pool; every request must be allowed.
        for _ in 0..100 {
            assert_eq!(
                rt.block_on(send(&mut sender)),
                200,
                "{name}: requests are allowed"
            );
        }
        group.bench_function(name, |b| b.iter(|| rt.block_on(send(&mut sender))));
        senders.push(sender);
        keep.push(running);
    }
    group.finish();
    // The ratio, measured interleaved (one request of each variant in turn), so that load
    // from elsewhere on the machine weighs on every variant alike.
    const PAIRS: usize = 20_000;
    let mut spent = vec![Duration::ZERO; senders.len()];
    for _ in 0..PAIRS {
        for (i, sender) in senders.iter_mut().enumerate() {
            let t = Instant::now();
            black_box(rt.block_on(send(sender)));
            spent[i] += t.elapsed();
        }
    }
    let base = spent[0].as_secs_f64();
    for (name, t) in names.iter().zip(&spent) {
        println!(
            "request/{name}: {:.1} µs per request interleaved, {:.2} x none",
            t.as_secs_f64() * 1e6 / PAIRS as f64,
            t.as_secs_f64() / base
        );
    }
    drop(keep);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = decide, report, request
}
criterion_main!(benches);
