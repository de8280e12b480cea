//! `cargo xtask test`: everything CI checks, in order, failing fast with the step named.
//!
//! fmt, clippy (host and kernel programs), unit tests, build, then the privileged node tests
//! (`nodemesh-tests`) between a sweep of what crashed earlier runs left in the kernel and a
//! check that this run left nothing. Before the node tests, the container image is built
//! (`image.rs`) for the tests that run it (`tests/tests/image.rs`).
use anyhow::bail;

use crate::leftovers::{self, Leftover, Owner, Places};
use crate::steps::Steps;
use crate::workspace::{EBPF_PACKAGE, NODE_TESTS_PACKAGE, Workspace};
use crate::{cmd_build, image, setup, util};

#[derive(Debug, Clone, Default)]
pub struct TestOpts {
    /// Only fmt, clippy, unit tests and build.
    pub unit: bool,
    /// A test-name filter for the node tests.
    pub filter: Option<String>,
    pub skip_setup: bool,
}

pub fn run(ws: &Workspace, steps: &mut Steps, opts: &TestOpts) -> anyhow::Result<()> {
    if opts.skip_setup {
        steps.skip("setup", "--skip-setup");
    } else {
        setup::run(ws, steps)?;
    }
    let lint_fix = "fix the lints above (`cargo clippy --fix` handles many); a deliberate \
                    exception gets `#[expect(clippy::..., reason = \"...\")]`";
    steps.run("fmt", "cargo fmt --all --check", || {
        util::run(
            ws.cargo().args(["fmt", "--all", "--check"]),
            "run `cargo fmt --all` and commit the result",
        )
    })?;
    steps.run("clippy", "lints of every host crate, all targets", || {
        util::run(
            ws.cargo()
                .args([
                    "clippy",
                    "--workspace",
                    "--exclude",
                    EBPF_PACKAGE,
                    "--all-targets",
                ])
                .args(["--", "-D", "warnings"]),
            lint_fix,
        )
    })?;
    // The kernel programs as aya-build compiles them (nightly, BPF target, build-std=core).
    // clippy only checks, so neither bpf-linker nor the release profile aya-build uses is
    // involved; run from the workspace root so that the workspace's lints apply.
    steps.run(
        "clippy: kernel programs",
        "lints of nodemesh-ebpf for bpfel-unknown-none",
        || {
            util::run(
                ws.cargo()
                    .args(["+nightly", "clippy", "-p", EBPF_PACKAGE])
                    .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
                    .args(["--", "-D", "warnings"]),
                "fix the lints above in ebpf/programs (rerun the command above to check; add \
                 `--fix --allow-dirty` after `clippy` to apply the suggestions)",
            )
        },
    )?;
    steps.run(
        "unit tests",
        "every crate but the kernel programs and node tests",
        || {
            util::run(
                ws.cargo().args([
                    "test",
                    "--workspace",
                    "--exclude",
                    EBPF_PACKAGE,
                    "--exclude",
                    NODE_TESTS_PACKAGE,
                ]),
                "fix the failing tests above (`cargo test -p <crate> <name>` reruns one)",
            )
        },
    )?;
    cmd_build::build_bins(ws, steps, false)?;
    if opts.unit {
        return Ok(());
    }
    node_tests(ws, steps, opts.filter.as_deref())
}

