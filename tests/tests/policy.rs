//! Check, quota and report in the L7 node proxy on a simulated node: pods' requests are
//! authorized by the source pod's identity (its SPIFFE principal, until mTLS), rate limited
//! per route, counted against a global quota leased from a real redis-server (fail-closed
//! promptly when it is killed, used again when it is back), and reported with Istio's
//! metrics and an access log naming the policy behind every deny.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use nodemesh_simnode::{Pod, Process, require_root};
use nodemesh_tests::mesh::{AgentOptions, MeshNode, metric};

const PORT: u16 = 8080;
const T: Duration = Duration::from_secs(60);

/// A redis-server of the test's own in the node's network namespace (where the agent
/// runs), killed by pid on drop.
struct Redis {
    process: Option<Process>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    /// The node's namespace is the test's own: a fixed port is free there.
    const PORT: u16 = 16379;

    fn start(node: &MeshNode) -> Self {
        let mut r = Self {
            process: None,
            port: Self::PORT,
            dir: tempfile::tempdir().expect("redis dir"),
        };
        r.restart(node);
        r
    }

    fn restart(&mut self, node: &MeshNode) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path());
        let process = node
            .sim
            .spawn_in_node(cmd)
            .expect("redis-server (cargo xtask setup installs it)");
        self.process = Some(process);
        let until = Instant::now() + T;
        loop {
            let mut ping = Command::new("redis-cli");
            ping.args(["-p", &self.port.to_string(), "ping"]);
            let out = node.sim.run_in_node(ping, T).expect("redis-cli");
            if String::from_utf8_lossy(&out.stdout).contains("PONG") {
                return;
            }
            assert!(Instant::now() < until, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Port 8080 to pod `a`: RBAC allows only the client pod's identity, `/limited` has a local
/// bucket of 2, `/quota` a global quota of 4 per minute, and everything is logged.
fn bootstrap(a: &Pod, redis: u16, log: &std::path::Path) -> String {
    format!(
        r#"static_resources:
  listeners:
  - name: outbound_{PORT}
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: {PORT} }} }}
    bind_to_port: false
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound_{PORT}
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  ns[shop]-policy[client-only]-rule[0]:
                    permissions: [ {{ any: true }} ]
                    principals: [ {{ authenticated: {{ principal_name: {{ exact: "spiffe://cluster.local/ns/shop/sa/client" }} }} }} ]
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: off_by_default
          - name: nodemesh.filters.http.global_quota
            typed_config:
              "@type": type.googleapis.com/xds.type.v3.TypedStruct
              type_url: type.googleapis.com/nodemesh.filters.http.global_quota.v1.GlobalQuota
              value:
                redis: 127.0.0.1:{redis}
                domain: node-policy-{redis}
                failure_mode: closed
                timeout: 100ms
                quotas:
                - {{ name: api, limit: 4, window: 60s, batch: 2, prefix: /quota }}
                - {{ name: other, limit: 1000, window: 60s, batch: 10, prefix: /other }}
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            name: outbound_{PORT}
            virtual_hosts:
            - name: api
              domains: ["*"]
              routes:
              - match: {{ prefix: "/limited" }}
                route: {{ cluster: a }}
                typed_per_filter_config:
                  envoy.filters.http.local_ratelimit:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
                    stat_prefix: limited
                    token_bucket: {{ max_tokens: 2, tokens_per_fill: 1, fill_interval: 3600s }}
                    filter_enabled: {{ default_value: {{ numerator: 100, denominator: HUNDRED }} }}
                    filter_enforced: {{ default_value: {{ numerator: 100, denominator: HUNDRED }} }}
              - match: {{ prefix: "/" }}
                route: {{ cluster: a }}
  clusters:
  - name: a
    connect_timeout: 1s
    load_assignment:
      cluster_name: a
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {PORT} }} }} }} }}] }}]
"#,
        ip = a.ip,
        log = log.display(),
    )
}

/// The statuses of `count` requests to `path` on one kept-alive connection.
fn statuses(node: &MeshNode, pod: &Pod, dst: &str, path: &str, count: usize) -> Vec<u64> {
    let got = node
        .httpapp(
            pod,
            &[
                "request",
                "--connect",
                dst,
                "--authority",
                "api.shop",
                "--path",
                path,
                "--count",
                &count.to_string(),
            ],
            T,
        )
        .expect("nm-httpapp request");
    got["responses"]
        .as_array()
        .unwrap_or_else(|| panic!("no responses: {got}"))
        .iter()
        .map(|r| r["status"].as_u64().unwrap_or(0))
        .collect()
}

