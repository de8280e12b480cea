//! The HTTP part: HTTP/1.1, h2c and gRPC unary through three paths (direct, the L7 node
//! proxy without sockmap, with sockmap), in interleaved rounds:
//!
//! - fixed-rate latency: 1000 requests/s over 16 connections, 1 KiB responses, warm-up
//!   excluded; p50/p90/p99/p99.9 as the median over rounds, with the p50 spread;
//! - closed-loop throughput over 16 connections;
//! - the agent's CPU seconds per 1000 requests (from the fixed-rate runs) and the load
//!   generator's, so that a saturated client shows.
//!
//! Results: `<out-dir>/http.json` and `http.md`. Goals, judged in the Markdown: the sockmap
//! path's added p50 below the capture-only path's for each protocol.
use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use nodemesh_simnode::load::Protocol;
use serde::Serialize;

use super::{Common, median, spread, write};
use crate::{
    http::{HttpBench, Load, Shape},
    paths::Path,
};

const PROTOCOLS: [Protocol; 3] = [Protocol::Http1, Protocol::H2c, Protocol::Grpc];

#[derive(Debug, Serialize)]
struct Row {
    protocol: Protocol,
    path: Path,
    label: &'static str,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    p50_spread_us: f64,
    added_p50_us: f64,
    added_p90_us: f64,
    max_rps: f64,
    agent_cpu_ms_per_1000: f64,
    client_cpu_ms_per_1000: f64,
    fixed_rate: Vec<Load>,
    closed_loop: Vec<Load>,
}

#[derive(Debug, Serialize)]
struct Report {
    rounds: usize,
    rate: u64,
    connections: usize,
    response_bytes: usize,
    duration_s: f64,
    rows: Vec<Row>,
    /// Per protocol: sockmap's added p50 below the capture-only path's.
    goals: BTreeMap<String, bool>,
}

pub fn run(common: &Common, rounds: Option<usize>) -> anyhow::Result<()> {
    let rounds = rounds.unwrap_or(if common.quick { 1 } else { 3 });
    let duration = if common.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(10)
    };
    let warmup = Duration::from_secs(if common.quick { 1 } else { 2 });
    // The quick run is a smoke check (often of a debug build on a busy machine): a low rate.
    let rate = if common.quick { 200 } else { 1000 };
    let (connections, response_bytes) = (16, 1024);
    let bench = HttpBench::start("bench-http").context("setting up the simulated node")?;
    let mut fixed: BTreeMap<(u8, u8), Vec<Load>> = BTreeMap::new();
    let mut closed: BTreeMap<(u8, u8), Vec<Load>> = BTreeMap::new();
    let key = |proto: Protocol, path: Path| (proto as u8, path as u8);
    for round in 0..rounds {
        for (pi, &protocol) in PROTOCOLS.iter().enumerate() {
            for i in 0..3 {
                // Rotate the order of the paths, per round and protocol.
                let path = Path::ALL[(round + pi + i) % 3];
                let shape = Shape {
                    protocol,
                    rate,
                    connections,
                    duration,
                    warmup,
                    response_bytes,
                };
                let f = bench.measure(path, shape).with_context(|| {
                    format!("round {round}, {protocol:?}, {path:?}, fixed rate")
                })?;
                let c = bench
                    .measure(path, Shape { rate: 0, ..shape })
                    .with_context(|| {
                        format!("round {round}, {protocol:?}, {path:?}, closed loop")
                    })?;
                eprintln!(
                    "round {}/{rounds} {protocol:?} {:<24} p50 {:>7.0} us p90 {:>7.0} us p99 {:>7.0} us | max {:>7.0} rps",
                    round + 1,
                    path.label(),
                    f.p50_us,
                    f.p90_us,
                    f.p99_us,
                    c.throughput_rps
                );
                fixed.entry(key(protocol, path)).or_default().push(f);
                closed.entry(key(protocol, path)).or_default().push(c);
            }
        }
    }
    let mut rows = Vec::new();
    let mut goals = BTreeMap::new();
    for protocol in PROTOCOLS {
        let stat = |path: Path, f: fn(&Load) -> f64| {
            median(
                &fixed[&key(protocol, path)]
                    .iter()
                    .map(f)
                    .collect::<Vec<_>>(),
            )
        };
        let direct = (
            stat(Path::Direct, |l| l.p50_us),
            stat(Path::Direct, |l| l.p90_us),
        );
        for path in Path::ALL {
            let f = fixed[&key(protocol, path)].clone();
            let c = closed[&key(protocol, path)].clone();
            let per_1000 = |cpu: fn(&Load) -> f64| {
                median(
                    &f.iter()
                        .map(|l| 1000.0 * 1000.0 * cpu(l) / l.requests.max(1) as f64)
                        .collect::<Vec<_>>(),
                )
            };
            rows.push(Row {
                protocol,
                path,
                label: path.label(),
                p50_us: stat(path, |l| l.p50_us),
                p90_us: stat(path, |l| l.p90_us),
                p99_us: stat(path, |l| l.p99_us),
                p999_us: stat(path, |l| l.p999_us),
                p50_spread_us: spread(&f.iter().map(|l| l.p50_us).collect::<Vec<_>>()),
                added_p50_us: stat(path, |l| l.p50_us) - direct.0,
                added_p90_us: stat(path, |l| l.p90_us) - direct.1,
                max_rps: median(&c.iter().map(|l| l.throughput_rps).collect::<Vec<_>>()),
                agent_cpu_ms_per_1000: if path == Path::Direct {
                    0.0
                } else {
                    per_1000(|l| l.agent_cpu_seconds)
                },
                client_cpu_ms_per_1000: per_1000(|l| l.cpu_seconds),
                fixed_rate: f,
                closed_loop: c,
            });
        }
        let added = |path: Path| {
            rows.iter()
                .find(|r| r.protocol == protocol && r.path == path)
                .map_or(0.0, |r| r.added_p50_us)
        };
        goals.insert(
            format!("{protocol:?}"),
            added(Path::Sockmap) < added(Path::Proxied),
        );
    }
    let report = Report {
        rounds,
        rate,
        connections,
        response_bytes,
        duration_s: duration.as_secs_f64(),
        rows,
        goals,
    };
    let md = markdown(&report);
    write(common, "http", &report, &md)
}

fn markdown(r: &Report) -> String {
    let mut s = format!(
        "HTTP through the L7 node proxy: {} requests/s over {} connections, {} B responses, \
         {} s per run, median of {} interleaved rounds; max rps closed loop over {} \
         connections. CPU: milliseconds per 1000 requests at the fixed rate.\n\n\
         | protocol | path | p50 (us) | p90 (us) | p99 (us) | p99.9 (us) | added p50 | added p90 | p50 spread | max rps | agent CPU | client CPU |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        r.rate, r.connections, r.response_bytes, r.duration_s, r.rounds, r.connections
    );
    for row in &r.rows {
        s.push_str(&format!(
            "| {:?} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} |\n",
            row.protocol,
            row.label,
            row.p50_us,
            row.p90_us,
            row.p99_us,
            row.p999_us,
            row.added_p50_us,
            row.added_p90_us,
            row.p50_spread_us,
            row.max_rps,
            row.agent_cpu_ms_per_1000,
            row.client_cpu_ms_per_1000
        ));
    }
    s.push('\n');
    for (protocol, met) in &r.goals {
        s.push_str(&format!(
            "Goal ({protocol}): sockmap's added p50 below capture-only's: {}\n",
            if *met { "met" } else { "MISSED" }
        ));
    }
    s
}
