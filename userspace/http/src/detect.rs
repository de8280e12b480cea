//! Protocol detection on an accepted connection: what Envoy's `http_inspector` and
//! `tls_inspector` listener filters find out, from the first bytes the client sends.
//!
//! The bytes are read (not peeked: a peek loop either spins or sleeps) into a buffer that is
//! replayed in front of the stream by [`Rewind`], so whatever serves the connection next sees
//! it from its first byte.
//!
//! Parsing here is hand-written over hostile input: every length is checked before use and
//! nothing here can panic (see the fuzz target `detect`).
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface a prior-knowledge (h2c) client sends first.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest HTTP/1 request line the inspector reads before deciding "not HTTP".
const MAX_REQUEST_LINE: usize = 8 * 1024;
/// A ClientHello is one TLS record: at most 16 KiB plus the record header.
const MAX_CLIENT_HELLO: usize = 5 + (1 << 14);

/// What detection found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detected {
    /// `tls` (the TLS inspector saw a ClientHello) or `raw_buffer`.
    pub transport: &'static str,
    /// `http/1.1`, `http/1.0`, `h2c` from the HTTP inspector, or the ClientHello's ALPN.
    pub application_protocols: Vec<String>,
    /// The ClientHello's server name, lower case.
    pub server_name: Option<String>,
    /// The plaintext HTTP protocol, if the HTTP inspector recognized one.
    pub http: Option<HttpVersion>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// The verdict on the bytes read so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<T> {
    /// Not this protocol.
    No,
    /// Could still be: read more.
    NeedMore,
    Yes(T),
}

/// HTTP inspector: an h2c preface or an HTTP/1.x request line.
pub fn http_version(buf: &[u8]) -> Verdict<(HttpVersion, &'static str)> {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Verdict::Yes((HttpVersion::Http2, "h2c"))
        } else {
            Verdict::NeedMore
        };
    }
    // METHOD SP request-target SP HTTP/1.x CRLF
    let line_end = buf.iter().position(|&b| b == b'\n');
    let line = &buf[..line_end.unwrap_or(buf.len())];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.splitn(3, |&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    if method.is_empty() && !line.is_empty() || !method.iter().all(|&b| is_token(b)) {
        return Verdict::No;
    }
    let (Some(target), Some(version)) = (parts.next(), parts.next()) else {
        return undecided(line_end.is_some(), buf.len());
    };
    if target.is_empty() || target.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Verdict::No;
    }
    if line_end.is_none() {
        // The version is still arriving: it must be a prefix of HTTP/1.x.
        let want = b"HTTP/1.";
        let k = version.len().min(want.len());
        return if version[..k] == want[..k] && version.len() <= want.len() + 1 {
            undecided(false, buf.len())
        } else {
            Verdict::No
        };
    }
    match version {
        b"HTTP/1.1" => Verdict::Yes((HttpVersion::Http1, "http/1.1")),
        b"HTTP/1.0" => Verdict::Yes((HttpVersion::Http1, "http/1.0")),
        _ => Verdict::No,
    }
}

fn undecided<T>(line_complete: bool, len: usize) -> Verdict<T> {
    if line_complete || len >= MAX_REQUEST_LINE {
        Verdict::No
    } else {
        Verdict::NeedMore
    }
}

/// RFC 9110 `tchar`.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What a ClientHello says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    pub server_name: Option<String>,
    pub alpn: Vec<String>,
}

