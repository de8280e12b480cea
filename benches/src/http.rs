//! The HTTP part of the data-path benchmark: HTTP/1.1, h2c and gRPC unary requests from a
//! client pod to a server pod, direct, through the L7 node proxy without sockmap, and with
//! sockmap; fixed-rate latency (p50/p90/p99/p99.9) and closed-loop throughput, with the
//! agent's CPU time per 1000 requests. Every row is checked against the kernel counters and
//! the proxy's L7 counter, or the run fails.
//!
//! The node proxy runs a sidecar-style L7 configuration: a listener for the server's port
//! with the HTTP connection manager, one route to an `ORIGINAL_DST` cluster that speaks the
//! downstream protocol. Every request is decoded, routed and re-encoded, as through a mesh
//! proxy, without policy.
use std::time::Duration;

use anyhow::{Context as _, bail};
use nodemesh_simnode::{Pod, Process, load::Protocol};
use nodemesh_tests::mesh::{AgentOptions, MeshNode, metric};
use serde::{Deserialize, Serialize};

use crate::paths::Path;

pub const PORT: u16 = 8080;

/// The L7 configuration of the benchmark's agent.
pub fn bootstrap() -> String {
    format!(
        r#"static_resources:
  listeners:
  - name: outbound_{PORT}
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: {PORT} }} }}
    bind_to_port: false
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound_{PORT}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            name: outbound_{PORT}
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: passthrough, timeout: 0s }}
  clusters:
  - name: passthrough
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        use_downstream_protocol_config: {{ http_protocol_options: {{}}, http2_protocol_options: {{}} }}
"#
    )
}

/// One measurement of `nm-httpapp load`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Load {
    pub requests: u64,
    pub errors: u64,
    pub throughput_rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// The load generator's CPU seconds.
    pub cpu_seconds: f64,
    /// The agent's CPU seconds during the run (filled by the harness).
    #[serde(default)]
    pub agent_cpu_seconds: f64,
}

/// What a run asks for.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub protocol: Protocol,
    /// 0: closed loop.
    pub rate: u64,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub response_bytes: usize,
}

/// A node with an L7 agent, a client pod and an HTTP server pod.
#[allow(
    missing_debug_implementations,
    reason = "holds processes and a node; nothing to print"
)]
pub struct HttpBench {
    pub node: MeshNode,
    pub client: Pod,
    pub server: Pod,
    _server: Process,
    _work: tempfile::TempDir,
}

impl HttpBench {
    pub fn start(label: &str) -> anyhow::Result<Self> {
        Self::start_with(label, &[])
    }

    /// With extra lines under `proxy.l7:` (e.g. per-pod limits).
    pub fn start_with(label: &str, l7_extra: &[&str]) -> anyhow::Result<Self> {
        let work = tempfile::tempdir()?;
        let file = work.path().join("envoy.yaml");
        std::fs::write(&file, bootstrap())?;
        let mut proxy = vec!["l7:".into(), format!("  bootstrap: {}", file.display())];
        proxy.extend(l7_extra.iter().map(|l| format!("  {l}")));
        let opts = AgentOptions {
            proxy,
            ..AgentOptions::default()
        };
        let mut node = MeshNode::start_with(label, &opts)?;
        let client = node.add_pod("client", "bench")?;
        let server = node.add_pod("server", "bench")?;
        let process = node.serve_http(&server, PORT, "server")?;
        Ok(Self {
            node,
            client,
            server,
            _server: process,
            _work: work,
        })
    }

    /// Runs one load on `path`, checking that it took that path.
    pub fn measure(&self, path: Path, shape: Shape) -> anyhow::Result<Load> {
        crate::paths::Paths::new(&self.node, &self.client, &self.server).select(path)?;
        self.measure_from(&self.client, path, shape)
    }

    /// The `nm-httpapp load` arguments for `shape` against the server.
    pub fn load_args(&self, shape: Shape) -> Vec<String> {
        let protocol = match shape.protocol {
            Protocol::Http1 => "http1",
            Protocol::H2c => "h2c",
            Protocol::Grpc => "grpc",
        };
        [
            "load",
            "--connect",
            &format!("{}:{PORT}", self.server.ip),
            "--authority",
            "server.bench",
            "--protocol",
            protocol,
            "--rate",
            &shape.rate.to_string(),
            "--connections",
            &shape.connections.to_string(),
            "--duration-ms",
            &shape.duration.as_millis().to_string(),
            "--warmup-ms",
            &shape.warmup.as_millis().to_string(),
            "--response-bytes",
            &shape.response_bytes.to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// [`Self::measure`] from another client pod, with the node already on `path`.
    pub fn measure_from(&self, client: &Pod, path: Path, shape: Shape) -> anyhow::Result<Load> {
        let before = self.node.counters()?;
        let l7_before = self.l7_connections()?;
        let cpu_before = self.agent_cpu()?;
        let args = self.load_args(shape);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let report = self.node.httpapp(
            client,
            &args,
            shape.duration + shape.warmup + Duration::from_secs(60),
        )?;
        if report["ok"] != true {
            bail!("{path:?} {:?}: the load failed: {report}", shape.protocol);
        }
        let mut load: Load =
            serde_json::from_value(report.clone()).with_context(|| format!("{report}"))?;
        load.agent_cpu_seconds = self.agent_cpu()? - cpu_before;
        let after = self.node.counters()?;
        let delta = |k: &str| {
            after
                .get(k)
                .copied()
                .unwrap_or(0)
                .saturating_sub(before.get(k).copied().unwrap_or(0))
        };
        let captured = delta("connect4.redirected");
        let redirected = delta("sk_msg.redirected");
        let l7 = self.l7_connections()? - l7_before;
        let conns = shape.connections as u64;
        match path {
            Path::Direct if captured != 0 || l7 != 0 => {
                bail!("the direct path went through the proxy ({captured} captures)")
            }
            Path::Proxied if captured != conns || l7 != conns || redirected != 0 => bail!(
                "L7 path: {captured} captures, {l7} L7 connections, {redirected} sockmap \
                 redirects (want {conns}, {conns}, 0)"
            ),
            Path::Sockmap if captured != conns || l7 != conns || redirected < load.requests => {
                bail!(
                    "L7 + sockmap path: {captured} captures, {l7} L7 connections, {redirected} \
                     redirects for {} requests",
                    load.requests
                )
            }
            _ => Ok(load),
        }
    }

    fn l7_connections(&self) -> anyhow::Result<u64> {
        Ok(metric(
            &self.node.metrics()?,
            "nodemesh_proxy_l7_connections_total",
            &[],
        ) as u64)
    }

    /// The agent's user + system CPU seconds so far.
    pub fn agent_cpu(&self) -> anyhow::Result<f64> {
        let pid = self.node.agent_pid().context("no agent")?;
        process_cpu_seconds(pid)
    }
}

/// User + system CPU seconds of a process, from `/proc/<pid>/stat`.
pub fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Ok((ticks(11) + ticks(12)) / hz)
}
