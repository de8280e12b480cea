//! The sidecar comparison (`--part sidecars`): nodemesh against Envoy as Istio runs it, on
//! one simulated node, in one run.
//!
//! - Latency at a fixed rate (1000 requests/s, 16 connections, 1 KiB responses, warm-up
//!   excluded) and closed-loop throughput, for HTTP/1.1, h2c and gRPC unary, over the five
//!   scenarios of [`crate::scenarios`], in interleaved rounds; medians with their spread.
//! - The proxies' CPU per 1000 requests and their RSS; the load generator's CPU.
//! - Density: K idle pods each with a sidecar against one nodemesh agent serving K pods:
//!   total proxy memory and idle CPU.
//! - Cost growth: memory and configuration time of the node proxy with 10, 100 and 1,000
//!   services.
//!
//! Every target of the issue is judged in the output; a missed one says so plainly.
//! Results: `<out-dir>/sidecars.json`, `sidecars.md` and `sidecars.svg`.
use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use nodemesh_simnode::load::Protocol;
use serde::Serialize;

use super::{Common, median, spread, write};
use crate::{
    density, growth,
    http::Shape,
    scenarios::{Comparison, Measured, Scenario, settle},
    svg,
};

const PROTOCOLS: [Protocol; 3] = [Protocol::Http1, Protocol::H2c, Protocol::Grpc];

#[derive(Debug, Serialize)]
pub struct Row {
    pub protocol: Protocol,
    pub scenario: Scenario,
    pub label: &'static str,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub p50_spread_us: f64,
    pub p99_spread_us: f64,
    pub added_p50_us: f64,
    pub added_p90_us: f64,
    pub max_rps: f64,
    pub proxy_cpu_ms_per_1000: f64,
    pub client_cpu_ms_per_1000: f64,
    pub proxy_rss_mib: f64,
    pub fixed_rate: Vec<Measured>,
    pub closed_loop: Vec<Measured>,
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub value: f64,
    pub limit: String,
    pub met: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    rounds: usize,
    rate: u64,
    connections: usize,
    response_bytes: usize,
    duration_s: f64,
    rows: Vec<Row>,
    density: Vec<density::Point>,
    growth: Vec<growth::Point>,
    targets: Vec<Target>,
}

pub fn run(common: &Common, rounds: Option<usize>) -> anyhow::Result<()> {
    let rounds = rounds.unwrap_or(if common.quick { 1 } else { 3 });
    let duration = Duration::from_secs(if common.quick { 2 } else { 10 });
    let warmup = Duration::from_secs(if common.quick { 1 } else { 2 });
    let rate = if common.quick { 200 } else { 1000 };
    let (connections, response_bytes) = (16, 1024);
    let cmp = Comparison::start("bench-sidecars").context("setting up the node and Envoys")?;
    let mut fixed: BTreeMap<(Protocol, Scenario), Vec<Measured>> = BTreeMap::new();
    let mut closed: BTreeMap<(Protocol, Scenario), Vec<Measured>> = BTreeMap::new();
    for round in 0..rounds {
        for (pi, &protocol) in PROTOCOLS.iter().enumerate() {
            for i in 0..Scenario::ALL.len() {
                let scenario = Scenario::ALL[(round + pi + i) % Scenario::ALL.len()];
                cmp.select(scenario)?;
                settle();
                let shape = Shape {
                    protocol,
                    rate,
                    connections,
                    duration,
                    warmup,
                    response_bytes,
                };
                let what = |mode: &str| {
                    format!("round {round}, {protocol:?}, {}, {mode}", scenario.label())
                };
                let f = cmp
                    .measure(scenario, shape)
                    .with_context(|| what("fixed rate"))?;
                let c = cmp
                    .measure(scenario, Shape { rate: 0, ..shape })
                    .with_context(|| what("closed loop"))?;
                eprintln!(
                    "round {}/{rounds} {protocol:?} {:<24} p50 {:>6.0} p90 {:>6.0} p99 {:>6.0} us | {:>6.0} rps | proxy CPU {:>5.1} ms/1000",
                    round + 1,
                    scenario.label(),
                    f.load.p50_us,
                    f.load.p90_us,
                    f.load.p99_us,
                    c.load.throughput_rps,
                    1e6 * f.proxy_cpu_seconds / f.load.requests.max(1) as f64
                );
                fixed.entry((protocol, scenario)).or_default().push(f);
                closed.entry((protocol, scenario)).or_default().push(c);
            }
        }
    }
    cmp.finish()?;
    drop(cmp);

    let rows = rows(&fixed, &closed);
    let ks: &[usize] = if common.quick { &[1, 5] } else { &[1, 10, 50] };
    let density = density::run(ks, common.quick).context("density")?;
    let services: &[usize] = if common.quick {
        &[10, 100]
    } else {
        &[10, 100, 1000]
    };
    let growth = growth::run(services).context("cost growth")?;
    let targets = targets(&rows, &density);
    let report = Report {
        rounds,
        rate,
        connections,
        response_bytes,
        duration_s: duration.as_secs_f64(),
        rows,
        density,
        growth,
        targets,
    };
    std::fs::write(
        common.out_dir.join("sidecars.svg"),
        svg::latency_chart(&report.rows),
    )?;
    let md = markdown(&report);
    write(common, "sidecars", &report, &md)
}

