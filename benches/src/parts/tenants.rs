//! The tenants part: one pod floods the L7 node proxy while a quiet pod sends a steady
//! 200 requests/s; the quiet pod's latency is measured alone and under the flood, in
//! alternating rounds, with the per-pod limits on (`max_requests_per_pod`). The flooder is
//! shed with 503 `OM` past its limit (counted in `nodemesh_tenant_shed_total`); the quiet
//! pod must see no error and a p99 under flood within the stated bound of its p99 alone:
//! at most [`BOUND_FACTOR`] times it plus [`BOUND_SLACK_US`].
//!
//! On a 2-core machine the flooding client competes for the same cores as the proxy and the
//! quiet pod, so part of the quiet pod's extra latency is CPU the node proxy cannot isolate;
//! the bound says how much the proxy lets through, not that there is none.
//!
//! Results: `<out-dir>/tenants.json` and `tenants.md`.
use std::time::Duration;

use anyhow::{Context as _, bail};
use nodemesh_simnode::load::Protocol;
use nodemesh_tests::mesh::metric;
use serde::Serialize;

use super::{Common, median, write};
use crate::{
    http::{HttpBench, Load, Shape},
    paths::Path,
};

/// The quiet pod's p99 under flood may be at most this multiple of its p99 alone ...
pub const BOUND_FACTOR: f64 = 3.0;
/// ... plus this much.
pub const BOUND_SLACK_US: f64 = 2000.0;
/// The flooder's in-flight request limit.
const LIMIT: u32 = 16;

#[derive(Debug, Serialize)]
struct Report {
    rounds: usize,
    limit_per_pod: u32,
    flood_connections: usize,
    quiet_alone: Vec<Load>,
    quiet_under_flood: Vec<Load>,
    flood: Vec<serde_json::Value>,
    quiet_p99_alone_us: f64,
    quiet_p99_under_flood_us: f64,
    bound_us: f64,
    shed: f64,
    met: bool,
}

pub fn run(common: &Common, rounds: Option<usize>) -> anyhow::Result<()> {
    let rounds = rounds.unwrap_or(if common.quick { 1 } else { 3 });
    let duration = Duration::from_secs(if common.quick { 2 } else { 8 });
    let limit = format!("max_requests_per_pod: {LIMIT}");
    let mut bench =
        HttpBench::start_with("bench-tenants", &[&limit]).context("setting up the node")?;
    let flooder = bench.node.add_pod("flooder", "bench")?;
    crate::paths::Paths::new(&bench.node, &bench.client, &bench.server).select(Path::Sockmap)?;
    let quiet = Shape {
        protocol: Protocol::Http1,
        rate: 200,
        connections: 4,
        duration,
        warmup: Duration::from_secs(1),
        response_bytes: 1024,
    };
    let flood_connections = 64;
    let flood_shape = Shape {
        protocol: Protocol::H2c,
        rate: 0,
        connections: flood_connections,
        duration: duration + Duration::from_secs(2),
        warmup: Duration::ZERO,
        response_bytes: 1024,
    };
    let shed = || -> anyhow::Result<f64> {
        Ok(metric(
            &bench.node.metrics()?,
            "nodemesh_tenant_shed_total",
            &[("source", "bench/flooder")],
        ))
    };
    let shed_before = shed()?;
    let (mut alone, mut under, mut floods) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let a = bench.measure_from(&bench.client, Path::Sockmap, quiet)?;
        let args = bench.load_args(flood_shape);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut flood = bench.node.sim.spawn_in_pod(&flooder, {
            let mut c = std::process::Command::new(nodemesh_simnode::bin_path("nm-httpapp"));
            c.args(&args);
            c
        })?;
        std::thread::sleep(Duration::from_millis(500));
        let u = bench.measure_from(&bench.client, Path::Sockmap, quiet);
        let status = flood.wait_timeout(flood_shape.duration + Duration::from_secs(60))?;
        let report: serde_json::Value =
            serde_json::from_str(flood.stdout_text().trim()).unwrap_or(serde_json::Value::Null);
        let u = u.with_context(|| format!("round {round}: the quiet pod under flood"))?;
        if u.errors != 0 {
            bail!(
                "round {round}: the quiet pod got {} errors under the flood",
                u.errors
            );
        }
        eprintln!(
            "round {}/{rounds}: quiet p99 alone {:.0} us, under flood {:.0} us; flooder {status}: {} ok, {} errors",
            round + 1,
            a.p99_us,
            u.p99_us,
            report["requests"],
            report["errors"]
        );
        alone.push(a);
        under.push(u);
        floods.push(report);
    }
    let shed = shed()? - shed_before;
    let p99 = |v: &[Load]| median(&v.iter().map(|l| l.p99_us).collect::<Vec<_>>());
    let (pa, pu) = (p99(&alone), p99(&under));
    let bound = BOUND_FACTOR * pa + BOUND_SLACK_US;
    let report = Report {
        rounds,
        limit_per_pod: LIMIT,
        flood_connections,
        quiet_p99_alone_us: pa,
        quiet_p99_under_flood_us: pu,
        bound_us: bound,
        shed,
        met: pu <= bound && shed > 0.0,
        quiet_alone: alone,
        quiet_under_flood: under,
        flood: floods,
    };
    let md = format!(
        "Tenant isolation: a quiet pod at 200 requests/s (HTTP/1.1, 4 connections) alone and \
         while another pod floods the node proxy (h2c, {flood_connections} connections, closed \
         loop; per-pod limit {LIMIT} requests in flight), median of {rounds} rounds, sockmap on.\n\n\
         | quiet p99 alone (us) | quiet p99 under flood (us) | bound (us) | flooder requests shed |\n\
         |---:|---:|---:|---:|\n| {pa:.0} | {pu:.0} | {bound:.0} | {shed:.0} |\n\n\
         Bound: p99 under flood <= {BOUND_FACTOR} x p99 alone + {BOUND_SLACK_US} us, and the \
         flooder shed: {}\n",
        if report.met { "met" } else { "MISSED" }
    );
    write(common, "tenants", &report, &md)
}
