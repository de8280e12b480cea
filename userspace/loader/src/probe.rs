//! Start-up probes: everything the agent needs from the kernel, each checked on its own so
//! that a refusal names exactly what is missing (and the README's table lists the same).
use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
    util::KernelVersion,
};

use crate::LoaderError;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `SO_NETNS_COOKIE` (Linux 5.14).
pub const SO_NETNS_COOKIE: libc::c_int = 71;

/// The outcome of one probe.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub feature: String,
    pub needed_for: &'static str,
    pub ok: bool,
    /// Why it failed, or a note (e.g. "could not probe").
    pub detail: String,
}

impl Check {
    fn new(
        feature: impl Into<String>,
        needed_for: &'static str,
        result: Result<(), String>,
    ) -> Self {
        let (ok, detail) = match result {
            Ok(()) => (true, String::new()),
            Err(detail) => (false, detail),
        };
        Self {
            feature: feature.into(),
            needed_for,
            ok,
            detail,
        }
    }
}

fn fs_magic(path: &Path) -> Result<i64, String> {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0)
        .map_err(|e| format!("statfs {}: {e}", path.display()))
}

/// The nearest existing ancestor of `path` (the pin directory may not exist yet).
fn existing_ancestor(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_owned()
}

fn program(ty: ProgramType) -> Result<(), String> {
    match is_program_supported(ty) {
        Ok(true) => Ok(()),
        Ok(false) => Err("not supported by this kernel".into()),
        Err(e) => Err(format!("probe failed: {e}")),
    }
}

fn map(ty: MapType) -> Result<(), String> {
    match is_map_supported(ty) {
        Ok(true) => Ok(()),
        Ok(false) => Err("not supported by this kernel".into()),
        Err(e) => Err(format!("probe failed: {e}")),
    }
}

fn helper(ty: ProgramType, helper: BpfHelper) -> Result<(), String> {
    match is_helper_supported(ty, helper) {
        Ok(true) => Ok(()),
        Ok(false) => Err("not available to this program type on this kernel".into()),
        Err(e) => Err(format!("probe failed: {e}")),
    }
}

/// The network namespace cookie of the namespace `socket` was created in
/// (`SO_NETNS_COOKIE`, Linux 5.14): what `bpf_get_netns_cookie()` returns for its sockets.
pub fn netns_cookie(socket: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket, out pointer and length for an 8-byte option.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    if ret == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn netns_cookie_sockopt() -> Result<(), String> {
    use std::os::fd::AsFd as _;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("socket: {e}"))?;
    netns_cookie(sock.as_fd())
        .map(drop)
        .map_err(|e| e.to_string())
}

fn kernel_at_least(major: u8, minor: u8) -> Result<(), String> {
    let current = KernelVersion::current().map_err(|e| format!("reading the version: {e}"))?;
    if current >= KernelVersion::new(major, minor, 0) {
        Ok(())
    } else {
        Err(format!("running {current:?}"))
    }
}

/// Runs every probe. `cgroup` is where the programs will be attached, `bpffs` where they
/// will be pinned.
pub fn run(cgroup: &Path, bpffs: &Path) -> Vec<Check> {
    use aya::sys::BpfHelper as H;
    let mut checks = vec![
        Check::new(
            format!("cgroup v2 hierarchy at {}", cgroup.display()),
            "attaching the programs to the pods' cgroups",
            fs_magic(cgroup).and_then(|m| {
                (m == CGROUP2_SUPER_MAGIC).then_some(()).ok_or_else(|| {
                    "not a cgroup2 directory (mount cgroup v2 or fix `cgroup_path`)".into()
                })
            }),
        ),
        Check::new(
            format!("bpffs at {}", existing_ancestor(bpffs).display()),
            "pinning programs and maps so an agent restart keeps connections",
            fs_magic(&existing_ancestor(bpffs)).and_then(|m| {
                (m == BPF_FS_MAGIC)
                    .then_some(())
                    .ok_or_else(|| "not on bpffs (run `mount -t bpf bpf /sys/fs/bpf`)".into())
            }),
        ),
        Check::new(
            "Linux >= 5.15",
            "netns cookies in sock_ops/sk_msg, pinnable cgroup links, BPF_LINK_UPDATE",
            kernel_at_least(5, 15),
        ),
        Check::new(
            "SO_NETNS_COOKIE socket option",
            "identifying pods by network namespace",
            netns_cookie_sockopt(),
        ),
        Check::new(
            "BPF_PROG_TYPE_CGROUP_SOCK_ADDR",
            "connect4/connect6 capture",
            program(ProgramType::CgroupSockAddr),
        ),
        Check::new(
            "BPF_PROG_TYPE_SOCK_OPS",
            "recording original destinations, filling the SockHash",
            program(ProgramType::SockOps),
        ),
        Check::new(
            "BPF_PROG_TYPE_SK_MSG (CONFIG_NET_SOCK_MSG)",
            "socket-to-socket redirect",
            program(ProgramType::SkMsg),
        ),
        Check::new(
            "BPF_MAP_TYPE_SOCKHASH (CONFIG_BPF_STREAM_PARSER)",
            "socket-to-socket redirect",
            map(MapType::SockHash),
        ),
        Check::new(
            "BPF_MAP_TYPE_LRU_HASH",
            "original destinations",
            map(MapType::LruHash),
        ),
        Check::new(
            "BPF_MAP_TYPE_PERCPU_ARRAY",
            "counters",
            map(MapType::PerCpuArray),
        ),
    ];
    for (ty, ty_name, h, h_name, needed_for) in [
        (
            ProgramType::SockOps,
            "sock_ops",
            H::BPF_FUNC_get_netns_cookie,
            "bpf_get_netns_cookie",
            "recognising pod sockets",
        ),
        (
            ProgramType::SockOps,
            "sock_ops",
            H::BPF_FUNC_get_socket_cookie,
            "bpf_get_socket_cookie",
            "recording original destinations",
        ),
        (
            ProgramType::SockOps,
            "sock_ops",
            H::BPF_FUNC_sock_hash_update,
            "bpf_sock_hash_update",
            "filling the SockHash",
        ),
        (
            ProgramType::SkMsg,
            "sk_msg",
            H::BPF_FUNC_msg_redirect_hash,
            "bpf_msg_redirect_hash",
            "socket-to-socket redirect",
        ),
    ] {
        checks.push(Check::new(
            format!("{h_name} in {ty_name}"),
            needed_for,
            helper(ty, h),
        ));
    }
    checks
}

/// Runs every probe and fails naming each missing feature.
pub fn require(cgroup: &Path, bpffs: &Path) -> Result<Vec<Check>, LoaderError> {
    let checks = run(cgroup, bpffs);
    let missing: Vec<String> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{} (needed for {}): {}", c.feature, c.needed_for, c.detail))
        .collect();
    if missing.is_empty() {
        Ok(checks)
    } else {
        Err(LoaderError::MissingFeatures(missing))
    }
}
