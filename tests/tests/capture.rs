//! Capture: which connections the kernel sends through the node proxy, and what arrives.
use std::time::Duration;

use nodemesh_simnode::require_root;
use nodemesh_tests::mesh::{MeshNode, all_ok, delta, metric};

const PORT: u16 = 8080;
const T: Duration = Duration::from_secs(60);

fn accepted(node: &MeshNode) -> f64 {
    metric(
        &node.metrics().expect("metrics"),
        "nodemesh_proxy_accepted_connections_total",
        &[],
    )
}

/// An enabled pod's connection goes through the proxy and arrives intact, from small
/// messages to 64 MiB each way with half-close; the destination sees the pod's address.
#[test]
fn enabled_pods_go_through_the_proxy_with_payload_intact() {
    if !require_root() {
        return;
    }
    let mut node = MeshNode::start("capture").expect("node");
    let client = node.add_pod("client", "shop").expect("pod");
    let server = node.add_pod("server", "shop").expect("pod");
    node.enable_namespace("shop").expect("label");
    let _echo = node
        .serve(&server, PORT, &["--mode", "echo"])
        .expect("echo");
    let _who = node
        .serve(&server, 8081, &["--mode", "whoami"])
        .expect("whoami");
    let dst = format!("{}:{PORT}", server.ip);
    let before = node.counters().expect("counters");

    let small = node
        .podapp(
            &client,
            &[
                "client",
                "--connect",
                &dst,
                "--connections",
                "10",
                "--bytes",
                "100",
            ],
            T,
        )
        .expect("small");
    assert_eq!(all_ok(&small), 10);
    let big = node
        .podapp(
            &client,
            &[
                "client",
                "--connect",
                &dst,
                "--bytes",
                &(64u64 << 20).to_string(),
                "--timeout-ms",
                "50000",
            ],
            T,
        )
        .expect("64 MiB");
    assert_eq!(all_ok(&big), 1);
    assert_eq!(big["bytes_received"], 64u64 << 20);

    let who = node
        .podapp(
            &client,
            &["whoami", "--connect", &format!("{}:8081", server.ip)],
            T,
        )
        .expect("whoami");
    let seen_as = who["seen_as"].as_str().expect("seen_as");
    assert!(
        seen_as.starts_with(&format!("{}:", client.ip)),
        "the destination must see the client pod's own address, saw {seen_as}"
    );

    let after = node.counters().expect("counters");
    let delta = |k: &str| delta(&before, &after, k);
    assert_eq!(
        delta("connect4.redirected"),
        12,
        "10 small + 1 big + 1 whoami connects captured"
    );
    assert!(
        delta("connect4.proxy_owned") >= 12,
        "the proxy's own upstream connects are left alone"
    );
    assert_eq!(delta("sockops.orig_dst_recorded"), 12);
    let metrics = node.metrics().expect("metrics");
    let opened = metric(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[
            ("source_workload", "client"),
            ("destination_workload", "server"),
            ("source_workload_namespace", "shop"),
        ],
    );
    assert_eq!(opened, 12.0, "{metrics}");
    let received = metric(
        &metrics,
        "istio_tcp_received_bytes_total",
        &[("source_workload", "client")],
    );
    assert!(
        received >= (64u64 << 20) as f64 + 1000.0,
        "request bytes counted: {received}"
    );
    node.sim.leftovers(); // the node is torn down on drop; see lifecycle.rs for the checks
}

/// A pod whose namespace is not enabled connects directly: the proxy sees nothing.
#[test]
fn pods_outside_the_mesh_go_direct() {
    if !require_root() {
        return;
    }
    let mut node = MeshNode::start("direct").expect("node");
    let client = node.add_pod("legacy", "batch").expect("pod");
    let server = node.add_pod("server", "shop").expect("pod");
    node.enable_namespace("shop").expect("label");
    let _echo = node
        .serve(&server, PORT, &["--mode", "echo"])
        .expect("echo");
    let _who = node
        .serve(&server, 8081, &["--mode", "whoami"])
        .expect("whoami");
    let before = node.counters().expect("counters");

    let r = node
        .podapp(
            &client,
            &[
                "client",
                "--connect",
                &format!("{}:{PORT}", server.ip),
                "--connections",
                "5",
                "--bytes",
                "10000",
            ],
            T,
        )
        .expect("client");
    assert_eq!(all_ok(&r), 5);
    let who = node
        .podapp(
            &client,
            &["whoami", "--connect", &format!("{}:8081", server.ip)],
            T,
        )
        .expect("whoami");
    assert!(
        who["seen_as"]
            .as_str()
            .expect("seen_as")
            .starts_with(&client.ip.to_string())
    );

    let after = node.counters().expect("counters");
    let delta = |k: &str| delta(&before, &after, k);
    assert_eq!(delta("connect4.redirected"), 0);
    assert_eq!(delta("connect4.not_enabled"), 6);
    assert_eq!(accepted(&node), 0.0, "the proxy accepted nothing");
    assert_eq!(
        delta("sockops.sockhash_inserted"),
        0,
        "sockets of pods outside the mesh are never touched"
    );
}

