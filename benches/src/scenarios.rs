//! The five scenarios of the sidecar comparison, on one simulated node with the same client
//! and server pods, switched at run time:
//!
//! 1. **direct**: client pod to server pod, no proxy;
//! 2. **sidecar pair**: Envoy in the client pod and in the server pod, Istio's model;
//! 3. **node Envoy**: one Envoy per node;
//! 4. **nodemesh, capture only**: the L7 node proxy, sockmap off;
//! 5. **nodemesh + sockmap**.
//!
//! Every measurement checks that the traffic went through the proxies its scenario names
//! (Envoy's request counters, nodemesh's kernel and L7 counters) and fails otherwise.
use std::time::Duration;

use anyhow::{Context as _, bail};
use nodemesh_simnode::Process;
use serde::Serialize;

use crate::{
    envoy,
    http::{HttpBench, Load, PORT, Shape, process_cpu_seconds},
    paths::Path,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    Direct,
    SidecarPair,
    NodeEnvoy,
    NodemeshCapture,
    NodemeshSockmap,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::Direct,
        Scenario::SidecarPair,
        Scenario::NodeEnvoy,
        Scenario::NodemeshCapture,
        Scenario::NodemeshSockmap,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Scenario::Direct => "direct (no proxy)",
            Scenario::SidecarPair => "Envoy sidecar pair",
            Scenario::NodeEnvoy => "node-level Envoy",
            Scenario::NodemeshCapture => "nodemesh, capture only",
            Scenario::NodemeshSockmap => "nodemesh + sockmap",
        }
    }
}

/// One run of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub load: Load,
    /// CPU seconds of the scenario's proxies during the run.
    pub proxy_cpu_seconds: f64,
    /// RSS of each of the scenario's proxies after the run, KiB.
    pub proxy_rss_kib: Vec<u64>,
}

/// The node, its pods, and the three Envoys (idle unless their scenario is selected).
#[allow(
    missing_debug_implementations,
    reason = "holds processes and a node; nothing to print"
)]
pub struct Comparison {
    pub bench: HttpBench,
    client_envoy: Process,
    server_envoy: Process,
    node_envoy: Process,
    _work: tempfile::TempDir,
}

impl Comparison {
    pub fn start(label: &str) -> anyhow::Result<Self> {
        let bench = HttpBench::start(label)?;
        let work = tempfile::tempdir()?;
        // Envoy runs as uid 1337 and must read its configuration.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755))?;
        let sidecar = work.path().join("sidecar.yaml");
        std::fs::write(&sidecar, envoy::sidecar_bootstrap(&bench.server, PORT))?;
        let node_cfg = work.path().join("node.yaml");
        let node_ip = bench.node.sim.node_ip();
        std::fs::write(
            &node_cfg,
            envoy::node_bootstrap(node_ip, &bench.server, PORT),
        )?;
        let sim = &bench.node.sim;
        let mut client_envoy = envoy::start(sim, Some(&bench.client), &sidecar, "client")?;
        let mut server_envoy = envoy::start(sim, Some(&bench.server), &sidecar, "server")?;
        let mut node_envoy = envoy::start(sim, None, &node_cfg, "node")?;
        envoy::wait_ready(
            sim,
            Some(&bench.client),
            envoy::ADMIN_PORT,
            &mut client_envoy,
        )
        .context("client sidecar")?;
        envoy::wait_ready(
            sim,
            Some(&bench.server),
            envoy::ADMIN_PORT,
            &mut server_envoy,
        )
        .context("server sidecar")?;
        envoy::wait_ready(sim, None, envoy::NODE_ADMIN_PORT, &mut node_envoy)
            .context("node Envoy")?;
        Ok(Self {
            bench,
            client_envoy,
            server_envoy,
            node_envoy,
            _work: work,
        })
    }

    /// Puts the node in the state `scenario` needs.
    pub fn select(&self, scenario: Scenario) -> anyhow::Result<()> {
        let b = &self.bench;
        envoy::release(&b.client)?;
        envoy::release(&b.server)?;
        let paths = crate::paths::Paths::new(&b.node, &b.client, &b.server);
        match scenario {
            Scenario::Direct => paths.select(Path::Direct),
            Scenario::SidecarPair => {
                paths.select(Path::Direct)?;
                envoy::capture_sidecar(&b.client)?;
                envoy::capture_sidecar(&b.server)
            }
            Scenario::NodeEnvoy => {
                paths.select(Path::Direct)?;
                envoy::capture_to_node(&b.client, &b.server, PORT, b.node.sim.node_ip())
            }
            Scenario::NodemeshCapture => paths.select(Path::Proxied),
            Scenario::NodemeshSockmap => paths.select(Path::Sockmap),
        }
    }

