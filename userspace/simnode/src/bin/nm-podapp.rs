//! `nm-podapp`: the application inside simulated pods. Real TCP traffic with every byte
//! checked, a deadline on everything (a stall is reported as a failure, never a hang), and
//! one JSON object on stdout for the test to read.
//!
//! ```text
//! nm-podapp serve --listen 0.0.0.0:8080 --mode echo|whoami|sink
//! nm-podapp client --connect 198.18.0.3:8080 --connections 50 --concurrency 10 --bytes 1048576
//! nm-podapp rr --connect 198.18.0.3:8080 --iterations 10000 --size 64
//! nm-podapp whoami --connect 198.18.0.3:8080
//! nm-podapp churn --connect 198.18.0.3:8080 --connections 500 --bytes 1024
//! ```
use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Test application for simulated pods")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ServeMode {
    /// Echo every byte; half-close after the client does.
    Echo,
    /// Send the client's address as seen by the server, then close.
    Whoami,
    /// Read and count; answer the 8-byte count at end of stream.
    Sink,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Expect {
    Echo,
    Sink,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve connections until killed.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, value_enum, default_value = "echo")]
        mode: ServeMode,
        /// sink: after this many bytes on a connection, stop reading for --sink-pause-ms.
        #[arg(long, default_value_t = u64::MAX)]
        sink_pause_after: u64,
        #[arg(long, default_value_t = 0)]
        sink_pause_ms: u64,
    },
    /// Many connections, each sending --bytes and checking the answer.
    Client {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = 1024)]
        bytes: u64,
        /// Keep each connection open this long after its data was echoed (echo only).
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Per-connection deadline.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
        #[arg(long, value_enum, default_value = "echo")]
        expect: Expect,
    },
    /// Request/response round trips on one connection (against an echo server).
    Rr {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        iterations: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 100)]
        warmup: usize,
        /// Pause between round trips (a long-lived, mostly idle connection).
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Ask a whoami server how it sees us.
    Whoami {
        #[arg(long)]
        connect: SocketAddr,
    },
    /// Sequential short connections.
    Churn {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 100)]
        connections: usize,
        #[arg(long, default_value_t = 1024)]
        bytes: u64,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    let ok = match cli.cmd {
        Cmd::Serve {
            listen,
            mode,
            sink_pause_after,
            sink_pause_ms,
        } => serve(listen, mode, sink_pause_after, sink_pause_ms),
        Cmd::Client {
            connect,
            connections,
            concurrency,
            bytes,
            hold_ms,
            timeout_ms,
            expect,
        } => {
            let opts = ConnOpts {
                bytes,
                hold: Duration::from_millis(hold_ms),
                timeout: Duration::from_millis(timeout_ms),
                expect,
            };
            clients(connect, connections, concurrency.max(1), opts)
        }
        Cmd::Rr {
            connect,
            iterations,
            size,
            warmup,
            interval_ms,
            timeout_ms,
        } => rr(
            connect,
            iterations,
            size.max(1),
            warmup,
            Duration::from_millis(interval_ms),
            Duration::from_millis(timeout_ms),
        ),
        Cmd::Whoami { connect } => whoami(connect),
        Cmd::Churn {
            connect,
            connections,
            bytes,
            timeout_ms,
        } => {
            let opts = ConnOpts {
                bytes,
                hold: Duration::ZERO,
                timeout: Duration::from_millis(timeout_ms),
                expect: Expect::Echo,
            };
            clients(connect, connections, 1, opts)
        }
    };
    std::process::exit(if ok { 0 } else { 1 });
}

fn print(mut value: serde_json::Value) {
    if let Some(obj) = value.as_object_mut() {
        obj.insert(
            "spurious_eagain".into(),
            SPURIOUS_EAGAIN.load(Ordering::Relaxed).into(),
        );
    }
    println!("{value}");
    let _ = io::stdout().flush();
}

/// `EAGAIN` from a blocking read before its deadline. On sockets in a sockmap, Linux's
/// `tcp_bpf_recvmsg` ends a blocking read with `EAGAIN` when the socket is woken without
/// data (e.g. by the ACK of its own FIN after another thread half-closed it). A robust
/// blocking application retries, as this one does; the count is reported.
static SPURIOUS_EAGAIN: AtomicU64 = AtomicU64::new(0);

