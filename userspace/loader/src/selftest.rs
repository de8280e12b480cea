//! The start-up self-test of the sockmap fast path on the running kernel.
//!
//! sockmap has a history of kernel bugs (stalled sends, lost data). Before the agent turns
//! the fast path on it pushes real traffic through the real programs and maps: a loopback
//! TCP pair in the agent's own namespace is put into `NM_SOCKS`/`NM_ACCEL` by hand (the
//! agent's namespace is not a pod, so sockops would not), both ends send a patterned stream
//! at once and half-close, and the receivers check every byte. The data part passes only if
//! everything arrives intact before the deadline and the sk_msg program really redirected it.
//!
//! A second probe checks a semantic difference found on Linux 6.18: a socket in a sockmap
//! reads through `tcp_bpf_recvmsg`, which ends a *blocking* `recv` with `EAGAIN` whenever the
//! socket's wait queue is woken without data (for instance by the ACK of its own FIN, after
//! another thread half-closed it). Applications on non-blocking sockets (epoll: Go, Java NIO,
//! Node, Envoy, nginx, tokio) retry and never notice; a blocking-socket application may treat
//! the error as fatal. The probe reports whether this kernel has the behaviour.
use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use nodemesh_common::{CONFIG_SOCKMAP, Counter, SockKey};

use crate::{
    LoaderError, addr,
    maps::{ConfigMap, FastPathMaps, StatsMap},
};

/// Bytes each side sends.
const STREAM_BYTES: usize = 4 << 20;
const CHUNK: usize = 16 << 10;

/// The result of a self-test run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SelfTestReport {
    /// Data integrity, ordering and progress: the fast path moves bytes correctly.
    pub passed: bool,
    pub detail: String,
    pub redirected_messages: u64,
    pub elapsed_ms: u64,
    /// Whether a blocking `recv` keeps blocking across a wakeup without data (see the module
    /// documentation); `false` on kernels where it returns `EAGAIN`.
    pub blocking_recv_ok: bool,
}

/// Runs the self-test against the maps pinned under `pin_dir`. The sockmap switch must be
/// on (the caller turns it off again if the test fails).
pub fn run(pin_dir: &Path, deadline: Duration) -> Result<SelfTestReport, LoaderError> {
    let config = ConfigMap::open(pin_dir)?.get()?;
    if config.flags & CONFIG_SOCKMAP == 0 {
        return Err(LoaderError::Other(
            "self-test needs the sockmap switch on".into(),
        ));
    }
    let mut fast = FastPathMaps::open(pin_dir)?;
    let stats = StatsMap::open(pin_dir)?;
    let redirected = |stats: &StatsMap| -> Result<u64, LoaderError> {
        Ok(stats
            .read()?
            .into_iter()
            .find(|(info, _)| info.counter == Counter::MsgRedirected)
            .map_or(0, |(_, n)| n))
    };

    let before = redirected(&stats)?;
    let start = Instant::now();
    let outcome = accelerated_pair(&mut fast).and_then(|(a, b, keys)| {
        let r = exchange(a, b, deadline);
        for key in keys {
            let _ = fast.accel.remove(&key);
        }
        r
    });
    let elapsed_ms = start.elapsed().as_millis() as u64;
    let redirected_messages = redirected(&stats)?.saturating_sub(before);

    let (passed, mut detail) = match outcome {
        Err(e) => (false, e.to_string()),
        Ok(()) if redirected_messages == 0 => (
            false,
            "data arrived but no message was redirected by sk_msg".to_owned(),
        ),
        Ok(()) => (
            true,
            format!("2 x {} MiB exchanged intact", STREAM_BYTES >> 20),
        ),
    };
    let blocking_recv_ok = match blocking_recv_probe(&mut fast) {
        Ok(ok) => ok,
        Err(e) => {
            detail.push_str(&format!("; blocking-recv probe failed: {e}"));
            false
        }
    };
    if !blocking_recv_ok {
        detail.push_str(
            "; a blocking recv on an accelerated socket can return EAGAIN when woken without data",
        );
    }
    Ok(SelfTestReport {
        passed,
        detail,
        redirected_messages,
        elapsed_ms,
        blocking_recv_ok,
    })
}

