//! `nodemesh-demo` (run it with `cargo xtask demo`): one simulated node, three pods in two
//! namespaces with one of them in the mesh, the real agent and kernel programs, real
//! traffic, and a short report of what happened.
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use nodemesh_benches::paths::{Latency, PORT, Path};
use nodemesh_simnode::Pod;
use nodemesh_tests::{
    mesh::{AgentOptions, MeshNode, metric},
    xds,
};

#[derive(Parser)]
struct Args {
    /// Leave the node, agent and pods running at the end (Ctrl-C removes them).
    #[arg(long)]
    keep: bool,
    /// Round trips per latency measurement.
    #[arg(long, default_value_t = 5000)]
    iterations: usize,
    /// `basic`: three pods, two namespaces, flows, latency and counters. `namespaces`: pods
    /// from a Kubernetes API, one namespace accelerated and one not, then swapped
    /// (`nodemesh_benches::namespaces`).
    #[arg(long, default_value = "basic")]
    scenario: String,
}

const T: Duration = Duration::from_secs(120);
/// The control plane's port on the node's loopback.
const CONTROL_PLANE: u16 = 15010;
/// The HTTP port routed at L7 (the echo port stays L4).
const HTTP_PORT: u16 = 8090;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.scenario.as_str() {
        "basic" => {}
        "namespaces" => return nodemesh_benches::namespaces::run(),
        other => bail!("unknown scenario {other:?}: basic or namespaces"),
    }
    println!("== nodemesh demo: one node, three pods, two namespaces\n");
    // The agent's L7 configuration comes from `nodemesh controlplane` on the node, which
    // starts with an empty folder: the pods' addresses are known once they exist.
    let work = tempfile::tempdir()?;
    let resources = work.path().join("resources");
    std::fs::create_dir(&resources)?;
    let bootstrap = work.path().join("envoy.yaml");
    std::fs::write(&bootstrap, xds::ads_bootstrap(CONTROL_PLANE, false))?;
    let mut node = MeshNode::create(
        "demo",
        &AgentOptions {
            sockmap_mode: "auto",
            proxy: vec![
                "l7:".into(),
                format!("  bootstrap: {}", bootstrap.display()),
            ],
            ..AgentOptions::default()
        },
    )
    .context("creating the simulated node")?;
    let _control_plane = xds::start_control_plane(&node, &resources, CONTROL_PLANE)
        .context("starting nodemesh controlplane on the node")?;
    node.start_agent().context("starting the agent")?;
    let frontend = node.add_pod("frontend", "shop")?;
    let backend = node.add_pod("backend", "shop")?;
    let batch = node.add_pod("batch", "legacy")?;
    node.enable_namespace("shop")?;
    let _servers = [
        node.serve(&backend, PORT, &["--mode", "echo"])?,
        node.serve(&batch, PORT, &["--mode", "echo"])?,
    ];
    let _whoami = node.serve(&backend, 8081, &["--mode", "whoami"])?;

    println!(
        "node: namespace {} with the node proxy on {}:15001",
        node.sim.netns_name(),
        node.sim.node_ip()
    );
    for (pod, meshed) in [(&frontend, true), (&backend, true), (&batch, false)] {
        println!(
            "pod:  {:<8} {:<9} {:<12} {}",
            pod.namespace,
            pod.name,
            pod.ip.to_string(),
            if meshed {
                "namespace labelled nodemesh.io/acceleration=enabled"
            } else {
                "not in the mesh"
            }
        );
    }
    let status = node.status()?;
    let sockmap = &status.datapath.sockmap;
    if let Some(t) = &sockmap.selftest {
        println!(
            "sockmap self-test: data {}; blocking recv {}; fast path {} (mode {})",
            if t.passed { "intact" } else { "FAILED" },
            if t.blocking_recv_ok {
                "ok"
            } else {
                "can return EAGAIN on this kernel"
            },
            if sockmap.enabled { "on" } else { "off" },
            sockmap.mode
        );
    }

    println!("\n== flows (10 connections x 64 KiB echoed, every byte checked)\n");
    println!(
        "{:<22} {:<18} {:<18} result",
        "flow", "through node proxy", "destination saw"
    );
    for (from, to) in [
        (&frontend, &backend),
        (&frontend, &batch),
        (&batch, &backend),
    ] {
        flow(&node, from, to)?;
    }

    println!(
        "\n== round-trip latency, 64 B request/response, {} round trips, frontend -> backend\n",
        args.iterations
    );
    if !sockmap.enabled {
        println!(
            "(the agent kept sockmap off in auto mode; the third row switches it on at run time,"
        );
        println!(
            " as `sockmap.mode: on` would: nm-podapp retries EAGAIN like a robust application)\n"
        );
    }
    let paths = nodemesh_benches::paths::Paths::new(&node, &frontend, &backend);
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>14}",
        "path", "p50 us", "p90 us", "p99 us", "added p50 us"
    );
    let mut direct: Option<Latency> = None;
    for path in Path::ALL {
        let l = paths
            .measure(path, args.iterations, 64)
            .with_context(|| format!("measuring {path:?}"))?;
        let base = direct.get_or_insert(l).p50_us;
        println!(
            "{:<24} {:>9.1} {:>9.1} {:>9.1} {:>14.1}",
            path.label(),
            l.p50_us,
            l.p90_us,
            l.p99_us,
            l.p50_us - base
        );
    }
    // Leave the demo as configured: sockmap back to the agent's own decision.
    node.set_sockmap(sockmap.enabled)?;
    node.enable_namespace("shop")?;

    l7_from_the_control_plane(&mut node, &frontend, &backend, &resources)?;

    println!("\n== what the kernel programs counted (nodemesh status)\n");
    for p in node.status()?.counters {
        let detail: Vec<String> = p
            .detail
            .iter()
            .filter(|(_, v)| *v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "{:<9} hit {:>8}  miss {:>6}  fallback {:>6}  failure {:>3}   {}",
            p.program,
            p.hit,
            p.miss,
            p.fallback,
            p.failure,
            detail.join(" ")
        );
    }

    if args.keep {
        println!("\nkept running; inspect with:");
        println!(
            "  target/release/nodemesh status --run-dir {}",
            node.sim.run_dir().display()
        );
        println!("Ctrl-C to remove the node.");
        let (tx, rx) = std::sync::mpsc::channel();
        let _ = std::thread::spawn(move || {
            let _ = std::io::stdin().read_line(&mut String::new());
            let _ = tx.send(());
        });
        let _ = rx.recv();
    }
    node.cleanup_agent().context("removing the agent")?;
    println!(
        "\ncleaned up: agent stopped, programs detached and unpinned, namespaces and cgroups removed"
    );
    Ok(())
}

