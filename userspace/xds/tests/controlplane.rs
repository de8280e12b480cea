//! The ADS client against the file-backed control plane, over real gRPC on loopback, in
//! both variants: a complete config arrives and follows changes and removals, a rejected
//! update keeps the last good config (NACK on both ends), oversized resources are refused,
//! the control plane disappearing and coming back (with the same or a new version history)
//! is survived and resumed, a flood of updates ends at the last one, and an EDS cluster
//! whose assignment never comes stops warming after `initial_fetch_timeout`.
//!
//! Each control plane runs on its own runtime in its own thread, so that stopping it drops
//! every stream at once, as a control plane that dies does.
use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use nodemesh_config::model::{ClusterTarget, Discovery, RouteAction, Snapshot};
use nodemesh_xds::{
    client::{self, Backoff, ClientConfig, Metrics},
    files,
    server::{ControlPlane, ServerConfig, ServerMetrics, ServerStatus},
};
use tokio::sync::{mpsc, oneshot};

const WAIT: Duration = Duration::from_secs(20);

/// A control plane on a thread of its own.
struct Cp {
    addr: SocketAddr,
    handle: ControlPlane,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Cp {
    fn start(dir: &Path, check: bool, port: u16) -> Self {
        let config = ServerConfig {
            dir: dir.to_owned(),
            poll: Duration::from_millis(20),
            check,
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let cp = ControlPlane::start(config, ServerMetrics::default())
                    .expect("the folder loads");
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .expect("bind the ADS port");
                ready_tx
                    .send((listener.local_addr().expect("local address"), cp.clone()))
                    .expect("the test waits for the control plane");
                tokio::select! {
                    r = cp.serve(listener) => r.expect("serve"),
                    _ = stopped => {}
                }
            });
            // Dropping the runtime drops every connection task: the streams end abruptly.
            rt.shutdown_background();
        });
        let (addr, handle) = ready_rx
            .recv_timeout(WAIT)
            .expect("the control plane starts");
        Self {
            addr,
            handle,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn status(&self) -> ServerStatus {
        self.handle.status()
    }

    fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("the control plane thread");
        }
    }
}

impl Drop for Cp {
    fn drop(&mut self) {
        self.halt();
    }
}

/// What the resource folder holds: the EDS clusters (name, endpoint port) and where the
/// route for `web.example` goes.
struct Folder<'a> {
    clusters: &'a [(&'a str, u16)],
    route_to: &'a str,
    /// A second listener that proxies TCP to this cluster (which need not exist).
    tcp_to: Option<&'a str>,
    /// Extra virtual hosts, to make the route configuration large.
    padding: usize,
    /// A route whose regex does not compile: an invalid resource.
    bad_regex: bool,
}

impl<'a> Folder<'a> {
    /// The clusters and where the route for `web.example` goes; nothing else.
    fn new(clusters: &'a [(&'a str, u16)], route_to: &'a str) -> Self {
        Self {
            clusters,
            route_to,
            tcp_to: None,
            padding: 0,
            bad_regex: false,
        }
    }

    fn tcp(self, to: &'a str) -> Self {
        Self {
            tcp_to: Some(to),
            ..self
        }
    }

    fn padding(self, padding: usize) -> Self {
        Self { padding, ..self }
    }

    fn bad_regex(self) -> Self {
        Self {
            bad_regex: true,
            ..self
        }
    }

    fn write(&self, dir: &Path) {
        let mut clusters = String::from("resources:\n");
        for (name, port) in self.clusters {
            clusters.push_str(&format!(
                r#"- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: {name}
  type: EDS
  eds_cluster_config: {{ eds_config: {{ ads: {{}} }} }}
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: {name}
  endpoints:
  - lb_endpoints:
    - endpoint: {{ address: {{ socket_address: {{ address: 198.18.7.1, port_value: {port} }} }} }}
"#
            ));
        }
        let mut listeners = String::from(
            r#"resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: http
  address: { socket_address: { address: 198.18.7.2, port_value: 8080 } }
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: http
        rds: { route_config_name: routes, config_source: { ads: {} } }
        http_filters:
        - name: envoy.filters.http.router
          typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
"#,
        );
        if let Some(to) = self.tcp_to {
            listeners.push_str(&format!(
                r#"- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: tcp
  address: {{ socket_address: {{ address: 198.18.7.2, port_value: 9090 }} }}
  filter_chains:
  - filters:
    - name: envoy.filters.network.tcp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
        stat_prefix: tcp
        cluster: {to}
"#
            ));
        }
        let mut routes = format!(
            r#"resources:
- "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
  name: routes
  virtual_hosts:
  - name: web
    domains: [web.example]
    routes:
    - match: {{ prefix: / }}
      route: {{ cluster: {} }}
"#,
            self.route_to
        );
        if self.bad_regex {
            routes.push_str(
                "    - match: { safe_regex: { regex: \"(unclosed\" } }\n      direct_response: { status: 204 }\n",
            );
        }
        for i in 0..self.padding {
            routes.push_str(&format!(
                "  - name: pad{i}\n    domains: [pad{i}.example]\n    routes:\n    - match: {{ prefix: / }}\n      direct_response: {{ status: 204 }}\n"
            ));
        }
        // Written to temporary names and renamed, as a deployment tool (or Kubernetes'
        // ConfigMap volume) replaces files: the control plane never reads half a file.
        for (name, text) in [
            ("clusters.yaml", clusters),
            ("listeners.yaml", listeners),
            ("routes.yaml", routes),
        ] {
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).expect("write");
            std::fs::rename(&tmp, dir.join(name)).expect("rename");
        }
    }
}

