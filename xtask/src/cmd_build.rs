//! `cargo xtask build`: every host binary of the workspace (the kernel programs come with
//! them: the loader's build script builds and embeds them).
use crate::steps::Steps;
use crate::util;
use crate::workspace::{EBPF_PACKAGE, Workspace};

/// `cargo build --workspace --bins --exclude nodemesh-ebpf [--release]`. `--workspace` takes
/// the test and bench crates' binaries too (default-members leave them out); the eBPF crate
/// only builds for the BPF target, so it is excluded here.
pub fn build_bins(ws: &Workspace, steps: &mut Steps, release: bool) -> anyhow::Result<()> {
    let mut cmd = ws.cargo();
    cmd.args(["build", "--workspace", "--bins", "--exclude", EBPF_PACKAGE]);
    if release {
        cmd.arg("--release");
    }
    let what = format!("all binaries into {}", ws.bin_dir(release).display());
    steps.run("build", &what, || {
        util::run(
            &mut cmd,
            "fix the compile errors above; if the kernel programs fail to build, run \
             `cargo xtask setup`",
        )
    })
}
