//! The agent's configuration file (YAML), with every default spelled out here and in
//! `deploy/` so that an empty file plus `cgroup_path` is a working node agent.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use nodemesh_proxy::{ProxyConfig, config::humantime_serde_compat as duration};
use nodemesh_workloads::selector::LabelSelector;
use serde::{Deserialize, Serialize};

/// `nodemesh agent --config FILE`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The cgroup v2 directory that holds the node's pods (on Kubernetes: the `kubepods`
    /// slice). The programs are attached here, never to the root cgroup.
    pub cgroup_path: PathBuf,
    /// Where programs, links and maps are pinned (on bpffs).
    #[serde(default = "defaults::bpffs_dir")]
    pub bpffs_dir: PathBuf,
    /// Unix sockets (registry, admin, handoff) and the registry's state file.
    #[serde(default = "defaults::run_dir")]
    pub run_dir: PathBuf,
    /// Namespaces whose labels match get the mesh (Kubernetes equality-based selector).
    #[serde(default = "defaults::namespace_selector")]
    pub namespace_selector: String,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub sockmap: SockmapConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub handoff: HandoffConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    /// The xDS control plane (`host:port`, plaintext gRPC, e.g. istiod's 15010 or
    /// `nodemesh controlplane`): the L7 proxy follows it over ADS (state of the world), with
    /// `proxy.l7.bootstrap`'s static resources, if any, as the base. Setting it turns the L7
    /// proxy on. Alternatively the bootstrap's own `dynamic_resources` name the control
    /// plane (and choose delta); setting both is an error.
    #[serde(default)]
    pub control_plane: String,
}

/// Kubernetes as the pod source (`nodemesh-kube`): the agent watches the pods of its node
/// and the namespaces' labels and registers them itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    pub enabled: bool,
    /// This node's name; empty: `$NODE_NAME` (the DaemonSet sets it from `spec.nodeName`).
    pub node_name: String,
    /// A kubeconfig file; unset: the in-cluster service account (or `$KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
    /// kubelet's pod cgroup (`kubepods.slice` for the systemd driver, `kubepods` for
    /// cgroupfs); unset: `cgroup_path`.
    pub kubepods_cgroup: Option<PathBuf>,
    /// The host's /proc (the pods' processes and their network namespaces).
    pub proc_path: PathBuf,
    /// How often pods whose containers are not found on the node yet are looked for again.
    #[serde(with = "duration")]
    pub retry_interval: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            node_name: String::new(),
            kubeconfig: None,
            kubepods_cgroup: None,
            proc_path: "/proc".into(),
            retry_interval: Duration::from_secs(2),
        }
    }
}

/// Environment variables that override the file (how the DaemonSet sets per-node and
/// per-install values; an empty value is unset).
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("NODEMESH_PROXY_LISTEN", "proxy.listen"),
    ("NODEMESH_NAMESPACE_SELECTOR", "namespace_selector"),
    ("NODEMESH_LOG_LEVEL", "log.level"),
    ("NODEMESH_CONTROL_PLANE", "control_plane"),
    (
        "NODE_NAME",
        "kubernetes.node_name (when the file leaves it empty)",
    ),
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Admin HTTP (metrics, status, readiness). Also served on `<run_dir>/admin.sock`.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 15000)),
        }
    }
}

/// Whether to short-circuit local hops with sockmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SockmapMode {
    /// On if the start-up self-test passes on this kernel.
    #[default]
    Auto,
    /// On even if the self-test fails (it still runs and its result is reported).
    On,
    Off,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SockmapConfig {
    pub mode: SockmapMode,
    /// A self-test exchange not finished by then counts as a stall.
    #[serde(with = "duration")]
    pub selftest_timeout: Duration,
}