/// A blocking read that honours `deadline` and retries a spurious `EAGAIN` before it.
fn read_until(conn: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        conn.set_read_timeout(Some(left))?;
        match conn.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                SPURIOUS_EAGAIN.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// `read_exact` on top of [`read_until`].
fn read_exact_until(conn: &mut TcpStream, mut buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        match read_until(conn, buf, deadline)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            n => buf = &mut buf[n..],
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// server

fn serve(listen: SocketAddr, mode: ServeMode, pause_after: u64, pause_ms: u64) -> bool {
    let listener = match TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            print(json!({ "error": format!("bind {listen}: {e}") }));
            return false;
        }
    };
    print(json!({ "listening": listener.local_addr().map(|a| a.to_string()).unwrap_or_default() }));
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        thread::spawn(move || {
            let r = match mode {
                ServeMode::Echo => echo(conn),
                ServeMode::Whoami => tell_peer(conn),
                ServeMode::Sink => sink(conn, pause_after, Duration::from_millis(pause_ms)),
            };
            if let Err(e) = r {
                eprintln!("connection: {e}");
            }
        });
    }
    true
}

/// Servers wait for their clients this long at most.
const IDLE: Duration = Duration::from_secs(600);

fn echo(mut conn: TcpStream) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = read_until(&mut conn, &mut buf, Instant::now() + IDLE)?;
        if n == 0 {
            return conn.shutdown(Shutdown::Write);
        }
        conn.write_all(&buf[..n])?;
    }
}

fn tell_peer(mut conn: TcpStream) -> io::Result<()> {
    let peer = conn.peer_addr()?;
    conn.write_all(format!("{peer}\n").as_bytes())?;
    conn.shutdown(Shutdown::Write)?;
    let mut sink = [0u8; 1024];
    while read_until(&mut conn, &mut sink, Instant::now() + IDLE)? > 0 {}
    Ok(())
}

fn sink(mut conn: TcpStream, pause_after: u64, pause: Duration) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    let mut paused = false;
    loop {
        if !paused && total >= pause_after {
            paused = true;
            thread::sleep(pause);
        }
        let n = read_until(&mut conn, &mut buf, Instant::now() + IDLE)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    conn.write_all(&total.to_be_bytes())?;
    conn.shutdown(Shutdown::Write)
}

// ---------------------------------------------------------------------------------------
// clients

#[derive(Clone, Copy)]
struct ConnOpts {
    bytes: u64,
    hold: Duration,
    timeout: Duration,
    expect: Expect,
}

fn pattern(i: u64, seed: u64) -> u8 {
    ((i.wrapping_mul(7).wrapping_add(seed)) % 251) as u8
}

fn clients(addr: SocketAddr, connections: usize, concurrency: usize, opts: ConnOpts) -> bool {
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency.min(connections.max(1)))
        .map(|_| {
            let (next, ok, sent, received, errors) = (
                next.clone(),
                ok.clone(),
                sent.clone(),
                received.clone(),
                errors.clone(),
            );
            thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= connections {
                        return;
                    }
                    match one_connection(addr, i as u64, opts) {
                        Ok((s, r)) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            sent.fetch_add(s, Ordering::Relaxed);
                            received.fetch_add(r, Ordering::Relaxed);
                        }
                        Err(e) => {
                            let mut errors = errors.lock().unwrap_or_else(|p| p.into_inner());
                            if errors.len() < 10 {
                                errors.push(format!("connection {i}: {e}"));
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let ok = ok.load(Ordering::Relaxed);
    let failed = connections - ok;
    let errors = errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    print(json!({
        "ok": ok,
        "failed": failed,
        "bytes_sent": sent.load(Ordering::Relaxed),
        "bytes_received": received.load(Ordering::Relaxed),
        "errors": errors,
        "elapsed_ms": start.elapsed().as_millis() as u64,
    }));
    failed == 0
}

/// Connects, sends the pattern while reading the answer, checks it. A deadline on the
/// whole exchange: running out of it is reported as a stall.
fn one_connection(addr: SocketAddr, seed: u64, opts: ConnOpts) -> Result<(u64, u64), String> {
    let deadline = Instant::now() + opts.timeout;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let conn = TcpStream::connect_timeout(&addr, left()).map_err(|e| format!("connect: {e}"))?;
    conn.set_nodelay(true).ok();
    let mut writer = conn.try_clone().map_err(|e| e.to_string())?;
    let bytes = opts.bytes;
    let hold = opts.hold;
    writer.set_write_timeout(Some(left())).ok();
    let echoed = Arc::new(AtomicU64::new(0));
    let echoed_w = echoed.clone();
    let send = thread::spawn(move || -> Result<u64, String> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(buf.len() as u64) as usize;
            for (j, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(sent + j as u64, seed);
            }
            writer
                .write_all(&buf[..n])
                .map_err(|e| stall_or(e, "send"))?;
            sent += n as u64;
        }
        if !hold.is_zero() {
            // Hold the connection open once everything came back.
            while echoed_w.load(Ordering::Relaxed) < bytes && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            thread::sleep(hold);
        }
        writer
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("half-close: {e}"))?;
        Ok(sent)
    });
    let mut reader = conn;
    let received = match opts.expect {
        Expect::Echo => read_echo(&mut reader, seed, bytes, &echoed, deadline),
        Expect::Sink => read_count(&mut reader, bytes, deadline),
    };
    let sent = send.join().map_err(|_| "sender panicked".to_owned())??;
    Ok((sent, received?))
}