/// Sends checked traffic `from` -> `to` and reports whether the node proxy carried it.
fn flow(node: &MeshNode, from: &Pod, to: &Pod) -> anyhow::Result<()> {
    let accepted = || -> anyhow::Result<f64> {
        Ok(metric(
            &node.metrics()?,
            "nodemesh_proxy_accepted_connections_total",
            &[],
        ))
    };
    let before = accepted()?;
    let dst = format!("{}:{PORT}", to.ip);
    let report = node.podapp(
        from,
        &[
            "client",
            "--connect",
            &dst,
            "--connections",
            "10",
            "--bytes",
            "65536",
        ],
        T,
    )?;
    let proxied = accepted()? - before;
    let seen = if to.name == "backend" {
        let who = node.podapp(
            from,
            &["whoami", "--connect", &format!("{}:8081", to.ip)],
            T,
        )?;
        who["seen_as"]
            .as_str()
            .unwrap_or("?")
            .split(':')
            .next()
            .unwrap_or("?")
            .to_owned()
    } else {
        "-".to_owned()
    };
    if report["failed"] != 0 {
        bail!("{} -> {}: {report}", from.name, to.name);
    }
    println!(
        "{:<22} {:<18} {:<18} {} connections ok",
        format!("{} -> {}", from.name, to.name),
        if proxied >= 10.0 {
            "yes"
        } else if proxied == 0.0 {
            "no (direct)"
        } else {
            "partly?"
        },
        seen,
        report["ok"]
    );
    Ok(())
}

/// HTTP from frontend to backend's address on [`HTTP_PORT`], routed by the configuration
/// the control plane serves: first to backend, then (the folder changed) to a canary.
fn l7_from_the_control_plane(
    node: &mut MeshNode,
    frontend: &Pod,
    backend: &Pod,
    resources: &std::path::Path,
) -> anyhow::Result<()> {
    println!(
        "\n== L7 from the control plane: nodemesh controlplane on the node, the agent on ADS\n"
    );
    let canary = node.add_pod("canary", "shop")?;
    let _servers = [
        node.serve_http(backend, HTTP_PORT, "backend")?,
        node.serve_http(&canary, HTTP_PORT, "canary")?,
    ];
    let dst = format!("{}:{HTTP_PORT}", backend.ip);
    let clusters = [("backend", backend), ("canary", &canary)];
    let serve = |to: &str| -> anyhow::Result<()> {
        let written = Instant::now();
        xds::write_folder(resources, HTTP_PORT, "api.shop", &clusters, to)?;
        loop {
            let got = xds::upstream(node, frontend, &dst, "api.shop");
            if got.as_deref() == Ok(to) {
                println!(
                    "route api.shop -> {to:<8} served {:>5} ms after the folder changed; frontend's request to {dst} answered by {to}",
                    written.elapsed().as_millis()
                );
                return Ok(());
            }
            if written.elapsed() > T {
                bail!(
                    "api.shop never reached {to}: last {got:?}\n{}",
                    node.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    serve("backend")?;
    serve("canary")?;
    if let Some(x) = node.status()?.xds {
        println!(
            "xDS client: {} ({}), {}, {} snapshots published",
            x["server"].as_str().unwrap_or("?"),
            x["variant"].as_str().unwrap_or("?"),
            x["state"].as_str().unwrap_or("?"),
            x["published"]
        );
        for (ty, t) in x["types"].as_object().into_iter().flatten() {
            println!(
                "  {ty}: version {}, {} resources, {} ACKs, {} NACKs",
                t["version"].as_str().unwrap_or(""),
                t["resources"],
                t["acks"],
                t["nacks"]
            );
        }
    }
    Ok(())
}