struct Follower {
    client: client::Client,
    snapshots: mpsc::UnboundedReceiver<Arc<Snapshot>>,
    last: Option<Arc<Snapshot>>,
}

fn config(addr: SocketAddr, delta: bool) -> ClientConfig {
    ClientConfig {
        server: addr.to_string(),
        ads: nodemesh_config::AdsSource {
            cluster: "xds".into(),
            delta,
            node: envoy_types::pb::envoy::config::core::v3::Node {
                id: format!("test-{}", if delta { "delta" } else { "sotw" }),
                cluster: "nodemesh-tests".into(),
                ..Default::default()
            },
            node_on_first_message_only: false,
            initial_fetch_timeout: Duration::from_secs(15),
        },
        base: nodemesh_config::Resources::default(),
        max_resource_bytes: 4 << 20,
        max_message_bytes: 64 << 20,
        backoff: Backoff {
            base: Duration::from_millis(50),
            max: Duration::from_millis(400),
        },
    }
}

fn follow(config: ClientConfig) -> Follower {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = client::spawn(config, Metrics::default(), move |s: Snapshot| {
        let _ = tx.send(Arc::new(s));
        async {}
    });
    Follower {
        client,
        snapshots: rx,
        last: None,
    }
}

impl Follower {
    /// Waits for a published snapshot that satisfies `pred` (the last one counts).
    async fn until(&mut self, what: &str, pred: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
        if let Some(s) = &self.last
            && pred(s)
        {
            return s.clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.snapshots.recv()).await {
                Ok(Some(s)) => {
                    self.last = Some(s.clone());
                    if pred(&s) {
                        return s;
                    }
                }
                _ => panic!(
                    "no snapshot where {what}; client status: {}",
                    serde_json::to_string_pretty(&self.client.status()).unwrap_or_default()
                ),
            }
        }
    }

    /// Waits until the client's status satisfies `pred`.
    async fn until_status(&self, what: &str, pred: impl Fn(&client::Status) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !pred(&self.client.status()) {
            assert!(
                Instant::now() < deadline,
                "client status never showed {what}: {}",
                serde_json::to_string_pretty(&self.client.status()).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Snapshots published since the last look.
    fn drain(&mut self) -> usize {
        let mut n = 0;
        while let Ok(s) = self.snapshots.try_recv() {
            self.last = Some(s);
            n += 1;
        }
        n
    }
}

/// The cluster the `web.example` route forwards to.
fn web_target(s: &Snapshot) -> Option<String> {
    let vh = s.routes.get("routes")?.best_domain("web.example")?;
    match &vh.routes.first()?.action {
        RouteAction::Forward(f) => match &f.target {
            ClusterTarget::Named(n) => Some(n.clone()),
            _ => None,
        },
        _ => None,
    }
}

fn endpoint_port(s: &Snapshot, cluster: &str) -> Option<u16> {
    match &s.clusters.get(cluster)?.discovery {
        Discovery::Eds { endpoints, .. } | Discovery::Static(endpoints) => {
            endpoints.first().map(|e| e.address.port())
        }
        _ => None,
    }
}

async fn until_server(cp: &Cp, what: &str, pred: impl Fn(&ServerStatus) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !pred(&cp.status()) {
        assert!(
            Instant::now() < deadline,
            "control plane status never showed {what}: {}",
            serde_json::to_string_pretty(&cp.status()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn complete_config_and_changes(delta: bool) {
    let dir = tempfile::tempdir().expect("temporary folder");
    Folder::new(&[("web", 1001)], "web").write(dir.path());
    let cp = Cp::start(dir.path(), true, 0);
    let mut f = follow(config(cp.addr, delta));
    let s = f
        .until("the route and its EDS cluster arrived", |s| {
            web_target(s).as_deref() == Some("web") && endpoint_port(s, "web") == Some(1001)
        })
        .await;
    assert!(s.listener("http").is_some());

    // Both ends agree on what was sent and acknowledged.
    until_server(&cp, "every type acknowledged", |st| {
        st.clients.len() == 1
            && ["cds", "eds", "lds", "rds"].iter().all(|t| {
                st.clients[0].types.get(t).is_some_and(|c| {
                    !c.sent.is_empty()
                        && c.nacks == 0
                        && c.responses >= 1
                        && (delta || c.acked == c.sent)
                })
            })
    })
    .await;
    let st = cp.status();
    let node = &st.clients[0];
    assert_eq!(node.node, config(cp.addr, delta).ads.node.id);
    assert_eq!(node.variant, if delta { "delta" } else { "sotw" });
    let cs = f.client.status();
    for t in ["cds", "eds", "lds", "rds"] {
        assert_eq!(cs.types[t].nacks, 0, "{t}");
        assert!(cs.types[t].acks >= 1, "{t}");
        assert_eq!(cs.types[t].resources, 1, "{t} resources held");
    }
    assert_eq!(cs.state, "connected");

    // A new cluster and the route moved to it (hot reload of the folder).
    Folder::new(&[("web", 1001), ("api", 2002)], "api")
        .tcp("api")
        .write(dir.path());
    let s = f
        .until("the route moved to the new cluster", |s| {
            web_target(s).as_deref() == Some("api") && s.listener("tcp").is_some()
        })
        .await;
    assert_eq!(endpoint_port(&s, "api"), Some(2002));

    // Removal: the cluster, its assignment and the listener go.
    Folder::new(&[("web", 1003)], "web").write(dir.path());
    let s = f
        .until("the removed cluster and listener are gone", |s| {
            // Types arrive one by one: a snapshot may have the cluster gone and the route
            // still naming it (503 NC for that moment, as in Envoy) before the route moves.
            !s.clusters.contains_key("api")
                && s.listener("tcp").is_none()
                && web_target(s).as_deref() == Some("web")
                && endpoint_port(s, "web") == Some(1003)
        })
        .await;
    assert!(s.routes.contains_key("routes"));

    // The live configuration as an Envoy config dump reads back as the same configuration.
    let dump = f.client.config_dump().to_string();
    let read = nodemesh_config::load_config_dump(&dump).expect("the dump parses");
    assert_eq!(read.diagnostics.errors, Vec::<String>::new(), "{dump}");
    let back = read.snapshot.expect("the dump translates");
    assert_eq!(web_target(&back).as_deref(), Some("web"));
    assert_eq!(endpoint_port(&back, "web"), Some(1003));
    assert!(back.listener("http").is_some() && back.listener("tcp").is_none());
    assert!(dump.contains("\"dynamic_active_clusters\""), "{dump}");

    f.until_status("no EDS name left for the removed cluster", |st| {
        st.types
            .get("eds")
            .is_some_and(|t| t.subscribed == ["web".to_owned()])
    })
    .await;
}

#[tokio::test]
async fn sotw_delivers_a_complete_config_and_follows_changes() {
    complete_config_and_changes(false).await;
}

#[tokio::test]
async fn delta_delivers_a_complete_config_and_follows_changes() {
    complete_config_and_changes(true).await;
}

async fn rejected_update_keeps_last_good(delta: bool) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let good = Folder::new(&[("web", 1001)], "web");
    good.write(dir.path());
    // Unchecked: the control plane serves what nodemesh would refuse.
    let cp = Cp::start(dir.path(), false, 0);
    let mut f = follow(config(cp.addr, delta));
    f.until("the good config", |s| {
        web_target(s).as_deref() == Some("web")
    })
    .await;
    let published = f.client.status().published;

    // A route whose regex does not compile.
    Folder::new(&[("web", 1001)], "web")
        .bad_regex()
        .write(dir.path());
    let names_the_field = |r: &str| r.contains("route_config \"routes\"") && r.contains("regex");
    f.until_status("the RDS NACK naming the resource and field", |st| {
        st.types
            .get("rds")
            .and_then(|t| t.last_nack.as_ref())
            .is_some_and(|n| names_the_field(&n.reason))
    })
    .await;
    until_server(&cp, "the NACK on the control plane's side", |st| {
        st.clients.first().is_some_and(|c| {
            c.types.get("rds").is_some_and(|t| {
                t.nacks >= 1 && t.last_nack.as_deref().is_some_and(names_the_field)
            })
        })
    })
    .await;
    // Nothing new was published: the last good snapshot serves.
    f.drain();
    assert_eq!(f.client.status().published, published);
    let last = f.last.clone().expect("a snapshot");
    assert_eq!(last.routes["routes"].virtual_hosts()[0].routes.len(), 1);
    // The NACK is not answered by resending the same thing in a loop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let nacks = f.client.status().types["rds"].nacks;
    assert_eq!(nacks, 1, "the control plane resent a rejected update");

    // A reference to a cluster nobody defines is accepted, as Envoy accepts it, and named.
    Folder::new(&[("web", 1001)], "web")
        .tcp("nowhere")
        .write(dir.path());
    f.until("the listener to the unknown cluster", |s| {
        s.listener("tcp").is_some()
    })
    .await;
    let st = f.client.status();
    assert!(
        st.warnings
            .iter()
            .any(|w| w.contains("unknown cluster \"nowhere\"")),
        "{:?}",
        st.warnings
    );

    // The cluster arrives: nothing to warn about any more.
    Folder::new(&[("web", 1001), ("nowhere", 3003)], "web")
        .tcp("nowhere")
        .write(dir.path());
    let s = f
        .until("the cluster", |s| s.clusters.contains_key("nowhere"))
        .await;
    assert_eq!(endpoint_port(&s, "nowhere"), Some(3003));
    assert!(f.client.status().warnings.is_empty());
}

#[tokio::test]
async fn sotw_rejected_update_keeps_the_last_good_config() {
    rejected_update_keeps_last_good(false).await;
}

#[tokio::test]
async fn delta_rejected_update_keeps_the_last_good_config() {
    rejected_update_keeps_last_good(true).await;
}

#[tokio::test]
async fn a_resource_over_the_limit_is_refused() {
    for delta in [false, true] {
        let dir = tempfile::tempdir().expect("temporary folder");
        Folder::new(&[("web", 1001)], "web").write(dir.path());
        let cp = Cp::start(dir.path(), true, 0);
        let mut cfg = config(cp.addr, delta);
        cfg.max_resource_bytes = 4096;
        let mut f = follow(cfg);
        f.until("the small config", |s| web_target(s).is_some())
            .await;
        Folder::new(&[("web", 1001)], "web")
            .padding(200)
            .write(dir.path());
        f.until_status("the RDS NACK for the large route configuration", |st| {
            st.types
                .get("rds")
                .and_then(|t| t.last_nack.as_ref())
                .is_some_and(|n| n.reason.contains("over the limit of 4096 bytes"))
        })
        .await;
        f.drain();
        let last = f.last.clone().expect("a snapshot");
        assert_eq!(
            last.routes["routes"].virtual_hosts().len(),
            1,
            "delta={delta}"
        );
    }
}

async fn restart_and_resume(delta: bool) {
    let dir = tempfile::tempdir().expect("temporary folder");
    Folder::new(&[("web", 1001)], "web").write(dir.path());
    let cp = Cp::start(dir.path(), true, 0);
    let addr = cp.addr;
    let mut f = follow(config(addr, delta));
    f.until("the first config", |s| {
        endpoint_port(s, "web") == Some(1001)
    })
    .await;
    f.until_status("every type acknowledged", |st| {
        ["cds", "eds", "lds", "rds"]
            .iter()
            .all(|t| st.types.get(t).is_some_and(|t| t.acks >= 1))
    })
    .await;

    // The control plane dies mid-stream: the client keeps its config and retries.
    cp.stop();
    f.until_status("the disconnect", |st| st.state != "connected")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(f.drain(), 0, "nothing is published while disconnected");
    assert_eq!(
        endpoint_port(f.last.as_ref().expect("a snapshot"), "web"),
        Some(1001)
    );

    // It comes back with the same resources: the client resumes and is sent nothing.
    let cp = Cp::start(dir.path(), true, addr.port());
    f.until_status("the reconnect", |st| {
        st.state == "connected" && st.connects >= 2
    })
    .await;
    until_server(&cp, "the resumed stream", |st| {
        st.clients.len() == 1 && !st.clients[0].node.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = cp.status();
    for t in ["cds", "lds"] {
        let responses = st.clients[0].types.get(t).map_or(0, |t| t.responses);
        assert_eq!(
            responses, 0,
            "{t} was resent to a client that resumed with it: {st:?}"
        );
    }

    // It restarts again with a new history (other content, other versions).
    cp.stop();
    f.until_status("the second disconnect", |st| st.state != "connected")
        .await;
    Folder::new(&[("web", 1002), ("api", 2002)], "api").write(dir.path());
    let _cp = Cp::start(dir.path(), true, addr.port());
    let s = f
        .until("the new history's config", |s| {
            web_target(s).as_deref() == Some("api") && endpoint_port(s, "web") == Some(1002)
        })
        .await;
    assert_eq!(endpoint_port(&s, "api"), Some(2002));
}

#[tokio::test]
async fn sotw_survives_a_control_plane_restart_and_resumes() {
    restart_and_resume(false).await;
}

#[tokio::test]
async fn delta_survives_a_control_plane_restart_and_resumes() {
    restart_and_resume(true).await;
}

async fn flood(delta: bool) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let scratch = tempfile::tempdir().expect("temporary folder");
    Folder::new(&[("web", 1000)], "web").write(dir.path());
    // Every version to publish, prepared beforehand so the flood is as fast as sending.
    const N: u16 = 2000;
    let versions: Vec<_> = (1..=N)
        .map(|i| {
            Folder::new(&[("web", 1000 + i)], "web").write(scratch.path());
            files::load_dir(scratch.path(), true).expect("a flood version loads")
        })
        .collect();
    let cp = Cp::start(dir.path(), true, 0);
    let mut f = follow(config(cp.addr, delta));
    f.until("the first config", |s| {
        endpoint_port(s, "web") == Some(1000)
    })
    .await;
    let started = Instant::now();
    for v in versions {
        cp.handle.publish(v);
        tokio::task::yield_now().await;
    }
    let sent = started.elapsed();
    f.until("the last of the flood", |s| {
        endpoint_port(s, "web") == Some(1000 + N)
    })
    .await;
    let st = f.client.status();
    println!(
        "flood ({}): {N} versions published in {sent:?} ({:.0}/s); the client applied {} EDS updates and published {} snapshots",
        if delta { "delta" } else { "sotw" },
        f64::from(N) / sent.as_secs_f64(),
        st.types["eds"].acks,
        st.published
    );
    assert_eq!(st.types["eds"].nacks, 0);
    assert_eq!(st.state, "connected");
}

#[tokio::test]
async fn sotw_a_flood_of_updates_ends_at_the_last_one() {
    flood(false).await;
}

#[tokio::test]
async fn delta_a_flood_of_updates_ends_at_the_last_one() {
    flood(true).await;
}

#[tokio::test]
async fn an_assignment_that_never_comes_stops_warming_after_the_fetch_timeout() {
    let dir = tempfile::tempdir().expect("temporary folder");
    Folder::new(&[("web", 1001)], "web").write(dir.path());
    // The assignment file goes: the cluster remains, its endpoints do not come.
    let clusters = std::fs::read_to_string(dir.path().join("clusters.yaml")).expect("read");
    let cluster_only = clusters
        .split("- \"@type\": type.googleapis.com/envoy.config.endpoint")
        .next()
        .expect("the cluster part")
        .to_owned();
    std::fs::write(dir.path().join("clusters.yaml"), cluster_only).expect("write");
    let cp = Cp::start(dir.path(), false, 0);
    let mut cfg = config(cp.addr, false);
    cfg.ads.initial_fetch_timeout = Duration::from_millis(500);
    let mut f = follow(cfg);
    let asked = Instant::now();
    let s = f
        .until("the config without the assignment", |s| {
            s.clusters.contains_key("web")
        })
        .await;
    assert!(
        asked.elapsed() >= Duration::from_millis(500),
        "published before the fetch timeout, while the assignment was still awaited"
    );
    assert_eq!(endpoint_port(&s, "web"), None);
    assert!(f.client.status().warming.is_empty());
}
/// A listener with an Istio-style mTLS filter chain names its certificate and CA by SDS:
/// the client subscribes to both, holds them (they are never dumped), and lets go of them
/// when the chain goes.
#[tokio::test]
async fn secrets_named_by_tls_chains_are_subscribed_and_released() {
    for delta in [false, true] {
        let dir = tempfile::tempdir().expect("temporary folder");
        let write = |tls: bool| {
            let chain = if tls {
                r#"  - filter_chain_match: { transport_protocol: tls }
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
        require_client_certificate: true
        common_tls_context:
          tls_certificate_sds_secret_configs: [{ name: default, sds_config: { ads: {}, resource_api_version: V3 } }]
          combined_validation_context:
            default_validation_context: {}
            validation_context_sds_secret_config: { name: ROOTCA, sds_config: { ads: {}, resource_api_version: V3 } }
    filters:
    - name: envoy.filters.network.tcp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
        stat_prefix: mtls
        cluster: web
"#
            } else {
                ""
            };
            let text = format!(
                r#"resources:
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: web
  type: STATIC
  load_assignment:
    cluster_name: web
    endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 198.18.7.1, port_value: 80 }} }} }} }}] }}]
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: inbound
  address: {{ socket_address: {{ address: 198.18.7.2, port_value: 15006 }} }}
  listener_filters:
  - name: envoy.filters.listener.tls_inspector
    typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }}
  filter_chains:
{chain}  - filters:
    - name: envoy.filters.network.tcp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
        stat_prefix: plain
        cluster: web