fn node_tests(ws: &Workspace, steps: &mut Steps, filter: Option<&str>) -> anyhow::Result<()> {
    if util::unprivileged_requested() {
        steps.skip_loudly(
            "node tests",
            "NODEMESH_UNPRIVILEGED=1: the privileged node tests (and their sweep and leftover \
             check) did NOT run",
        );
        return Ok(());
    }
    if !util::is_root() {
        return steps.run("node tests", "nodemesh-tests on the real kernel", || {
            bail!(
                "the node tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run as root; \
                 only on a machine that cannot, set NODEMESH_UNPRIVILEGED=1 to skip them \
                 (CI must not)"
            )
        });
    }
    let places = Places::system();
    steps.run(
        "sweep",
        "remove nodemesh-sim-* left by crashed runs",
        || sweep(&places),
    )?;
    let podman_conf = if image::selected(filter) {
        Some(image::build(ws, steps)?)
    } else {
        steps.skip("image", "the filter selects no image_* test");
        None
    };
    let bin_dir = ws.bin_dir(false);
    let tests = steps.run("node tests", "nodemesh-tests on the real kernel", || {
        let mut cmd = ws.cargo();
        cmd.env("NODEMESH_BIN_DIR", &bin_dir);
        if let Some(conf) = &podman_conf {
            cmd.env(image::IMAGE_ENV, image::IMAGE)
                .env("CONTAINERS_CONF", conf);
        }
        cmd.args(["test", "-p", NODE_TESTS_PACKAGE, "--", "--test-threads=2"])
            .args(filter);
        let fix = format!(
            "fix the failing tests above; rerun one with `NODEMESH_BIN_DIR={} cargo test -p \
             {NODE_TESTS_PACKAGE} -- <name>` (or `cargo xtask test --filter <name>`)",
            bin_dir.display()
        );
        util::run(&mut cmd, &fix)
    });
    // Checked after a failure too: a failing test is the likeliest to leak.
    let check = steps.run(
        "leftover check",
        "nothing nodemesh-sim-* left behind",
        || check_clean(&places),
    );
    if let (Err(_), Err(leak)) = (&tests, &check) {
        println!("    (also: {leak:#})");
    }
    tests.and(check)
}

fn sweep(places: &Places) -> anyhow::Result<()> {
    let found = leftovers::list(places)?;
    print_others(&found);
    let removed = leftovers::sweep(&found)?;
    if removed.is_empty() {
        println!("    nothing stale");
    }
    for r in removed {
        println!("    removed {r}");
    }
    Ok(())
}

fn check_clean(places: &Places) -> anyhow::Result<()> {
    let found = leftovers::list(places)?;
    print_others(&found);
    let ours: Vec<String> = found
        .iter()
        .filter(|l| matches!(l.owner, Owner::Dead(_)))
        .map(|l| format!("  {l}"))
        .collect();
    if !ours.is_empty() {
        bail!(
            "the node tests left these behind:\n{}\nmake the test that created them clean up \
             on every path (its guards' Drop); the next `cargo xtask test` sweeps them",
            ours.join("\n")
        );
    }
    println!("    clean");
    Ok(())
}

/// What is not ours to remove or to blame this run for, said once so nobody wonders.
fn print_others(found: &[Leftover]) {
    for l in found {
        match l.owner {
            Owner::Alive(_) => println!("    ignored (a concurrent run's): {l}"),
            Owner::Unknown => println!("    ignored (not made by the fixture): {l}"),
            Owner::Dead(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_fails_on_what_a_dead_run_left_and_ignores_the_rest() {
        let cgroups = tempfile::tempdir().expect("tempdir");
        let bpffs = tempfile::tempdir().expect("tempdir");
        let places = Places {
            cgroup_root: cgroups.path().to_owned(),
            bpffs_root: bpffs.path().to_owned(),
            system_tools: false,
        };
        let me = std::process::id();
        std::fs::create_dir(bpffs.path().join(format!("nodemesh-sim-t-{me}-0"))).expect("mkdir");
        std::fs::create_dir(bpffs.path().join("nodemesh-sim-by-hand")).expect("mkdir");
        check_clean(&places).expect("a live run's and unknown entries are not this run's");

        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let dead = child.id();
        child.wait().expect("wait");
        let leaked = cgroups.path().join(format!("nodemesh-sim-t-{dead}-3"));
        std::fs::create_dir(&leaked).expect("mkdir");
        let err = check_clean(&places).expect_err("a leak fails the check");
        let msg = format!("{err:#}");
        assert!(msg.contains(&leaked.display().to_string()), "{msg}");
    }
}
