//! `nodemesh config check|route` and `nodemesh proxy -c` as a user runs them.
use std::{
    io::{Read as _, Write as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_nodemesh");

fn bootstrap(listener_port: u16, extra_cluster_field: &str) -> String {
    format!(
        r#"
static_resources:
  listeners:
  - name: main
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listener_port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main
          route_config:
            name: local
            virtual_hosts:
            - name: hello
              domains: ["*"]
              routes:
              - match: {{ prefix: "/hello" }}
                direct_response: {{ status: 200, body: {{ inline_string: "hello from nodemesh" }} }}
              - match: {{ prefix: "/" }}
                route: {{ cluster: backend }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
  - name: backend
    connect_timeout: 1s
{extra_cluster_field}    load_assignment:
      cluster_name: backend
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 1 }} }} }} }} ] }} ]
"#
    )
}

fn write(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp file");
    f.write_all(text.as_bytes()).expect("write");
    f
}

#[test]
fn config_check_accepts_a_good_file_and_names_what_is_unsupported() {
    let good = write(&bootstrap(10000, ""));
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(good.path())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("ok: 1 listener(s), 0 route configuration(s), 1 cluster(s)")
    );

    let bad = write(&bootstrap(
        10000,
        "    dns_failure_refresh_rate: { base_interval: 1s }\n    lrs_server: { ads: {} }\n",
    ));
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(bad.path())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "error: bootstrap.static_resources.clusters[backend].lrs_server: not supported"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "warning: envoy.config.cluster.v3.Cluster.dns_failure_refresh_rate is ignored"
        ),
        "{stdout}"
    );
}

#[test]
fn config_route_explains_the_choice() {
    let file = write(&bootstrap(10000, ""));
    let out = Command::new(BIN)
        .args(["config", "route"])
        .arg(file.path())
        .args(["--listener", "main", "--host", "any", "--path", "/api"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(e["virtual_host"], "hello");
    assert_eq!(e["route"], "1");
    assert_eq!(e["clusters"][0][0], "backend");
}

#[test]
fn proxy_serves_the_bootstrap_like_envoy_does() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let file = write(&bootstrap(port, ""));
    let mut child = Command::new(BIN)
        .args(["proxy", "-c"])
        .arg(file.path())
        .args(["--concurrency", "1", "-l", "warn"])
        .stderr(Stdio::null())
        .spawn()
        .expect("start proxy");
    let deadline = Instant::now() + Duration::from_secs(20);
    let response = loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .expect("write");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "nodemesh proxy did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("hello from nodemesh"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("server: envoy"),
        "{response}"
    );
}
