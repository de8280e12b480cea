//! Envoy bootstraps with N services in the shape istiod gives a node proxy on one port: for
//! each service a cluster with one endpoint and a virtual host with the service's names
//! (`svc`, `svc.ns`, `svc.ns.svc`, the FQDN, each with and without the port) and a few
//! routes, the last one the catch-all. The benchmarks' cost-growth part and the route
//! selection micro-benchmark load the same shape.

/// A bootstrap with `n` services behind one HTTP listener on `127.0.0.1:port`; the
/// listener's inline route configuration is named `"8080"`.
pub fn bootstrap(n: usize, port: u16) -> String {
    let mut vhosts = String::new();
    let mut clusters = String::new();
    for i in 0..n {
        let names = ["", ".bench", ".bench.svc", ".bench.svc.cluster.local"]
            .iter()
            .flat_map(|s| [format!("\"svc-{i}{s}\""), format!("\"svc-{i}{s}:8080\"")])
            .collect::<Vec<_>>()
            .join(", ");
        let cluster = format!("outbound|8080||svc-{i}.bench.svc.cluster.local");
        vhosts.push_str(&format!(
            "            - name: svc-{i}\n              domains: [{names}]\n              routes:\n              - match: {{ prefix: \"/api/v2/\", headers: [{{ name: x-canary, string_match: {{ exact: \"1\" }} }}] }}\n                route: {{ cluster: \"{cluster}\" }}\n              - match: {{ path: \"/healthz\" }}\n                direct_response: {{ status: 200 }}\n              - match: {{ prefix: \"/\" }}\n                route: {{ cluster: \"{cluster}\", timeout: 0s }}\n"
        ));
        clusters.push_str(&format!(
            "  - name: \"{cluster}\"\n    connect_timeout: 10s\n    load_assignment:\n      cluster_name: svc-{i}\n      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 198.18.{}.{}, port_value: 8080 }} }} }} }}] }}]\n",
            1 + i / 250,
            1 + i % 250
        ));
    }
    format!(
        r#"static_resources:
  listeners:
  - name: outbound_8080
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound_8080
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            name: "8080"
            virtual_hosts:
{vhosts}  clusters:
{clusters}"#
    )
}
