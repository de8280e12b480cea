//! `deploy/`: the kustomizations render offline, validate strictly against the Kubernetes
//! API schema (unknown or misspelled fields fail), and keep the invariants the agent needs.
//! Needs `kubectl` and `kubernetes-validate` from the project's venv (`cargo xtask setup`);
//! not root.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use nodemesh_agent::AgentConfig;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A tool from the venv (`cargo xtask setup` installs it), or `$NODEMESH_<TOOL>`.
fn tool(name: &str, env: &str) -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Ok(p.into());
    }
    let venv = repo().join(".build/venv/bin").join(name);
    if venv.is_file() {
        return Ok(venv);
    }
    bail!(
        "{} not found: run `cargo xtask setup` (it installs it into .build/venv) or set {env}",
        venv.display()
    )
}

fn render(dir: &str) -> anyhow::Result<String> {
    let out = Command::new(tool("kubectl", "NODEMESH_KUBECTL")?)
        .arg("kustomize")
        .arg(repo().join("deploy/kustomize").join(dir))
        .output()
        .context("running kubectl kustomize")?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize {dir} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Strict validation; `Err` carries the validator's complaint.
fn validate(yaml: &str, name: &str) -> anyhow::Result<Result<(), String>> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join(format!("{name}.yaml"));
    std::fs::write(&file, yaml)?;
    let out = Command::new(tool("kubernetes-validate", "NODEMESH_KUBERNETES_VALIDATE")?)
        .args(["--strict", "--quiet", "--kubernetes-version", "1.33"])
        .arg(&file)
        .output()
        .context("running kubernetes-validate")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(if out.status.success() {
        Ok(())
    } else {
        Err(text)
    })
}

fn docs(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The agent configuration the DaemonSet's container really gets: the ConfigMap's file with
/// the container's environment (downward API values filled in as on a node).
fn agent_config(docs: &[Value]) -> AgentConfig {
    let cm = find(docs, "ConfigMap");
    let text = cm["data"]["agent.yaml"]
        .as_str()
        .expect("agent.yaml in the ConfigMap");
    let container = &find(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0];
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("name").to_owned();
            let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("spec.nodeName") => "node-a".to_owned(),
                Some("status.hostIP") => "198.18.0.1".to_owned(),
                Some(other) => panic!("unexpected fieldRef {other}"),
                None => e["value"].as_str().unwrap_or("").to_owned(),
            };
            (name, value)
        })
        .collect();
    // $(VAR) references, expanded as kubelet does.
    let expand = |v: &str| {
        let mut v = v.to_owned();
        for (n, val) in &env {
            v = v.replace(&format!("$({n})"), val);
        }
        v
    };
    AgentConfig::parse_with_env(text, Path::new("agent.yaml"), |k| {
        env.iter().find(|(n, _)| n == k).map(|(_, v)| expand(v))
    })
    .expect("the shipped agent configuration is valid")
}

#[test]
fn every_kustomization_renders_and_validates_strictly() -> anyhow::Result<()> {
    for dir in ["default", "overlays/example", "cleanup"] {
        let yaml = render(dir)?;
        let kinds: Vec<String> = docs(&yaml)?
            .iter()
            .map(|d| d["kind"].as_str().unwrap_or("").to_owned())
            .collect();
        assert!(kinds.contains(&"DaemonSet".to_owned()), "{dir}: {kinds:?}");
        if let Err(e) = validate(&yaml, "rendered")? {
            panic!("{dir} does not validate:\n{e}");
        }
        // The values ConfigMap is local-config: it must not reach the cluster.
        assert!(!yaml.contains("nodemesh-values"), "{dir} ships its values");
    }
    Ok(())
}

