//! `xds`: configuration from a control plane at scale. `nodemesh controlplane` serves a
//! folder of 1,000 services in the shape istiod gives a node proxy (EDS clusters
//! `outbound|8080||svc-N...` with 10 endpoints each: 10,000 endpoints; one RDS route
//! configuration with a virtual host per service, 3 routes each: 3,000 routes) plus a
//! `probe` virtual host answering its version. Two clients follow it, one after the other,
//! with the same ADS bootstrap: `nodemesh proxy -c` and Envoy (2 workers, as the baseline).
//!
//! Measured per client, over rounds:
//! - apply: from process start to the probe route answering (connect, receive, translate,
//!   serve the whole configuration), and the RSS once it serves;
//! - change to serving: from the rename of the probe's file to the first request answered
//!   with the new version, with the control plane's own reload (folder read, parsed and
//!   validated: the same for both clients) measured on its `/status` and reported apart.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{Common, median, spread};
use crate::scenarios::rss_kib;

#[derive(Debug, Clone, Serialize)]
pub struct ClientResult {
    pub client: &'static str,
    pub apply_ms: Vec<f64>,
    pub rss_mib: Vec<f64>,
    /// Change on the control plane to the new route serving, minus the control plane's
    /// own reload.
    pub change_ms: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub services: usize,
    pub clusters: usize,
    pub endpoints: usize,
    pub routes: usize,
    /// The control plane's reload of the whole folder after a change (poll interval
    /// included), per change.
    pub controlplane_reload_ms: Vec<f64>,
    pub clients: Vec<ClientResult>,
}

const ENDPOINTS_PER_SERVICE: usize = 10;
const ROUTES_PER_SERVICE: usize = 3;

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The services' clusters and assignments, and the listener; returns the services' virtual
/// hosts for [`write_routes`].
fn write_services(dir: &Path, n: usize, listen: u16) -> anyhow::Result<String> {
    let mut clusters = String::from("resources:\n");
    let mut vhosts = String::new();
    for i in 0..n {
        let name = format!("outbound|8080||svc-{i}.bench.svc.cluster.local");
        clusters.push_str(&format!(
            "- \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: \"{name}\"\n  type: EDS\n  connect_timeout: 10s\n  eds_cluster_config: {{ service_name: \"{name}\", eds_config: {{ ads: {{}}, resource_api_version: V3 }} }}\n- \"@type\": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment\n  cluster_name: \"{name}\"\n  endpoints:\n  - lb_endpoints:\n"
        ));
        for e in 0..ENDPOINTS_PER_SERVICE {
            let k = i * ENDPOINTS_PER_SERVICE + e;
            clusters.push_str(&format!(
                "    - endpoint: {{ address: {{ socket_address: {{ address: 198.18.{}.{}, port_value: 8080 }} }} }}\n",
                k / 250 % 250,
                1 + k % 250
            ));
        }
        let names = ["", ".bench", ".bench.svc", ".bench.svc.cluster.local"]
            .iter()
            .flat_map(|s| [format!("\"svc-{i}{s}\""), format!("\"svc-{i}{s}:8080\"")])
            .collect::<Vec<_>>()
            .join(", ");
        vhosts.push_str(&format!(
            "  - name: svc-{i}\n    domains: [{names}]\n    routes:\n    - match: {{ prefix: \"/api/v2/\", headers: [{{ name: x-canary, string_match: {{ exact: \"1\" }} }}] }}\n      route: {{ cluster: \"{name}\" }}\n    - match: {{ path: \"/healthz\" }}\n      direct_response: {{ status: 200 }}\n    - match: {{ prefix: \"/\" }}\n      route: {{ cluster: \"{name}\", timeout: 0s }}\n"
        ));
    }
    let listener = format!(
        r#"resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: outbound_8080
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: outbound_8080
        rds: {{ route_config_name: "8080", config_source: {{ ads: {{}}, resource_api_version: V3 }} }}
        http_filters:
        - name: envoy.filters.http.router
          typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#
    );
    std::fs::write(dir.join("clusters.yaml"), clusters)?;
    std::fs::write(dir.join("listener.yaml"), listener)?;
    Ok(vhosts)
}