/// TLS inspector: a ClientHello in the first record.
pub fn client_hello(buf: &[u8]) -> Verdict<ClientHello> {
    // Record: type 22 (handshake), version 3.x, length.
    match buf {
        [] => return Verdict::NeedMore,
        [0x16] | [0x16, 0x03] | [0x16, 0x03, _] | [0x16, 0x03, _, _] => return Verdict::NeedMore,
        [0x16, 0x03, _, _, _, ..] => {}
        _ => return Verdict::No,
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if record_len == 0 || record_len > 1 << 14 {
        return Verdict::No;
    }
    let Some(record) = buf.get(5..5 + record_len) else {
        return Verdict::NeedMore;
    };
    // Handshake: type 1 (ClientHello), 24-bit length. A hello longer than its first record
    // is TLS all the same; its extensions are then out of reach.
    let mut r = Reader(record);
    let (Some(1), Some(_len)) = (r.u8(), r.u24()) else {
        return Verdict::No;
    };
    Verdict::Yes(parse_hello_body(&mut r).unwrap_or_default())
}

fn parse_hello_body(r: &mut Reader<'_>) -> Option<ClientHello> {
    r.skip(2 + 32)?; // client_version, random
    let session = usize::from(r.u8()?);
    r.skip(session)?;
    let suites = usize::from(r.u16()?);
    r.skip(suites)?;
    let compression = usize::from(r.u8()?);
    r.skip(compression)?;
    let mut hello = ClientHello::default();
    let Some(ext_len) = r.u16() else {
        return Some(hello); // no extensions
    };
    let mut exts = Reader(r.take(usize::from(ext_len))?);
    while let (Some(kind), Some(len)) = (exts.u16(), exts.u16()) {
        let mut body = Reader(exts.take(usize::from(len))?);
        match kind {
            0 => {
                let len = usize::from(body.u16()?);
                let mut list = Reader(body.take(len)?);
                while let (Some(name_type), Some(len)) = (list.u8(), list.u16()) {
                    let name = list.take(usize::from(len))?;
                    if name_type == 0 {
                        hello.server_name =
                            std::str::from_utf8(name).ok().map(str::to_ascii_lowercase);
                    }
                }
            }
            16 => {
                let len = usize::from(body.u16()?);
                let mut list = Reader(body.take(len)?);
                while let Some(len) = list.u8() {
                    let proto = list.take(usize::from(len))?;
                    hello.alpn.push(String::from_utf8_lossy(proto).into_owned());
                }
            }
            _ => {}
        }
    }
    Some(hello)
}

/// A bounds-checked big-endian reader.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(drop)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self) -> Option<u32> {
        self.take(3)
            .map(|b| u32::from_be_bytes([0, b[0], b[1], b[2]]))
    }
}

/// Which inspectors run.
#[derive(Debug, Clone, Copy)]
pub struct Inspectors {
    pub http: bool,
    pub tls: bool,
    pub timeout: Duration,
}

/// Reads from `io` until every enabled inspector has decided (or `timeout`, or EOF), and
/// returns what they found with the bytes read. A connection that sends nothing before the
/// timeout (a server-first protocol) is treated as raw TCP, as Istio configures Envoy
/// (`continue_on_listener_filters_timeout`).
pub async fn inspect<S>(io: &mut S, inspectors: Inspectors) -> io::Result<(Detected, Bytes)>
where
    S: AsyncRead + Unpin,
{
    inspect_after(io, Bytes::new(), inspectors).await
}

/// [`inspect`] for a connection of which `read` was already read.
pub async fn inspect_after<S>(
    io: &mut S,
    read: Bytes,
    inspectors: Inspectors,
) -> io::Result<(Detected, Bytes)>
where
    S: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024.max(read.len()));
    buf.extend_from_slice(&read);
    let mut detected = Detected {
        transport: "raw_buffer",
        ..Detected::default()
    };
    if !inspectors.http && !inspectors.tls {
        return Ok((detected, buf.freeze()));
    }
    let deadline = tokio::time::Instant::now() + inspectors.timeout;
    loop {
        let http = if inspectors.http {
            http_version(&buf)
        } else {
            Verdict::No
        };
        let tls = if inspectors.tls {
            client_hello(&buf)
        } else {
            Verdict::No
        };
        if !buf.is_empty() {
            match (&http, &tls) {
                (Verdict::Yes((version, alpn)), _) => {
                    detected.http = Some(*version);
                    detected.application_protocols = vec![(*alpn).to_owned()];
                    break;
                }
                (_, Verdict::Yes(hello)) => {
                    detected.transport = "tls";
                    detected.application_protocols = hello.alpn.clone();
                    detected.server_name = hello.server_name.clone();
                    break;
                }
                (Verdict::No, Verdict::No) => break,
                _ => {}
            }
        }
        if buf.len() >= MAX_CLIENT_HELLO {
            break;
        }
        buf.reserve(1024);
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_elapsed) => break,
            Ok(Ok(0)) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok((detected, buf.freeze()))
}

pin_project_lite::pin_project! {
    /// A stream with bytes already read from it put back in front.
    #[derive(Debug)]
    pub struct Rewind<S> {
        prefix: Bytes,
        #[pin]
        inner: S,
    }
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(out.remaining());
            out.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, out)
    }
}

