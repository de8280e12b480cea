//! `Engine::update` keeps the live state of clusters an update does not change: pooled
//! upstream connections (counted on a real upstream socket), and stops the health checks of
//! clusters it removes or replaces. Real hyper upstreams on loopback.
mod common;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use common::{Upstream, get, snapshot, start};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodemesh_http::UpdateSummary;
use tokio::net::TcpListener;

/// An upstream that counts the connections it accepted and the requests per path.
struct Counting {
    addr: SocketAddr,
    accepted: Arc<AtomicU32>,
    paths: Arc<Mutex<HashMap<String, u32>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Counting {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Counting {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicU32::new(0));
        let paths: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let (acc, p) = (accepted.clone(), paths.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let p = p.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let p = p.clone();
                        async move {
                            *p.lock()
                                .expect("counts")
                                .entry(req.uri().path().to_owned())
                                .or_default() += 1;
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                                "counted",
                            ))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            accepted,
            paths,
            task,
        }
    }

    fn accepted(&self) -> u32 {
        self.accepted.load(Ordering::SeqCst)
    }

    fn path(&self, path: &str) -> u32 {
        self.paths
            .lock()
            .expect("counts")
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    async fn wait_path(&self, path: &str, at_least: u32) {
        for _ in 0..400 {
            if self.path(path) >= at_least {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "{path} was requested {} times, not {at_least}",
            self.path(path)
        );
    }
}

const H2: &str = r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
"#;

fn cluster(name: &str, port: u16, extra: &str) -> String {
    format!(
        "  - name: {name}\n    connect_timeout: 1s\n{extra}    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}\n"
    )
}

/// One listener routing `/<cluster>...` prefixes to the clusters named in `routes`.
fn bootstrap(port: u16, routes: &[(&str, &str)], clusters: &[String]) -> String {
    let routes: String = routes
        .iter()
        .map(|(prefix, c)| {
            format!(
                "              - match: {{ prefix: \"{prefix}\" }}\n                route: {{ cluster: {c} }}\n"
            )
        })
        .collect();
    format!(
        r#"static_resources:
  listeners:
  - name: main
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{routes}  clusters:
{}"#,
        clusters.concat()
    )
}

#[tokio::test]
async fn an_update_keeps_unchanged_clusters_and_applies_changed_ones() {
    let a = Counting::start().await;
    let b1 = Upstream::start("b1").await;
    let b2 = Upstream::start("b2").await;
    let c = Upstream::start("c").await;
    let gone = Upstream::start("gone").await;
    let port = common::free_port();
    let v1 = bootstrap(
        port,
        &[("/a", "a"), ("/b", "b"), ("/c", "c"), ("/gone", "gone")],
        &[
            cluster("a", a.addr.port(), H2),
            cluster("b", b1.addr.port(), ""),
            cluster("c", c.addr.port(), ""),
            cluster("gone", gone.addr.port(), ""),
        ],
    );
    let (running, proxy) = start(&v1).await;
    for _ in 0..2 {
        assert_eq!(get(proxy, "x", "/a", &[]).await.status, 200);
    }
    assert_eq!(a.accepted(), 1, "HTTP/2 upstream connection shared");
    let c1 = get(proxy, "x", "/c", &[]).await;
    assert_eq!(c1.json()["version"], "HTTP/1.1");
    assert_eq!(
        get(proxy, "x", "/b", &[]).await.upstream().as_deref(),
        Some("b1")
    );
    let before = running.engine.state();

    // a unchanged (new route to it); b: new endpoint only; c: now HTTP/2; gone: removed.
    let v2 = bootstrap(
        port,
        &[("/a2", "a"), ("/a", "a"), ("/b", "b"), ("/c", "c")],
        &[
            cluster("a", a.addr.port(), H2),
            cluster("b", b2.addr.port(), ""),
            cluster("c", c.addr.port(), H2),
        ],
    );
    let summary = running.engine.update(snapshot(&v2));
    assert_eq!(
        summary,
        UpdateSummary {
            kept: 1,
            endpoints_updated: 1,
            built: 1,
            retired: 2,
        },
        "gone removed and c replaced are retired"
    );
    let after = running.engine.state();
    assert!(Arc::ptr_eq(&before.clusters["a"], &after.clusters["a"]));
    assert!(Arc::ptr_eq(&before.clusters["b"], &after.clusters["b"]));
    assert!(!Arc::ptr_eq(&before.clusters["c"], &after.clusters["c"]));

    // The new route works and reuses a's pooled connection.
    assert_eq!(get(proxy, "x", "/a2", &[]).await.status, 200);
    assert_eq!(get(proxy, "x", "/a", &[]).await.status, 200);
    assert_eq!(a.path("/a2"), 1);
    assert_eq!(
        a.accepted(),
        1,
        "an unchanged cluster keeps its upstream connection"
    );
    // The changed clusters serve their new configuration.
    assert_eq!(
        get(proxy, "x", "/b", &[]).await.upstream().as_deref(),
        Some("b2")
    );
    assert_eq!(after.clusters["b"].hosts()[0].address, b2.addr);
    assert_eq!(
        get(proxy, "x", "/c", &[]).await.json()["version"],
        "HTTP/2.0"
    );
    assert_eq!(get(proxy, "x", "/gone", &[]).await.status, 404);
}

fn health_checked(name: &str, port: u16, path: &str) -> String {
    cluster(
        name,
        port,
        &format!(
            "    health_checks:\n    - timeout: 0.5s\n      interval: 0.02s\n      healthy_threshold: 1\n      unhealthy_threshold: 1\n      http_health_check: {{ path: {path} }}\n"
        ),
    )
}

#[tokio::test]
async fn health_checks_of_replaced_and_removed_clusters_stop() {
    let up = Counting::start().await;
    let other = Upstream::start("other").await;
    let port = common::free_port();
    let routes = [("/", "other")];
    let other_cluster = cluster("other", other.addr.port(), "");
    let v1 = bootstrap(
        port,
        &routes,
        &[
            other_cluster.clone(),
            health_checked("hc", up.addr.port(), "/old"),
        ],
    );
    let (running, proxy) = start(&v1).await;
    up.wait_path("/old", 2).await;

    // Unchanged: the same state keeps checking. (Applied from another task, as the xDS
    // client does.)
    let engine = running.engine.clone();
    let unchanged = snapshot(&v1);
    let s = tokio::spawn(async move { engine.update(unchanged) })
        .await
        .expect("update task");
    assert_eq!(s.kept, 2);
    let n = up.path("/old");
    up.wait_path("/old", n + 2).await;

    // Replaced (new check path): the old check stops, the new one runs.
    let v2 = bootstrap(
        port,
        &routes,
        &[
            other_cluster.clone(),
            health_checked("hc", up.addr.port(), "/new"),
        ],
    );
    assert_eq!(running.engine.update(snapshot(&v2)).built, 1);
    up.wait_path("/new", 2).await;
    let old = up.path("/old");
    let new = up.path("/new");
    up.wait_path("/new", new + 5).await;
    assert_eq!(up.path("/old"), old, "the replaced cluster's check stopped");

    // Removed: no check runs any more (the state may still be referenced: retirement stops
    // the task, not the last reference going away).
    let held = running.engine.state().clusters["hc"].clone();
    let v3 = bootstrap(port, &routes, &[other_cluster]);
    assert_eq!(running.engine.update(snapshot(&v3)).retired, 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let new = up.path("/new");
    // Other traffic keeps flowing meanwhile; checks every 20 ms would add about 10.
    for _ in 0..10 {
        assert_eq!(get(proxy, "x", "/", &[]).await.status, 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.path("/new"), new, "the removed cluster's check stopped");
    drop(held);
}
