//! The L7 node proxy on a simulated node: pods' HTTP/1.1, h2c, gRPC and WebSocket traffic
//! captured by the kernel, routed by the agent's Envoy bootstrap, sent from the client
//! pod's own address without a second proxy hop, and short-circuited by sockmap.
use std::time::Duration;

use nodemesh_simnode::{Pod, require_root};
use nodemesh_tests::mesh::{AgentOptions, MeshNode, delta, metric};

const PORT: u16 = 8080;
const T: Duration = Duration::from_secs(60);

/// A sidecar-style outbound listener for port 8080: `api.shop` is routed by path and
/// protocol to two server pods, anything else goes to its original destination.
fn bootstrap(a: &Pod, b: &Pod) -> String {
    let cluster = |name: &str, pod: &Pod, h2: bool| {
        let proto = if h2 {
            "\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: { http2_protocol_options: {} }"
        } else {
            ""
        };
        format!(
            r#"  - name: {name}
    connect_timeout: 1s{proto}
    load_assignment:
      cluster_name: {name}
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {PORT} }} }} }} }}] }}]
"#,
            ip = pod.ip
        )
    };
    format!(
        r#"static_resources:
  listeners:
  - name: outbound_{PORT}
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: {PORT} }} }}
    bind_to_port: false
    listener_filters:
    - name: envoy.filters.listener.http_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound_{PORT}
          upgrade_configs: [{{ upgrade_type: websocket }}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            name: outbound_{PORT}
            virtual_hosts:
            - name: api
              domains: ["api.shop", "api.shop:{PORT}"]
              routes:
              - match: {{ prefix: "/b" }}
                route: {{ cluster: b }}
                response_headers_to_add: [{{ header: {{ key: x-routed, value: b }} }}]
              - match: {{ prefix: "/", grpc: {{}} }}
                route: {{ cluster: b-h2 }}
              - match: {{ prefix: "/" }}
                route: {{ cluster: a }}
                response_headers_to_add: [{{ header: {{ key: x-routed, value: a }} }}]
            - name: passthrough
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: passthrough }}
  clusters:
{a}{b}{b2}  - name: passthrough
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
"#,
        a = cluster("a", a, false),
        b = cluster("b", b, false),
        b2 = cluster("b-h2", b, true),
    )
}

fn response(report: &serde_json::Value, i: usize) -> &serde_json::Value {
    assert_eq!(report["ok"], true, "{report}");
    &report["responses"][i]
}