impl<S: AsyncWrite> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_inspector_verdicts() {
        assert_eq!(
            http_version(b"GET / HTTP/1.1\r\n"),
            Verdict::Yes((HttpVersion::Http1, "http/1.1"))
        );
        assert_eq!(
            http_version(b"POST /x HTTP/1.0\n"),
            Verdict::Yes((HttpVersion::Http1, "http/1.0"))
        );
        assert_eq!(http_version(b"GET / HTT"), Verdict::NeedMore);
        assert_eq!(http_version(b"GET /"), Verdict::NeedMore);
        assert_eq!(http_version(b"PRI * HTTP/2.0\r\n"), Verdict::NeedMore);
        assert_eq!(
            http_version(H2_PREFACE),
            Verdict::Yes((HttpVersion::Http2, "h2c"))
        );
        assert_eq!(http_version(b"GET / HTTP/2.0\r\n"), Verdict::No);
        assert_eq!(http_version(b"GET / SSH-2.0\r\n"), Verdict::No);
        assert_eq!(http_version(b"\x16\x03\x01"), Verdict::No);
        assert_eq!(http_version(b"SSH-2.0-OpenSSH\r\n"), Verdict::No);
        assert_eq!(http_version(b"G(T / HTTP/1.1\r\n"), Verdict::No);
        assert_eq!(http_version(&[b'A'; MAX_REQUEST_LINE]), Verdict::No);
    }

    /// A ClientHello with SNI and ALPN, built field by field.
    fn hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let mut ext = Vec::new();
        let mut sni_list = vec![0u8];
        sni_list.extend((sni.len() as u16).to_be_bytes());
        sni_list.extend(sni.as_bytes());
        let mut sni_body = (sni_list.len() as u16).to_be_bytes().to_vec();
        sni_body.extend(sni_list);
        ext.extend(0u16.to_be_bytes());
        ext.extend((sni_body.len() as u16).to_be_bytes());
        ext.extend(sni_body);
        let mut protos = Vec::new();
        for p in alpn {
            protos.push(p.len() as u8);
            protos.extend(p.as_bytes());
        }
        let mut alpn_body = (protos.len() as u16).to_be_bytes().to_vec();
        alpn_body.extend(protos);
        ext.extend(16u16.to_be_bytes());
        ext.extend((alpn_body.len() as u16).to_be_bytes());
        ext.extend(alpn_body);
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend(2u16.to_be_bytes());
        body.extend([0x13, 0x01]);
        body.extend([1, 0]); // compression: null
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![1];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut record = vec![0x16, 3, 1];
        record.extend((hs.len() as u16).to_be_bytes());
        record.extend(hs);
        record
    }

    #[test]
    fn tls_inspector_reads_sni_and_alpn() {
        let record = hello("API.Example.com", &["h2", "http/1.1"]);
        for cut in 0..record.len() {
            assert_eq!(
                client_hello(&record[..cut]),
                Verdict::NeedMore,
                "cut at {cut}"
            );
        }
        let Verdict::Yes(h) = client_hello(&record) else {
            panic!("hello")
        };
        assert_eq!(h.server_name.as_deref(), Some("api.example.com"));
        assert_eq!(h.alpn, ["h2", "http/1.1"]);
        assert_eq!(client_hello(b"GET / HTTP/1.1"), Verdict::No);
    }

    #[test]
    fn truncated_hellos_never_panic() {
        let record = hello("a", &["h2"]);
        // Corrupt every length byte in turn: the parser must answer, not panic.
        for i in 5..record.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut r = record.clone();
                r[i] = v;
                let _ = client_hello(&r);
            }
        }
    }

    #[tokio::test]
    async fn inspect_replays_what_it_read() {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut server = server;
        let inspectors = Inspectors {
            http: true,
            tls: true,
            timeout: Duration::from_secs(5),
        };
        let (found, prefix) = inspect(&mut server, inspectors).await.expect("inspect");
        assert_eq!(found.http, Some(HttpVersion::Http1));
        assert_eq!(found.application_protocols, ["http/1.1"]);
        let mut rewound = Rewind::new(prefix, server);
        let mut first = [0u8; 6];
        rewound.read_exact(&mut first).await.expect("read");
        assert_eq!(&first, b"GET /a");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_raw_tcp_after_the_timeout() {
        let (_client, mut server) = tokio::io::duplex(64);
        let inspectors = Inspectors {
            http: true,
            tls: true,
            timeout: Duration::from_secs(1),
        };
        let (found, prefix) = inspect(&mut server, inspectors).await.expect("inspect");
        assert_eq!(found.transport, "raw_buffer");
        assert!(found.http.is_none() && prefix.is_empty());
    }
}
