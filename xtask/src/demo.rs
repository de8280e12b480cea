//! `cargo xtask demo`: runs `nodemesh-demo` (benches/src/bin/demo.rs) from the fresh build:
//! a simulated node with three pods in two namespaces, the real agent, real traffic, and a
//! short report. The demo itself lives with the benchmarks because it uses the same node
//! harness; xtask only builds and launches it, so that `cargo xtask setup` never has to
//! compile the kernel programs before it has installed what they need.
use std::path::PathBuf;
use std::process::Command;

use crate::util;

#[derive(Debug, Clone)]
pub struct DemoOpts {
    /// Whether `bin_dir` holds a release build.
    pub release: bool,
    /// Where the built `nodemesh` binaries are.
    pub bin_dir: PathBuf,
    /// Leave the simulated node running after the demo (for poking at it).
    pub keep: bool,
    /// `basic` or `namespaces` (benches/src/namespaces.rs).
    pub scenario: String,
}

pub fn run(opts: &DemoOpts) -> anyhow::Result<()> {
    let mut cmd = Command::new(opts.bin_dir.join("nodemesh-demo"));
    cmd.env("NODEMESH_BIN_DIR", &opts.bin_dir);
    if opts.keep {
        cmd.arg("--keep");
    }
    cmd.args(["--scenario", &opts.scenario]);
    if !opts.release {
        // Debug builds are slow on the data path; fewer round trips keep the demo short.
        cmd.args(["--iterations", "1000"]);
    }
    util::run(
        &mut cmd,
        "the demo failed; its output above names the step (rerun with RUST_LOG=debug for the agent's log)",
    )
}