fn rows(
    fixed: &BTreeMap<(Protocol, Scenario), Vec<Measured>>,
    closed: &BTreeMap<(Protocol, Scenario), Vec<Measured>>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for protocol in PROTOCOLS {
        let of = |s: Scenario| fixed.get(&(protocol, s)).cloned().unwrap_or_default();
        let med =
            |v: &[Measured], f: fn(&Measured) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
        let direct = of(Scenario::Direct);
        let (d50, d90) = (
            med(&direct, |m| m.load.p50_us),
            med(&direct, |m| m.load.p90_us),
        );
        for scenario in Scenario::ALL {
            let f = of(scenario);
            let c = closed
                .get(&(protocol, scenario))
                .cloned()
                .unwrap_or_default();
            let per_1000 = |m: &Measured, cpu: f64| 1e6 * cpu / m.load.requests.max(1) as f64;
            rows.push(Row {
                protocol,
                scenario,
                label: scenario.label(),
                p50_us: med(&f, |m| m.load.p50_us),
                p90_us: med(&f, |m| m.load.p90_us),
                p99_us: med(&f, |m| m.load.p99_us),
                p999_us: med(&f, |m| m.load.p999_us),
                p50_spread_us: spread(&f.iter().map(|m| m.load.p50_us).collect::<Vec<_>>()),
                p99_spread_us: spread(&f.iter().map(|m| m.load.p99_us).collect::<Vec<_>>()),
                added_p50_us: med(&f, |m| m.load.p50_us) - d50,
                added_p90_us: med(&f, |m| m.load.p90_us) - d90,
                max_rps: med(&c, |m| m.load.throughput_rps),
                proxy_cpu_ms_per_1000: median(
                    &f.iter()
                        .map(|m| per_1000(m, m.proxy_cpu_seconds))
                        .collect::<Vec<_>>(),
                ),
                client_cpu_ms_per_1000: median(
                    &f.iter()
                        .map(|m| per_1000(m, m.load.cpu_seconds))
                        .collect::<Vec<_>>(),
                ),
                proxy_rss_mib: med(&f, |m| m.proxy_rss_kib.iter().sum::<u64>() as f64 / 1024.0),
                fixed_rate: f,
                closed_loop: c,
            });
        }
    }
    rows
}

