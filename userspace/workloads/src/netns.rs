//! Network namespaces of pods: identity (the kernel's netns cookie) and entering them.
//!
//! The agent creates its upstream sockets inside the client pod's namespace, as Istio
//! ambient's ztunnel does, so that the destination sees the pod's own address. `setns(2)`
//! is per thread: [`Netns::run`] enters, runs a synchronous closure (no `.await` can happen
//! in between, so a tokio worker never parks in a foreign namespace) and returns home.
use std::{
    fs::File,
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

/// `NSFS_MAGIC`: the filesystem of `/proc/<pid>/ns/*` and bind-mounted namespace files.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// The namespace the agent runs in. The main thread never leaves it, so `/proc/self`
/// (the thread-group leader) names it.
fn home() -> io::Result<&'static File> {
    static HOME: OnceLock<File> = OnceLock::new();
    if let Some(f) = HOME.get() {
        return Ok(f);
    }
    let f = File::open("/proc/self/ns/net")?;
    Ok(HOME.get_or_init(|| f))
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    cookie: u64,
}

impl Netns {
    /// Opens the namespace file at `path` and reads its cookie.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let magic = nix::sys::statfs::fstatfs(file.as_fd())
            .map_err(io::Error::from)?
            .filesystem_type()
            .0 as i64;
        if magic != NSFS_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a namespace file",
            ));
        }
        let mut netns = Self {
            file,
            path: path.to_owned(),
            cookie: 0,
        };
        netns.cookie = netns.run(current_cookie)??;
        Ok(netns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kernel's cookie for this namespace: what the programs see as
    /// `bpf_get_netns_cookie()` for the pod's sockets.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` on the current thread inside this namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = home()?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("setns into {}: {e}", self.path.display()),
            )
        })?;
        let out = f();
        if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A thread left in a pod's namespace would open later sockets there: there is no
            // safe way to continue.
            eprintln!("nodemesh: cannot return to the agent's network namespace: {e}");
            std::process::abort();
        }
        Ok(out)
    }

    /// A non-blocking TCP socket created inside this namespace.
    pub fn tcp_socket(&self, domain: Domain) -> io::Result<Socket> {
        self.run(|| Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP)))?
    }
}

/// The cookie of the current thread's network namespace.
pub fn current_cookie() -> io::Result<u64> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    nodemesh_loader::probe::netns_cookie(sock.as_fd())
}

/// The cookie of the agent's own namespace (the node's).
pub fn home_cookie() -> io::Result<u64> {
    current_cookie()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Entering namespaces needs CAP_SYS_ADMIN; that is tested in the privileged node tests.
    #[test]
    fn own_namespace_has_a_stable_cookie() {
        let a = current_cookie().expect("SO_NETNS_COOKIE");
        assert_ne!(a, 0);
        assert_eq!(current_cookie().expect("SO_NETNS_COOKIE"), a);
    }

    #[test]
    fn a_regular_file_is_not_a_namespace() {
        let f = tempfile::NamedTempFile::new().expect("tempfile");
        let err = Netns::open(f.path()).expect_err("must be rejected");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