    fn envoys(&self, scenario: Scenario) -> Vec<&Process> {
        match scenario {
            Scenario::SidecarPair => vec![&self.client_envoy, &self.server_envoy],
            Scenario::NodeEnvoy => vec![&self.node_envoy],
            _ => Vec::new(),
        }
    }

    /// The requests each Envoy's HTTP connection manager counted so far.
    fn envoy_requests(&self) -> anyhow::Result<[u64; 3]> {
        let b = &self.bench;
        let sim = &b.node.sim;
        let rq = |stats: &str, prefix: &str| {
            envoy::stat(stats, &format!("http.{prefix}.downstream_rq_total"))
        };
        let client = envoy::admin(sim, Some(&b.client), envoy::ADMIN_PORT, "/stats")?;
        let server = envoy::admin(sim, Some(&b.server), envoy::ADMIN_PORT, "/stats")?;
        let node = envoy::admin(sim, None, envoy::NODE_ADMIN_PORT, "/stats")?;
        Ok([
            rq(&client, &format!("outbound_0.0.0.0_{PORT}")),
            rq(&server, &format!("inbound_0.0.0.0_{PORT}")),
            rq(&node, &format!("node_{PORT}")),
        ])
    }

    /// Runs `shape` on `scenario` (already selected), verifies the path, and measures the
    /// proxies' CPU and memory.
    pub fn measure(&self, scenario: Scenario, shape: Shape) -> anyhow::Result<Measured> {
        let b = &self.bench;
        let proxies: Vec<u32> = match scenario {
            Scenario::Direct => Vec::new(),
            Scenario::NodemeshCapture | Scenario::NodemeshSockmap => {
                vec![b.node.agent_pid().context("no agent")?]
            }
            s => self.envoys(s).iter().map(|p| p.pid()).collect(),
        };
        let cpu = |pids: &[u32]| -> anyhow::Result<f64> {
            pids.iter().map(|p| process_cpu_seconds(*p)).sum()
        };
        let envoy_before = self.envoy_requests()?;
        let cpu_before = cpu(&proxies)?;
        let path = match scenario {
            Scenario::NodemeshCapture => Path::Proxied,
            Scenario::NodemeshSockmap => Path::Sockmap,
            // The nodemesh counters must show no capture for the Envoy scenarios.
            _ => Path::Direct,
        };
        let load = b.measure_from(&b.client, path, shape)?;
        let proxy_cpu_seconds = cpu(&proxies)? - cpu_before;
        let after = self.envoy_requests()?;
        let grew = |i: usize| after[i].saturating_sub(envoy_before[i]);
        let want = load.requests;
        let ok = match scenario {
            Scenario::SidecarPair => grew(0) >= want && grew(1) >= want && grew(2) == 0,
            Scenario::NodeEnvoy => grew(2) >= want && grew(0) == 0 && grew(1) == 0,
            _ => grew(0) == 0 && grew(1) == 0 && grew(2) == 0,
        };
        if !ok {
            bail!(
                "{}: Envoy counted {:?} requests (client sidecar, server sidecar, node) for {want}",
                scenario.label(),
                [grew(0), grew(1), grew(2)]
            );
        }
        let proxy_rss_kib = proxies
            .iter()
            .map(|p| rss_kib(*p))
            .collect::<anyhow::Result<_>>()?;
        Ok(Measured {
            load,
            proxy_cpu_seconds,
            proxy_rss_kib,
        })
    }

    /// Leaves the pods without rules.
    pub fn finish(&self) -> anyhow::Result<()> {
        envoy::release(&self.bench.client)?;
        envoy::release(&self.bench.server)
    }
}

/// Resident memory of a process, KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// The anonymous part of a process's resident memory (heap, stacks), without the binary's
/// file-backed pages, which the kernel can drop and share: KiB.
pub fn anon_rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "RssAnon:")
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} for pid {pid}"))
}

/// Sleeps a little so counters and sockets settle between runs.
pub fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}
