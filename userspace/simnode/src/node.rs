//! The simulated node and its pods.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::{BPFFS_ROOT, PREFIX, Process, SimError, cgroup2_root, cmd::ip, process, sweep};

/// The node's address on the pod network (the bridge), where the node proxy listens.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const PREFIX_LEN: u8 = 24;
const BRIDGE: &str = "nmbr0";

/// A pod: a network namespace and a cgroup, with one address on the node's bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub ip: Ipv4Addr,
    pub netns_name: String,
    /// `/var/run/netns/<netns_name>`.
    pub netns_path: PathBuf,
    pub cgroup: PathBuf,
}

/// A node: see the crate documentation. Dropping it removes everything it made.
#[derive(Debug)]
pub struct SimNode {
    id: String,
    label: String,
    netns_name: String,
    cgroup_root: PathBuf,
    work_dir: PathBuf,
    pods: Vec<Pod>,
    cleaned: bool,
}

fn netns_path(name: &str) -> PathBuf {
    Path::new("/var/run/netns").join(name)
}

/// `[a-z0-9]` only, short: names end up in netns, cgroup and bpffs paths.
fn sanitize(label: &str) -> String {
    let s: String = label
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { 'x' })
        .take(16)
        .collect();
    if s.is_empty() { "node".into() } else { s }
}

