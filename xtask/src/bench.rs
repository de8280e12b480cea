//! `cargo xtask bench`: data-path benchmarks on a simulated node (not written yet).
use std::path::PathBuf;

use anyhow::bail;

#[derive(Debug, Clone)]
pub struct BenchOpts {
    /// A short run for a smoke check rather than numbers worth publishing.
    pub quick: bool,
    /// Where results go (default `<target dir>/bench`, i.e. `<workspace>/target/bench`).
    pub out_dir: PathBuf,
    /// Where the built (release) `nodemesh` binaries are.
    pub bin_dir: PathBuf,
}

pub fn run(opts: &BenchOpts) -> anyhow::Result<()> {
    println!(
        "bench: not implemented yet (quick={}, out_dir={}, bin_dir={})",
        opts.quick,
        opts.out_dir.display(),
        opts.bin_dir.display()
    );
    bail!("`cargo xtask bench` is not implemented yet")
}
