//! The sockmap fast path, tested hard: which hops it short-circuits, large transfers both
//! ways, many concurrent connections, half-close, peers that stop reading, churn, and the
//! run-time switch. Every client runs under a deadline: a stall fails the test.
use std::time::Duration;

use nodemesh_simnode::{Pod, require_root};
use nodemesh_tests::mesh::{AgentOptions, MeshNode, all_ok, delta};

const PORT: u16 = 8080;
const T: Duration = Duration::from_secs(90);

/// A node with a client and an echo server in an enabled namespace.
fn meshed(label: &str) -> (MeshNode, Pod, Pod, nodemesh_simnode::Process) {
    let mut node = MeshNode::start(label).expect("node");
    let client = node.add_pod("client", "shop").expect("pod");
    let server = node.add_pod("server", "shop").expect("pod");
    node.enable_namespace("shop").expect("label");
    let echo = node
        .serve(&server, PORT, &["--mode", "echo"])
        .expect("echo");
    (node, client, server, echo)
}

/// Both local hops of a proxied connection (app <-> proxy, proxy <-> destination pod) are
/// in the SockHash while the connection lives, every byte of them is redirected, and the
/// entries go when it closes.
#[test]
fn both_local_hops_are_short_circuited() {
    if !require_root() {
        return;
    }
    let (node, client, server, _echo) = meshed("hops");
    let dst = format!("{}:{PORT}", server.ip);
    let before = node.counters().expect("counters");
    let held = node
        .spawn_podapp(
            &client,
            &[
                "client",
                "--connect",
                &dst,
                "--bytes",
                "1048576",
                "--hold-ms",
                "1500",
            ],
        )
        .expect("held connection");
    std::thread::sleep(Duration::from_millis(700));
    let accelerated = node.maps().expect("maps").accelerated;
    let ends: Vec<(String, String)> = accelerated
        .iter()
        .map(|s| (s.local.clone(), s.remote.clone()))
        .collect();
    let proxy = format!("{}:15001", node.sim.node_ip());
    let client_ip = client.ip.to_string();
    assert!(
        ends.iter()
            .any(|(l, r)| l.starts_with(&client_ip) && *r == proxy),
        "the app's socket to the proxy is accelerated: {ends:?}"
    );
    assert!(
        ends.iter()
            .any(|(l, r)| *l == proxy && r.starts_with(&client_ip)),
        "the proxy's accepted socket: {ends:?}"
    );
    assert!(
        ends.iter()
            .any(|(l, r)| l.starts_with(&client_ip) && *r == dst),
        "the proxy's upstream socket, inside the client pod: {ends:?}"
    );
    assert!(
        ends.iter()
            .any(|(l, r)| *l == dst && r.starts_with(&client_ip)),
        "the destination's socket: {ends:?}"
    );

    let mut held = held;
    assert!(
        held.wait_timeout(T).expect("finishes").success(),
        "{}",
        held.stdout_text()
    );
    let after = node.counters().expect("counters");
    assert_eq!(delta(&before, &after, "sockops.sockhash_inserted"), 4);
    // 1 MiB up and back over two hops each.
    assert!(delta(&before, &after, "sk_msg.redirected_bytes") >= 4 << 20);
    assert_eq!(
        delta(&before, &after, "sk_msg.no_peer"),
        0,
        "no socket had to fall back"
    );
    std::thread::sleep(Duration::from_millis(200));
    let left = node.maps().expect("maps").accelerated;
    assert!(left.is_empty(), "closed sockets leave NM_ACCEL: {left:?}");
}

/// 64 MiB each way on two connections at once, with half-close.
#[test]
fn large_transfers_both_ways_arrive_intact() {
    if !require_root() {
        return;
    }
    let (node, client, server, _echo) = meshed("large");
    let before = node.counters().expect("counters");
    let r = node
        .podapp(
            &client,
            &[
                "client",
                "--connect",
                &format!("{}:{PORT}", server.ip),
                "--connections",
                "2",
                "--concurrency",
                "2",
                "--bytes",
                &(64u64 << 20).to_string(),
                "--timeout-ms",
                "60000",
            ],
            T,
        )
        .expect("client");
    assert_eq!(all_ok(&r), 2);
    assert_eq!(r["bytes_received"], 2 * (64u64 << 20));
    let after = node.counters().expect("counters");
    assert!(delta(&before, &after, "sk_msg.redirected_bytes") >= 4 * 2 * (64u64 << 20));
}

/// 200 concurrent connections from four pods all complete correctly.
#[test]
fn two_hundred_concurrent_connections_from_four_pods() {
    if !require_root() {
        return;
    }
    let (mut node, first, server, _echo) = meshed("concurrent");
    let mut clients = vec![first];
    for i in 1..4 {
        clients.push(node.add_pod(&format!("client{i}"), "shop").expect("pod"));
    }
    let dst = format!("{}:{PORT}", server.ip);
    let running: Vec<_> = clients
        .iter()
        .map(|pod| {
            node.spawn_podapp(
                pod,
                &[
                    "client",
                    "--connect",
                    &dst,
                    "--connections",
                    "50",
                    "--concurrency",
                    "50",
                    "--bytes",
                    "65536",
                ],
            )
            .expect("client")
        })
        .collect();
    for mut p in running {
        let status = p.wait_timeout(T).expect("finishes");
        let report: serde_json::Value = serde_json::from_str(p.stdout_text().trim()).expect("json");
        assert!(status.success(), "{report}");
        assert_eq!(all_ok(&report), 50);
    }
    let metrics = node.metrics().expect("metrics");
    let opened = nodemesh_tests::mesh::metric(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[("destination_workload", "server")],
    );
    assert_eq!(opened, 200.0);
}

