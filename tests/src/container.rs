//! The agent's container image run with podman the way the DaemonSet runs it
//! (`deploy/kustomize/base/daemonset.yaml`), on a simulated node.
//!
//! [`DaemonSetPod`] reads the manifest and turns its container spec into `podman run`
//! arguments: the capabilities it drops and adds, `runAsUser`, `readOnlyRootFilesystem`,
//! `hostNetwork` (the simulated node's namespace), `hostPID`, every volume mount with its
//! read-only flag and propagation, and the environment with `$(VAR)` expanded. Host paths
//! that belong to the node (the run directory, the ConfigMap) are given per test, so nothing
//! touches the machine's own `/var/run/nodemesh`.
//!
//! The image comes from `cargo xtask test` (or `cargo xtask image`), which builds
//! `deploy/Dockerfile` and passes its tag in `NODEMESH_IMAGE` and podman's configuration in
//! `CONTAINERS_CONF`. Containers are named `nmimg-<label>-<pid>-<n>`; a [`Container`] is
//! removed (`podman rm -f`) when dropped, on panic too.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// The image under test, from `NODEMESH_IMAGE`; a loud failure without it.
pub fn image() -> String {
    std::env::var("NODEMESH_IMAGE").unwrap_or_else(|_| {
        panic!(
            "NODEMESH_IMAGE is not set: the image tests run the image `cargo xtask test` \
             builds (`cargo xtask test --filter image`, or `cargo xtask image` and then \
             NODEMESH_IMAGE=localhost/nmimg-nodemesh:test \
             CONTAINERS_CONF=.build/podman/containers.conf)"
        )
    })
}

/// A `podman` command (with the `CONTAINERS_CONF` the environment names, if any).
pub fn podman() -> Command {
    Command::new("podman")
}

