//! The bpf filesystem at /sys/fs/bpf, where the loader and the tests pin maps and links. It is
//! not mounted at boot on these machines.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::steps::Check;
use crate::util;

const BPFFS: &str = "/sys/fs/bpf";

pub fn check() -> anyhow::Result<Check> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    Ok(if is_bpf_mount(&mounts, BPFFS) {
        Check::Present(format!("bpf mounted at {BPFFS}"))
    } else if !util::is_root() && util::unprivileged_requested() {
        Check::NotNeeded("not root and NODEMESH_UNPRIVILEGED=1: nothing will pin".into())
    } else {
        Check::Missing(format!("{BPFFS} is not a bpf mount"))
    })
}

pub fn mount() -> anyhow::Result<()> {
    if !util::is_root() {
        bail!(
            "mounting bpffs needs root: run `sudo mount -t bpf bpf {BPFFS}` or \
             `sudo cargo xtask setup`"
        );
    }
    util::run(
        Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]),
        "the kernel needs CONFIG_BPF_SYSCALL and the process CAP_SYS_ADMIN",
    )
}

/// Whether `/proc/mounts` shows a bpf filesystem mounted exactly at `at`.
fn is_bpf_mount(mounts: &str, at: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next(), fields.next(), fields.next());
        target == Some(at) && fstype == Some("bpf")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_bpf_mount_by_target_and_type() {
        let mounts = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n";
        assert!(is_bpf_mount(mounts, "/sys/fs/bpf"));
        assert!(!is_bpf_mount("sysfs /sys sysfs rw 0 0\n", "/sys/fs/bpf"));
        // Something else mounted there is not bpffs.
        assert!(!is_bpf_mount(
            "tmpfs /sys/fs/bpf tmpfs rw 0 0\n",
            "/sys/fs/bpf"
        ));
        assert!(!is_bpf_mount(
            "bpf /sys/fs/bpf/x bpf rw 0 0\n",
            "/sys/fs/bpf"
        ));
    }
}