fn stall_or(e: io::Error, what: &str) -> String {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        format!("{what}: stalled (deadline passed)")
    } else {
        format!("{what}: {e}")
    }
}

fn read_echo(
    conn: &mut TcpStream,
    seed: u64,
    bytes: u64,
    echoed: &AtomicU64,
    deadline: Instant,
) -> Result<u64, String> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        let n = read_until(conn, &mut buf, deadline).map_err(|e| stall_or(e, "receive"))?;
        if n == 0 {
            break;
        }
        if let Some(j) = (0..n).find(|&j| buf[j] != pattern(got + j as u64, seed)) {
            return Err(format!("corrupt byte at offset {}", got + j as u64));
        }
        got += n as u64;
        echoed.store(got, Ordering::Relaxed);
    }
    if got != bytes {
        return Err(format!("echo ended after {got} of {bytes} bytes"));
    }
    Ok(got)
}

fn read_count(conn: &mut TcpStream, bytes: u64, deadline: Instant) -> Result<u64, String> {
    let mut count = [0u8; 8];
    read_exact_until(conn, &mut count, deadline).map_err(|e| stall_or(e, "receive count"))?;
    let count = u64::from_be_bytes(count);
    if count != bytes {
        return Err(format!("the sink received {count} of {bytes} bytes"));
    }
    Ok(8)
}

fn rr(
    addr: SocketAddr,
    iterations: usize,
    size: usize,
    warmup: usize,
    interval: Duration,
    timeout: Duration,
) -> bool {
    let run = || -> Result<Vec<u64>, String> {
        let mut conn =
            TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
        conn.set_nodelay(true).ok();
        conn.set_read_timeout(Some(timeout)).ok();
        conn.set_write_timeout(Some(timeout)).ok();
        let request: Vec<u8> = (0..size as u64).map(|i| pattern(i, 1)).collect();
        let mut response = vec![0u8; size];
        let mut samples = Vec::with_capacity(iterations);
        for i in 0..warmup + iterations {
            let start = Instant::now();
            conn.write_all(&request).map_err(|e| stall_or(e, "send"))?;
            read_exact_until(&mut conn, &mut response, start + timeout)
                .map_err(|e| stall_or(e, "receive"))?;
            let ns = start.elapsed().as_nanos() as u64;
            if response != request {
                return Err(format!("round trip {i}: corrupt response"));
            }
            if i >= warmup {
                samples.push(ns);
            }
            if !interval.is_zero() {
                thread::sleep(interval);
            }
        }
        let _ = conn.shutdown(Shutdown::Write);
        Ok(samples)
    };
    match run() {
        Ok(mut samples) => {
            samples.sort_unstable();
            let pct = |p: f64| {
                let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
                samples.get(idx).map_or(0.0, |ns| *ns as f64 / 1000.0)
            };
            let mean = samples.iter().sum::<u64>() as f64 / samples.len().max(1) as f64 / 1000.0;
            print(json!({
                "n": samples.len(),
                "p50_us": pct(0.50),
                "p90_us": pct(0.90),
                "p99_us": pct(0.99),
                "mean_us": mean,
                "min_us": pct(0.0),
                "max_us": pct(1.0),
            }));
            true
        }
        Err(e) => {
            print(json!({ "error": e }));
            false
        }
    }
}

fn whoami(addr: SocketAddr) -> bool {
    let run = || -> io::Result<(String, String)> {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let local = conn.local_addr()?.to_string();
        let mut line = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match read_until(&mut conn, &mut buf, deadline)? {
                0 => break,
                n => line.extend_from_slice(&buf[..n]),
            }
        }
        Ok((String::from_utf8_lossy(&line).trim().to_owned(), local))
    };
    match run() {
        Ok((seen_as, local)) => {
            print(json!({ "seen_as": seen_as, "local": local }));
            true
        }
        Err(e) => {
            print(json!({ "error": e.to_string() }));
            false
        }
    }
}
