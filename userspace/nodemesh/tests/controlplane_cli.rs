//! `nodemesh controlplane` as a user runs it: `--validate` before deploying a folder, and
//! the running control plane's admin port reporting what it serves and why a reload failed.
use std::{
    io::{Read as _, Write as _},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_nodemesh");

const CLUSTER: &str = r#"resources:
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: web
  type: STATIC
  load_assignment:
    cluster_name: web
    endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 198.18.9.1, port_value: 80 } } } }] }]
"#;

const LISTENER_TO_NOWHERE: &str = r#"resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: tcp
  address: { socket_address: { address: 198.18.9.2, port_value: 9000 } }
  filter_chains:
  - filters:
    - name: envoy.filters.network.tcp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
        stat_prefix: tcp
        cluster: nowhere
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

fn validate(dir: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(["controlplane", "--validate", "--dir"])
        .arg(dir)
        .output()
        .expect("run")
}

#[test]
fn validate_lists_a_good_folder_and_names_every_problem_of_a_bad_one() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("clusters.yaml"), CLUSTER).expect("write");
    let out = validate(dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("clusters.yaml: 1 resources"), "{stdout}");
    assert!(stdout.contains("Cluster: 1"), "{stdout}");

    std::fs::write(dir.path().join("listeners.yaml"), LISTENER_TO_NOWHERE).expect("write");
    std::fs::write(dir.path().join("dup.yaml"), CLUSTER).expect("write");
    let out = validate(dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("unknown cluster \"nowhere\""), "{stderr}");
    assert!(
        stderr.contains("Cluster \"web\" is already defined in"),
        "{stderr}"
    );
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

fn until(what: &str, mut pred: impl FnMut() -> Option<bool>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while pred() != Some(true) {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_admin_port_shows_what_is_served_and_why_a_reload_failed() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("clusters.yaml"), CLUSTER).expect("write");
    let admin = free_port();
    let mut child = Command::new(BIN)
        .args(["controlplane", "--poll-ms", "50", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--admin")
        .arg(format!("127.0.0.1:{admin}"))
        .arg("--dir")
        .arg(dir.path())
        .stderr(Stdio::null())
        .spawn()
        .expect("start");
    let status =
        || -> Option<serde_json::Value> { serde_json::from_str(&get(admin, "/status")?).ok() };
    until("the control plane serves", || {
        Some(status()?["version"].is_string())
    });
    let first = status().expect("status");
    assert_eq!(
        first["resources"]["cds"].as_object().map(|m| m.len()),
        Some(1),
        "{first}"
    );
    assert_eq!(first["last_error"], serde_json::Value::Null);

    // An invalid addition: refused, the previous set keeps serving, the reason is shown.
    std::fs::write(dir.path().join("listeners.yaml"), LISTENER_TO_NOWHERE).expect("write");
    until("the failed reload is reported", || {
        Some(status()?["last_error"].as_str()?.contains("nowhere"))
    });
    let after = status().expect("status");
    assert_eq!(
        after["version"], first["version"],
        "the last good set serves"
    );
    assert_eq!(after["reload_errors"], 1);
    let metrics = get(admin, "/stats/prometheus").unwrap_or_default();
    assert!(
        metrics.contains("nodemesh_controlplane_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
