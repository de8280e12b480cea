//! The agent's life on a node: restarts under live connections, stop and start, per-pod
//! limits, and removal that leaves nothing behind.
use std::time::Duration;

use nodemesh_simnode::require_root;
use nodemesh_tests::mesh::{AgentOptions, MeshNode, all_ok, metric};

const PORT: u16 = 8080;
const T: Duration = Duration::from_secs(90);

/// A new agent takes over from a running one: connections open through the proxy keep
/// working (the old agent hands them over), the kernel programs are adopted in place, the
/// pods are known again, and new connections work.
#[test]
fn the_agent_restarts_under_live_connections_without_breaking_them() {
    if !require_root() {
        return;
    }
    let mut node = MeshNode::start("restart").expect("node");
    let client = node.add_pod("client", "shop").expect("pod");
    let server = node.add_pod("server", "shop").expect("pod");
    node.enable_namespace("shop").expect("label");
    let _echo = node
        .serve(&server, PORT, &["--mode", "echo"])
        .expect("echo");
    let dst = format!("{}:{PORT}", server.ip);
    // Three long-lived connections: round trips every 10 ms for ~4 s, across the restart.
    let live: Vec<_> = (0..3)
        .map(|_| {
            node.spawn_podapp(
                &client,
                &[
                    "rr",
                    "--connect",
                    &dst,
                    "--iterations",
                    "400",
                    "--warmup",
                    "0",
                    "--interval-ms",
                    "10",
                ],
            )
            .expect("long-lived")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(node.status().expect("status").proxy.active_connections, 3);
    let redirected_before = node.counters().expect("counters")["sk_msg.redirected"];

    node.start_agent().expect("restart");

    let status = node.status().expect("status");
    assert!(
        status
            .datapath
            .programs
            .iter()
            .filter(|p| p.name != "nm_sk_msg")
            .all(|p| p.outcome == "adopted"),
        "{:?}",
        status.datapath.programs
    );
    assert_eq!(status.pods.len(), 2, "the registry was restored");
    assert_eq!(
        status.proxy.active_connections, 3,
        "the new agent relays the handed-over connections"
    );
    for mut p in live {
        let done = p.wait_timeout(T).expect("finishes");
        assert!(
            done.success(),
            "a connection broke across the restart: {}",
            p.stdout_text()
        );
    }
    let after = node.counters().expect("counters");
    assert!(
        after["sk_msg.redirected"] > redirected_before,
        "accelerated hops kept being redirected"
    );
    let r = node
        .podapp(
            &client,
            &["client", "--connect", &dst, "--bytes", "10000"],
            T,
        )
        .expect("new connection");
    assert_eq!(all_ok(&r), 1);
    let metrics = node.metrics().expect("metrics");
    assert!(metric(&metrics, "nodemesh_proxy_accepted_connections_total", &[]) >= 1.0);
    let handoff = |result| {
        metric(
            &metrics,
            "nodemesh_proxy_handoff_connections_total",
            &[("result", result)],
        )
    };
    assert_eq!(handoff("resumed"), 3.0, "{metrics}");
    assert_eq!(handoff("failed"), 0.0);
}

/// Stopped with SIGTERM and started again (no handoff): the programs stay attached and are
/// adopted, the pods are restored from the state file, and traffic flows again.
#[test]
fn the_agent_stops_and_starts_again() {
    if !require_root() {
        return;
    }
    let mut node = MeshNode::start("stopstart").expect("node");
    let client = node.add_pod("client", "shop").expect("pod");
    let server = node.add_pod("server", "shop").expect("pod");
    node.enable_namespace("shop").expect("label");
    let _echo = node
        .serve(&server, PORT, &["--mode", "echo"])
        .expect("echo");
    let dst = format!("{}:{PORT}", server.ip);
    node.stop_agent().expect("stop");
    assert!(
        node.sim.bpffs_dir().exists(),
        "a stopped agent leaves its programs attached"
    );
    // Without an agent the pod's connections are captured but refused: fail closed.
    let r = node
        .podapp(&client, &["client", "--connect", &dst, "--bytes", "10"], T)
        .expect("client");
    assert_eq!(r["ok"], 0, "{r}");
    // `nodemesh status` still answers from the pinned maps, and shows that capture happened.
    let mut cmd = std::process::Command::new(nodemesh_simnode::bin_path("nodemesh"));
    cmd.args(["status", "--run-dir"])
        .arg(node.sim.run_dir())
        .arg("--bpffs-dir")
        .arg(node.sim.bpffs_dir());
    let out = node.sim.run_in_node(cmd, T).expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("agent: not reachable"), "{text}");
    assert!(
        text.contains("redirected="),
        "the kernel counters are shown: {text}"
    );
    assert!(text.contains("pods 2"), "{text}");

    node.start_agent().expect("start");
    let status = node.status().expect("status");
    assert_eq!(
        status.pods.iter().filter(|p| p.enabled).count(),
        2,
        "pods restored: {:?}",
        status.pods
    );
    let r = node
        .podapp(
            &client,
            &["client", "--connect", &dst, "--bytes", "10000"],
            T,
        )
        .expect("client");
    assert_eq!(all_ok(&r), 1);
}

/// One pod cannot take more than its share of the proxy.
#[test]
fn a_pod_is_limited_without_affecting_others() {
    if !require_root() {
        return;
    }
    let opts = AgentOptions {
        proxy: vec!["max_connections_per_pod: 4".into()],
        ..AgentOptions::default()
    };
    let mut node = MeshNode::start_with("limit", &opts).expect("node");
    let noisy = node.add_pod("noisy", "shop").expect("pod");
    let quiet = node.add_pod("quiet", "shop").expect("pod");
    let server = node.add_pod("server", "shop").expect("pod");
    node.enable_namespace("shop").expect("label");
    let _echo = node
        .serve(&server, PORT, &["--mode", "echo"])
        .expect("echo");
    let dst = format!("{}:{PORT}", server.ip);
    let held = [
        "client",
        "--connect",
        dst.as_str(),
        "--bytes",
        "100",
        "--hold-ms",
        "1500",
        "--timeout-ms",
        "10000",
    ];
    let noisy_run = node
        .spawn_podapp(
            &noisy,
            &[&held[..], &["--connections", "8", "--concurrency", "8"]].concat(),
        )
        .expect("noisy");
    std::thread::sleep(Duration::from_millis(500));
    let quiet_report = node
        .podapp(
            &quiet,
            &[&held[..], &["--connections", "4", "--concurrency", "4"]].concat(),
            T,
        )
        .expect("quiet");
    assert_eq!(
        all_ok(&quiet_report),
        4,
        "the quiet pod gets its full share"
    );
    let mut noisy_run = noisy_run;
    let _ = noisy_run.wait_timeout(T).expect("noisy finishes");
    let noisy_report: serde_json::Value =
        serde_json::from_str(noisy_run.stdout_text().trim()).expect("json");
    assert_eq!(noisy_report["ok"], 4, "{noisy_report}");
    assert_eq!(noisy_report["failed"], 4, "{noisy_report}");
    let metrics = node.metrics().expect("metrics");
    assert_eq!(
        metric(
            &metrics,
            "nodemesh_proxy_connection_errors_total",
            &[
                ("source_workload", "noisy"),
                ("reason", "pod_connection_limit")
            ]
        ),
        4.0
    );
    assert_eq!(
        metric(
            &metrics,
            "nodemesh_proxy_connection_errors_total",
            &[("source_workload", "quiet")]
        ),
        0.0
    );
}

/// `nodemesh agent --cleanup` detaches and unpins everything; pods then go direct, and
/// the node's teardown finds nothing left.
#[test]
fn cleanup_leaves_nothing_behind() {
    if !require_root() {
        return;
    }
    let mut node = MeshNode::start("cleanup").expect("node");
    let client = node.add_pod("client", "shop").expect("pod");
    let server = node.add_pod("server", "shop").expect("pod");
    node.enable_namespace("shop").expect("label");
    let _echo = node
        .serve(&server, PORT, &["--mode", "echo"])
        .expect("echo");
    let dst = format!("{}:{PORT}", server.ip);
    assert_eq!(
        all_ok(
            &node
                .podapp(&client, &["client", "--connect", &dst], T)
                .expect("client")
        ),
        1
    );

    let log = node.cleanup_agent().expect("cleanup");
    assert!(log.contains("removed"), "{log}");
    assert!(!node.sim.bpffs_dir().exists(), "no pin left");
    assert!(!node.sim.run_dir().join("registry.json").exists());
    let attached = std::process::Command::new("bpftool")
        .args(["cgroup", "tree"])
        .arg(node.sim.cgroup_root())
        .output()
        .expect("bpftool (installed by cargo xtask setup)");
    let tree = String::from_utf8_lossy(&attached.stdout);
    assert!(
        !tree
            .lines()
            .any(|l| l.contains("connect4") || l.contains("sock_ops") || l.contains("nm_")),
        "nothing attached under the node's cgroup:\n{tree}"
    );
    // The programs are gone: with no agent running, a captured connect would be refused;
    // this one reaches the server directly.
    assert_eq!(
        all_ok(
            &node
                .podapp(&client, &["client", "--connect", &dst], T)
                .expect("direct")
        ),
        1
    );

    let sim = std::mem::replace(
        &mut node.sim,
        nodemesh_simnode::SimNode::new("scratch").expect("scratch"),
    );
    let id = sim.id().to_owned();
    sim.cleanup().expect("teardown");
    let stray = std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().contains(&id))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(stray, 0, "no namespace of the node left");
}
