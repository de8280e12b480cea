//! `cargo xtask bench`: runs `nodemesh-bench` (benches/src/bin/bench.rs) from the fresh
//! release build: its parts (`tcp`: round trips direct, through the node proxy and with
//! sockmap; `http`: HTTP/1.1, h2c and gRPC through the L7 node proxy), in interleaved
//! rounds; JSON and Markdown per part in `out_dir`.
use std::path::PathBuf;
use std::process::Command;

use crate::util;

#[derive(Debug, Clone)]
pub struct BenchOpts {
    /// A short run for a smoke check rather than numbers worth publishing.
    pub quick: bool,
    /// Where results go (default `<target dir>/bench`, i.e. `<workspace>/target/bench`).
    pub out_dir: PathBuf,
    /// Where the built (release) `nodemesh` binaries are.
    pub bin_dir: PathBuf,
    /// Only these parts (`nodemesh-bench --part`); all when empty.
    pub parts: Vec<String>,
}

pub fn run(opts: &BenchOpts) -> anyhow::Result<()> {
    let mut cmd = Command::new(opts.bin_dir.join("nodemesh-bench"));
    cmd.env("NODEMESH_BIN_DIR", &opts.bin_dir)
        .arg("--out-dir")
        .arg(&opts.out_dir);
    if opts.quick {
        cmd.arg("--quick");
    }
    for part in &opts.parts {
        cmd.args(["--part", part]);
    }
    util::run(
        &mut cmd,
        "the benchmark failed; its output above names the path and round (nothing else may load \
         the machine while it runs)",
    )
}