#[test]
fn a_misspelled_or_unknown_field_fails_validation() -> anyhow::Result<()> {
    let good = render("default")?;
    for (from, to, field) in [
        ("mountPropagation:", "mountPropogation:", "mountPropogation"),
        ("hostNetwork: true", "hostNetwrok: true", "hostNetwrok"),
        ("readinessProbe:", "readynessProbe:", "readynessProbe"),
    ] {
        assert!(good.contains(from), "{from} not in the rendered manifests");
        let bad = good.replacen(from, to, 1);
        match validate(&bad, "bad")? {
            Ok(()) => panic!("{field} was accepted"),
            Err(e) => assert!(e.contains(field), "the error does not name {field}: {e}"),
        }
    }
    // A wrong type fails too, not only unknown names.
    let bad = good.replacen("hostPID: true", "hostPID: \"yes\"", 1);
    assert!(
        validate(&bad, "bad")?.is_err(),
        "a string hostPID was accepted"
    );
    Ok(())
}

#[test]
fn the_daemonset_keeps_the_invariants_the_agent_needs() -> anyhow::Result<()> {
    let docs = docs(&render("default")?)?;
    let cfg = agent_config(&docs);
    assert!(
        cfg.kubernetes.enabled,
        "the shipped config must use the Kubernetes pod source"
    );
    assert_eq!(cfg.kubernetes.node_name, "node-a");
    assert_eq!(cfg.proxy.listen.to_string(), "198.18.0.1:15001");

    let ds = find(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(
        pod["hostPID"], true,
        "cgroup.procs needs the host's pid namespace"
    );
    assert_eq!(pod["serviceAccountName"], "nodemesh");
    assert!(
        pod["priorityClassName"]
            .as_str()
            .is_some_and(|p| !p.is_empty())
    );
    // Tolerates every taint: an operator Exists without a key.
    assert!(
        pod["tolerations"]
            .as_array()
            .expect("tolerations")
            .iter()
            .any(|t| t["operator"] == "Exists"
                && t.get("key").is_none()
                && t.get("effect").is_none()),
        "{}",
        pod["tolerations"]
    );
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace period");
    assert!(
        grace > cfg.handoff.drain_timeout.as_secs(),
        "grace {grace}s <= drain timeout"
    );

    // Capabilities: exactly what eBPF, attach, setns and /proc need; all else dropped.
    let sc = &c["securityContext"];
    let mut add = strs(&sc["capabilities"]["add"]);
    add.sort_unstable();
    assert_eq!(add, ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]);
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_ne!(sc["privileged"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);

    // Mounts: bpffs, the cgroup v2 hierarchy, the host's /proc, the run dir, the config.
    let mount_of = |target: &Path| -> (String, String) {
        let mounts = c["volumeMounts"].as_array().expect("mounts");
        let m = mounts
            .iter()
            .filter(|m| target.starts_with(m["mountPath"].as_str().unwrap_or("")))
            .max_by_key(|m| m["mountPath"].as_str().unwrap_or("").len())
            .unwrap_or_else(|| panic!("nothing mounted at {}", target.display()));
        let name = m["name"].as_str().expect("name");
        let vol = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == name)
            .expect("volume");
        let host = vol["hostPath"]["path"].as_str().unwrap_or("").to_owned();
        (m["mountPath"].as_str().unwrap_or("").to_owned(), host)
    };
    assert_eq!(
        mount_of(&cfg.bpffs_dir),
        ("/sys/fs/bpf".into(), "/sys/fs/bpf".into())
    );
    assert_eq!(
        mount_of(&cfg.cgroup_path),
        ("/sys/fs/cgroup".into(), "/sys/fs/cgroup".into())
    );
    assert_eq!(
        mount_of(&cfg.kubernetes.proc_path),
        ("/host/proc".into(), "/proc".into())
    );
    assert_eq!(
        mount_of(&cfg.run_dir).1,
        "/var/run/nodemesh",
        "the run dir must be the host's"
    );
    let config_arg = strs(&c["args"]).last().copied().expect("args").to_owned();
    let (config_mount, _) = mount_of(Path::new(&config_arg));
    assert_eq!(config_mount, "/etc/nodemesh");

    // Probes on the admin port of the configuration.
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/ready")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["port"], cfg.admin.listen.port(), "{probe}");
        assert_eq!(get["host"], cfg.admin.listen.ip().to_string(), "{probe}");
        assert_eq!(get["path"], path, "{probe}");
    }
    // No host ports: the surge pod of a rolling update must fit next to the old one.
    assert!(
        c.get("ports").is_none(),
        "containerPorts would block maxSurge"
    );
    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(
                c["resources"][kind][res].is_string(),
                "resources.{kind}.{res}"
            );
        }
    }
    let ru = &ds["spec"]["updateStrategy"];
    assert_eq!(ru["type"], "RollingUpdate");
    assert_eq!(ru["rollingUpdate"]["maxUnavailable"], 0);
    assert_eq!(ru["rollingUpdate"]["maxSurge"], 1);
    assert!(
        cfg.handoff.enabled,
        "the surge rollout relies on the handoff"
    );

    // RBAC: read-only on pods and namespaces, bound to the agent's ServiceAccount.
    let role = find(&docs, "ClusterRole");
    for rule in role["rules"].as_array().expect("rules") {
        let mut verbs = strs(&rule["verbs"]);
        verbs.sort_unstable();
        assert_eq!(verbs, ["get", "list", "watch"]);
        for r in strs(&rule["resources"]) {
            assert!(["pods", "namespaces"].contains(&r), "grants {r}");
        }
    }
    let binding = find(&docs, "ClusterRoleBinding");
    let sa = find(&docs, "ServiceAccount");
    assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
    assert_eq!(
        binding["subjects"][0]["namespace"],
        sa["metadata"]["namespace"]
    );
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    Ok(())
}

