//! Passing the live proxy to a new agent process, so that an agent restart (an upgrade, a
//! DaemonSet rollout with `maxSurge`) drops no connection.
//!
//! The old agent listens on `<run_dir>/handoff.sock`, a `SOCK_SEQPACKET` unix socket (each
//! message arrives whole, with its file descriptors). A starting agent that finds it asks
//! for the proxy:
//!
//! ```text
//! new -> old   Hello
//! old -> new   Listener {addr}          + [listening socket]   the new agent accepts from now on
//! old -> new   Connection {meta}        + [client, upstream]   once per parked connection
//! old -> new   Done {handed_off, kept}
//! ```
//! A connection is parked only at a read boundary (see [`crate::relay`]), so no byte the
//! old agent read is lost; bytes in the kernel's socket buffers travel with the sockets.
//! A connection that cannot park in time (its peer does not read) stays with the old agent,
//! which drains it before exiting.
use std::{
    io::{self, IoSlice, IoSliceMut},
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use nix::{
    cmsg_space,
    sys::socket::{
        self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
        SockType, UnixAddr,
    },
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use crate::outbound::ConnectionMeta;

/// Largest message: the metadata of one connection is ~200 bytes of JSON.
const MAX_MESSAGE: usize = 16 * 1024;
/// Descriptors per message.
const MAX_FDS: usize = 2;

/// Protocol version; a mismatch ends the handoff before anything moves.
pub const VERSION: u32 = 1;

/// A handoff message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    Hello {
        version: u32,
        pid: u32,
    },
    Listener {
        addr: String,
    },
    Connection {
        meta: ConnectionMeta,
    },
    Done {
        handed_off: u64,
        kept: u64,
    },
    /// The old agent refuses (another handoff is running, versions differ, ...).
    Refused {
        reason: String,
    },
}

/// One end of a handoff conversation. Blocking; run it on a blocking thread.
#[derive(Debug)]
pub struct Channel(OwnedFd);

impl Channel {
    /// Connects to the old agent at `path`. `Ok(None)` when no agent is listening there.
    pub fn connect(path: &Path) -> io::Result<Option<Self>> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = UnixAddr::new(path.as_os_str().as_bytes())?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => Ok(Some(Self(fd))),
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Another handle on the same conversation (for use from a blocking task).
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(Self)
    }

    /// Sends `msg` with `fds` attached.
    pub fn send(&self, msg: &Message, fds: &[RawFd]) -> io::Result<()> {
        let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
        let iov = [IoSlice::new(&bytes)];
        let cmsgs = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsgs };
        let sent = socket::sendmsg::<()>(
            self.0.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        if sent != bytes.len() {
            return Err(io::Error::other("handoff message truncated"));
        }
        Ok(())
    }

    /// Receives one message and the descriptors that came with it. `Ok(None)` at the end.
    pub fn recv(&self) -> io::Result<Option<(Message, Vec<OwnedFd>)>> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut cmsg = cmsg_space!([RawFd; MAX_FDS]);
        let (len, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = socket::recvmsg::<()>(
                self.0.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )?;
            let mut fds = Vec::new();
            for c in msg.cmsgs()? {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: the kernel just installed these descriptors in this process.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            if msg
                .flags
                .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "handoff message truncated",
                ));
            }
            (msg.bytes, fds)
        };
        if len == 0 {
            return Ok(None);
        }
        let msg = serde_json::from_slice(&buf[..len]).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("handoff message: {e}"))
        })?;
        Ok(Some((msg, fds)))
    }
}

/// The old agent's listening end.
#[derive(Debug)]
pub struct Listener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl Listener {
    /// Listens at `path` (replacing a stale socket file). Must run inside a tokio runtime.
    pub fn bind(path: &Path) -> io::Result<Self> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(path.as_os_str().as_bytes())?)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        socket::listen(&fd, Backlog::new(4).map_err(io::Error::from)?)?;
        // SAFETY: the `OwnedFd` moved into the AsyncFd is the only owner of the descriptor.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self {
            fd,
            path: path.to_owned(),
        })
    }

    /// Waits for a new agent.
    pub async fn accept(&self) -> io::Result<Channel> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                let raw = socket::accept4(fd.as_fd().as_raw_fd(), SockFlag::SOCK_CLOEXEC)
                    .map_err(io::Error::from)?;
                // SAFETY: accept4 returned a new descriptor that we now own.
                Ok(unsafe { OwnedFd::from_raw_fd(raw) })
            }) {
                Ok(r) => return r.map(Channel),
                Err(_would_block) => continue,
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener};

    use super::*;
    use crate::relay::Progress;

    #[tokio::test]
    async fn messages_and_descriptors_cross() {
        let dir = tempfile_dir();
        let path = dir.join("handoff.sock");
        let listener = Listener::bind(&path).expect("bind");
        let client_path = path.clone();
        let client = tokio::task::spawn_blocking(move || Channel::connect(&client_path));
        let server = listener.accept().await.expect("accept");
        let client = client
            .await
            .expect("join")
            .expect("connect")
            .expect("listening");

        let tcp = TcpListener::bind("127.0.0.1:0").expect("tcp");
        let addr = tcp.local_addr().expect("addr");
        let meta = ConnectionMeta {
            client_addr: SocketAddr::from(([198, 18, 0, 2], 40000)),
            dst: SocketAddr::from(([198, 18, 0, 3], 80)),
            netns_cookie: 7,
            progress: Progress {
                upstream_done: true,
                downstream_done: false,
            },
        };
        server
            .send(
                &Message::Listener {
                    addr: addr.to_string(),
                },
                &[tcp.as_raw_fd()],
            )
            .expect("send");
        server
            .send(&Message::Connection { meta }, &[])
            .expect("send");
        drop(server);

        let (msg, fds) = client.recv().expect("recv").expect("message");
        assert_eq!(
            msg,
            Message::Listener {
                addr: addr.to_string()
            }
        );
        assert_eq!(fds.len(), 1);
        let passed = TcpListener::from(fds.into_iter().next().expect("fd"));
        assert_eq!(
            passed.local_addr().expect("addr"),
            addr,
            "the same listening socket"
        );
        let (msg, fds) = client.recv().expect("recv").expect("message");
        assert_eq!(msg, Message::Connection { meta });
        assert!(fds.is_empty());
        assert!(
            client.recv().expect("recv").is_none(),
            "end of conversation"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn nobody_listening_is_not_an_error() {
        let dir = tempfile_dir();
        assert!(
            Channel::connect(&dir.join("absent.sock"))
                .expect("connect")
                .is_none()
        );
        std::fs::remove_dir_all(dir).ok();
    }

    fn tempfile_dir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("nodemesh-handoff-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }
}
