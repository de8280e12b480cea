//! Density: K idle pods, each with an Envoy sidecar (the sidecar configuration of the
//! comparison, 2 workers), against one nodemesh agent with its L7 configuration serving the
//! same K pods. Measured per K: the proxies' total RSS and their idle CPU over a quiet
//! period. Pods are added to one node in steps, so each K reuses the previous pods.
//!
//! The sidecars' configuration is small (one service); istiod sends every sidecar the whole
//! mesh's services unless `Sidecar` resources scope it, so real sidecars use more memory
//! than these: the comparison favours the sidecars.
use std::time::Duration;

use anyhow::Context as _;
use nodemesh_simnode::Process;
use serde::Serialize;

use crate::{
    envoy,
    http::{HttpBench, PORT, process_cpu_seconds},
    scenarios::{anon_rss_kib, rss_kib},
};

#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub pods: usize,
    pub sidecars_rss_mib: f64,
    pub sidecars_idle_cpu_percent: f64,
    pub nodemesh_rss_mib: f64,
    /// Of which anonymous (heap, stacks): the rest is the binary's shareable text.
    pub nodemesh_anon_mib: f64,
    pub nodemesh_idle_cpu_percent: f64,
}

pub fn run(ks: &[usize], quick: bool) -> anyhow::Result<Vec<Point>> {
    let quiet = Duration::from_secs(if quick { 2 } else { 10 });
    let mut bench = HttpBench::start("bench-density")?;
    bench.node.enable_namespace("idle")?;
    let work = tempfile::tempdir()?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755))?;
    let config = work.path().join("sidecar.yaml");
    std::fs::write(&config, envoy::sidecar_bootstrap(&bench.server, PORT))?;
    let mut sidecars: Vec<Process> = Vec::new();
    let mut points = Vec::new();
    for &k in ks {
        while sidecars.len() < k {
            let pod = bench
                .node
                .add_pod(&format!("idle-{}", sidecars.len()), "idle")
                .context("adding an idle pod")?;
            let mut p = envoy::start(&bench.node.sim, Some(&pod), &config, &pod.name)?;
            envoy::wait_ready(&bench.node.sim, Some(&pod), envoy::ADMIN_PORT, &mut p)?;
            sidecars.push(p);
        }
        std::thread::sleep(Duration::from_secs(1));
        let agent = bench.node.agent_pid().context("no agent")?;
        let pids: Vec<u32> = sidecars.iter().map(Process::pid).collect();
        let cpu = |pids: &[u32]| -> anyhow::Result<f64> {
            pids.iter().map(|p| process_cpu_seconds(*p)).sum()
        };
        let (s0, n0) = (cpu(&pids)?, cpu(&[agent])?);
        std::thread::sleep(quiet);
        let (s1, n1) = (cpu(&pids)?, cpu(&[agent])?);
        let rss = |pids: &[u32]| -> anyhow::Result<f64> {
            Ok(pids
                .iter()
                .map(|p| rss_kib(*p))
                .sum::<anyhow::Result<u64>>()? as f64
                / 1024.0)
        };
        let point = Point {
            pods: k,
            sidecars_rss_mib: rss(&pids)?,
            sidecars_idle_cpu_percent: 100.0 * (s1 - s0) / quiet.as_secs_f64(),
            nodemesh_rss_mib: rss(&[agent])?,
            nodemesh_anon_mib: anon_rss_kib(agent)? as f64 / 1024.0,
            nodemesh_idle_cpu_percent: 100.0 * (n1 - n0) / quiet.as_secs_f64(),
        };
        eprintln!(
            "density {k:>3} pods: sidecars {:.0} MiB, {:.2}% CPU idle; nodemesh {:.1} MiB, {:.2}% CPU idle",
            point.sidecars_rss_mib,
            point.sidecars_idle_cpu_percent,
            point.nodemesh_rss_mib,
            point.nodemesh_idle_cpu_percent
        );
        points.push(point);
    }
    Ok(points)
}

pub fn markdown(points: &[Point]) -> String {
    let mut s = String::from(
        "Density: K idle pods, a sidecar each, against one nodemesh agent (L7 on) serving them.\n\n\
         | pods | sidecars RSS (MiB) | sidecars idle CPU (%) | nodemesh RSS (MiB) | of which anonymous | nodemesh idle CPU (%) | memory ratio |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in points {
        s.push_str(&format!(
            "| {} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} | {:.3} |\n",
            p.pods,
            p.sidecars_rss_mib,
            p.sidecars_idle_cpu_percent,
            p.nodemesh_rss_mib,
            p.nodemesh_anon_mib,
            p.nodemesh_idle_cpu_percent,
            p.nodemesh_rss_mib / p.sidecars_rss_mib.max(f64::MIN_POSITIVE)
        ));
    }
    s.push('\n');
    s
}