/// Toggling a namespace at run time changes new connections only: a connection opened
/// before keeps its path and keeps working.
#[test]
fn toggling_a_namespace_changes_new_connections_only() {
    if !require_root() {
        return;
    }
    let mut node = MeshNode::start("toggle").expect("node");
    let client = node.add_pod("client", "shop").expect("pod");
    let server = node.add_pod("server", "shop").expect("pod");
    let _echo = node
        .serve(&server, PORT, &["--mode", "echo"])
        .expect("echo");
    let dst = format!("{}:{PORT}", server.ip);
    let short = ["client", "--connect", dst.as_str(), "--bytes", "1000"];

    // Disabled: direct. A long-lived connection opened now must survive the switch.
    let long = node
        .spawn_podapp(
            &client,
            &[
                "rr",
                "--connect",
                &dst,
                "--iterations",
                "150",
                "--warmup",
                "0",
                "--interval-ms",
                "10",
            ],
        )
        .expect("long-lived");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(all_ok(&node.podapp(&client, &short, T).expect("direct")), 1);
    assert_eq!(accepted(&node), 0.0);

    node.enable_namespace("shop").expect("enable");
    assert_eq!(all_ok(&node.podapp(&client, &short, T).expect("meshed")), 1);
    assert_eq!(
        accepted(&node),
        1.0,
        "a new connection goes through the proxy"
    );

    node.disable_namespace("shop").expect("disable");
    assert_eq!(
        all_ok(&node.podapp(&client, &short, T).expect("direct again")),
        1
    );
    assert_eq!(accepted(&node), 1.0, "and direct again once disabled");

    let mut long = long;
    let status = long.wait_timeout(T).expect("long-lived finishes");
    assert!(
        status.success(),
        "the connection opened before the switches kept working: {}",
        long.stdout_text()
    );
}

