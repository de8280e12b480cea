//! A simulated node with a running nodemesh agent: what every node test starts from.
//!
//! ```no_run
//! # use nodemesh_tests::mesh::MeshNode;
//! let mut node = MeshNode::start("capture").expect("node");
//! let client = node.add_pod("client", "shop").expect("pod");
//! node.enable_namespace("shop").expect("label");
//! ```
//! The agent is the real `nodemesh` binary, started in the node's network namespace and in
//! the agent cgroup under the node's cgroup root, where the programs are attached; pods are
//! registered through the real registry API on its unix socket.
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nodemesh_agent::status::{MapDump, Status};
use nodemesh_api::registry as api;
use nodemesh_simnode::{Pod, Process, SimNode, bin_path};

/// The namespace label that switches the mesh on (the agent's default selector).
pub const MESH_LABEL: (&str, &str) = ("nodemesh.io/acceleration", "enabled");

/// Extra agent configuration for a test, appended to the generated file (YAML).
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// `sockmap.mode`. The node tests default to `on`: the fast path is what they exercise,
    /// including on kernels where `auto` would keep it off (see `sockmap.rs`).
    pub sockmap_mode: &'static str,
    /// YAML lines under `proxy:` (indented by the harness).
    pub proxy: Vec<String>,
    /// Top-level YAML lines.
    pub extra: Vec<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            sockmap_mode: "on",
            proxy: Vec::new(),
            extra: Vec::new(),
        }
    }
}

/// A node with its agent.
pub struct MeshNode {
    pub sim: SimNode,
    agent: Option<Process>,
    config: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for MeshNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshNode")
            .field("id", &self.sim.id())
            .finish_non_exhaustive()
    }
}

impl MeshNode {
    /// A node with an agent in its default configuration.
    pub fn start(label: &str) -> anyhow::Result<Self> {
        Self::start_with(label, &AgentOptions::default())
    }

    pub fn start_with(label: &str, opts: &AgentOptions) -> anyhow::Result<Self> {
        let mut node = Self::create(label, opts)?;
        node.start_agent()?;
        Ok(node)
    }

