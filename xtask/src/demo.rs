//! `cargo xtask demo`: a simulated node with meshed pods, end to end (not written yet).
use std::path::PathBuf;

use anyhow::bail;

#[derive(Debug, Clone)]
pub struct DemoOpts {
    /// Whether `bin_dir` holds a release build.
    pub release: bool,
    /// Where the built `nodemesh` binaries are.
    pub bin_dir: PathBuf,
    /// Leave the simulated node running after the demo (for poking at it).
    pub keep: bool,
}

pub fn run(opts: &DemoOpts) -> anyhow::Result<()> {
    println!(
        "demo: not implemented yet (release={}, bin_dir={}, keep={})",
        opts.release,
        opts.bin_dir.display(),
        opts.keep
    );
    bail!("`cargo xtask demo` is not implemented yet")
}