/// The route configuration with the probe answering `version`, replaced by a rename (the
/// control plane skips hidden files, so it never reads the half-written one).
fn write_routes(dir: &Path, vhosts: &str, version: u32) -> anyhow::Result<()> {
    let text = format!(
        "resources:\n- \"@type\": type.googleapis.com/envoy.config.route.v3.RouteConfiguration\n  name: \"8080\"\n  virtual_hosts:\n{vhosts}  - name: probe\n    domains: [probe]\n    routes:\n    - match: {{ prefix: / }}\n      direct_response: {{ status: 200, body: {{ inline_string: \"v{version}\" }} }}\n"
    );
    let tmp = dir.join(".routes.yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join("routes.yaml"))?;
    Ok(())
}

/// A GET on a fresh connection; the body of a 200, if one came. The body is read by its
/// `content-length`, not to the end of the stream: Envoy holds a closing connection open
/// for `delayed_close_timeout` (1 s) waiting for the client to close first, and waiting for
/// that would measure the timeout.
fn get(port: u16, host: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    let (head_len, length) = loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                return None;
            }
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())?;
            break (end + 4, length);
        }
    };
    while buf.len() < head_len + length {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&buf[head_len..head_len + length]).into_owned())
}

/// Polls until `pred` holds, returning the time it took.
fn until(what: &str, limit: Duration, mut pred: impl FnMut() -> bool) -> anyhow::Result<f64> {
    let start = Instant::now();
    while !pred() {
        if start.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(mut cmd: Command) -> anyhow::Result<Killed> {
    Ok(Killed(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("{cmd:?}"))?,
    ))
}

fn cp_version(admin: u16) -> Option<String> {
    let body = get(admin, "localhost", "/status")?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["version"].as_str().map(str::to_owned)
}

/// The NACKs the control plane has seen from the clients connected now.
fn nacks_on(admin: u16) -> anyhow::Result<u64> {
    let body = get(admin, "localhost", "/status").context("control plane status")?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok(v["clients"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["types"].as_object().into_iter().flatten())
        .map(|(_, t)| t["nacks"].as_u64().unwrap_or(0))
        .sum())
}

pub fn run(common: &Common, rounds: Option<usize>) -> anyhow::Result<()> {
    let services = if common.quick { 100 } else { 1000 };
    let rounds = rounds.unwrap_or(if common.quick { 1 } else { 3 });
    let changes = if common.quick { 2 } else { 5 };
    let work = tempfile::tempdir()?;
    let dir = work.path().join("resources");
    std::fs::create_dir(&dir)?;
    let listen = free_port()?;
    let vhosts = write_services(&dir, services, listen)?;
    let mut version = 0;
    write_routes(&dir, &vhosts, version)?;

    let (cp_port, cp_admin) = (free_port()?, free_port()?);
    let mut cmd = Command::new(nodemesh_simnode::bin_path("nodemesh"));
    cmd.args(["controlplane", "--poll-ms", "10", "--listen"])
        .arg(format!("127.0.0.1:{cp_port}"))
        .arg("--admin")
        .arg(format!("127.0.0.1:{cp_admin}"))
        .arg("--dir")
        .arg(&dir)
        .env("NODEMESH_LOG", "info");
    let log = common.out_dir.join("xds-controlplane.log");
    let _cp = Killed(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("nodemesh controlplane")?,
    );
    until("the control plane", Duration::from_secs(120), || {
        cp_version(cp_admin).is_some()
    })?;

    let envoy = crate::envoy::binary()?;
    let mut clients = vec![
        ClientResult {
            client: "nodemesh proxy -c",
            apply_ms: Vec::new(),
            rss_mib: Vec::new(),
            change_ms: Vec::new(),
        },
        ClientResult {
            client: "Envoy (2 workers)",
            apply_ms: Vec::new(),
            rss_mib: Vec::new(),
            change_ms: Vec::new(),
        },
    ];
    let mut reloads = Vec::new();
    for round in 0..rounds {
        // Alternate which client goes first.
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let boot = work.path().join(format!("ads-{which}.yaml"));
            std::fs::write(
                &boot,
                nodemesh_tests::xds::ads_bootstrap_as(cp_port, false, &format!("bench-{which}")),
            )?;
            let cmd = if which == 0 {
                let mut c = Command::new(nodemesh_simnode::bin_path("nodemesh"));
                c.args(["proxy", "-c"])
                    .arg(&boot)
                    .env("NODEMESH_LOG", "warn");
                c
            } else {
                let mut c = Command::new(&envoy);
                c.arg("-c").arg(&boot).args([
                    "--concurrency",
                    "2",
                    "--disable-hot-restart",
                    "-l",
                    "error",
                ]);
                c
            };
            let want = format!("v{version}");
            let started = Instant::now();
            let proc = spawn(cmd)?;
            until(
                "the whole configuration serving",
                Duration::from_secs(120),
                || get(listen, "probe", "/").as_deref() == Some(want.as_str()),
            )?;
            let apply = started.elapsed().as_secs_f64() * 1000.0;
            // A service's route works too: the whole route configuration is in.
            let last = services - 1;
            if get(listen, &format!("svc-{last}.bench"), "/healthz").is_none() {
                bail!(
                    "{}: svc-{last}'s route does not answer",
                    clients[which].client
                );
            }
            std::thread::sleep(Duration::from_millis(500));
            let rss = rss_kib(proc.0.id())? as f64 / 1024.0;
            for _ in 0..changes {
                version += 1;
                let want = format!("v{version}");
                let before = cp_version(cp_admin);
                let t0 = Instant::now();
                write_routes(&dir, &vhosts, version)?;
                let mut reloaded = None;
                until("the change serving", Duration::from_secs(60), || {
                    if reloaded.is_none() && cp_version(cp_admin) != before {
                        reloaded = Some(t0.elapsed().as_secs_f64() * 1000.0);
                    }
                    get(listen, "probe", "/").as_deref() == Some(want.as_str())
                })?;
                let total = t0.elapsed().as_secs_f64() * 1000.0;
                let reload = reloaded.unwrap_or(total);
                reloads.push(reload);
                clients[which].change_ms.push(total - reload);
            }
            clients[which].apply_ms.push(apply);
            clients[which].rss_mib.push(rss);
            eprintln!(
                "xds round {round} {}: apply {apply:.0} ms, RSS {rss:.1} MiB, changes {:?} ms",
                clients[which].client,
                clients[which]
                    .change_ms
                    .iter()
                    .rev()
                    .take(changes)
                    .map(|v| format!("{v:.1}"))
                    .collect::<Vec<_>>()
            );
            drop(proc);
            // The listener port is free again before the next client binds it.
            until("the listener closing", Duration::from_secs(30), || {
                TcpStream::connect(("127.0.0.1", listen)).is_err()
            })?;
        }
    }
    let nacks = nacks_on(cp_admin)?;
    if nacks > 0 {
        bail!("a client rejected the served configuration ({nacks} NACKs)");
    }
    let report = Report {
        services,
        clusters: services,
        endpoints: services * ENDPOINTS_PER_SERVICE,
        routes: services * ROUTES_PER_SERVICE + 1,
        controlplane_reload_ms: reloads,
        clients,
    };
    super::write(common, "xds", &report, &markdown(&report))
}

