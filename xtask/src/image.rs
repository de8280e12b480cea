//! The container image (`deploy/Dockerfile`), built for real with podman and no container
//! registry: its two base images are made here from Debian packages (deploy/offline/).
//!
//! 1. `localhost/nmimg-bookworm:<hash>`: a minimal bookworm rootfs (mmdebstrap, from the
//!    Debian mirror apt already uses), imported.
//! 2. `localhost/nmimg-rust:<stable>-<hash>`: the stand-in for `rust:<stable>-bookworm`
//!    (build-essential, curl, rustup installing the host's stable).
//! 3. `localhost/nmimg-runtime:<hash>`: the stand-in for `distroless/cc` (glibc, libgcc_s,
//!    CA certificates; no shell).
//! 4. [`IMAGE`]: deploy/Dockerfile with those two as `--build-arg`s; its cache mounts (cargo
//!    registry, target) make a rebuild after a source change incremental.
//!
//! The tags carry a hash of what made them, so a changed Containerfile is rebuilt and an
//! unchanged one is found and skipped ("already present"). Podman runs with this machine's
//! [`containers.conf`](podman_conf): see [`podman_conf_text`] for why each setting is there.
//! Builds use the host network (crates.io, static.rust-lang.org, the Debian mirror) and the
//! host's CA bundle, bind-mounted (never copied into an image), so that a TLS proxy the host
//! trusts is trusted inside the build too.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::steps::{Check, Steps};
use crate::util;
use crate::workspace::Workspace;

/// What `cargo xtask test` builds and the image tests (`tests/tests/image.rs`) run.
pub const IMAGE: &str = "localhost/nmimg-nodemesh:test";

/// The environment variable that tells the image tests which image to run.
pub const IMAGE_ENV: &str = "NODEMESH_IMAGE";

const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
const SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
const HOST_CA: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The base images, tagged by content (see the module documentation).
#[derive(Debug, Clone)]
pub struct Bases {
    pub bookworm: String,
    pub build: String,
    pub runtime: String,
}

impl Bases {
    fn new(ws: &Workspace, rust_version: &str) -> anyhow::Result<Self> {
        let offline = ws.root.join("deploy/offline");
        let read = |name: &str| {
            let path = offline.join(name);
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
        };
        let bookworm_hash = fnv1a(mmdebstrap_args("-").join(" ").as_bytes());
        let bookworm = format!("localhost/nmimg-bookworm:{bookworm_hash:08x}");
        let build = format!(
            "localhost/nmimg-rust:{rust_version}-{:08x}",
            fnv1a(&[bookworm.as_bytes(), &read("Containerfile.build")?].concat())
        );
        let runtime = format!(
            "localhost/nmimg-runtime:{:08x}",
            fnv1a(&[bookworm.as_bytes(), &read("Containerfile.runtime")?].concat())
        );
        Ok(Self {
            bookworm,
            build,
            runtime,
        })
    }
}

/// `cargo xtask image` and the image steps of `cargo xtask test`: the base images (each
/// skipped when present), then deploy/Dockerfile. Returns the containers.conf to run
/// podman with.
pub fn build(ws: &Workspace, steps: &mut Steps) -> anyhow::Result<PathBuf> {
    let conf = podman_conf(ws)?;
    let rust_version = host_rust_version(ws)?;
    let bases = Bases::new(ws, &rust_version)?;
    let podman = || podman(&conf);

    steps.ensure(
        "image: bookworm rootfs",
        &bases.bookworm,
        || exists(podman(), &bases.bookworm),
        || import_bookworm(ws, podman(), &bases.bookworm),
    )?;
    for (name, file, tag) in [
        ("image: build base", "Containerfile.build", &bases.build),
        (
            "image: runtime base",
            "Containerfile.runtime",
            &bases.runtime,
        ),
    ] {
        steps.ensure(
            name,
            tag,
            || exists(podman(), tag),
            || {
                let mut cmd = podman();
                build_command(&mut cmd)
                    .arg("--build-arg")
                    .arg(format!("BOOKWORM={}", bases.bookworm))
                    .arg("--build-arg")
                    .arg(format!("RUST_VERSION={rust_version}"))
                    .arg("-f")
                    .arg(ws.root.join("deploy/offline").join(file))
                    .args(["-t", tag])
                    .arg(ws.root.join("deploy/offline"));
                util::run(&mut cmd, BUILD_FIX)
            },
        )?;
    }
    steps.run(
        "image: build",
        &format!("deploy/Dockerfile -> {IMAGE}"),
        || {
            let mut cmd = podman();
            build_command(&mut cmd)
                .arg("--build-arg")
                .arg(format!("BUILD_IMAGE={}", bases.build))
                .arg("--build-arg")
                .arg(format!("RUNTIME_IMAGE={}", bases.runtime))
                .arg("--ignorefile")
                .arg(ws.root.join("deploy/Dockerfile.dockerignore"))
                .arg("-f")
                .arg(ws.root.join("deploy/Dockerfile"))
                .args(["-t", IMAGE])
                .arg(&ws.root);
            util::run(&mut cmd, BUILD_FIX)
        },
    )?;
    Ok(conf)
}

const BUILD_FIX: &str = "see the build output above; the build needs the Debian mirror, \
                         static.rust-lang.org and crates.io (host network)";

/// `podman build` with what every build here needs.
fn build_command(cmd: &mut Command) -> &mut Command {
    // Only local images: a pull would go to a registry this machine cannot reach.
    cmd.args(["build", "--pull=never", "--network", "host"]);
    if Path::new(HOST_CA).is_file() {
        cmd.arg("--volume")
            .arg(format!("{HOST_CA}:/etc/ssl/certs/ca-certificates.crt:ro"));
    }
    cmd
}