    /// The node and its agent configuration, without starting the agent (a test that must
    /// prepare more first, e.g. a Kubernetes API for it, then calls [`MeshNode::start_agent`]).
    pub fn create(label: &str, opts: &AgentOptions) -> anyhow::Result<Self> {
        let sim = SimNode::new(label).context("simulated node")?;
        let config = sim.work_dir().join("agent.yaml");
        std::fs::write(&config, agent_config(&sim, opts)).context("writing the agent config")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            sim,
            agent: None,
            config,
            runtime,
        })
    }

    /// Appends top-level YAML to the agent configuration (read at the next start).
    pub fn append_config(&self, yaml: &str) -> anyhow::Result<()> {
        let mut text = std::fs::read_to_string(&self.config)?;
        text.push_str(yaml);
        std::fs::write(&self.config, text).context("writing the agent config")
    }

    /// The agent's configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Starts an agent process and waits until it is ready. With an agent already running
    /// this is a restart: the new agent takes over from the old one, which then exits.
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        let previous = self.agent.take();
        let mut cmd = Command::new(bin_path("nodemesh"));
        cmd.args(["agent", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info,nodemesh_proxy=debug");
        let process = self.sim.spawn_in_node(cmd).context("starting the agent")?;
        self.agent = Some(process);
        if let Some(mut old) = previous {
            // The old agent exits by itself once it has handed over.
            let status = old.wait_timeout(Duration::from_secs(20));
            if !matches!(status, Ok(s) if s.success()) {
                bail!(
                    "the previous agent did not exit cleanly after the handoff: {status:?}\n{}",
                    old.stderr_text()
                );
            }
        }
        self.wait_ready(Duration::from_secs(20))
    }

    /// Stops the agent with SIGTERM and waits for it to exit.
    pub fn stop_agent(&mut self) -> anyhow::Result<()> {
        let Some(mut agent) = self.agent.take() else {
            return Ok(());
        };
        agent.send_signal(nix::sys::signal::Signal::SIGTERM)?;
        let status = agent.wait_timeout(Duration::from_secs(40))?;
        if !status.success() {
            bail!("agent exited with {status}: {}", agent.stderr_text());
        }
        Ok(())
    }

    /// The running agent's process id.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Process::pid)
    }

    /// The running agent's log so far.
    pub fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map(Process::stderr_text)
            .unwrap_or_default()
    }

    /// `nodemesh agent --config ... --cleanup`.
    pub fn cleanup_agent(&mut self) -> anyhow::Result<String> {
        self.stop_agent()?;
        let mut cmd = Command::new(bin_path("nodemesh"));
        cmd.args(["agent", "--cleanup", "--config"])
            .arg(&self.config);
        let out = self.sim.run_in_node(cmd, Duration::from_secs(20))?;
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            bail!("cleanup failed: {text}");
        }
        Ok(text)
    }

    fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(body) = self.admin_get("/ready")
                && body.starts_with("ready")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not become ready in {timeout:?}:\n{}",
                    self.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A GET on the agent's admin socket.
    pub fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        self.admin(hyper::Method::GET, path)
    }

    pub fn admin(&self, method: hyper::Method, path: &str) -> anyhow::Result<String> {
        let socket = self.sim.run_dir().join("admin.sock");
        self.runtime
            .block_on(crate::http::unix_request(&socket, method, path))
    }

    pub fn status(&self) -> anyhow::Result<Status> {
        Ok(serde_json::from_str(&self.admin_get("/status")?)?)
    }

    pub fn maps(&self) -> anyhow::Result<MapDump> {
        Ok(serde_json::from_str(&self.admin_get("/debug/maps")?)?)
    }

    /// Every kernel counter as `program.event -> value`.
    pub fn counters(&self) -> anyhow::Result<HashMap<String, u64>> {
        let mut out = HashMap::new();
        for program in self.status()?.counters {
            for (name, value) in program.detail {
                out.insert(format!("{}.{name}", program.program), value);
            }
        }
        Ok(out)
    }

    /// The Prometheus exposition.
    pub fn metrics(&self) -> anyhow::Result<String> {
        self.admin_get("/metrics")
    }

    /// Switches the sockmap fast path at run time.
    pub fn set_sockmap(&self, enabled: bool) -> anyhow::Result<()> {
        self.admin(hyper::Method::POST, &format!("/sockmap?enabled={enabled}"))
            .map(drop)
    }

    async fn registry(
        &self,
    ) -> anyhow::Result<api::pod_registry_client::PodRegistryClient<tonic::transport::Channel>>
    {
        Ok(nodemesh_workloads::api::connect(&self.sim.run_dir().join("registry.sock")).await?)
    }

    /// Creates a pod on the node and registers it with the agent.
    pub fn add_pod(&mut self, name: &str, namespace: &str) -> anyhow::Result<Pod> {
        let pod = self.sim.add_pod(name, namespace)?;
        self.register(&pod)?;
        Ok(pod)
    }

    /// Registers an existing pod.
    pub fn register(&self, pod: &Pod) -> anyhow::Result<api::PodStatus> {
        let request = api::AddPodRequest {
            pod: Some(api_pod(pod)),
        };
        self.runtime.block_on(async {
            let status = self
                .registry()
                .await?
                .add_pod(request)
                .await?
                .into_inner()
                .status;
            status.context("no status in the answer")
        })
    }

    /// Sends a raw registry request (for the bad-input tests).
    pub fn add_pod_raw(&self, pod: api::Pod) -> Result<api::PodStatus, tonic::Status> {
        self.runtime.block_on(async {
            let mut client = self
                .registry()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let r = client
                .add_pod(api::AddPodRequest { pod: Some(pod) })
                .await?;
            Ok(r.into_inner().status.unwrap_or_default())
        })
    }

    pub fn list_pods(&self) -> anyhow::Result<api::ListPodsResponse> {
        self.runtime.block_on(async {
            Ok(self
                .registry()
                .await?
                .list_pods(api::ListPodsRequest::default())
                .await?
                .into_inner())
        })
    }

    pub fn remove_pod(&self, pod: &Pod) -> anyhow::Result<bool> {
        self.runtime.block_on(async {
            let request = api::RemovePodRequest {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
            };
            Ok(self
                .registry()
                .await?
                .remove_pod(request)
                .await?
                .into_inner()
                .removed)
        })
    }

    pub fn set_namespace_labels(
        &self,
        namespace: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        self.runtime.block_on(async {
            let request = api::SetNamespaceLabelsRequest {
                namespace: namespace.to_owned(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            };
            self.registry().await?.set_namespace_labels(request).await?;
            Ok(())
        })
    }

    /// Labels `namespace` so that its pods are in the mesh.
    pub fn enable_namespace(&self, namespace: &str) -> anyhow::Result<()> {
        self.set_namespace_labels(namespace, &[MESH_LABEL])
    }

    pub fn disable_namespace(&self, namespace: &str) -> anyhow::Result<()> {
        self.set_namespace_labels(namespace, &[])
    }

    /// Starts `nm-podapp serve` in `pod` and waits until it listens.
    pub fn serve(&self, pod: &Pod, port: u16, args: &[&str]) -> anyhow::Result<Process> {
        let mut cmd = Command::new(bin_path("nm-podapp"));
        cmd.args(["serve", "--listen", &format!("0.0.0.0:{port}")])
            .args(args);
        let process = self.sim.spawn_in_pod(pod, cmd)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !process.stdout_text().contains("listening") {
            if Instant::now() > deadline {
                bail!(
                    "server in {} did not start: {}",
                    pod.name,
                    process.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(process)
    }

    /// Starts `nm-httpapp serve` (HTTP/1.1, h2c, gRPC, upgrades) in `pod` as `name` and
    /// waits until it listens.
    pub fn serve_http(&self, pod: &Pod, port: u16, name: &str) -> anyhow::Result<Process> {
        let mut cmd = Command::new(bin_path("nm-httpapp"));
        cmd.args([
            "serve",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--name",
            name,
        ]);
        let process = self.sim.spawn_in_pod(pod, cmd)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !process.stdout_text().contains("listening") {
            if Instant::now() > deadline {
                bail!(
                    "HTTP server in {} did not start: {}",
                    pod.name,
                    process.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(process)
    }

    /// Runs `nm-httpapp <args>` in `pod` to completion and parses its JSON report.
    pub fn httpapp(
        &self,
        pod: &Pod,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let mut cmd = Command::new(bin_path("nm-httpapp"));
        cmd.args(args);
        let out = self.sim.run_in_pod(pod, cmd, timeout)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim()).with_context(|| {
            format!(
                "nm-httpapp {args:?} printed no JSON: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Runs `nm-podapp <args>` in `pod` to completion and parses its JSON report.
    pub fn podapp(
        &self,
        pod: &Pod,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let mut cmd = Command::new(bin_path("nm-podapp"));
        cmd.args(args);
        let out = self.sim.run_in_pod(pod, cmd, timeout)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report: serde_json::Value = serde_json::from_str(stdout.trim()).with_context(|| {
            format!(
                "nm-podapp {args:?} printed no JSON: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok(report)
    }

    /// Starts `nm-podapp <args>` in `pod` without waiting.
    pub fn spawn_podapp(&self, pod: &Pod, args: &[&str]) -> anyhow::Result<Process> {
        let mut cmd = Command::new(bin_path("nm-podapp"));
        cmd.args(args);
        Ok(self.sim.spawn_in_pod(pod, cmd)?)
    }
}

impl Drop for MeshNode {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
        }
    }
}

fn agent_config(sim: &SimNode, opts: &AgentOptions) -> String {
    let mut text = format!(
        "cgroup_path: {cgroup}\nbpffs_dir: {bpffs}\nrun_dir: {run}\nproxy:\n  listen: {ip}:15001\n",
        cgroup = sim.cgroup_root().display(),
        bpffs = sim.bpffs_dir().display(),
        run = sim.run_dir().display(),
        ip = sim.node_ip(),
    );
    for line in &opts.proxy {
        text.push_str("  ");
        text.push_str(line);
        text.push('\n');
    }
    text.push_str("handoff:\n  drain_timeout: 10s\n");
    text.push_str(&format!("sockmap:\n  mode: {}\n", opts.sockmap_mode));
    for line in &opts.extra {
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// The registry's view of a simulated pod.
pub fn api_pod(pod: &Pod) -> api::Pod {
    api::Pod {
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        labels: BTreeMap::from([("app".to_owned(), pod.name.clone())])
            .into_iter()
            .collect(),
        ips: vec![pod.ip.to_string()],
        netns_path: pod.netns_path.display().to_string(),
        cgroup_path: pod.cgroup.display().to_string(),
        service_account: pod.name.clone(),
        workload: String::new(),
    }
}

/// The value of a Prometheus sample `name{...}` whose labels contain every `label=value`,
/// summed over the matching series.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Asserts that an `nm-podapp client|churn` report has no failed connection; returns how
/// many succeeded.
pub fn all_ok(report: &serde_json::Value) -> u64 {
    assert_eq!(report["failed"], 0, "{report}");
    report["ok"].as_u64().unwrap_or(0)
}

/// How much kernel counter `key` (`program.event`) grew between two [`MeshNode::counters`].
pub fn delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>, key: &str) -> u64 {
    after
        .get(key)
        .copied()
        .unwrap_or(0)
        .saturating_sub(before.get(key).copied().unwrap_or(0))
}