fn markdown(r: &Report) -> String {
    let mut s = format!(
        "xDS at scale: {} clusters, {} endpoints, {} routes from `nodemesh controlplane`, \
         medians over rounds (spread in brackets).\n\n\
         | client | apply: start to serving (ms) | RSS serving (MiB) | change to serving (ms) |\n\
         |---|---:|---:|---:|\n",
        r.clusters, r.endpoints, r.routes
    );
    for c in &r.clients {
        s.push_str(&format!(
            "| {} | {:.0} [{:.0}] | {:.1} [{:.1}] | {:.1} [{:.1}] |\n",
            c.client,
            median(&c.apply_ms),
            spread(&c.apply_ms),
            median(&c.rss_mib),
            spread(&c.rss_mib),
            median(&c.change_ms),
            spread(&c.change_ms),
        ));
    }
    s.push_str(&format!(
        "\nChange to serving excludes the control plane's own reload of the folder (poll every \
         10 ms, read, parse, validate): median {:.0} ms, the same for both clients.\n",
        median(&r.controlplane_reload_ms)
    ));
    if let [nm, envoy] = r.clients.as_slice() {
        s.push_str(&format!(
            "\nRatios nodemesh / Envoy: apply {:.2}, RSS {:.2}, change to serving {:.2}.\n",
            median(&nm.apply_ms) / median(&envoy.apply_ms),
            median(&nm.rss_mib) / median(&envoy.rss_mib),
            median(&nm.change_ms) / median(&envoy.change_ms).max(0.001),
        ));
    }
    s
}