impl SimNode {
    /// Creates the node's namespace, bridge, cgroup subtree and work directory.
    pub fn new(label: &str) -> Result<Self, SimError> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let label = sanitize(label);
        let pid = std::process::id();
        let id = format!("{label}-{pid}-{n}");
        let root = cgroup2_root();
        if nix::sys::statfs::statfs(&root).map(|s| s.filesystem_type().0) != Ok(0x6367_7270) {
            return Err(SimError::Other(format!(
                "{} is not a cgroup v2 mount (set NODEMESH_CGROUP2_ROOT)",
                root.display()
            )));
        }
        ensure_bpffs()?;
        let mut node = Self {
            netns_name: format!("{PREFIX}{label}.node-{pid}-{n}"),
            cgroup_root: root.join(format!("{PREFIX}{id}")),
            work_dir: std::env::temp_dir().join(format!("{PREFIX}{id}")),
            id,
            label,
            pods: Vec::new(),
            cleaned: false,
        };
        // From here on, Drop cleans up whatever was made if a later step fails.
        node.build()?;
        Ok(node)
    }

    fn build(&mut self) -> Result<(), SimError> {
        for dir in [
            self.work_dir.clone(),
            self.run_dir(),
            self.agent_cgroup(),
            self.pods_cgroup(),
        ] {
            std::fs::create_dir_all(&dir).map_err(|e| SimError::io("creating", &dir, e))?;
        }
        let ns = self.netns_name.clone();
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{NODE_IP}/{PREFIX_LEN}"),
            "dev",
            BRIDGE,
        ])?;
        ip(&["-n", &ns, "link", "set", BRIDGE, "up"])?;
        Ok(())
    }

    /// `<label>-<pid>-<n>`, unique on the machine.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn netns_name(&self) -> &str {
        &self.netns_name
    }

    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns_name)
    }

    pub fn node_ip(&self) -> Ipv4Addr {
        NODE_IP
    }

    pub fn subnet_prefix(&self) -> u8 {
        PREFIX_LEN
    }

    /// The node's cgroup subtree; the agent attaches its programs here.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    pub fn pods_cgroup(&self) -> PathBuf {
        self.cgroup_root.join("pods")
    }

    /// Where the agent process runs: inside the subtree, as a DaemonSet pod under kubepods.
    pub fn agent_cgroup(&self) -> PathBuf {
        self.cgroup_root.join("agent")
    }

    /// The agent's bpffs directory (created by the agent, removed with the node).
    pub fn bpffs_dir(&self) -> PathBuf {
        Path::new(BPFFS_ROOT).join(format!("{PREFIX}{}", self.id))
    }

    pub fn run_dir(&self) -> PathBuf {
        self.work_dir.join("run")
    }

    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Creates a pod: namespace, veth into the bridge, the next address, default route via
    /// the node, and its cgroup.
    pub fn add_pod(&mut self, name: &str, namespace: &str) -> Result<Pod, SimError> {
        let index = self.pods.len() + 2;
        if index > 250 {
            return Err(SimError::Other(
                "a simulated node holds at most 249 pods".into(),
            ));
        }
        let (pid, n) = self.pid_and_n();
        let pod = Pod {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            ip: Ipv4Addr::new(198, 18, 0, index as u8),
            netns_name: format!("{PREFIX}{}.{}-{pid}-{n}", self.label, sanitize(name)),
            netns_path: PathBuf::new(),
            cgroup: self.pods_cgroup().join(format!("{namespace}_{name}")),
        };
        let pod = Pod {
            netns_path: netns_path(&pod.netns_name),
            ..pod
        };
        // Record first, so that a failure half way is still cleaned up.
        self.pods.push(pod.clone());
        std::fs::create_dir_all(&pod.cgroup)
            .map_err(|e| SimError::io("creating", &pod.cgroup, e))?;
        let (node, ns) = (self.netns_name.clone(), pod.netns_name.clone());
        let host_end = format!("vp{index}");
        let pod_end = format!("vq{index}");
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &node, "link", "add", &host_end, "type", "veth", "peer", "name", &pod_end,
        ])?;
        ip(&["-n", &node, "link", "set", &pod_end, "netns", &ns])?;
        ip(&[
            "-n", &node, "link", "set", &host_end, "master", BRIDGE, "up",
        ])?;
        ip(&["-n", &ns, "link", "set", &pod_end, "name", "eth0"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/{PREFIX_LEN}", pod.ip),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &NODE_IP.to_string(),
        ])?;
        Ok(pod)
    }

    fn pid_and_n(&self) -> (&str, &str) {
        let mut fields = self.id.rsplit('-');
        let n = fields.next().unwrap_or("0");
        let pid = fields.next().unwrap_or("0");
        (pid, n)
    }

    /// Starts a process in the node's namespace, in the agent cgroup.
    pub fn spawn_in_node(&self, cmd: Command) -> Result<Process, SimError> {
        process::spawn(
            cmd,
            &self.netns_path(),
            &self.agent_cgroup(),
            &self.work_dir,
        )
    }

    /// Starts a process in `pod`'s namespace and cgroup.
    pub fn spawn_in_pod(&self, pod: &Pod, cmd: Command) -> Result<Process, SimError> {
        process::spawn(cmd, &pod.netns_path, &pod.cgroup, &self.work_dir)
    }

    /// Runs a command in `pod` to completion; a timeout kills it and is an error.
    pub fn run_in_pod(
        &self,
        pod: &Pod,
        cmd: Command,
        timeout: Duration,
    ) -> Result<Output, SimError> {
        let process = self.spawn_in_pod(pod, cmd)?;
        finish(process, timeout)
    }

    /// Runs a command in the node (agent cgroup) to completion.
    pub fn run_in_node(&self, cmd: Command, timeout: Duration) -> Result<Output, SimError> {
        let process = self.spawn_in_node(cmd)?;
        finish(process, timeout)
    }

    /// What of this node still exists.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        for ns in std::iter::once(&self.netns_name).chain(self.pods.iter().map(|p| &p.netns_name)) {
            if netns_path(ns).exists() {
                found.push(format!("netns {ns}"));
            }
        }
        for path in [
            self.cgroup_root.clone(),
            self.bpffs_dir(),
            self.work_dir.clone(),
        ] {
            if path.exists() {
                found.push(path.display().to_string());
            }
        }
        found
    }

    /// Removes everything, reporting the first failure.
    pub fn cleanup(mut self) -> Result<(), SimError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), SimError> {
        if self.cleaned {
            return Ok(());
        }
        self.cleaned = true;
        let namespaces: Vec<String> = std::iter::once(self.netns_name.clone())
            .chain(self.pods.iter().map(|p| p.netns_name.clone()))
            .collect();
        let keep_workdir = std::env::var("NODEMESH_KEEP_WORKDIR").is_ok_and(|v| v == "1");
        sweep::remove_node(
            &self.cgroup_root,
            &namespaces,
            &self.bpffs_dir(),
            (!keep_workdir).then_some(&self.work_dir),
        )
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("nodemesh-simnode: cleaning up node {}: {e}", self.id);
        }
    }
}

fn finish(mut process: Process, timeout: Duration) -> Result<Output, SimError> {
    let status = match process.wait_timeout(timeout) {
        Ok(status) => status,
        Err(_) => {
            let _ = process.kill();
            return Err(SimError::Other(format!(
                "{} did not finish within {timeout:?}; stderr: {}",
                process.name(),
                process.stderr_text()
            )));
        }
    };
    Ok(Output {
        status,
        stdout: process.stdout_text().into_bytes(),
        stderr: process.stderr_text().into_bytes(),
    })
}

fn ensure_bpffs() -> Result<(), SimError> {
    let magic = nix::sys::statfs::statfs(BPFFS_ROOT).map(|s| s.filesystem_type().0);
    if magic == Ok(0xcafe_4a11) {
        return Ok(());
    }
    crate::cmd::run("mount", &["-t", "bpf", "bpf", BPFFS_ROOT]).map(drop)
}