impl Default for SockmapConfig {
    fn default() -> Self {
        Self {
            mode: SockmapMode::Auto,
            selftest_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Pods the node may register (sizes the pod map).
    pub max_pods: u32,
    /// Concurrent local connections the kernel maps can track (SockHash and friends).
    pub max_connections: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_pods: nodemesh_common::defaults::MAX_PODS,
            max_connections: nodemesh_common::defaults::MAX_SOCKS,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `info,nodemesh_proxy=debug`. `RUST_LOG` overrides.
    pub level: String,
    pub json: bool,
    /// Threshold of the kernel programs' own log messages (aya-log): off, error, warn, info, debug.
    pub kernel: nodemesh_loader::KernelLogLevel,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            json: false,
            kernel: nodemesh_loader::KernelLogLevel::Warn,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandoffConfig {
    /// Hand live connections to a new agent that asks (restarts drop nothing).
    pub enabled: bool,
    /// How long the old agent waits for its connections to park before keeping the rest.
    #[serde(with = "duration")]
    pub park_timeout: Duration,
    /// How long an agent that stops (or handed off) keeps relaying what it still holds.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
}

impl Default for HandoffConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            park_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Data-plane worker threads, each running its own single-threaded runtime (a
    /// connection stays on one); 0 = one per CPU.
    pub worker_threads: usize,
}

mod defaults {
    use std::path::PathBuf;

    pub fn bpffs_dir() -> PathBuf {
        "/sys/fs/bpf/nodemesh".into()
    }

    pub fn run_dir() -> PathBuf {
        "/var/run/nodemesh".into()
    }

    pub fn namespace_selector() -> String {
        "nodemesh.io/acceleration=enabled".into()
    }
}

/// A configuration problem, naming the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{path}: {field}: {reason}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
}

impl AgentConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_with_env(&text, path, |k| std::env::var(k).ok())
    }

