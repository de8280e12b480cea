//! Cost growth: the node proxy's memory and configuration time with N services, N in
//! 10 / 100 / 1,000. A service is what istiod gives a node proxy for one HTTP service
//! (`nodemesh_simnode::services`): a cluster with an endpoint and a virtual host with its
//! names and routes, on the shared per-port outbound listener. Each N is loaded by `nodemesh proxy -c` (the node proxy's engine,
//! without the eBPF half), timed from start to serving, and its RSS read once it serves;
//! Envoy loads the same file for comparison.
use std::{
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::scenarios::rss_kib;

#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub services: usize,
    pub nodemesh_ready_ms: f64,
    pub nodemesh_rss_mib: f64,
    pub envoy_ready_ms: f64,
    pub envoy_rss_mib: f64,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `cmd`, waits until `port` accepts, returns the time it took and the RSS then.
fn load(mut cmd: Command, port: u16) -> anyhow::Result<(f64, f64)> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("{cmd:?}"))?;
    let result = (|| {
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("{cmd:?} exited with {status}");
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if start.elapsed() > Duration::from_secs(120) {
                bail!("{cmd:?}: not serving after 120 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let ready = start.elapsed().as_secs_f64() * 1000.0;
        // Let the allocator and background tasks settle before reading the RSS.
        std::thread::sleep(Duration::from_millis(500));
        Ok((ready, rss_kib(child.id())? as f64 / 1024.0))
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

pub fn run(services: &[usize]) -> anyhow::Result<Vec<Point>> {
    let work = tempfile::tempdir()?;
    let mut points = Vec::new();
    for &n in services {
        let port = free_port()?;
        let file = work.path().join(format!("services-{n}.yaml"));
        std::fs::write(&file, nodemesh_simnode::services::bootstrap(n, port))?;
        let mut nm = Command::new(nodemesh_simnode::bin_path("nodemesh"));
        nm.args(["proxy", "-c"]).arg(&file).env("RUST_LOG", "error");
        let (nodemesh_ready_ms, nodemesh_rss_mib) = load(nm, port)?;
        let mut envoy = Command::new(crate::envoy::binary()?);
        envoy.arg("-c").arg(&file).args([
            "--concurrency",
            "2",
            "--disable-hot-restart",
            "-l",
            "error",
        ]);
        let (envoy_ready_ms, envoy_rss_mib) = load(envoy, port)?;
        eprintln!(
            "growth {n:>5} services: nodemesh {nodemesh_ready_ms:.0} ms, {nodemesh_rss_mib:.1} MiB; Envoy {envoy_ready_ms:.0} ms, {envoy_rss_mib:.1} MiB"
        );
        points.push(Point {
            services: n,
            nodemesh_ready_ms,
            nodemesh_rss_mib,
            envoy_ready_ms,
            envoy_rss_mib,
        });
    }
    Ok(points)
}

pub fn markdown(points: &[Point]) -> String {
    let mut s = String::from(
        "Cost growth: the node proxy's engine (`nodemesh proxy -c`) and Envoy loading N services \
         (start to serving, RSS once serving).\n\n\
         | services | nodemesh ready (ms) | nodemesh RSS (MiB) | Envoy ready (ms) | Envoy RSS (MiB) |\n\
         |---:|---:|---:|---:|---:|\n",
    );
    for p in points {
        s.push_str(&format!(
            "| {} | {:.0} | {:.1} | {:.0} | {:.1} |\n",
            p.services, p.nodemesh_ready_ms, p.nodemesh_rss_mib, p.envoy_ready_ms, p.envoy_rss_mib
        ));
    }
    s.push('\n');
    s
}
