//! The container image of `deploy/Dockerfile`, built by `cargo xtask test` with podman (base
//! images made from Debian packages, no registry), run for real: its configuration, and the
//! agent in it on a simulated node with exactly the DaemonSet's security context.
use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::Duration,
};

use nodemesh_simnode::{SimNode, require_root};
use nodemesh_tests::container::{self, Container, DaemonSetPod, podman_ok, unique_name};

const ADMIN: &str = "127.0.0.1:15000";
const AGENT_DS: &str = "deploy/kustomize/base/daemonset.yaml";
const CLEANUP_DS: &str = "deploy/kustomize/cleanup/daemonset.yaml";

/// `--version`, the entrypoint and default command (the DaemonSet's args), and a runtime
/// filesystem with the binary, glibc and CA certificates but no shell.
#[test]
fn image_version_config_and_contents() {
    if !require_root() {
        return;
    }
    let image = container::image();
    let out = podman_ok(&["run", "--rm", "--network=none", &image, "--version"]).expect("run");
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.starts_with(&format!("nodemesh {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );

    let out =
        podman_ok(&["image", "inspect", "--format", "{{json .Config}}", &image]).expect("inspect");
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/nodemesh"]),
        "{config}"
    );
    let ds = DaemonSetPod::from_manifest(AGENT_DS, "agent").expect("daemonset.yaml");
    assert_eq!(
        config["Cmd"],
        serde_json::json!(ds.container.args),
        "the image's default command is what the DaemonSet runs"
    );
    let size = podman_ok(&["image", "inspect", "--format", "{{.Size}}", &image]).expect("size");
    let size: u64 = String::from_utf8_lossy(&size.stdout)
        .trim()
        .parse()
        .expect("size");
    eprintln!("image {image}: {:.1} MB", size as f64 / 1e6);

    // No shell: the entrypoint cannot be swapped for one, and the filesystem has none.
    let sh = podman_ok(&[
        "run",
        "--rm",
        "--network=none",
        "--entrypoint=/bin/sh",
        &image,
    ]);
    assert!(sh.is_err(), "a shell ran in the runtime image");
    let files = image_files(&image);
    for must in [
        "usr/local/bin/nodemesh",
        "etc/ssl/certs/ca-certificates.crt",
        "usr/lib64/ld-linux-x86-64.so.2",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        "usr/lib/x86_64-linux-gnu/libgcc_s.so.1",
        "etc/passwd",
    ] {
        assert!(files.iter().any(|f| f == must), "{must} missing: {files:?}");
    }
    let shells: Vec<&String> = files
        .iter()
        .filter(|f| {
            let name = f.rsplit('/').next().unwrap_or_default();
            ["sh", "bash", "dash", "busybox", "apt", "dpkg"].contains(&name)
        })
        .collect();
    assert!(shells.is_empty(), "shells or package managers: {shells:?}");
    eprintln!("image {image}: {} files", files.len());
}

/// Every path in the image's filesystem (`podman export` of a created container).
fn image_files(image: &str) -> Vec<String> {
    let name = unique_name("files");
    podman_ok(&["create", "--name", &name, "--network=none", image]).expect("create");
    let _guard = Container { name: name.clone() };
    let mut export = container::podman()
        .args(["export", &name])
        .stdout(Stdio::piped())
        .spawn()
        .expect("podman export");
    let tar = Command::new("tar")
        .arg("-t")
        .stdin(export.stdout.take().expect("stdout"))
        .output()
        .expect("tar");
    assert!(export.wait().expect("export").success());
    assert!(tar.status.success());
    String::from_utf8_lossy(&tar.stdout)
        .lines()
        .map(|l| l.trim_start_matches("./").trim_end_matches('/').to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The agent in its container with the DaemonSet's capabilities (all dropped but those it
/// adds), host PID, the node's network as host network, bpffs, cgroupfs and /proc mounted
/// as the DaemonSet mounts them, a read-only root, the image's default command: it loads and
/// attaches its programs under the node's cgroup, answers the probes on the admin port,
/// `nodemesh status` works inside the container, and `agent --cleanup` (the cleanup
/// DaemonSet's command) leaves nothing pinned or attached.
#[test]
fn image_agent_runs_as_the_daemonset_runs_it() {
    if !require_root() {
        return;
    }
    let image = container::image();
    let ds = DaemonSetPod::from_manifest(AGENT_DS, "agent").expect("daemonset.yaml");
    let node = SimNode::new("image").expect("node");
    let config_dir = configmap(&node, "configmap", "deploy/kustomize/base/agent.yaml", true);
    let host_dirs = BTreeMap::from([("config", config_dir.clone()), ("run", node.run_dir())]);
    let downward = BTreeMap::from([
        ("NODE_NAME", node.id().to_owned()),
        ("HOST_IP", node.node_ip().to_string()),
    ]);
    let args = ds
        .podman_args(&node.netns_path(), &host_dirs, &downward)
        .expect("podman args");
    eprintln!("podman run {}", args.join(" "));

    let agent = Container::start(unique_name("agent"), &args, &image, &[]).expect("agent");
    let admin = ADMIN.parse().expect("addr");
    agent
        .wait_for(
            "readiness on the admin port",
            Duration::from_secs(60),
            || {
                container::get_in_netns(&node.netns_path(), admin, "/ready")
                    .is_ok_and(|(status, _)| status == 200)
            },
        )
        .expect("ready");
    let (status, body) =
        container::get_in_netns(&node.netns_path(), admin, "/healthz").expect("healthz");
    assert_eq!(status, 200, "{body}");

    // The programs are attached under the node's cgroup, not above it.
    let tree = Command::new("bpftool")
        .args(["cgroup", "tree"])
        .arg(node.cgroup_root())
        .output()
        .expect("bpftool");
    let tree = String::from_utf8_lossy(&tree.stdout);
    assert!(
        tree.contains("connect4") && tree.contains("sock_ops"),
        "programs attached under {}:\n{tree}\n{}",
        node.cgroup_root().display(),
        agent.logs()
    );
    assert!(
        node.bpffs_dir().exists(),
        "pinned under the node's bpffs dir"
    );

    // `kubectl exec ds/nodemesh -- nodemesh status --run-dir /var/run/nodemesh`.
    let out = agent
        .exec(&["nodemesh", "status", "--run-dir", "/var/run/nodemesh"])
        .expect("exec");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("agent ready"), "{text}");
    assert!(
        text.contains(&node.cgroup_root().display().to_string()),
        "attach points in status:\n{text}"
    );

    // Stopping the container (SIGTERM) leaves the programs pinned, on purpose.
    let code = agent.stop(Duration::from_secs(45)).expect("stop");
    assert_eq!(code, 0, "agent exit code\n{}", agent.logs());
    assert!(
        node.bpffs_dir().exists(),
        "pins kept after the agent stopped"
    );
    drop(agent);

    // The cleanup DaemonSet: its init container's command, security context and mounts,
    // with its own ConfigMap (the installed agent's paths).
    let cleanup = DaemonSetPod::from_manifest(CLEANUP_DS, "cleanup").expect("cleanup ds");
    let cleanup_dir = configmap(
        &node,
        "cleanup-configmap",
        "deploy/kustomize/cleanup/agent.yaml",
        false,
    );
    let cleanup_dirs = BTreeMap::from([("config", cleanup_dir), ("run", node.run_dir())]);
    let mut run_args = vec![
        "--rm".to_owned(),
        format!("--name={}", unique_name("cleanup")),
    ];
    run_args.extend(
        cleanup
            .podman_args(&node.netns_path(), &cleanup_dirs, &downward)
            .expect("podman args"),
    );
    let mut run = vec!["run"];
    run.extend(run_args.iter().map(String::as_str));
    run.push(image.as_str());
    run.extend(cleanup.container.args.iter().map(String::as_str));
    let out = podman_ok(&run).expect("cleanup");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(log.contains("removed"), "{log}");
    assert!(!node.bpffs_dir().exists(), "no pin left after --cleanup");
    let tree = Command::new("bpftool")
        .args(["cgroup", "tree"])
        .arg(node.cgroup_root())
        .output()
        .expect("bpftool");
    let tree = String::from_utf8_lossy(&tree.stdout);
    assert!(
        !tree
            .lines()
            .any(|l| l.contains("connect4") || l.contains("sock_ops")),
        "nothing attached after --cleanup:\n{tree}"
    );
    assert!(
        !node.run_dir().join("registry.json").exists(),
        "registry state removed"
    );
    node.cleanup().expect("teardown");
}

/// [`node_config`] written as `agent.yaml` in the node's folder `dir`, mounted as the
/// ConfigMap.
fn configmap(node: &SimNode, dir: &str, manifest: &str, agent: bool) -> std::path::PathBuf {
    let dir = node.work_dir().join(dir);
    std::fs::create_dir_all(&dir).expect("configmap dir");
    std::fs::write(dir.join("agent.yaml"), node_config(node, manifest, agent)).expect("agent.yaml");
    dir
}

/// A shipped ConfigMap (`manifest`) for this node: its cgroup and bpffs folder instead of
/// the node-wide ones, and the registry API as the pod source (there is no Kubernetes API
/// here).
fn node_config(node: &SimNode, manifest: &str, agent: bool) -> String {
    let text = std::fs::read_to_string(container::repo_path(manifest)).expect("agent.yaml");
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
    doc["cgroup_path"] = node.cgroup_root().display().to_string().into();
    doc["bpffs_dir"] = node.bpffs_dir().display().to_string().into();
    assert_eq!(
        doc["run_dir"], "/var/run/nodemesh",
        "the DaemonSet's run dir mount"
    );
    if agent {
        doc["kubernetes"]["enabled"] = false.into();
        assert_eq!(doc["admin"]["listen"], ADMIN, "the DaemonSet's probes");
    }
    serde_yaml::to_string(&doc).expect("yaml")
}