/// The registry refuses bad input with a clear error and changes nothing.
#[test]
fn bad_registry_input_is_rejected_and_changes_nothing() {
    if !require_root() {
        return;
    }
    let mut node = MeshNode::start("badinput").expect("node");
    let good = node.add_pod("good", "shop").expect("pod");
    let other = node.sim.add_pod("other", "shop").expect("pod");
    node.enable_namespace("shop").expect("label");
    let before = (
        node.list_pods().expect("list"),
        node.maps().expect("maps").pods.len(),
    );

    let base = nodemesh_tests::mesh::api_pod(&other);
    let cases: Vec<(&str, nodemesh_api::registry::Pod, tonic::Code)> = vec![
        (
            "bad name",
            nodemesh_api::registry::Pod {
                name: "Not_A_Name".into(),
                ..base.clone()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            "no ips",
            nodemesh_api::registry::Pod {
                ips: vec![],
                ..base.clone()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            "garbage ip",
            nodemesh_api::registry::Pod {
                ips: vec!["300.1.1.1".into()],
                ..base.clone()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            "relative netns",
            nodemesh_api::registry::Pod {
                netns_path: "netns/x".into(),
                ..base.clone()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            "missing netns",
            nodemesh_api::registry::Pod {
                netns_path: "/var/run/netns/does-not-exist".into(),
                ..base.clone()
            },
            tonic::Code::FailedPrecondition,
        ),
        (
            "not a netns",
            nodemesh_api::registry::Pod {
                netns_path: "/etc/hostname".into(),
                ..base.clone()
            },
            tonic::Code::FailedPrecondition,
        ),
        (
            "the node's own netns",
            nodemesh_api::registry::Pod {
                netns_path: node.sim.netns_path().display().to_string(),
                ..base.clone()
            },
            tonic::Code::FailedPrecondition,
        ),
        (
            "cgroup outside the attach point",
            nodemesh_api::registry::Pod {
                cgroup_path: "/sys/fs/cgroup/unified".into(),
                ..base.clone()
            },
            tonic::Code::FailedPrecondition,
        ),
        (
            "address owned by another pod",
            nodemesh_api::registry::Pod {
                ips: vec![good.ip.to_string()],
                ..base.clone()
            },
            tonic::Code::FailedPrecondition,
        ),
        (
            "netns owned by another pod",
            nodemesh_api::registry::Pod {
                netns_path: good.netns_path.display().to_string(),
                ..base.clone()
            },
            tonic::Code::FailedPrecondition,
        ),
        (
            "oversized request",
            nodemesh_api::registry::Pod {
                labels: (0..5000)
                    .map(|i| (format!("k{i}"), "v".repeat(60)))
                    .collect(),
                ..base.clone()
            },
            tonic::Code::OutOfRange,
        ),
    ];
    for (what, pod, code) in cases {
        let err = node.add_pod_raw(pod).expect_err(what);
        assert!(
            err.code() == code
                || (what == "oversized request" && err.code() == tonic::Code::ResourceExhausted),
            "{what}: expected {code:?}, got {:?}: {}",
            err.code(),
            err.message()
        );
        assert!(!err.message().is_empty(), "{what}: the error says why");
    }
    let after = (
        node.list_pods().expect("list"),
        node.maps().expect("maps").pods.len(),
    );
    assert_eq!(before.0.pods.len(), after.0.pods.len(), "no pod was added");
    assert_eq!(before.1, after.1, "the pod map did not change");
    let metrics = node.metrics().expect("metrics");
    assert!(
        metric(
            &metrics,
            "nodemesh_registry_requests_total",
            &[("op", "add_pod"), ("result", "invalid")]
        ) >= 4.0
    );
    assert!(
        metric(
            &metrics,
            "nodemesh_registry_requests_total",
            &[("op", "add_pod"), ("result", "conflict")]
        ) >= 6.0
    );
    // And the well-formed request still works.
    node.register(&other)
        .expect("a good request after bad ones");
}

/// The agent refuses to start when the kernel (here: the cgroup it should attach to)
/// lacks what it needs, and says what is missing.
#[test]
fn the_agent_refuses_to_start_naming_the_missing_feature() {
    if !require_root() {
        return;
    }
    let sim = nodemesh_simnode::SimNode::new("refuse").expect("node");
    let config = sim.work_dir().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "cgroup_path: {}\nbpffs_dir: {}\nrun_dir: {}\nproxy:\n  listen: {}:15001\n",
            sim.work_dir().display(), // a plain directory, not a cgroup v2 directory
            sim.bpffs_dir().display(),
            sim.run_dir().display(),
            sim.node_ip()
        ),
    )
    .expect("config");
    let mut cmd = std::process::Command::new(nodemesh_simnode::bin_path("nodemesh"));
    cmd.args(["agent", "--config"]).arg(&config);
    let out = sim.run_in_node(cmd, T).expect("agent exits");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cgroup v2 hierarchy"),
        "names the feature: {stderr}"
    );
    assert!(!sim.bpffs_dir().exists(), "nothing was pinned");
}

/// A dual-stack (AF_INET6) socket connecting to an IPv4-mapped address is captured by
/// connect6 the same way.
#[test]
fn dual_stack_sockets_are_captured_by_connect6() {
    if !require_root() {
        return;
    }
    let mut node = MeshNode::start("connect6").expect("node");
    let client = node.add_pod("client", "shop").expect("pod");
    let server = node.add_pod("server", "shop").expect("pod");
    node.enable_namespace("shop").expect("label");
    let _echo = node
        .serve(&server, PORT, &["--mode", "echo"])
        .expect("echo");
    let before = node.counters().expect("counters");
    let mapped = format!("[::ffff:{}]:{PORT}", server.ip);
    let r = node
        .podapp(
            &client,
            &[
                "client",
                "--connect",
                &mapped,
                "--connections",
                "3",
                "--bytes",
                "100000",
            ],
            T,
        )
        .expect("client");
    assert_eq!(all_ok(&r), 3);
    let after = node.counters().expect("counters");
    let delta = |k: &str| delta(&before, &after, k);
    assert_eq!(delta("connect6.redirected"), 3);
    assert_eq!(delta("connect4.redirected"), 0);
    assert_eq!(
        delta("sockops.orig_dst_recorded"),
        3,
        "the mapped tuple matched the proxy's IPv4 view"
    );
    assert_eq!(accepted(&node), 3.0);
}

/// A node full of pods refuses the next one clearly, and keeps serving the others.
#[test]
fn a_full_node_refuses_more_pods() {
    if !require_root() {
        return;
    }
    let opts = nodemesh_tests::mesh::AgentOptions {
        extra: vec!["limits:".into(), "  max_pods: 2".into()],
        ..Default::default()
    };
    let mut node = MeshNode::start_with("full", &opts).expect("node");
    let a = node.add_pod("a", "shop").expect("pod");
    let b = node.add_pod("b", "shop").expect("pod");
    let c = node.sim.add_pod("c", "shop").expect("pod");
    node.enable_namespace("shop").expect("label");
    let err = node
        .add_pod_raw(nodemesh_tests::mesh::api_pod(&c))
        .expect_err("a third pod");
    assert_eq!(
        err.code(),
        tonic::Code::ResourceExhausted,
        "{}",
        err.message()
    );
    assert!(err.message().contains("max_pods"), "{}", err.message());
    let _echo = node.serve(&b, PORT, &["--mode", "echo"]).expect("echo");
    let r = node
        .podapp(&a, &["client", "--connect", &format!("{}:{PORT}", b.ip)], T)
        .expect("client");
    assert_eq!(all_ok(&r), 1);
    assert_eq!(accepted(&node), 1.0);
}