    /// [`AgentConfig::parse`], then the [`ENV_OVERRIDES`] read through `env`, then checks.
    pub fn parse_with_env(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut cfg: Self = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        cfg.apply_env(path, env)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn apply_env(
        &mut self,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        if let Some(v) = get("NODEMESH_PROXY_LISTEN") {
            self.proxy.listen = v.trim().parse().map_err(|e| ConfigError::Invalid {
                path: path.to_owned(),
                field: "proxy.listen",
                reason: format!("NODEMESH_PROXY_LISTEN={v:?}: {e}"),
            })?;
        }
        if let Some(v) = get("NODEMESH_NAMESPACE_SELECTOR") {
            self.namespace_selector = v;
        }
        if let Some(v) = get("NODEMESH_LOG_LEVEL") {
            self.log.level = v;
        }
        if let Some(v) = get("NODEMESH_CONTROL_PLANE") {
            self.control_plane = v;
        }
        if self.kubernetes.node_name.is_empty()
            && let Some(v) = get("NODE_NAME")
        {
            self.kubernetes.node_name = v;
        }
        Ok(())
    }

    /// Where kubelet's pods are: `kubernetes.kubepods_cgroup`, else `cgroup_path`.
    pub fn kubepods_cgroup(&self) -> &Path {
        self.kubernetes
            .kubepods_cgroup
            .as_deref()
            .unwrap_or(&self.cgroup_path)
    }

    /// Parses and checks `text`, without environment overrides.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::parse_with_env(text, path, |_| None)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason,
        };
        if !self.cgroup_path.is_absolute() {
            return Err(invalid("cgroup_path", "must be an absolute path".into()));
        }
        if self.cgroup_path.parent().is_none()
            || self.cgroup_path == Path::new("/sys/fs/cgroup/unified")
        {
            return Err(invalid(
                "cgroup_path",
                "must not be a cgroup root: attach to the cgroup that holds the pods".into(),
            ));
        }
        if !nodemesh_loader::addr::is_capturable_proxy_addr(self.proxy.listen) {
            return Err(invalid(
                "proxy.listen",
                format!(
                    "{} is not an address pods can be redirected to (an IPv4 address other than \
                     loopback/unspecified, with a port)",
                    self.proxy.listen
                ),
            ));
        }
        self.selector()
            .map_err(|e| invalid("namespace_selector", e.to_string()))?;
        if self.kubernetes.enabled {
            if self.kubernetes.node_name.is_empty() {
                return Err(invalid(
                    "kubernetes.node_name",
                    "required when kubernetes.enabled (or set NODE_NAME)".into(),
                ));
            }
            if !self.kubepods_cgroup().starts_with(&self.cgroup_path) {
                return Err(invalid(
                    "kubernetes.kubepods_cgroup",
                    format!(
                        "{} must lie under cgroup_path {}, where the programs are attached",
                        self.kubepods_cgroup().display(),
                        self.cgroup_path.display()
                    ),
                ));
            }
        }
        if self.limits.max_pods == 0 || self.limits.max_connections == 0 {
            return Err(invalid("limits", "sizes must be positive".into()));
        }
        if self.proxy.max_connections_per_pod == 0 || self.proxy.buffer_size < 1024 {
            return Err(invalid(
                "proxy",
                "max_connections_per_pod > 0 and buffer_size >= 1024".into(),
            ));
        }
        Ok(())
    }

    pub fn selector(&self) -> Result<LabelSelector, nodemesh_workloads::selector::SelectorError> {
        self.namespace_selector.parse()
    }

    pub fn registry_socket(&self) -> PathBuf {
        self.run_dir.join("registry.sock")
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.run_dir.join("admin.sock")
    }

    pub fn handoff_socket(&self) -> PathBuf {
        self.run_dir.join("handoff.sock")
    }

    pub fn state_file(&self) -> PathBuf {
        self.run_dir.join("registry.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(text, Path::new("agent.yaml"))
    }

    #[test]
    fn minimal_config_gets_the_defaults() {
        let cfg = parse(
            "cgroup_path: /sys/fs/cgroup/unified/kubepods\nproxy:\n  listen: 198.18.0.1:15001\n",
        )
        .expect("valid");
        assert_eq!(cfg.namespace_selector, "nodemesh.io/acceleration=enabled");
        assert_eq!(cfg.sockmap.mode, SockmapMode::Auto);
        assert_eq!(cfg.proxy.connect_timeout, Duration::from_secs(5));
        assert_eq!(cfg.admin.listen.port(), 15000);
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse("cgroup_path: /sys/fs/cgroup/unified\nproxy:\n  listen: 198.18.0.1:15001\n")
            .expect_err("must be rejected");
        assert!(e.to_string().contains("cgroup_path"), "{e}");
        let e = parse("cgroup_path: /x/y\nproxy:\n  listen: 127.0.0.1:15001\n")
            .expect_err("must be rejected");
        assert!(e.to_string().contains("proxy.listen"), "{e}");
        let e =
            parse("cgroup_path: /x/y\nproxy:\n  listen: 198.18.0.1:15001\n  conect_timeout: 1s\n")
                .expect_err("must be rejected");
        assert!(e.to_string().contains("conect_timeout"), "{e}");
        let e = parse("cgroup_path: /x/y\nproxy:\n  listen: 198.18.0.1:15001\n  idle_timeout: 5\n")
            .expect_err("must be rejected");
        assert!(e.to_string().contains("unit"), "{e}");
        let e = parse(
            "cgroup_path: /x/y\nnamespace_selector: '=x'\nproxy:\n  listen: 198.18.0.1:15001\n",
        )
        .expect_err("must be rejected");
        assert!(e.to_string().contains("namespace_selector"), "{e}");
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let text = "cgroup_path: /sys/fs/cgroup/kubepods.slice\nkubernetes:\n  enabled: true\n";
        let env = |k: &str| match k {
            "NODEMESH_PROXY_LISTEN" => Some("198.18.0.7:15001".to_owned()),
            "NODEMESH_NAMESPACE_SELECTOR" => Some("mesh=on".to_owned()),
            "NODEMESH_LOG_LEVEL" => Some("debug".to_owned()),
            "NODEMESH_CONTROL_PLANE" => Some(String::new()),
            "NODE_NAME" => Some("node-a".to_owned()),
            _ => None,
        };
        let cfg = AgentConfig::parse_with_env(text, Path::new("agent.yaml"), env).expect("valid");
        assert_eq!(cfg.proxy.listen.to_string(), "198.18.0.7:15001");
        assert_eq!(cfg.namespace_selector, "mesh=on");
        assert_eq!(cfg.log.level, "debug");
        assert_eq!(cfg.control_plane, "");
        assert_eq!(cfg.kubernetes.node_name, "node-a");
        assert_eq!(
            cfg.kubepods_cgroup(),
            Path::new("/sys/fs/cgroup/kubepods.slice")
        );
        // Kubernetes without a node name, and a bad address from the environment, are refused.
        let e = AgentConfig::parse_with_env(text, Path::new("agent.yaml"), |k| {
            (k == "NODEMESH_PROXY_LISTEN").then(|| "198.18.0.7:15001".to_owned())
        })
        .expect_err("no node name");
        assert!(e.to_string().contains("kubernetes.node_name"), "{e}");
        let e = AgentConfig::parse_with_env(text, Path::new("agent.yaml"), |k| {
            (k == "NODEMESH_PROXY_LISTEN").then(|| "not-an-address".to_owned())
        })
        .expect_err("bad address");
        assert!(e.to_string().contains("NODEMESH_PROXY_LISTEN"), "{e}");
    }
}
