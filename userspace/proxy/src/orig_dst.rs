//! Where a redirected connection was going, and who opened it.
//!
//! The kernel records it (see `ebpf/programs/src/sockops.rs`) under the connection's tuple as
//! the client sees it; the proxy reads and deletes it right after `accept()`. A trait keeps
//! the data path testable without a kernel and leaves room for other capture modes.
use std::{io, net::SocketAddr, sync::Mutex};

use nodemesh_loader::{addr, maps::OrigDstMap};

/// The original destination of an accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    pub dst: SocketAddr,
    /// Network namespace cookie of the pod that connected.
    pub netns_cookie: u64,
}

/// Looks up (and consumes) the original destination of an accepted connection.
pub trait OriginalDst: Send + Sync + 'static {
    /// `client` is the peer address of the accepted socket, `local` its local address.
    fn take(&self, client: SocketAddr, local: SocketAddr) -> io::Result<Option<Redirect>>;
}

/// The kernel's `NM_ORIG_DST` map.
#[derive(Debug)]
pub struct KernelOrigDst(Mutex<OrigDstMap>);

impl KernelOrigDst {
    pub fn new(map: OrigDstMap) -> Self {
        Self(Mutex::new(map))
    }
}

impl OriginalDst for KernelOrigDst {
    fn take(&self, client: SocketAddr, local: SocketAddr) -> io::Result<Option<Redirect>> {
        let key = addr::sock_key(addr::canonical(client), addr::canonical(local));
        let mut map = self
            .0
            .lock()
            .map_err(|_| io::Error::other("original-destination map lock poisoned"))?;
        let orig = map.take(&key).map_err(io::Error::other)?;
        Ok(orig.map(|o| Redirect {
            dst: addr::orig_dst_addr(&o),
            netns_cookie: o.netns_cookie,
        }))
    }
}
