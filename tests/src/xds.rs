//! A control plane on a simulated node: `nodemesh controlplane` serving a folder of
//! resources that route one HTTP port of the pods, and the ADS bootstrap that points the
//! agent at it. Used by `tests/xds.rs` and by the demo.
use std::{path::Path, process::Command};

use nodemesh_simnode::{Pod, Process, bin_path};

use crate::mesh::MeshNode;

/// Writes the resources: an outbound listener for `port` (not bound: the capture feeds it)
/// routing `host` (by RDS, route configuration named after the port) to the EDS cluster
/// `route_to`, one of `clusters` (name, the pod serving it on `port`). The file is replaced
/// by a rename, as a deployment tool or a ConfigMap volume replaces it.
pub fn write_folder(
    dir: &Path,
    port: u16,
    host: &str,
    clusters: &[(&str, &Pod)],
    route_to: &str,
) -> std::io::Result<()> {
    let mut text = String::from("resources:\n");
    for (name, pod) in clusters {
        text.push_str(&format!(
            r#"- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: {name}
  type: EDS
  connect_timeout: 1s
  eds_cluster_config: {{ eds_config: {{ ads: {{}} }} }}
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: {name}
  endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }} }}] }}]
"#,
            ip = pod.ip
        ));
    }
    text.push_str(&format!(
        r#"- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: outbound_{port}
  address: {{ socket_address: {{ address: 0.0.0.0, port_value: {port} }} }}
  bind_to_port: false
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: outbound_{port}
        rds: {{ route_config_name: "{port}", config_source: {{ ads: {{}} }} }}
        http_filters:
        - name: envoy.filters.http.router
          typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
- "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
  name: "{port}"
  virtual_hosts:
  - name: {host}
    domains: ["{host}", "{host}:{port}"]
    routes:
    - match: {{ prefix: "/" }}
      route: {{ cluster: {route_to} }}
"#
    ));
    let tmp = dir.join(".resources.yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join("resources.yaml"))
}

/// An Envoy bootstrap whose only static resource is the control plane on the node's
/// loopback at `port`; the rest comes over ADS (`delta`: DELTA_GRPC, else GRPC).
pub fn ads_bootstrap(port: u16, delta: bool) -> String {
    ads_bootstrap_as(port, delta, "nodemesh~198.18.0.1~node")
}

/// [`ads_bootstrap`] with the node id `node` (the control plane's `/status` shows it).
pub fn ads_bootstrap_as(port: u16, delta: bool, node: &str) -> String {
    format!(
        r#"node: {{ id: "{node}", cluster: nodemesh }}
dynamic_resources:
  ads_config:
    api_type: {api}
    transport_api_version: V3
    grpc_services: [{{ envoy_grpc: {{ cluster_name: xds }} }}]
  cds_config: {{ ads: {{}}, resource_api_version: V3 }}
  lds_config: {{ ads: {{}}, resource_api_version: V3 }}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: xds
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }}] }}]
"#,
        api = if delta { "DELTA_GRPC" } else { "GRPC" }
    )
}

/// Starts `nodemesh controlplane` in the node's namespace, serving `dir` on
/// `127.0.0.1:port` (looked at every 100 ms).
pub fn start_control_plane(node: &MeshNode, dir: &Path, port: u16) -> anyhow::Result<Process> {
    let mut cmd = Command::new(bin_path("nodemesh"));
    cmd.args(["controlplane", "--poll-ms", "100", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--dir")
        .arg(dir);
    Ok(node.sim.spawn_in_node(cmd)?)
}

/// Sends one HTTP/1.1 request for `host` from `client` to `dst` (captured by the node
/// proxy); the name of the upstream that answered 200, or what happened instead.
pub fn upstream(node: &MeshNode, client: &Pod, dst: &str, host: &str) -> Result<String, String> {
    let got = node
        .httpapp(
            client,
            &[
                "request",
                "--connect",
                dst,
                "--authority",
                host,
                "--path",
                "/x",
            ],
            std::time::Duration::from_secs(60),
        )
        .map_err(|e| e.to_string())?;
    let r = &got["responses"][0];
    if r["status"] != 200 {
        return Err(format!("{got}"));
    }
    Ok(r["upstream"].as_str().unwrap_or_default().to_owned())
}
