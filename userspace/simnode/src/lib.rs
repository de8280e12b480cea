//! A simulated Kubernetes node on one machine, for nodemesh's node tests, demo and
//! benchmarks: everything a node proxy touches on a real node, made for real.
//!
//! - the node: its own network namespace with a bridge (`198.18.0.1/24`, where the node proxy
//!   listens) and its own cgroup v2 subtree (`pods/` and `agent/`), so nothing of the test
//!   reaches the machine's own namespaces or cgroups;
//! - a pod: a network namespace with a veth into the bridge, an address in `198.18.0.0/24`,
//!   and a cgroup under `pods/` that its processes are placed in before they exec;
//! - processes: started inside a pod (or the node) by `setns(2)` + `cgroup.procs` in a
//!   `pre_exec` hook, output captured to files, killed by pid.
//!
//! Every object is named `nodemesh-sim-<label>[.<pod>]-<pid>-<n>` (the creating pid second to
//! last), so concurrent runs never collide and [`sweep_stale`] can remove what a crashed run
//! left. [`SimNode`] cleans up on drop, on panic too.
//!
//! Must not: attach anything to the root cgroup, touch objects it did not create, or send
//! traffic anywhere but its own namespaces.

mod cmd;
pub mod echo;
mod error;
pub mod load;
mod node;
mod process;
pub mod services;
mod sweep;

pub use error::SimError;
pub use node::{Pod, SimNode};
pub use process::Process;
pub use sweep::{PREFIX, sweep_stale};

use std::path::PathBuf;

/// The cgroup v2 mount (hybrid layout on these machines); `NODEMESH_CGROUP2_ROOT` overrides.
pub fn cgroup2_root() -> PathBuf {
    std::env::var_os("NODEMESH_CGROUP2_ROOT")
        .map_or_else(|| "/sys/fs/cgroup/unified".into(), PathBuf::from)
}

/// Where bpffs is mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Locates a workspace binary: `$NODEMESH_BIN_DIR/<name>`, or the cargo profile directory
/// of the running executable (`target/<profile>/` from `target/<profile>/deps/<test>`).
pub fn bin_path(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("NODEMESH_BIN_DIR") {
        let path = PathBuf::from(dir).join(name);
        if path.exists() {
            return path;
        }
        panic!("{} does not exist (NODEMESH_BIN_DIR)", path.display());
    }
    let exe = std::env::current_exe().unwrap_or_default();
    for dir in exe.ancestors().skip(1).take(3) {
        let path = dir.join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "binary {name} not found next to {} or above; run `cargo build --bins` (cargo xtask test does) \
         or set NODEMESH_BIN_DIR",
        exe.display()
    );
}

/// Whether this process may run the node tests. Without root it panics, unless
/// `NODEMESH_UNPRIVILEGED=1` says the machine is unprivileged: then it prints a loud notice
/// and returns false (the caller returns early).
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("NODEMESH_UNPRIVILEGED").is_ok_and(|v| v == "1") {
        eprintln!(
            "SKIPPED: this node test needs root; NODEMESH_UNPRIVILEGED=1 says this machine has none"
        );
        return false;
    }
    panic!(
        "this test needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); set NODEMESH_UNPRIVILEGED=1 to \
         skip on an unprivileged machine"
    );
}
