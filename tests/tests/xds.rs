//! The agent following a control plane on a simulated node: `nodemesh controlplane` serves
//! a folder of resources on the node, the agent's L7 bootstrap names it in
//! `dynamic_resources`, and pods' traffic follows what the folder says: routed as served,
//! re-routed when the folder changes, still routed by the last good configuration while the
//! control plane is gone, and re-routed again when it comes back.
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use nodemesh_simnode::{Pod, bin_path, require_root};
use nodemesh_tests::{
    mesh::{AgentOptions, MeshNode},
    xds::{self, ads_bootstrap, start_control_plane},
};

const PORT: u16 = 8080;
const T: Duration = Duration::from_secs(60);

fn write_folder(dir: &Path, a: &Pod, b: &Pod, to: &str) {
    xds::write_folder(dir, PORT, "api.shop", &[("a", a), ("b", b)], to).expect("resources");
}

fn upstream(node: &MeshNode, client: &Pod, dst: &str) -> Result<String, String> {
    xds::upstream(node, client, dst, "api.shop")
}

fn until_upstream(node: &MeshNode, client: &Pod, dst: &str, want: &str) {
    let deadline = Instant::now() + T;
    loop {
        let got = upstream(node, client, dst);
        if got.as_deref() == Ok(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "requests never reached {want}: last {got:?}\nxds: {:?}\nagent log:\n{}",
            node.status().map(|s| s.xds),
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn xds_status(node: &MeshNode) -> serde_json::Value {
    node.status()
        .expect("status")
        .xds
        .expect("the agent reports its xDS client")
}

fn follows_the_control_plane(delta: bool) {
    let label = if delta { "xdsd" } else { "xdss" };
    let work = tempfile::tempdir().expect("work dir");
    let file = work.path().join("envoy.yaml");
    std::fs::write(&file, "static_resources: {}\n").expect("bootstrap");
    let opts = AgentOptions {
        proxy: vec!["l7:".into(), format!("  bootstrap: {}", file.display())],
        ..AgentOptions::default()
    };
    let mut node = MeshNode::start_with(label, &opts).expect("node");
    let client = node.add_pod("client", "shop").expect("pod");
    let a = node.add_pod("server-a", "shop").expect("pod");
    let b = node.add_pod("server-b", "shop").expect("pod");
    node.enable_namespace("shop").expect("label");
    let _sa = node.serve_http(&a, PORT, "a").expect("server a");
    let _sb = node.serve_http(&b, PORT, "b").expect("server b");
    // The pod's traffic goes to a's address; where it lands is the route's decision.
    let dst = format!("{}:{PORT}", a.ip);

    let folder = work.path().join("resources");
    std::fs::create_dir(&folder).expect("folder");
    write_folder(&folder, &a, &b, "b");
    let port = 15010 + u16::from(delta);
    let mut cp = start_control_plane(&node, &folder, port).expect("control plane");
    std::fs::write(&file, ads_bootstrap(port, delta)).expect("bootstrap");
    node.start_agent()
        .expect("agent restarted on the ADS bootstrap");

    until_upstream(&node, &client, &dst, "b");
    let x = xds_status(&node);
    assert_eq!(x["state"], "connected", "{x:#}");
    assert_eq!(x["variant"], if delta { "delta" } else { "sotw" });
    for t in ["cds", "eds", "lds", "rds"] {
        assert_eq!(x["types"][t]["nacks"], 0, "{t}: {x:#}");
        assert!(x["types"][t]["acks"].as_u64() >= Some(1), "{t}: {x:#}");
        let held = if matches!(t, "cds" | "eds") { 2 } else { 1 };
        assert_eq!(x["types"][t]["resources"], held, "{t}: {x:#}");
    }
    let text = Command::new(bin_path("nodemesh"))
        .arg("status")
        .arg("--run-dir")
        .arg(node.sim.run_dir())
        .output()
        .expect("nodemesh status");
    let shown = String::from_utf8_lossy(&text.stdout);
    assert!(
        shown.contains(&format!("xds: 127.0.0.1:{port}")) && shown.contains("rds: version"),
        "nodemesh status shows the xDS client:\n{shown}\n{}",
        String::from_utf8_lossy(&text.stderr)
    );

    // The live configuration, as an Envoy config dump, on the agent's admin port.
    let dump = node.admin_get("/config_dump").expect("config dump");
    let read = nodemesh_config::load_config_dump(&dump).expect("the dump parses");
    assert_eq!(read.diagnostics.errors, Vec::<String>::new(), "{dump}");
    let served = read.snapshot.expect("the dump translates");
    assert!(
        served.listener(&format!("outbound_{PORT}")).is_some(),
        "{dump}"
    );
    assert!(served.clusters.contains_key("xds") && served.clusters.contains_key("b"));

    // The folder changes: new connections take the new route.
    write_folder(&folder, &a, &b, "a");
    until_upstream(&node, &client, &dst, "a");

    // The control plane goes away: the last good configuration keeps serving.
    cp.kill().expect("stop the control plane");
    let deadline = Instant::now() + T;
    while xds_status(&node)["state"] == "connected" {
        assert!(Instant::now() < deadline, "the agent never noticed");
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..3 {
        assert_eq!(upstream(&node, &client, &dst).as_deref(), Ok("a"));
    }

    // It comes back with other resources: the agent reconnects and follows.
    write_folder(&folder, &a, &b, "b");
    let _cp = start_control_plane(&node, &folder, port).expect("control plane");
    until_upstream(&node, &client, &dst, "b");
    let x = xds_status(&node);
    assert!(x["connects"].as_u64() >= Some(2), "{x:#}");
}

#[test]
fn the_agent_follows_a_sotw_control_plane_through_changes_and_outages() {
    if !require_root() {
        return;
    }
    follows_the_control_plane(false);
}

#[test]
fn the_agent_follows_a_delta_control_plane_through_changes_and_outages() {
    if !require_root() {
        return;
    }
    follows_the_control_plane(true);
}

/// The agent's own `control_plane` setting (what the DaemonSet's `CONTROL_PLANE` sets), with
/// no bootstrap at all: the L7 proxy is on, everything comes over ADS.
#[test]
fn the_agent_follows_its_control_plane_setting_without_a_bootstrap() {
    if !require_root() {
        return;
    }
    let work = tempfile::tempdir().expect("work dir");
    let folder = work.path().join("resources");
    std::fs::create_dir(&folder).expect("folder");
    let port = 15013;
    let opts = AgentOptions {
        extra: vec![format!("control_plane: 127.0.0.1:{port}")],
        ..AgentOptions::default()
    };
    let mut node = MeshNode::create("xdsc", &opts).expect("node");
    // The folder starts empty: the pods' addresses are known once they exist.
    let _cp = start_control_plane(&node, &folder, port).expect("control plane");
    node.start_agent().expect("agent");
    let client = node.add_pod("client", "shop").expect("pod");
    let a = node.add_pod("server-a", "shop").expect("pod");
    let b = node.add_pod("server-b", "shop").expect("pod");
    node.enable_namespace("shop").expect("label");
    let _sa = node.serve_http(&a, PORT, "a").expect("server a");
    let _sb = node.serve_http(&b, PORT, "b").expect("server b");
    let dst = format!("{}:{PORT}", a.ip);
    write_folder(&folder, &a, &b, "b");
    until_upstream(&node, &client, &dst, "b");
    let x = xds_status(&node);
    assert_eq!(x["server"], format!("127.0.0.1:{port}"), "{x:#}");
    assert_eq!(x["variant"], "sotw");
}
