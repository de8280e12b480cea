//! The TCP part: 64-byte request/response round trips (`nm-podapp rr`) over the three
//! paths, interleaved rounds, medians with their spread, ratios to direct. Results:
//! `<out-dir>/datapath.json` and `datapath.md`.
use std::collections::BTreeMap;

use anyhow::Context as _;
use serde::Serialize;

use super::Common;
use crate::paths::{Bench, Latency, Path, median};

#[derive(Serialize)]
struct PathResult {
    path: Path,
    label: &'static str,
    rounds: Vec<Latency>,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    /// p50 over direct's p50.
    p50_ratio: f64,
    /// Added p50 over direct, microseconds.
    added_p50_us: f64,
    added_p90_us: f64,
    /// Spread of p50 across rounds (max - min).
    p50_spread_us: f64,
}

#[derive(Serialize)]
struct Report {
    kernel: String,
    rounds: usize,
    iterations: usize,
    size: usize,
    paths: Vec<PathResult>,
    /// Goal: the sockmap path's added p50 is at most half of the proxied path's.
    goal_sockmap_added_p50_ratio: f64,
    goal_met: bool,
}

/// Runs the TCP part.
pub fn run(
    args: &Common,
    size: usize,
    rounds: Option<usize>,
    iterations: Option<usize>,
) -> anyhow::Result<()> {
    let rounds = rounds.unwrap_or(if args.quick { 1 } else { 5 });
    let iterations = iterations.unwrap_or(if args.quick { 2_000 } else { 20_000 });
    let bench = Bench::start("bench", "on").context("setting up the simulated node")?;

    let mut samples: BTreeMap<&'static str, (Path, Vec<Latency>)> = BTreeMap::new();
    for round in 0..rounds {
        // Rotate the order so no path always runs first (or right after another).
        for i in 0..3 {
            let path = Path::ALL[(round + i) % 3];
            let latency = bench
                .paths()
                .measure(path, iterations, size)
                .with_context(|| format!("round {round}, {path:?}"))?;
            eprintln!(
                "round {}/{rounds} {:<24} p50 {:>7.1} us  p90 {:>7.1} us  p99 {:>7.1} us",
                round + 1,
                path.label(),
                latency.p50_us,
                latency.p90_us,
                latency.p99_us
            );
            samples
                .entry(path.label())
                .or_insert((path, Vec::new()))
                .1
                .push(latency);
        }
    }

    let stat = |path: Path, f: fn(&Latency) -> f64| -> f64 {
        samples
            .values()
            .find(|(p, _)| *p == path)
            .map_or(0.0, |(_, v)| median(&v.iter().map(f).collect::<Vec<_>>()))
    };
    let direct_p50 = stat(Path::Direct, |l| l.p50_us);
    let direct_p90 = stat(Path::Direct, |l| l.p90_us);
    let paths: Vec<PathResult> = Path::ALL
        .iter()
        .map(|&path| {
            let rounds = samples
                .values()
                .find(|(p, _)| *p == path)
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let p50s: Vec<f64> = rounds.iter().map(|l| l.p50_us).collect();
            let spread = p50s.iter().copied().fold(f64::MIN, f64::max)
                - p50s.iter().copied().fold(f64::MAX, f64::min);
            let p50 = stat(path, |l| l.p50_us);
            PathResult {
                path,
                label: path.label(),
                p50_us: p50,
                p90_us: stat(path, |l| l.p90_us),
                p99_us: stat(path, |l| l.p99_us),
                p50_ratio: p50 / direct_p50,
                added_p50_us: p50 - direct_p50,
                added_p90_us: stat(path, |l| l.p90_us) - direct_p90,
                p50_spread_us: spread,
                rounds,
            }
        })
        .collect();
    let added = |p: Path| {
        paths
            .iter()
            .find(|r| r.path == p)
            .map_or(0.0, |r| r.added_p50_us)
    };
    let ratio = added(Path::Sockmap) / added(Path::Proxied);
    let report = Report {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        rounds,
        iterations,
        size,
        goal_sockmap_added_p50_ratio: ratio,
        goal_met: ratio <= 0.5,
        paths,
    };
    let json = args.out_dir.join("datapath.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)?;
    let md = markdown(&report);
    std::fs::write(args.out_dir.join("datapath.md"), &md)?;
    println!("{md}");
    println!("results: {} and datapath.md", json.display());
    if !report.goal_met {
        println!(
            "GOAL MISSED: the sockmap path adds {:.0}% of the proxied path's added p50 (goal: at most 50%)",
            ratio * 100.0
        );
    }
    Ok(())
}

fn markdown(r: &Report) -> String {
    let mut s = format!(
        "Request/response latency, {} B each way, {} round trips per path and round, median of {} \
         interleaved rounds (Linux {}).\n\n\
         | path | p50 (us) | p90 (us) | p99 (us) | p50 / direct | added p50 (us) | added p90 (us) | p50 spread (us) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
        r.size, r.iterations, r.rounds, r.kernel
    );
    for p in &r.paths {
        s.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} |\n",
            p.label,
            p.p50_us,
            p.p90_us,
            p.p99_us,
            p.p50_ratio,
            p.added_p50_us,
            p.added_p90_us,
            p.p50_spread_us
        ));
    }
    s.push_str(&format!(
        "\nGoal: sockmap's added p50 <= 1/2 of the proxied path's: {:.2} -> {}\n",
        r.goal_sockmap_added_p50_ratio,
        if r.goal_met { "met" } else { "MISSED" }
    ));
    s
}
