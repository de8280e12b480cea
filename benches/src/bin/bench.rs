//! `nodemesh-bench` (run it with `cargo xtask bench [--part NAME]`): the data-path benchmark
//! parts (see `nodemesh_benches::parts`), each measured in interleaved rounds on one
//! simulated node, each row verified with the kernel and proxy counters.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use nodemesh_benches::parts::{self, Common};

#[derive(Parser)]
struct Args {
    /// Where the results go.
    #[arg(long)]
    out_dir: PathBuf,
    /// A short run: a smoke check, not numbers to publish.
    #[arg(long)]
    quick: bool,
    /// Which parts to run (repeatable); all by default.
    #[arg(long = "part", value_enum)]
    parts: Vec<Part>,
    /// Rounds (each measures every path once, in rotating order).
    #[arg(long)]
    rounds: Option<usize>,
    /// tcp: round trips per path and round.
    #[arg(long)]
    iterations: Option<usize>,
    /// tcp: request and response size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    /// 64-byte TCP round trips: direct, node proxy, node proxy + sockmap.
    Tcp,
    /// HTTP/1.1, h2c, gRPC through the L7 node proxy: latency, throughput, CPU.
    Http,
    /// A quiet pod's latency while another pod floods the node proxy.
    Tenants,
    /// nodemesh against Envoy sidecar pairs and a node-level Envoy; density; cost growth.
    Sidecars,
    /// 1,000 services from `nodemesh controlplane`: apply time, RSS, change to serving.
    Xds,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let common = Common {
        out_dir: args.out_dir.clone(),
        quick: args.quick,
    };
    let selected = if args.parts.is_empty() {
        vec![Part::Tcp, Part::Http, Part::Tenants, Part::Sidecars]
    } else {
        args.parts.clone()
    };
    for part in selected {
        eprintln!("== part {part:?}");
        match part {
            Part::Tcp => parts::tcp::run(&common, args.size, args.rounds, args.iterations),
            Part::Http => parts::http::run(&common, args.rounds),
            Part::Tenants => parts::tenants::run(&common, args.rounds),
            Part::Sidecars => parts::sidecars::run(&common, args.rounds),
            Part::Xds => parts::xds::run(&common, args.rounds),
        }
        .with_context(|| format!("part {part:?}"))?;
    }
    Ok(())
}
