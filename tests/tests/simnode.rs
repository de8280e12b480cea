//! The fixture itself: pods really are namespaces and cgroups, traffic flows between them,
//! and a node leaves nothing behind, on success and on panic.
use std::{os::unix::fs::MetadataExt as _, process::Command, time::Duration};

use nodemesh_simnode::{SimNode, bin_path, require_root};

const T: Duration = Duration::from_secs(30);

#[test]
fn pods_talk_over_the_bridge_from_their_own_namespace_and_cgroup() {
    if !require_root() {
        return;
    }
    let mut node = SimNode::new("fixture").expect("node");
    let a = node.add_pod("a", "ns1").expect("pod a");
    let b = node.add_pod("b", "ns2").expect("pod b");
    assert_ne!(a.ip, b.ip);

    let mut serve = Command::new(bin_path("nm-podapp"));
    serve.args(["serve", "--listen", "0.0.0.0:7000", "--mode", "echo"]);
    let server = node.spawn_in_pod(&b, serve).expect("server");
    let mut who = Command::new(bin_path("nm-podapp"));
    who.args(["serve", "--listen", "0.0.0.0:7001", "--mode", "whoami"]);
    let _who = node.spawn_in_pod(&b, who).expect("whoami");
    std::thread::sleep(Duration::from_millis(300));

    let proc_cgroup =
        std::fs::read_to_string(format!("/proc/{}/cgroup", server.pid())).expect("cgroup");
    let relative = b
        .cgroup
        .strip_prefix(nodemesh_simnode::cgroup2_root())
        .expect("under the root");
    assert!(
        proc_cgroup.contains(&format!("0::/{}", relative.display())),
        "{proc_cgroup}"
    );
    let ns = std::fs::metadata(format!("/proc/{}/ns/net", server.pid())).expect("ns");
    assert_eq!(
        ns.ino(),
        std::fs::metadata(&b.netns_path).expect("netns").ino(),
        "in the pod's netns"
    );

    let mut client = Command::new(bin_path("nm-podapp"));
    client.args([
        "client",
        "--connect",
        &format!("{}:7000", b.ip),
        "--connections",
        "4",
        "--bytes",
        "1048576",
    ]);
    let out = node.run_in_pod(&a, client, T).expect("client");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["ok"], 4, "{report}");
    assert_eq!(report["bytes_received"], 4 * 1048576);

    let mut whoami = Command::new(bin_path("nm-podapp"));
    whoami.args(["whoami", "--connect", &format!("{}:7001", b.ip)]);
    let out = node.run_in_pod(&a, whoami, T).expect("whoami");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        report["seen_as"]
            .as_str()
            .expect("seen_as")
            .starts_with(&format!("{}:", a.ip)),
        "{report}"
    );

    let names: Vec<String> = [&node.netns_path(), &a.netns_path, &b.netns_path]
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let cgroup = node.cgroup_root().to_owned();
    drop(server);
    node.cleanup().expect("cleanup");
    for n in names {
        assert!(!std::path::Path::new(&n).exists(), "{n} removed");
    }
    assert!(!cgroup.exists(), "cgroup removed");
}

#[test]
fn a_panicking_test_still_cleans_up() {
    if !require_root() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let mut node = SimNode::new("panic").expect("node");
        let pod = node.add_pod("p", "ns").expect("pod");
        let mut sleep = Command::new("sleep");
        sleep.arg("60");
        let process = node.spawn_in_pod(&pod, sleep).expect("sleep");
        tx.send((
            node.netns_path(),
            pod.netns_path.clone(),
            node.cgroup_root().to_owned(),
            process.pid(),
        ))
        .expect("send");
        std::mem::forget(process); // the node must kill it on its own
        panic!("test failure inside the node");
    });
    assert!(result.is_err());
    let (node_ns, pod_ns, cgroup, pid) = rx.recv().expect("paths");
    assert!(!node_ns.exists() && !pod_ns.exists(), "namespaces removed");
    assert!(!cgroup.exists(), "cgroup removed");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid),
        "process {pid} killed"
    );
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
}
