//! Envoy as the baselines of the sidecar comparison, set up the way Istio sets it up:
//!
//! - **sidecar**: an Envoy in a pod's network namespace and cgroup, running as uid 1337,
//!   with the pod's traffic captured into it by in-pod iptables `REDIRECT` rules equivalent
//!   to istio-init's (outbound to 15001, inbound to 15006, the proxy's own uid and loopback
//!   excluded, 127.0.0.6 as the inbound source), configured as istiod configures a sidecar
//!   for a plain HTTP port: `virtualOutbound` (15001, original destination) handing over to a
//!   per-port outbound listener with the HTTP connection manager, and `virtualInbound`
//!   (15006) with a filter chain for the application port;
//! - **node**: one Envoy in the node's network namespace as a per-node L7 proxy, the client
//!   pod's connections to the server sent to it by an in-pod `DNAT` rule.
//!
//! Both run with Istio's sidecar default of 2 worker threads and statistics on. The rules
//! are installed for a scenario and removed after it, so the same pods serve every scenario.
use std::{net::Ipv4Addr, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use nodemesh_simnode::{Pod, Process, SimNode};

/// Istio's proxy uid.
pub const PROXY_UID: u32 = 1337;
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
/// The node Envoy's listener (not 15001: the nodemesh agent has that).
pub const NODE_PORT: u16 = 15101;
/// Envoy admin ports (in the pod's namespace, or the node's).
pub const ADMIN_PORT: u16 = 15000;
pub const NODE_ADMIN_PORT: u16 = 15100;

/// The Envoy binary: `$NODEMESH_ENVOY`, or the project's venv.
pub fn binary() -> anyhow::Result<std::path::PathBuf> {
    nodemesh_tests::differential::envoy_path()
}

/// Runs a command with its output, failing with it.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn iptables(netns: &str, rules: &[&str]) -> anyhow::Result<()> {
    for rule in rules {
        run(Command::new("ip")
            .args(["netns", "exec", netns, "iptables", "-w", "-t", "nat"])
            .args(rule.split_whitespace()))?;
    }
    Ok(())
}

/// istio-init's NAT rules in `pod`: every TCP connection the application opens goes to the
/// sidecar's 15001, every inbound connection to its 15006.
pub fn capture_sidecar(pod: &Pod) -> anyhow::Result<()> {
    let uid = PROXY_UID.to_string();
    let rules = [
        "-N ISTIO_REDIRECT".to_owned(),
        format!("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}"),
        "-N ISTIO_IN_REDIRECT".to_owned(),
        format!("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {INBOUND_PORT}"),
        "-N ISTIO_INBOUND".to_owned(),
        "-A PREROUTING -p tcp -j ISTIO_INBOUND".to_owned(),
        format!("-A ISTIO_INBOUND -p tcp --dport {ADMIN_PORT} -j RETURN"),
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".to_owned(),
        "-N ISTIO_OUTPUT".to_owned(),
        "-A OUTPUT -p tcp -j ISTIO_OUTPUT".to_owned(),
        "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN".to_owned(),
        format!(
            "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner {uid} -j ISTIO_IN_REDIRECT"
        ),
        format!("-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner {uid} -j RETURN"),
        format!("-A ISTIO_OUTPUT -m owner --uid-owner {uid} -j RETURN"),
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN".to_owned(),
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT".to_owned(),
    ];
    let rules: Vec<&str> = rules.iter().map(String::as_str).collect();
    iptables(&pod.netns_name, &rules)
}

/// The client pod's connections to `server:port` go to the node Envoy.
pub fn capture_to_node(
    client: &Pod,
    server: &Pod,
    port: u16,
    node_ip: Ipv4Addr,
) -> anyhow::Result<()> {
    let rule = format!(
        "-A OUTPUT -p tcp -d {}/32 --dport {port} -j DNAT --to-destination {node_ip}:{NODE_PORT}",
        server.ip
    );
    iptables(&client.netns_name, &[&rule])
}

/// Removes every NAT rule and chain of `pod`.
pub fn release(pod: &Pod) -> anyhow::Result<()> {
    iptables(&pod.netns_name, &["-F", "-X"])
}

fn hcm(stat_prefix: &str, route: &str, cluster: &str) -> String {
    format!(
        r#"        - name: envoy.filters.network.http_connection_manager
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
            stat_prefix: {stat_prefix}
            codec_type: AUTO
            http_filters:
            - name: envoy.filters.http.router
              typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
            route_config:
              name: "{route}"
              virtual_hosts:
              - name: "{route}"
                domains: ["*"]
                routes:
                - match: {{ prefix: "/" }}
                  route: {{ cluster: "{cluster}", timeout: 0s }}
"#
    )
}

const DOWNSTREAM_PROTOCOL: &str = r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        use_downstream_protocol_config: { http_protocol_options: {}, http2_protocol_options: {} }
"#;