#[test]
fn the_example_values_land_where_they_belong() -> anyhow::Result<()> {
    let docs = docs(&render("overlays/example")?)?;
    let cfg = agent_config(&docs);
    assert_eq!(cfg.namespace_selector, "mesh=on,tier!=legacy");
    assert_eq!(cfg.log.level, "debug,nodemesh_workloads=trace");
    assert_eq!(cfg.control_plane, "istiod.istio-system.svc:15010");
    let c = &find(&docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.example/nodemesh:v0.1.0");
    assert_eq!(c["resources"]["limits"]["cpu"], "500m");
    assert_eq!(c["resources"]["limits"]["memory"], "256Mi");
    assert_eq!(c["resources"]["requests"]["cpu"], "50m");
    assert_eq!(c["resources"]["requests"]["memory"], "64Mi");
    // Everything namespaced moved, and the binding follows the ServiceAccount.
    assert_eq!(find(&docs, "Namespace")["metadata"]["name"], "mesh-example");
    for d in &docs {
        let ns = d["metadata"]["namespace"].as_str();
        assert!(
            ns.is_none() || ns == Some("mesh-example"),
            "{}",
            d["metadata"]
        );
    }
    assert_eq!(
        find(&docs, "ClusterRoleBinding")["subjects"][0]["namespace"],
        "mesh-example"
    );
    Ok(())
}

#[test]
fn the_cleanup_daemonset_uses_the_installed_paths() -> anyhow::Result<()> {
    let install = agent_config(&docs(&render("default")?)?);
    let docs = docs(&render("cleanup")?)?;
    let text = find(&docs, "ConfigMap")["data"]["agent.yaml"]
        .as_str()
        .expect("agent.yaml")
        .to_owned();
    let cleanup = AgentConfig::parse(&text, Path::new("cleanup.yaml"))?;
    assert_eq!(cleanup.bpffs_dir, install.bpffs_dir);
    assert_eq!(cleanup.run_dir, install.run_dir);
    let init = &find(&docs, "DaemonSet")["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(strs(&init["args"]).last(), Some(&"--cleanup"));
    Ok(())
}
