//! `cargo xtask demo --scenario namespaces`: acceleration switched on per namespace, with
//! Kubernetes as the pod source.
//!
//! One simulated node; a fixture Kubernetes API server (`nodemesh_tests::kubeapi`) serves
//! two namespaces, `shop` (labelled `nodemesh.io/acceleration=enabled`) and `legacy` (not),
//! and four pods, a client and a server in each, laid out on the node as kubelet lays them
//! out (`nodemesh_tests::kubelet`). The agent watches the API, finds the pods' cgroups and
//! network namespaces, and registers them. Each client then opens connections to the
//! server of its own namespace, and the counters show which namespace went through the
//! node proxy: the kernel's connect4 `redirected` / `not_enabled` and the proxy's
//! `istio_tcp_connections_opened_total` by source namespace. Then the labels are swapped in
//! the API and the same flows are run again.
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nodemesh_simnode::Pod;
use nodemesh_tests::{
    kubeapi::KubeApi,
    kubelet::{Kubelet, Layout, Spec},
    mesh::{AgentOptions, MeshNode, metric},
};
use serde_json::{Value, json};

use crate::paths::PORT;

const NODE: &str = "demo-node";
const CONNECTIONS: u64 = 10;
const T: Duration = Duration::from_secs(120);
const LABEL: &str = "nodemesh.io/acceleration";

const PODS: &str = include_str!("../../tests/corpus/kube/pods.json");
const NAMESPACES: &str = include_str!("../../tests/corpus/kube/namespaces.json");

fn template(list: &str, name: &str) -> anyhow::Result<Value> {
    let list: Value = serde_json::from_str(list)?;
    list["items"]
        .as_array()
        .and_then(|a| a.iter().find(|o| o["metadata"]["name"] == name))
        .cloned()
        .with_context(|| format!("{name} not in the recorded objects"))
}

fn namespace(name: &str, meshed: bool) -> anyhow::Result<Value> {
    let mut ns = template(NAMESPACES, "store")?;
    ns["metadata"]["name"] = json!(name);
    ns["metadata"]["labels"] = json!({ "kubernetes.io/metadata.name": name });
    if meshed {
        ns["metadata"]["labels"][LABEL] = json!("enabled");
    }
    Ok(ns)
}

fn pod_object(pod: &Pod, uid: &str) -> anyhow::Result<Value> {
    let mut p = template(PODS, "web-7d9f8b6c5-x2kqp")?;
    p["metadata"]["name"] = json!(pod.name);
    p["metadata"]["namespace"] = json!(pod.namespace);
    p["metadata"]["uid"] = json!(uid);
    p["metadata"]["labels"] = json!({ "app": pod.name });
    p["spec"]["nodeName"] = json!(NODE);
    p["spec"]["serviceAccountName"] = json!(pod.name);
    p["status"]["podIP"] = json!(pod.ip.to_string());
    p["status"]["podIPs"] = json!([{ "ip": pod.ip.to_string() }]);
    p["status"]["qosClass"] = json!("BestEffort");
    Ok(p)
}

pub fn run() -> anyhow::Result<()> {
    println!("== nodemesh demo: per-namespace acceleration, pods from the Kubernetes API\n");
    let mut node = MeshNode::create(
        "nsdemo",
        &AgentOptions {
            sockmap_mode: "auto",
            ..AgentOptions::default()
        },
    )?;
    let api = KubeApi::start_in(&node.sim.netns_path())?;
    let mut kubelet = Kubelet::default();
    let root = node.sim.cgroup_root().join("kubepods.slice");
    let mut pods = Vec::new();
    for (i, (name, ns)) in [
        ("client", "shop"),
        ("server", "shop"),
        ("client", "legacy"),
        ("server", "legacy"),
    ]
    .into_iter()
    .enumerate()
    {
        let pod = node.sim.add_pod(&format!("{ns}-{name}"), ns)?;
        let uid = format!("{:08x}-0000-4000-8000-{:012x}", i + 1, std::process::id());
        let container = format!("{:064x}", i + 1);
        kubelet.start(
            &node.sim,
            &pod,
            &root,
            Spec {
                layout: Layout::Systemd,
                uid: &uid,
                qos: "BestEffort",
                container: &container,
            },
        )?;
        api.apply("pods", pod_object(&pod, &uid)?);
        pods.push(pod);
    }
    api.apply("namespaces", namespace("shop", true)?);
    api.apply("namespaces", namespace("legacy", false)?);
    let kubeconfig = node.sim.work_dir().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    node.append_config(&format!(
        "kubernetes:\n  enabled: true\n  node_name: {NODE}\n  kubeconfig: {}\n  kubepods_cgroup: {}\n  retry_interval: 200ms\n",
        kubeconfig.display(),
        root.display()
    ))?;
    node.start_agent().context("starting the agent")?;
    println!(
        "node {NODE}: the agent watches {} (pods with fieldSelector spec.nodeName={NODE}, namespaces)",
        api.url()
    );
    wait_registered(&node, pods.len())?;
    let _servers = [
        node.serve(&pods[1], PORT, &["--mode", "echo"])?,
        node.serve(&pods[3], PORT, &["--mode", "echo"])?,
    ];
    print_pods(&node)?;

    println!("\n== round 1: shop labelled {LABEL}=enabled, legacy not\n");
    table_header();
    flow(&node, &pods[0], &pods[1], true)?;
    flow(&node, &pods[2], &pods[3], false)?;

    println!("\n== round 2: the labels swapped in the API (kubectl label ns ...)\n");
    api.apply("namespaces", namespace("shop", false)?);
    api.apply("namespaces", namespace("legacy", true)?);
    wait_enabled(&node, "legacy")?;
    table_header();
    flow(&node, &pods[0], &pods[1], false)?;
    flow(&node, &pods[2], &pods[3], true)?;

    println!("\n(only new connections follow a label change; established ones keep their path)");
    drop(api);
    node.cleanup_agent().context("removing the agent")?;
    drop(kubelet);
    println!(
        "cleaned up: agent stopped, programs detached and unpinned, namespaces and cgroups removed"
    );
    Ok(())
}

