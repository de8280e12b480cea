//! The three paths and how to measure one.
use std::time::Duration;

use anyhow::{Context as _, bail};
use nodemesh_simnode::{Pod, Process};
use nodemesh_tests::mesh::{AgentOptions, MeshNode};
use serde::Serialize;

pub const PORT: u16 = 8080;

/// A path a request can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    Direct,
    Proxied,
    Sockmap,
}

impl Path {
    pub const ALL: [Path; 3] = [Path::Direct, Path::Proxied, Path::Sockmap];

    pub fn label(self) -> &'static str {
        match self {
            Path::Direct => "direct (no mesh)",
            Path::Proxied => "node proxy, no sockmap",
            Path::Sockmap => "node proxy + sockmap",
        }
    }
}

/// Latency of one run of `nm-podapp rr`, microseconds.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct Latency {
    pub n: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
}

/// A node with a client pod and an echo server pod in namespace `bench`.
#[allow(
    missing_debug_implementations,
    reason = "holds processes and a node; nothing to print"
)]
pub struct Bench {
    pub node: MeshNode,
    pub client: Pod,
    pub server: Pod,
    _echo: Process,
}

impl Bench {
    /// `sockmap_mode` as in the agent config (`auto` shows the agent's own decision).
    pub fn start(label: &str, sockmap_mode: &'static str) -> anyhow::Result<Self> {
        let opts = AgentOptions {
            sockmap_mode,
            ..AgentOptions::default()
        };
        let mut node = MeshNode::start_with(label, &opts)?;
        let client = node.add_pod("client", "bench")?;
        let server = node.add_pod("server", "bench")?;
        let echo = node.serve(&server, PORT, &["--mode", "echo"])?;
        Ok(Self {
            node,
            client,
            server,
            _echo: echo,
        })
    }

    pub fn paths(&self) -> Paths<'_> {
        Paths::new(&self.node, &self.client, &self.server)
    }
}

/// The three paths between a client pod and an echo server (listening on [`PORT`]) in the
/// same namespace of a running node.
#[derive(Debug, Clone, Copy)]
pub struct Paths<'a> {
    node: &'a MeshNode,
    client: &'a Pod,
    server: &'a Pod,
}

impl<'a> Paths<'a> {
    pub fn new(node: &'a MeshNode, client: &'a Pod, server: &'a Pod) -> Self {
        Self {
            node,
            client,
            server,
        }
    }

    /// Puts the node in the state `path` needs.
    pub fn select(&self, path: Path) -> anyhow::Result<()> {
        let namespace = &self.client.namespace;
        match path {
            Path::Direct => self.node.disable_namespace(namespace),
            Path::Proxied => {
                self.node.enable_namespace(namespace)?;
                self.node.set_sockmap(false)
            }
            Path::Sockmap => {
                self.node.enable_namespace(namespace)?;
                self.node.set_sockmap(true)
            }
        }
    }

    /// Runs `iterations` round trips of `size` bytes on `path`, checking with the kernel
    /// counters that the traffic really took that path.
    pub fn measure(&self, path: Path, iterations: usize, size: usize) -> anyhow::Result<Latency> {
        const WARMUP: u64 = 500;
        self.select(path)?;
        let before = self.node.counters()?;
        let dst = format!("{}:{PORT}", self.server.ip);
        let report = self.node.podapp(
            self.client,
            &[
                "rr",
                "--connect",
                &dst,
                "--iterations",
                &iterations.to_string(),
                "--size",
                &size.to_string(),
                "--warmup",
                &WARMUP.to_string(),
            ],
            Duration::from_secs(600),
        )?;
        if report.get("error").is_some() {
            bail!("{path:?}: {report}");
        }
        let latency: Latency =
            serde_json::from_value(report.clone()).with_context(|| format!("{report}"))?;
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
        // Four local hops per round trip: app -> proxy -> server -> proxy -> app.
        let expected = 4 * (iterations as u64 + WARMUP);
        match path {
            Path::Direct if captured != 0 => {
                bail!("the direct path was captured ({captured} connects)")
            }
            Path::Proxied if captured != 1 || redirected != 0 => {
                bail!(
                    "proxied path: {captured} captured connects, {redirected} sockmap redirects (want 1, 0)"
                )
            }
            Path::Sockmap if captured != 1 || redirected < expected => {
                bail!(
                    "sockmap path: {captured} captured connects, {redirected} of {expected} messages redirected"
                )
            }
            _ => Ok(latency),
        }
    }
}

/// The median of `values` (sorted copy).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