#[test]
fn pods_are_authorized_by_identity_rate_limited_and_counted_against_a_redis_quota() {
    if !require_root() {
        return;
    }
    let work = tempfile::tempdir().expect("work dir");
    let file = work.path().join("envoy.yaml");
    let log = work.path().join("access.log");
    std::fs::write(&file, "static_resources: {}\n").expect("bootstrap");
    let opts = AgentOptions {
        proxy: vec!["l7:".into(), format!("  bootstrap: {}", file.display())],
        ..AgentOptions::default()
    };
    let mut node = MeshNode::start_with("policy", &opts).expect("node");
    let client = node.add_pod("client", "shop").expect("pod");
    let intruder = node.add_pod("intruder", "shop").expect("pod");
    let a = node.add_pod("server-a", "shop").expect("pod");
    node.enable_namespace("shop").expect("label");
    let mut redis = Redis::start(&node);
    std::fs::write(&file, bootstrap(&a, redis.port, &log)).expect("bootstrap");
    node.start_agent()
        .expect("agent restarted on the bootstrap");
    let _sa = node.serve_http(&a, PORT, "a").expect("server a");
    let dst = format!("{}:{PORT}", a.ip);

    // Check: the client pod's identity is allowed, another pod of the namespace is not.
    assert_eq!(statuses(&node, &client, &dst, "/open", 2), [200, 200]);
    assert_eq!(statuses(&node, &intruder, &dst, "/open", 1), [403]);

    // Local rate limit on the route: two tokens, then 429 on the same connection.
    assert_eq!(
        statuses(&node, &client, &dst, "/limited", 4),
        [200, 200, 429, 429]
    );

    // The global quota: 4 per window across the cluster, leased 2 at a time.
    assert_eq!(
        statuses(&node, &client, &dst, "/quota/x", 6),
        [200, 200, 200, 200, 429, 429]
    );

    // Redis killed: what this proxy holds on lease (at most two batches of 10) is still
    // spent, then the quota fails closed at once (500, RLSE; no request waits longer than
    // the Redis timeout); paths outside the quotas are untouched.
    redis.kill();
    let dead = statuses(&node, &client, &dst, "/other", 30);
    let served = dead.iter().take_while(|s| **s == 200).count();
    assert!(served <= 20, "no more than the lease: {dead:?}");
    assert!(
        dead[served..].iter().all(|s| *s == 500),
        "then fail closed: {dead:?}"
    );
    assert_eq!(statuses(&node, &client, &dst, "/open", 1), [200]);

    // Redis back: the quota leases from it again.
    redis.restart(&node);
    let until = Instant::now() + T;
    let mut back = Vec::new();
    while Instant::now() < until {
        back = statuses(&node, &client, &dst, "/other", 1);
        if back == [200] {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(back, [200], "the restarted Redis is used again");

    // Report: Istio's metrics with the pods' names, and a deny counted per policy.
    let metrics = node.metrics().expect("metrics");
    let requests = |labels: &[(&str, &str)]| metric(&metrics, "istio_requests_total", labels);
    assert!(
        requests(&[
            ("source_workload", "client"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/shop/sa/client"
            ),
            ("destination_workload", "server-a"),
            ("destination_workload_namespace", "shop"),
            ("destination_service", "a"),
            ("response_code", "200"),
        ]) >= 4.0,
        "{metrics}"
    );
    assert_eq!(
        requests(&[
            ("source_workload", "intruder"),
            ("response_code", "403"),
            ("response_flags", "RBAC")
        ]),
        1.0
    );
    assert_eq!(
        requests(&[("response_code", "429"), ("response_flags", "RL")]),
        4.0,
        "2 from the local bucket, 2 from the quota"
    );
    assert!(
        requests(&[("response_code", "500"), ("response_flags", "RLSE")]) >= 10.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "nodemesh_rbac_decisions_total",
            &[("policy", "none"), ("result", "denied")]
        ),
        1.0
    );

    // The access log names the policy (none matched) and the flag of the deny.
    let until = Instant::now() + T;
    let denied = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["response_code"] == 403);
        if let Some(e) = found {
            break e;
        }
        assert!(Instant::now() < until, "no deny in the access log:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(denied["response_flags"], "RBAC", "{denied}");
    assert_eq!(
        denied["response_code_details"],
        "rbac_access_denied_matched_policy[none]"
    );
    assert_eq!(
        denied["source_principal"],
        "spiffe://cluster.local/ns/shop/sa/intruder"
    );
    assert!(
        denied["downstream_remote_address"]
            .as_str()
            .is_some_and(|a| a.starts_with(&intruder.ip.to_string())),
        "{denied}"
    );
}