#[test]
fn pods_http_grpc_and_websocket_traffic_is_routed_at_l7() {
    if !require_root() {
        return;
    }
    let work = tempfile::tempdir().expect("work dir");
    let file = work.path().join("envoy.yaml");
    // The pods' addresses are known once they exist: start with an empty configuration,
    // then restart the agent on the real one (the restart is a handoff, as in production).
    std::fs::write(&file, "static_resources: {}\n").expect("bootstrap");
    let opts = AgentOptions {
        proxy: vec!["l7:".into(), format!("  bootstrap: {}", file.display())],
        ..AgentOptions::default()
    };
    let mut node = MeshNode::start_with("l7", &opts).expect("node");
    let client = node.add_pod("client", "shop").expect("pod");
    let a = node.add_pod("server-a", "shop").expect("pod");
    let b = node.add_pod("server-b", "shop").expect("pod");
    let outsider = node.add_pod("outsider", "plain").expect("pod");
    node.enable_namespace("shop").expect("label");
    std::fs::write(&file, bootstrap(&a, &b)).expect("bootstrap");
    node.start_agent()
        .expect("agent restarted on the bootstrap");
    let _sa = node.serve_http(&a, PORT, "a").expect("server a");
    let _sb = node.serve_http(&b, PORT, "b").expect("server b");
    let dst = format!("{}:{PORT}", a.ip);
    let before = node.counters().expect("counters");
    let l7_before = metric(
        &node.metrics().expect("metrics"),
        "nodemesh_proxy_l7_connections_total",
        &[],
    );

    // HTTP/1.1, two requests on one kept-alive connection to a's address: routed by path.
    let got = node
        .httpapp(
            &client,
            &[
                "request",
                "--connect",
                &dst,
                "--authority",
                "api.shop",
                "--path",
                "/b/x",
                "--count",
                "2",
            ],
            T,
        )
        .expect("http/1.1");
    for i in 0..2 {
        let r = response(&got, i);
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["upstream"], "b", "routed by path, not by address: {r}");
        assert_eq!(r["headers"]["x-routed"], "b");
        let peer = r["seen"]["peer"].as_str().expect("peer");
        assert!(
            peer.starts_with(&format!("{}:", client.ip)),
            "the upstream sees the client pod's own address: {peer}"
        );
    }
    let got = node
        .httpapp(
            &client,
            &[
                "request",
                "--connect",
                &dst,
                "--authority",
                "api.shop",
                "--path",
                "/",
            ],
            T,
        )
        .expect("http/1.1 to a");
    assert_eq!(response(&got, 0)["upstream"], "a");

    // h2c, multiplexed on one connection.
    let got = node
        .httpapp(
            &client,
            &[
                "request",
                "--h2c",
                "--connect",
                &dst,
                "--authority",
                "api.shop",
                "--path",
                "/b/h2",
                "--count",
                "3",
            ],
            T,
        )
        .expect("h2c");
    for i in 0..3 {
        let r = response(&got, i);
        assert_eq!(r["upstream"], "b", "{r}");
        assert_eq!(
            r["seen"]["version"], "HTTP/1.1",
            "b is an HTTP/1.1 cluster: {r}"
        );
    }

    // gRPC: to b over an HTTP/2 cluster, statuses passed through.
    let got = node
        .httpapp(
            &client,
            &[
                "grpc",
                "--connect",
                &dst,
                "--authority",
                "api.shop",
                "--count",
                "3",
            ],
            T,
        )
        .expect("grpc");
    for call in got["calls"].as_array().expect("calls") {
        assert_eq!(call["code"], 0, "{got}");
        assert_eq!(call["server"], "b", "{got}");
        assert_eq!(call["payload_ok"], true, "{got}");
    }
    let got = node
        .httpapp(
            &client,
            &[
                "grpc",
                "--connect",
                &dst,
                "--authority",
                "api.shop",
                "--status",
                "14",
            ],
            T,
        )
        .expect("grpc status");
    assert_eq!(got["calls"][0]["code"], 14, "{got}");

    // WebSocket upgrade, bytes through intact.
    let got = node
        .httpapp(
            &client,
            &[
                "upgrade",
                "--connect",
                &dst,
                "--authority",
                "api.shop",
                "--bytes",
                "300000",
            ],
            T,
        )
        .expect("upgrade");
    assert_eq!(got["status"], 101, "{got}");
    assert_eq!(got["intact"], true, "{got}");

    // Another host goes to its original destination.
    let got = node
        .httpapp(
            &client,
            &[
                "request",
                "--connect",
                &dst,
                "--authority",
                "elsewhere",
                "--path",
                "/",
            ],
            T,
        )
        .expect("passthrough");
    let r = response(&got, 0);
    assert_eq!(r["upstream"], "a", "ORIGINAL_DST: {r}");
    assert!(r["headers"]["x-routed"].is_null());

    // A pod outside the mesh reaches a directly: no route, no proxy headers.
    let got = node
        .httpapp(
            &outsider,
            &[
                "request",
                "--connect",
                &dst,
                "--authority",
                "api.shop",
                "--path",
                "/b",
            ],
            T,
        )
        .expect("outsider");
    let r = response(&got, 0);
    assert_eq!(r["upstream"], "a", "not routed: {r}");
    assert!(
        r["headers"]["x-envoy-upstream-service-time"].is_null(),
        "{r}"
    );

    let after = node.counters().expect("counters");
    let l7_after = metric(
        &node.metrics().expect("metrics"),
        "nodemesh_proxy_l7_connections_total",
        &[],
    );
    // One capture per client connection (7 connections: 2 http/1.1, h2c, 2 grpc channels,
    // upgrade, passthrough); the proxy's own upstream sockets are never captured again.
    assert_eq!(delta(&before, &after, "connect4.redirected"), 7);
    assert_eq!(l7_after - l7_before, 7.0);
    assert!(
        delta(&before, &after, "sk_msg.redirected") > 0,
        "the client <-> proxy and proxy <-> server hops are short-circuited"
    );
    let metrics = node.metrics().expect("metrics");
    // Per-route and per-cluster statistics, by what each request took.
    let route = |r: &str, class: &str| {
        metric(
            &metrics,
            "nodemesh_route_rq_total",
            &[("route", &format!("outbound_8080/{r}")), ("class", class)],
        )
    };
    assert_eq!(route("api/0", "2xx"), 5.0, "/b: 2 HTTP/1.1 + 3 h2c");
    assert_eq!(route("api/1", "2xx"), 4.0, "gRPC: 4 calls");
    assert_eq!(route("api/2", "2xx"), 1.0);
    assert_eq!(route("api/2", "1xx"), 1.0, "the upgrade");
    assert_eq!(route("passthrough/0", "2xx"), 1.0);
    assert_eq!(
        metric(
            &metrics,
            "nodemesh_upstream_rq_total",
            &[("cluster", "b-h2")]
        ),
        4.0
    );
}