/// Runs `podman <args>` to completion; an error names the command and its stderr.
pub fn podman_ok(args: &[&str]) -> anyhow::Result<Output> {
    let out = podman()
        .args(args)
        .output()
        .context("podman (installed by `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!(
            "podman {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `nmimg-<label>-<pid>-<n>`, unique on the machine.
pub fn unique_name(label: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "nmimg-{label}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The agent container of the DaemonSet, as the manifest declares it.
#[derive(Debug, Clone)]
pub struct DaemonSetPod {
    pub host_network: bool,
    pub host_pid: bool,
    pub container: ContainerSpec,
    /// Volume name -> host path (`hostPath` volumes only).
    pub host_paths: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerSpec {
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    pub security_context: SecurityContext,
    #[serde(default)]
    pub volume_mounts: Vec<VolumeMount>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    pub value: Option<String>,
    pub value_from: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    #[serde(default)]
    pub privileged: bool,
    pub run_as_user: Option<u32>,
    #[serde(default)]
    pub read_only_root_filesystem: bool,
    pub capabilities: Capabilities,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Capabilities {
    #[serde(default)]
    pub drop: Vec<String>,
    #[serde(default)]
    pub add: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
    pub mount_propagation: Option<String>,
}

impl DaemonSetPod {
    /// The container (or init container) `container` of the DaemonSet in `manifest`, a
    /// path relative to the repository root (`deploy/kustomize/base/daemonset.yaml`).
    pub fn from_manifest(manifest: &str, container: &str) -> anyhow::Result<Self> {
        let path = repo_path(manifest);
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        let doc: serde_yaml::Value = serde_yaml::from_str(&text)?;
        let spec = &doc["spec"]["template"]["spec"];
        let found = ["containers", "initContainers"]
            .iter()
            .filter_map(|list| spec[*list].as_sequence())
            .flatten()
            .find(|c| c["name"] == container)
            .with_context(|| format!("no container `{container}` in {manifest}"))?;
        let host_paths = spec["volumes"]
            .as_sequence()
            .context("no volumes")?
            .iter()
            .filter_map(|v| {
                Some((
                    v["name"].as_str()?.to_owned(),
                    v["hostPath"]["path"].as_str()?.to_owned(),
                ))
            })
            .collect();
        Ok(Self {
            host_network: spec["hostNetwork"].as_bool().unwrap_or(false),
            host_pid: spec["hostPID"].as_bool().unwrap_or(false),
            container: serde_yaml::from_value(found.clone())?,
            host_paths,
        })
    }

    /// `podman run` options for this pod on a node whose network namespace is `netns`.
    /// `host_dirs` replaces the host side of volumes by name (the node's own run directory,
    /// the ConfigMap's files); every other volume must be a `hostPath`, used as it is.
    /// `downward` gives the values of `valueFrom` variables (`NODE_NAME`, `HOST_IP`).
    pub fn podman_args(
        &self,
        netns: &Path,
        host_dirs: &BTreeMap<&str, PathBuf>,
        downward: &BTreeMap<&str, String>,
    ) -> anyhow::Result<Vec<String>> {
        let sc = &self.container.security_context;
        if sc.privileged {
            bail!("the DaemonSet runs the agent privileged; this harness does not");
        }
        let mut args = Vec::new();
        if self.host_network {
            args.push(format!("--network=ns:{}", netns.display()));
        } else {
            bail!("the DaemonSet is not hostNetwork: the simulated node has no pod network");
        }
        if self.host_pid {
            args.push("--pid=host".into());
        }
        if let Some(uid) = sc.run_as_user {
            args.push(format!("--user={uid}"));
        }
        if sc.read_only_root_filesystem {
            // Kubernetes mounts no tmpfs of its own on a read-only root; podman would.
            args.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
        }
        for cap in &sc.capabilities.drop {
            args.push(format!("--cap-drop={cap}"));
        }
        for cap in &sc.capabilities.add {
            args.push(format!("--cap-add={cap}"));
        }
        for m in &self.container.volume_mounts {
            let host = match host_dirs.get(m.name.as_str()) {
                Some(dir) => dir.display().to_string(),
                None => self
                    .host_paths
                    .get(&m.name)
                    .with_context(|| format!("volume {} is neither given nor a hostPath", m.name))?
                    .clone(),
            };
            let mut opts = vec![if m.read_only { "ro" } else { "rw" }];
            opts.push(match m.mount_propagation.as_deref() {
                None | Some("None") => "rprivate",
                Some("HostToContainer") => "rslave",
                Some("Bidirectional") => "rshared",
                Some(other) => bail!("unknown mountPropagation {other}"),
            });
            args.push(format!(
                "--volume={host}:{}:{}",
                m.mount_path,
                opts.join(",")
            ));
        }
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for var in &self.container.env {
            let value = match (&var.value, &var.value_from) {
                (Some(v), _) => expand(v, &env),
                (None, Some(_)) => downward
                    .get(var.name.as_str())
                    .with_context(|| format!("no downward value for {}", var.name))?
                    .clone(),
                (None, None) => String::new(),
            };
            args.push(format!("--env={}={value}", var.name));
            env.insert(var.name.clone(), value);
        }
        Ok(args)
    }
}

/// A path in the repository.
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// Kubernetes' `$(VAR)` expansion of earlier variables.
fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = value.to_owned();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// A running container, removed when dropped.
#[derive(Debug)]
pub struct Container {
    pub name: String,
}

impl Container {
    /// `podman run -d --name <name> <args> <image> <cmd>`.
    pub fn start(name: String, args: &[String], image: &str, cmd: &[&str]) -> anyhow::Result<Self> {
        let mut all: Vec<&str> = vec!["run", "-d", "--name", &name];
        all.extend(args.iter().map(String::as_str));
        all.push(image);
        all.extend(cmd);
        podman_ok(&all)?;
        Ok(Self { name })
    }

    /// `podman exec <name> <cmd>`, whatever its exit status.
    pub fn exec(&self, cmd: &[&str]) -> anyhow::Result<Output> {
        let out = podman()
            .args(["exec", &self.name])
            .args(cmd)
            .output()
            .context("podman exec")?;
        Ok(out)
    }

    /// Its output so far (stdout and stderr).
    pub fn logs(&self) -> String {
        podman()
            .args(["logs", &self.name])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    }

    /// Whether it still runs.
    pub fn running(&self) -> bool {
        podman()
            .args(["inspect", "--format", "{{.State.Running}}", &self.name])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
    }

    /// `podman stop` (SIGTERM, then SIGKILL after `grace`) and its exit code.
    pub fn stop(&self, grace: Duration) -> anyhow::Result<i64> {
        let secs = grace.as_secs().to_string();
        podman_ok(&["stop", "--time", &secs, &self.name])?;
        let out = podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", &self.name])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }

    /// Waits until `ready` holds, failing with the container's log after `timeout`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !ready() {
            if !self.running() {
                bail!(
                    "container {} exited before {what}:\n{}",
                    self.name,
                    self.logs()
                );
            }
            if Instant::now() > deadline {
                bail!("no {what} after {timeout:?}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "-f", "--time", "0", &self.name])
            .output();
    }
}

/// `GET path` on `addr` from inside the network namespace `netns`: the status and body.
pub fn get_in_netns(
    netns: &Path,
    addr: std::net::SocketAddr,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let netns = netns.to_owned();
    let path = path.to_owned();
    std::thread::spawn(move || {
        // setns(CLONE_NEWNET) moves only this thread; its sockets are the namespace's.
        let file = std::fs::File::open(&netns).with_context(|| format!("{}", netns.display()))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(5), crate::http::tcp_get(addr, &path))
                    .await
                    .context("timed out")?
            })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the request thread panicked"))?
}