fn wait_registered(node: &MeshNode, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.list_pods()?.pods.len() < n {
        if Instant::now() > deadline {
            bail!(
                "the agent did not register the pods from the API:\n{}",
                node.agent_log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn wait_enabled(node: &MeshNode, ns: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = node.list_pods()?;
        let ok = list.pods.iter().all(|s| {
            let in_ns = s.pod.as_ref().is_some_and(|p| p.namespace == ns);
            s.enabled == in_ns
        });
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the label change did not reach the registry:\n{}",
                node.agent_log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn print_pods(node: &MeshNode) -> anyhow::Result<()> {
    println!(
        "\n{:<8} {:<14} {:<12} {:<14} {:<5} cgroup (as kubelet names it)",
        "ns", "pod", "ip", "identity", "mesh"
    );
    for s in node.list_pods()?.pods {
        let p = s.pod.unwrap_or_default();
        let cgroup = p.cgroup_path.rsplit('/').next().unwrap_or("").to_owned();
        println!(
            "{:<8} {:<14} {:<12} {:<14} {:<5} .../{cgroup}",
            p.namespace,
            p.name,
            p.ips.join(","),
            p.service_account,
            if s.enabled { "on" } else { "off" }
        );
    }
    Ok(())
}

fn table_header() {
    println!(
        "{:<38} {:>5} {:>20} {:>21} {:>18}",
        "flow", "conns", "connect4 redirected", "connect4 not_enabled", "proxy opened (ns)"
    );
}

/// `CONNECTIONS` checked connections `from` -> `to`, and what the counters say about them;
/// counters that contradict `meshed` fail the demo.
fn flow(node: &MeshNode, from: &Pod, to: &Pod, meshed: bool) -> anyhow::Result<()> {
    let counters = || -> anyhow::Result<(u64, u64, f64)> {
        let c = node.counters()?;
        let opened = metric(
            &node.metrics()?,
            "istio_tcp_connections_opened_total",
            &[("source_workload_namespace", &from.namespace)],
        );
        Ok((
            c.get("connect4.redirected").copied().unwrap_or(0),
            c.get("connect4.not_enabled").copied().unwrap_or(0),
            opened,
        ))
    };
    let before = counters()?;
    let n = CONNECTIONS.to_string();
    let report = node.podapp(
        from,
        &[
            "client",
            "--connect",
            &format!("{}:{PORT}", to.ip),
            "--connections",
            &n,
            "--bytes",
            "65536",
        ],
        T,
    )?;
    if report["failed"] != 0 {
        bail!("{} -> {}: {report}", from.name, to.name);
    }
    let after = counters()?;
    println!(
        "{:<38} {:>5} {:>20} {:>21} {:>18}",
        format!("{}/{} -> {}", from.namespace, from.name, to.name),
        report["ok"].as_u64().unwrap_or(0),
        after.0 - before.0,
        after.1 - before.1,
        after.2 - before.2
    );
    let (redirected, direct, proxied) =
        (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    let expected = if meshed {
        redirected >= CONNECTIONS && proxied >= CONNECTIONS as f64
    } else {
        redirected == 0 && direct >= CONNECTIONS && proxied == 0.0
    };
    if !expected {
        bail!(
            "{}: the counters do not show the namespace {}",
            from.namespace,
            if meshed { "accelerated" } else { "left alone" }
        );
    }
    Ok(())
}