- "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
  name: default
  tls_certificate:
    certificate_chain: {{ inline_string: "-----BEGIN CERTIFICATE-----\nnot-a-real-cert\n-----END CERTIFICATE-----\n" }}
    private_key: {{ inline_string: "very-secret-private-key" }}
- "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
  name: ROOTCA
  validation_context:
    trusted_ca: {{ inline_string: "-----BEGIN CERTIFICATE-----\nnot-a-real-ca\n-----END CERTIFICATE-----\n" }}
"#
            );
            let tmp = dir.path().join(".r.tmp");
            std::fs::write(&tmp, text).expect("write");
            std::fs::rename(&tmp, dir.path().join("r.yaml")).expect("rename");
        };
        write(true);
        let cp = Cp::start(dir.path(), true, 0);
        let mut f = follow(config(cp.addr, delta));
        f.until("the listener", |s| s.listener("inbound").is_some())
            .await;
        f.until_status("both secrets held", |st| {
            st.types.get("sds").is_some_and(|t| {
                t.resources == 2 && t.subscribed == ["ROOTCA".to_owned(), "default".to_owned()]
            })
        })
        .await;
        assert_eq!(f.client.status().types["sds"].nacks, 0);
        let dump = f.client.config_dump().to_string();
        assert!(
            !dump.contains("very-secret-private-key"),
            "a secret was dumped: {dump}"
        );

        // The TLS chain goes: so do the subscriptions and the secrets.
        write(false);
        f.until_status("the secrets released", |st| {
            st.types
                .get("sds")
                .is_some_and(|t| t.resources == 0 && t.subscribed.is_empty())
        })
        .await;
    }
}

/// Nonces belong to a stream: a client whose first request on a new stream carries a nonce
/// of an earlier one is answered as a new subscriber, not ignored as stale.
#[tokio::test]
async fn a_first_request_with_an_old_streams_nonce_is_answered() {
    use envoy_types::pb::envoy::service::discovery::v3::{
        DiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    };
    let dir = tempfile::tempdir().expect("temporary folder");
    Folder::new(&[("web", 1001)], "web").write(dir.path());
    let cp = Cp::start(dir.path(), true, 0);
    let mut grpc = AggregatedDiscoveryServiceClient::connect(format!("http://{}", cp.addr))
        .await
        .expect("connect");
    let first = DiscoveryRequest {
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        response_nonce: "42".into(),
        version_info: "from-an-earlier-stream".into(),
        ..Default::default()
    };
    let mut responses = grpc
        .stream_aggregated_resources(tokio_stream::iter([first]))
        .await
        .expect("stream")
        .into_inner();
    let resp = tokio::time::timeout(WAIT, responses.message())
        .await
        .expect("answered in time")
        .expect("no stream error")
        .expect("a response");
    assert_eq!(resp.resources.len(), 1);
}