/// A destination that stops reading for a while: the sender is held back (or buffered),
/// nothing is lost, nothing stalls for good.
#[test]
fn a_peer_that_stops_reading_delays_but_loses_nothing() {
    if !require_root() {
        return;
    }
    let (node, client, server, _echo) = meshed("stopread");
    let _sink = node
        .serve(
            &server,
            9090,
            &[
                "--mode",
                "sink",
                "--sink-pause-after",
                "1048576",
                "--sink-pause-ms",
                "2000",
            ],
        )
        .expect("sink");
    let r = node
        .podapp(
            &client,
            &[
                "client",
                "--connect",
                &format!("{}:9090", server.ip),
                "--connections",
                "2",
                "--concurrency",
                "2",
                "--bytes",
                &(16u64 << 20).to_string(),
                "--expect",
                "sink",
                "--timeout-ms",
                "30000",
            ],
            T,
        )
        .expect("client");
    assert_eq!(all_ok(&r), 2);
    assert!(
        r["elapsed_ms"].as_u64().unwrap_or(0) >= 2000,
        "the pause was real: {r}"
    );
}

/// Short connections one after another: nothing leaks from one to the next.
#[test]
fn connection_churn() {
    if !require_root() {
        return;
    }
    let (node, client, server, _echo) = meshed("churn");
    let before = node.counters().expect("counters");
    let r = node
        .podapp(
            &client,
            &[
                "churn",
                "--connect",
                &format!("{}:{PORT}", server.ip),
                "--connections",
                "300",
                "--bytes",
                "4096",
            ],
            T,
        )
        .expect("churn");
    assert_eq!(all_ok(&r), 300);
    let after = node.counters().expect("counters");
    assert_eq!(delta(&before, &after, "connect4.redirected"), 300);
    assert_eq!(delta(&before, &after, "sockops.sockhash_inserted"), 1200);
    std::thread::sleep(Duration::from_millis(300));
    let maps = node.maps().expect("maps");
    assert!(
        maps.accelerated.is_empty(),
        "no accelerated socket left behind: {:?}",
        maps.accelerated
    );
    assert!(
        maps.orig_dst.is_empty(),
        "every original destination was consumed: {:?}",
        maps.orig_dst
    );
}

/// The switch flips at run time without dropping anything: established connections fall
/// back to the stack at their next send; new ones follow the switch.
#[test]
fn sockmap_can_be_switched_off_and_on_at_run_time() {
    if !require_root() {
        return;
    }
    let (node, client, server, _echo) = meshed("switch");
    let dst = format!("{}:{PORT}", server.ip);
    let long = node
        .spawn_podapp(
            &client,
            &[
                "rr",
                "--connect",
                &dst,
                "--iterations",
                "300",
                "--warmup",
                "0",
                "--interval-ms",
                "5",
            ],
        )
        .expect("long-lived");
    std::thread::sleep(Duration::from_millis(500));
    let before = node.counters().expect("counters");
    node.set_sockmap(false).expect("off");
    assert!(!node.status().expect("status").datapath.sockmap.enabled);
    let r = node
        .podapp(
            &client,
            &["client", "--connect", &dst, "--bytes", "100000"],
            T,
        )
        .expect("client");
    assert_eq!(all_ok(&r), 1);
    let mid = node.counters().expect("counters");
    assert!(
        delta(&before, &mid, "sk_msg.disabled") >= 1,
        "live sockets fell back"
    );
    assert!(
        delta(&before, &mid, "sockops.sockmap_disabled") >= 2,
        "new sockets were not inserted"
    );

    let mut long = long;
    assert!(
        long.wait_timeout(T).expect("finishes").success(),
        "kept working across the switch: {}",
        long.stdout_text()
    );

    node.set_sockmap(true).expect("on");
    let r = node
        .podapp(
            &client,
            &["client", "--connect", &dst, "--bytes", "100000"],
            T,
        )
        .expect("client");
    assert_eq!(all_ok(&r), 1);
    let after = node.counters().expect("counters");
    assert!(
        delta(&mid, &after, "sk_msg.redirected") > 0,
        "new connections are accelerated again"
    );
}

/// In `auto` mode the agent turns the fast path on exactly when its self-test says the
/// kernel is safe for it, and reports why.
#[test]
fn auto_mode_follows_the_self_test() {
    if !require_root() {
        return;
    }
    let node = MeshNode::start_with(
        "auto",
        &AgentOptions {
            sockmap_mode: "auto",
            ..AgentOptions::default()
        },
    )
    .expect("node");
    let sockmap = node.status().expect("status").datapath.sockmap;
    let report = sockmap.selftest.expect("the self-test ran");
    assert!(
        report.passed,
        "data integrity on this kernel: {}",
        report.detail
    );
    assert!(report.redirected_messages > 0);
    assert_eq!(
        sockmap.enabled,
        report.passed && report.blocking_recv_ok,
        "{}",
        report.detail
    );
    if !report.blocking_recv_ok {
        assert!(
            report.detail.contains("EAGAIN"),
            "the reason is reported: {}",
            report.detail
        );
        assert!(node.agent_log().contains("blocking recv"), "and logged");
    }
}
