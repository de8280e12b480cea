//! The start-up self-test of the sockmap fast path on the running kernel.
//!
//! sockmap has a history of kernel bugs (stalled sends, lost data). Before the agent turns
//! the fast path on it pushes real traffic through the real programs and maps: a loopback
//! TCP pair in the agent's own namespace is put into `NM_SOCKS`/`NM_ACCEL` by hand (the
//! agent's namespace is not a pod, so sockops would not), both ends send a patterned stream
//! at once and half-close, and the receivers check every byte. It passes only if the data
//! arrives intact before the deadline and the sk_msg program really redirected it.
use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use nodemesh_common::{CONFIG_SOCKMAP, Counter};

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
    pub passed: bool,
    pub detail: String,
    pub redirected_messages: u64,
    pub elapsed_ms: u64,
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

    let io = |what: &'static str| move |e| LoaderError::io(what, "127.0.0.1", e);
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("self-test listen"))?;
    let a = TcpStream::connect(listener.local_addr().map_err(io("self-test listen"))?)
        .map_err(io("self-test connect"))?;
    let (b, _) = listener.accept().map_err(io("self-test accept"))?;
    let keys = [&a, &b].map(|s| {
        let local = s.local_addr().map(addr::canonical);
        let peer = s.peer_addr().map(addr::canonical);
        local.and_then(|l| peer.map(|p| addr::sock_key(l, p)))
    });
    let [Ok(key_a), Ok(key_b)] = keys else {
        return Err(LoaderError::Other(
            "self-test: socket addresses unavailable".into(),
        ));
    };
    let insert = |fast: &mut FastPathMaps| -> Result<(), LoaderError> {
        for (key, sock) in [(key_a, &a), (key_b, &b)] {
            fast.accel
                .insert(key, 1, 0)
                .map_err(|e| LoaderError::map("NM_ACCEL", e))?;
            fast.socks
                .insert(key, sock.as_raw_fd(), 0)
                .map_err(|e| LoaderError::map("NM_SOCKS", e))?;
        }
        Ok(())
    };
    let before = redirected(&stats)?;
    let start = Instant::now();
    let outcome = insert(&mut fast).and_then(|()| exchange(a, b, deadline));
    let elapsed_ms = start.elapsed().as_millis() as u64;
    for key in [key_a, key_b] {
        let _ = fast.accel.remove(&key);
    }
    let redirected_messages = redirected(&stats)?.saturating_sub(before);

    let (passed, detail) = match outcome {
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
    Ok(SelfTestReport {
        passed,
        detail,
        redirected_messages,
        elapsed_ms,
    })
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
        thread::spawn(move || {
            tx.send(check_pattern(reader).map_err(|e| format!("{name} receive: {e}")))
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

fn check_pattern(mut sock: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut seen = 0;
    loop {
        let n = sock.read(&mut buf)?;
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