/// The sidecar configuration istiod would send a pod that calls `server:port` and serves
/// `port` itself (plain HTTP, no mTLS), as a static bootstrap.
pub fn sidecar_bootstrap(server: &Pod, port: u16) -> String {
    let outbound_cluster = format!("outbound|{port}||server.bench.svc.cluster.local");
    let inbound_cluster = format!("inbound|{port}||");
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ADMIN_PORT} }} }}
static_resources:
  listeners:
  - name: virtualOutbound
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: {OUTBOUND_PORT} }} }}
    use_original_dst: true
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: PassthroughCluster
          cluster: PassthroughCluster
  - name: "0.0.0.0_{port}"
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: {port} }} }}
    bind_to_port: false
    filter_chains:
    - filters:
{outbound_hcm}  - name: virtualInbound
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: {INBOUND_PORT} }} }}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst }}
    filter_chains:
    - filter_chain_match: {{ destination_port: {port} }}
      filters:
{inbound_hcm}  clusters:
  - name: PassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 10s
  - name: "{outbound_cluster}"
    type: STATIC
    connect_timeout: 10s
{DOWNSTREAM_PROTOCOL}    load_assignment:
      cluster_name: "{outbound_cluster}"
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }} }}] }}]
  - name: "{inbound_cluster}"
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 10s
    upstream_bind_config: {{ source_address: {{ address: 127.0.0.6, port_value: 0 }} }}
{DOWNSTREAM_PROTOCOL}"#,
        ip = server.ip,
        outbound_hcm = hcm(
            &format!("outbound_0.0.0.0_{port}"),
            &port.to_string(),
            &outbound_cluster
        ),
        inbound_hcm = hcm(
            &format!("inbound_0.0.0.0_{port}"),
            "inbound|http|8080",
            &inbound_cluster
        ),
    )
}

/// The node Envoy: one HTTP listener for the captured connections, to the server.
pub fn node_bootstrap(node_ip: Ipv4Addr, server: &Pod, port: u16) -> String {
    let cluster = format!("outbound|{port}||server.bench.svc.cluster.local");
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {NODE_ADMIN_PORT} }} }}
static_resources:
  listeners:
  - name: node_{port}
    address: {{ socket_address: {{ address: {node_ip}, port_value: {NODE_PORT} }} }}
    filter_chains:
    - filters:
{hcm}  clusters:
  - name: "{cluster}"
    type: STATIC
    connect_timeout: 10s
{DOWNSTREAM_PROTOCOL}    load_assignment:
      cluster_name: "{cluster}"
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }} }}] }}]
"#,
        ip = server.ip,
        hcm = hcm(&format!("node_{port}"), "node", &cluster),
    )
}

/// Starts Envoy on `config` in `pod` (as uid 1337) or, with `None`, in the node.
pub fn start(
    sim: &SimNode,
    pod: Option<&Pod>,
    config: &Path,
    name: &str,
) -> anyhow::Result<Process> {
    let envoy = binary()?;
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={PROXY_UID}"),
        &format!("--regid={PROXY_UID}"),
        "--clear-groups",
    ])
    .arg(&envoy)
    .arg("-c")
    .arg(config)
    .args([
        "--concurrency",
        "2",
        "--disable-hot-restart",
        "-l",
        "warning",
        "--service-node",
        name,
        "--service-cluster",
        "bench",
    ]);
    let process = match pod {
        Some(pod) => sim.spawn_in_pod(pod, cmd)?,
        None => sim.spawn_in_node(cmd)?,
    };
    Ok(process)
}

/// Waits until Envoy's admin answers `/ready` with `LIVE`.
pub fn wait_ready(
    sim: &SimNode,
    pod: Option<&Pod>,
    admin_port: u16,
    process: &mut Process,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = process.try_wait()? {
            bail!("Envoy exited with {status}: {}", process.stderr_text());
        }
        if admin(sim, pod, admin_port, "/ready").is_ok_and(|b| b.contains("LIVE")) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("Envoy not ready after 30 s: {}", process.stderr_text());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// GET `path` on an Envoy admin port in `pod` (or the node), the body as text.
pub fn admin(sim: &SimNode, pod: Option<&Pod>, port: u16, path: &str) -> anyhow::Result<String> {
    let mut cmd = Command::new(nodemesh_simnode::bin_path("nm-httpapp"));
    cmd.args([
        "request",
        "--connect",
        &format!("127.0.0.1:{port}"),
        "--authority",
        "admin",
        "--path",
        path,
        "--print-body",
        "--timeout-ms",
        "3000",
    ]);
    let out = match pod {
        Some(pod) => sim.run_in_pod(pod, cmd, Duration::from_secs(10))?,
        None => sim.run_in_node(cmd, Duration::from_secs(10))?,
    };
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("admin {path}: {}", String::from_utf8_lossy(&out.stdout)))?;
    doc["responses"][0]["body"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("admin {path}: {doc}"))
}

/// A counter from Envoy's `/stats` text (`name: value` lines), 0 when absent.
pub fn stat(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