fn targets(rows: &[Row], density: &[density::Point]) -> Vec<Target> {
    let mut t = Vec::new();
    let mut at_most = |name: String, value: f64, limit: f64, unit: &str| {
        t.push(Target {
            met: value <= limit,
            limit: format!("<= {limit:.2}{unit}"),
            name,
            value,
        });
    };
    for protocol in PROTOCOLS {
        let row = |s: Scenario| {
            rows.iter()
                .find(|r| r.protocol == protocol && r.scenario == s)
        };
        let (Some(nm), Some(pair), Some(node), Some(capture)) = (
            row(Scenario::NodemeshSockmap),
            row(Scenario::SidecarPair),
            row(Scenario::NodeEnvoy),
            row(Scenario::NodemeshCapture),
        ) else {
            continue;
        };
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::INFINITY };
        for (what, a, p, n) in [
            ("p50", nm.added_p50_us, pair.added_p50_us, node.added_p50_us),
            ("p90", nm.added_p90_us, pair.added_p90_us, node.added_p90_us),
        ] {
            at_most(
                format!("{protocol:?}: nodemesh added {what} / sidecar pair's"),
                ratio(a, p),
                0.2,
                "",
            );
            at_most(
                format!("{protocol:?}: nodemesh added {what} / node Envoy's"),
                ratio(a, n),
                0.5,
                "",
            );
        }
        at_most(
            format!("{protocol:?}: nodemesh CPU per 1000 requests / sidecar pair's"),
            ratio(nm.proxy_cpu_ms_per_1000, pair.proxy_cpu_ms_per_1000),
            0.25,
            "",
        );
        at_most(
            format!("{protocol:?}: nodemesh CPU per 1000 requests / node Envoy's"),
            ratio(nm.proxy_cpu_ms_per_1000, node.proxy_cpu_ms_per_1000),
            0.5,
            "",
        );
        at_most(
            format!("{protocol:?}: node Envoy throughput / nodemesh's (goal: nodemesh >= 1.5x)"),
            ratio(node.max_rps, nm.max_rps),
            1.0 / 1.5,
            "",
        );
        at_most(
            format!("{protocol:?}: sockmap p50 / capture-only p50 (goal: below)"),
            ratio(nm.p50_us, capture.p50_us),
            0.999,
            "",
        );
    }
    if let Some(p) = density.iter().max_by_key(|p| p.pods) {
        at_most(
            "nodemesh idle RSS with L7 on (MiB)".into(),
            p.nodemesh_rss_mib,
            12.0,
            " MiB",
        );
        at_most(
            format!(
                "total proxy memory with {} pods: nodemesh / sidecars",
                p.pods
            ),
            p.nodemesh_rss_mib / p.sidecars_rss_mib.max(f64::MIN_POSITIVE),
            0.1,
            "",
        );
    }
    t
}

fn markdown(r: &Report) -> String {
    let mut s = format!(
        "Sidecars against nodemesh on one simulated node: {} requests/s over {} connections, {} B \
         responses, {} s per run, median of {} interleaved rounds (spread: max - min over \
         rounds); max rps closed loop over {} connections; CPU in ms per 1000 requests at the \
         fixed rate; RSS of the scenario's proxies.\n\n\
         | protocol | scenario | p50 | p90 | p99 | p99.9 | added p50 | added p90 | p50 spread | p99 spread | max rps | proxy CPU | client CPU | proxy RSS (MiB) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        r.rate, r.connections, r.response_bytes, r.duration_s, r.rounds, r.connections
    );
    for row in &r.rows {
        s.push_str(&format!(
            "| {:?} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} |\n",
            row.protocol,
            row.label,
            row.p50_us,
            row.p90_us,
            row.p99_us,
            row.p999_us,
            row.added_p50_us,
            row.added_p90_us,
            row.p50_spread_us,
            row.p99_spread_us,
            row.max_rps,
            row.proxy_cpu_ms_per_1000,
            row.client_cpu_ms_per_1000,
            row.proxy_rss_mib
        ));
    }
    s.push_str("\nLatencies in microseconds.\n\n");
    s.push_str(&density::markdown(&r.density));
    s.push_str(&growth::markdown(&r.growth));
    s.push_str("\n| target | value | goal | |\n|---|---:|---|---|\n");
    for t in &r.targets {
        s.push_str(&format!(
            "| {} | {:.2} | {} | {} |\n",
            t.name,
            t.value,
            t.limit,
            if t.met { "met" } else { "**MISSED**" }
        ));
    }
    s
}