/// A podman command using `conf`.
pub fn podman(conf: &Path) -> Command {
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", conf);
    cmd
}

fn exists(mut podman: Command, tag: &str) -> anyhow::Result<Check> {
    let out = util::output(podman.args(["image", "exists", tag]))
        .context("podman is missing (`cargo xtask setup` installs it)")?;
    Ok(if out.status.success() {
        Check::Present(tag.to_owned())
    } else {
        Check::Missing("not built yet".into())
    })
}

fn mmdebstrap_args(out: &str) -> Vec<String> {
    vec![
        "--variant=minbase".into(),
        "--include=ca-certificates".into(),
        "--mode=root".into(),
        SUITE.into(),
        out.into(),
        format!("deb {MIRROR} {SUITE} main"),
        format!("deb {MIRROR} {SUITE}-updates main"),
        format!("deb {SECURITY_MIRROR} {SUITE}-security main"),
    ]
}

fn import_bookworm(ws: &Workspace, mut podman: Command, tag: &str) -> anyhow::Result<()> {
    let dir = ws.build_dir().join("image");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tar = dir.join("nmimg-bookworm.tar");
    let tar_arg = tar.display().to_string();
    util::run(
        Command::new("nice")
            .args(["-n", "10", "mmdebstrap"])
            .args(mmdebstrap_args(&tar_arg)),
        "mmdebstrap needs the Debian mirror (deb.debian.org) and root",
    )?;
    let imported = util::run(
        podman
            .args(["import", "--change", "CMD [\"/bin/bash\"]"])
            .arg(&tar)
            .arg(tag),
        "see podman's error above",
    );
    std::fs::remove_file(&tar).with_context(|| format!("removing {}", tar.display()))?;
    imported
}

/// The host's stable rustc version (`1.95.0`): the build image gets the same.
fn host_rust_version(ws: &Workspace) -> anyhow::Result<String> {
    let out = util::stdout(Command::new("rustc").current_dir(&ws.root).arg("--version"))?;
    parse_rustc_version(&out)
        .map(str::to_owned)
        .with_context(|| format!("no version in `rustc --version`: {out}"))
}

fn parse_rustc_version(out: &str) -> Option<&str> {
    let v = out.strip_prefix("rustc ")?.split_whitespace().next()?;
    v.chars()
        .all(|c| c.is_ascii_digit() || c == '.')
        .then_some(v)
}

/// Writes `<build dir>/podman/containers.conf` for this machine and returns its path.
pub fn podman_conf(ws: &Workspace) -> anyhow::Result<PathBuf> {
    let limits = std::fs::read_to_string("/proc/self/limits").context("/proc/self/limits")?;
    let nofile = hard_limit(&limits, "Max open files").unwrap_or(1024);
    let nproc = hard_limit(&limits, "Max processes").unwrap_or(4096);
    let dir = ws.build_dir().join("podman");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("containers.conf");
    std::fs::write(&path, podman_conf_text(nofile, nproc))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The hard limit on the `name` line of `/proc/<pid>/limits` (`None` for "unlimited").
fn hard_limit(limits: &str, name: &str) -> Option<u64> {
    let rest = limits.lines().find_map(|l| l.strip_prefix(name))?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn podman_conf_text(nofile: u64, nproc: u64) -> String {
    // Podman as root raises RLIMIT_NOFILE/NPROC to 1048576 in every container, which needs
    // CAP_SYS_RESOURCE; these VMs' root lacks it ("setrlimit: Operation not permitted"), so
    // the containers get the host's own hard limits (nproc at most podman's 32768 for
    // conmon, which a container cannot exceed).
    let nofile = nofile.min(1 << 20);
    let nproc = nproc.min(32768);
    format!(
        "# Written by `cargo xtask` (xtask/src/image.rs) for this machine.\n\
         [containers]\n\
         default_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\
         # No bridge: a container gets the network it is given (host, a test's netns, none),\n\
         # and podman never adds a bridge or iptables rules to the machine.\n\
         netns = \"none\"\n\
         [engine]\n\
         # crun refuses the hybrid cgroup layout when a controller is bound to the v2\n\
         # hierarchy (hugetlb is, here); runc handles it.\n\
         runtime = \"runc\"\n\
         cgroup_manager = \"cgroupfs\"\n\
         events_logger = \"file\"\n"
    )
}

/// FNV-1a, 32 bits: a tag that changes with what made the image, stable across Rust versions.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Whether the node tests selected by `filter` include the image tests (`image_*`).
pub fn selected(filter: Option<&str>) -> bool {
    filter.is_none_or(|f| "image_".contains(f) || f.starts_with("image_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_limits_are_read_from_proc_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max processes             96362                96362                processes\n\
                      Max open files            20000                20000                files\n\
                      Max locked memory         unlimited            unlimited            bytes\n";
        assert_eq!(hard_limit(limits, "Max open files"), Some(20000));
        assert_eq!(hard_limit(limits, "Max processes"), Some(96362));
        assert_eq!(hard_limit(limits, "Max locked memory"), None);
        let conf = podman_conf_text(20000, 96362);
        assert!(
            conf.contains(r#"default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]"#),
            "{conf}"
        );
    }

    #[test]
    fn the_rust_version_comes_from_rustc() {
        assert_eq!(
            parse_rustc_version("rustc 1.95.0 (59807616e 2026-04-14)\n"),
            Some("1.95.0")
        );
        assert_eq!(parse_rustc_version("rustc 1.97.0-nightly (x)"), None);
    }

    #[test]
    fn the_filter_selects_the_image_tests() {
        assert!(selected(None));
        assert!(selected(Some("image")));
        assert!(selected(Some("image_agent")));
        assert!(!selected(Some("restart")));
    }
}