/// A loopback pair with both ends on the fast path; the caller removes the keys from
/// `NM_ACCEL` (the sockets leave the SockHash when they close).
fn accelerated_pair(
    fast: &mut FastPathMaps,
) -> Result<(TcpStream, TcpStream, [SockKey; 2]), LoaderError> {
    let io = |what: &'static str| move |e| LoaderError::io(what, "127.0.0.1", e);
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("self-test listen"))?;
    let a = TcpStream::connect(listener.local_addr().map_err(io("self-test listen"))?)
        .map_err(io("self-test connect"))?;
    let (b, _) = listener.accept().map_err(io("self-test accept"))?;
    let mut keys = [SockKey::default(); 2];
    for (i, sock) in [&a, &b].into_iter().enumerate() {
        let local = sock.local_addr().map_err(io("self-test address"))?;
        let peer = sock.peer_addr().map_err(io("self-test address"))?;
        keys[i] = addr::sock_key(addr::canonical(local), addr::canonical(peer));
        fast.accel
            .insert(keys[i], 1, 0)
            .map_err(|e| LoaderError::map("NM_ACCEL", e))?;
        fast.socks
            .insert(keys[i], sock.as_raw_fd(), 0)
            .map_err(|e| LoaderError::map("NM_SOCKS", e))?;
    }
    Ok((a, b, keys))
}

/// A reader blocks on `a` with nothing to read; another thread half-closes `a` (the ACK of
/// its FIN wakes the reader without data); 200 ms later `b` sends one byte. A correct kernel
/// hands the reader that byte; affected ones end its `recv` with `EAGAIN` at the wakeup.
fn blocking_recv_probe(fast: &mut FastPathMaps) -> Result<bool, LoaderError> {
    let (a, mut b, keys) = accelerated_pair(fast)?;
    let mut reader = a
        .try_clone()
        .map_err(|e| LoaderError::io("self-test clone", "127.0.0.1", e))?;
    let read = thread::spawn(move || {
        let mut byte = [0u8; 1];
        reader.read(&mut byte)
    });
    thread::sleep(Duration::from_millis(50));
    let sent = a
        .shutdown(Shutdown::Write)
        .and_then(|()| {
            thread::sleep(Duration::from_millis(200));
            b.write_all(b"x")
        })
        .and_then(|()| b.shutdown(Shutdown::Write));
    let outcome = read.join();
    for key in keys {
        let _ = fast.accel.remove(&key);
    }
    sent.map_err(|e| LoaderError::io("self-test probe", "127.0.0.1", e))?;
    match outcome {
        Ok(Ok(1)) => Ok(true),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Ok(other) => Err(LoaderError::Other(format!(
            "blocking-recv probe: unexpected {other:?}"
        ))),
        Err(_) => Err(LoaderError::Other(
            "blocking-recv probe: the reader panicked".into(),
        )),
    }
}

/// Both ends send a patterned stream and half-close while the other reads and checks it.
fn exchange(a: TcpStream, b: TcpStream, deadline: Duration) -> Result<(), LoaderError> {
    let (done_tx, done_rx) = mpsc::channel::<Result<(), String>>();
    for (name, sock) in [("a->b", a), ("b->a", b)] {
        sock.set_read_timeout(Some(deadline)).ok();
        sock.set_write_timeout(Some(deadline)).ok();
        let reader = sock
            .try_clone()
            .map_err(|e| LoaderError::io("self-test clone", "127.0.0.1", e))?;
        let tx = done_tx.clone();
        thread::spawn(move || tx.send(send_pattern(sock).map_err(|e| format!("{name} send: {e}"))));
        let tx = done_tx.clone();
        let until = Instant::now() + deadline;
        thread::spawn(move || {
            tx.send(check_pattern(reader, until).map_err(|e| format!("{name} receive: {e}")))
        });
    }
    drop(done_tx);
    let until = Instant::now() + deadline;
    for _ in 0..4 {
        let left = until.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(LoaderError::Other(format!("self-test: {e}"))),
            Err(_) => {
                return Err(LoaderError::Other(format!(
                    "self-test: the exchange stalled (not done after {deadline:?})"
                )));
            }
        }
    }
    Ok(())
}

fn pattern_byte(i: usize) -> u8 {
    (i % 251) as u8
}

fn send_pattern(mut sock: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0;
    while sent < STREAM_BYTES {
        for (j, b) in buf.iter_mut().enumerate() {
            *b = pattern_byte(sent + j);
        }
        sock.write_all(&buf)?;
        sent += CHUNK;
    }
    sock.shutdown(Shutdown::Write)
}

/// Reads and checks the pattern until end of stream. A blocking `recv` that ends with
/// `EAGAIN` before `until` is the wakeup-without-data behaviour the second probe reports on
/// its own; here it is retried, as a non-blocking reader would, so that this check measures
/// integrity and progress only (the read timeout still ends a real stall).
fn check_pattern(mut sock: TcpStream, until: Instant) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut seen = 0;
    loop {
        let n = match sock.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) && Instant::now() < until =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        if let Some(j) = (0..n).find(|&j| buf[j] != pattern_byte(seen + j)) {
            return Err(std::io::Error::other(format!(
                "corrupt byte at offset {}",
                seen + j
            )));
        }
        seen += n;
    }
    if seen == STREAM_BYTES {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "got {seen} of {STREAM_BYTES} bytes"
        )))
    }
}
