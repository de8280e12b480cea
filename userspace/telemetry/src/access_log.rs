//! Access logs off the request path: a request hands its finished [`Entry`] to a
//! [`Writer`] without waiting, and a thread of the writer's own renders entries in the
//! configured format and writes them in batches.
//!
//! ```text
//! request end --try_send--> bounded queue (capacity entries) --> writer thread
//!                 full: drop, count `dropped`                      render, batch (64 KiB),
//!                                                                  one write per batch
//! ```
//!
//! A slow or stuck sink (a full pipe, a blocked disk, a FIFO nobody reads) fills the queue;
//! from then on entries are dropped and counted (`nodemesh_access_log_entries_total
//! {result="dropped"}`), and requests go on at full speed. The queue bounds memory:
//! `capacity` entries per log file.
//!
//! Must not: block or allocate unboundedly on the request path, or do I/O there.
use std::{
    fs::OpenOptions,
    io::{self, Write},
    net::SocketAddr,
    sync::{
        Arc,
        mpsc::{self, SyncSender, TrySendError},
    },
    time::{Duration, SystemTime},
};

use http::HeaderMap;
use nodemesh_config::access_log::{LogField, LogFormat, Segment};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde_json::Value;

/// Entries queued per log file by default.
pub const DEFAULT_CAPACITY: usize = 8192;
/// Bytes rendered before a write.
const BATCH_BYTES: usize = 64 * 1024;
/// How long the writer lets entries gather after the first one of a batch: requests wake
/// the writer thread at most once per interval instead of once each (Envoy flushes its
/// file logs every second).
const FLUSH_INTERVAL: Duration = Duration::from_millis(20);

/// Everything a format may ask about one finished request.
#[derive(Debug, Clone)]
pub struct Entry {
    pub start: SystemTime,
    pub method: String,
    /// As the client sent it (before rewrites), with the query.
    pub path: String,
    pub authority: String,
    /// `HTTP/1.1`, `HTTP/2`; empty for a TCP connection (`-` in the log).
    pub protocol: &'static str,
    pub request_headers: HeaderMap,
    pub response_headers: HeaderMap,
    /// 0 when no response was sent.
    pub response_code: u16,
    /// Envoy's short flags (`UF`, `RL`, `RBAC`, ...), or none.
    pub response_flags: Option<&'static str>,
    /// `%RESPONSE_CODE_DETAILS%`: why the proxy answered (e.g. the RBAC policy that denied).
    pub details: Option<String>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Until the last byte of the response (or the stream's end).
    pub duration: Duration,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<Arc<str>>,
    pub route_name: Option<String>,
    /// The trusted client address, the peer, and where the client connected to.
    pub remote: SocketAddr,
    pub direct_remote: SocketAddr,
    pub local: SocketAddr,
    pub principal: Option<Arc<str>>,
}

impl Entry {
    fn header<'a>(h: &'a HeaderMap, e: &'a Entry, name: &str) -> Option<&'a str> {
        // A TCP connection's entry has no request line: Envoy's `-`.
        let set = |s: &'a String| Some(s.as_str()).filter(|s| !s.is_empty());
        match name {
            ":method" => set(&e.method),
            ":path" => set(&e.path),
            ":authority" | "host" => set(&e.authority),
            _ => h.get(name).and_then(|v| v.to_str().ok()),
        }
    }

    /// One operator's value; `None` is Envoy's `-`.
    fn value(&self, f: &LogField) -> Option<Value> {
        let addr = |a: SocketAddr, port: bool| {
            Some(Value::String(if port {
                a.to_string()
            } else {
                a.ip().to_string()
            }))
        };
        let text = |s: Option<&str>| s.map(|s| Value::String(s.to_owned()));
        match f {
            LogField::StartTime => Some(Value::String(rfc3339_millis(self.start))),
            LogField::Request(a, b) => {
                text(Self::header(&self.request_headers, self, a).or_else(|| {
                    b.as_deref()
                        .and_then(|b| Self::header(&self.request_headers, self, b))
                }))
            }
            LogField::Response(a, b) => text(
                self.response_headers
                    .get(a.as_str())
                    .or_else(|| b.as_deref().and_then(|b| self.response_headers.get(b)))
                    .and_then(|v| v.to_str().ok()),
            ),
            LogField::Protocol => text(Some(self.protocol).filter(|p| !p.is_empty())),
            LogField::ResponseCode => Some(Value::from(self.response_code)),
            LogField::ResponseFlags => text(self.response_flags),
            // TCP connections have no response to explain (Envoy: `-`).
            LogField::ResponseCodeDetails if self.protocol.is_empty() => {
                text(self.details.as_deref())
            }
            LogField::ResponseCodeDetails => text(Some(self.details.as_deref().unwrap_or(
                if self.response_flags.is_none() {
                    "via_upstream"
                } else {
                    "local_reply"
                },
            ))),
            LogField::BytesReceived => Some(Value::from(self.bytes_received)),
            LogField::BytesSent => Some(Value::from(self.bytes_sent)),
            LogField::Duration => Some(Value::from(self.duration.as_millis() as u64)),
            LogField::UpstreamHost => self.upstream_host.and_then(|a| addr(a, true)),
            LogField::UpstreamCluster => text(self.upstream_cluster.as_deref()),
            LogField::RouteName => text(self.route_name.as_deref()),
            LogField::DownstreamRemote { port } => addr(self.remote, *port),
            LogField::DownstreamDirectRemote { port } => addr(self.direct_remote, *port),
            LogField::DownstreamLocal { port } => addr(self.local, *port),
            LogField::DownstreamPeerUriSan => text(self.principal.as_deref()),
            LogField::Unavailable(_) => None,
        }
    }

    /// Appends the entry, in `format`, as one line.
    pub fn render(&self, format: &LogFormat, out: &mut Vec<u8>) {
        match format {
            LogFormat::Json(fields) => {
                let mut map = serde_json::Map::with_capacity(fields.len());
                for (key, segments) in fields {
                    let v = match segments.as_slice() {
                        [Segment::Field(f)] => self.value(f).unwrap_or(Value::Null),
                        _ => Value::String(self.text(segments)),
                    };
                    map.insert(key.clone(), v);
                }
                // Writing JSON into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, &Value::Object(map));
                out.push(b'\n');
            }
            LogFormat::Text(segments) => {
                out.extend_from_slice(self.text(segments).as_bytes());
                if out.last() != Some(&b'\n') {
                    out.push(b'\n');
                }
            }
        }
    }

    fn text(&self, segments: &[Segment]) -> String {
        let mut s = String::new();
        for seg in segments {
            match seg {
                Segment::Literal(l) => s.push_str(l),
                Segment::Field(f) => match self.value(f) {
                    Some(Value::String(v)) => s.push_str(&v),
                    Some(v) => s.push_str(&v.to_string()),
                    None => s.push('-'),
                },
            }
        }
        s
    }
}

/// `2026-12-02T17:39:08.123Z`, Envoy's `%START_TIME%` default.
fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LogLabels {
    path: String,
    result: &'static str,
}

/// `nodemesh_access_log_entries_total{path,result}`: written, dropped (queue full), error
/// (the sink failed); `nodemesh_access_log_batches_total{path}`.
#[derive(Clone, Debug, Default)]
pub struct LogStats {
    entries: Family<LogLabels, Counter>,
    batches: Family<LogLabels, Counter>,
}

impl LogStats {
    pub fn register(registry: &mut Registry) -> Self {
        let s = Self::default();
        let r = registry.sub_registry_with_prefix("nodemesh");
        r.register(
            "access_log_entries",
            "Access log entries by file and result: written, dropped (the writer's queue was \
             full: the sink is slower than the traffic), error (the sink failed)",
            s.entries.clone(),
        );
        r.register(
            "access_log_batches",
            "Writes to an access log file (each carries one or more entries)",
            s.batches.clone(),
        );
        s
    }

    fn counter(&self, path: &str, result: &'static str) -> Counter {
        self.entries
            .get_or_create(&LogLabels {
                path: path.to_owned(),
                result,
            })
            .clone()
    }
}

/// What the writer thread is sent.
type Message = (Arc<LogFormat>, Arc<Entry>);

/// One log file's queue and writer thread. Dropping the last handle lets the thread drain
/// the queue and end.
#[derive(Debug)]
pub struct Writer {
    path: String,
    tx: SyncSender<Message>,
    dropped: Counter,
}

impl Writer {
    /// A writer appending to the file at `path` (opened by the writer thread, so a FIFO or
    /// a slow mount never blocks the caller), queueing up to `capacity` entries.
    pub fn file(path: &str, capacity: usize, stats: &LogStats) -> io::Result<Arc<Self>> {
        let owned = path.to_owned();
        Self::spawn(
            path,
            capacity,
            stats,
            Box::new(move || {
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&owned)
                    .map(|f| Box::new(f) as Box<dyn Write + Send>)
            }),
        )
    }

    /// A writer over any sink; `open` is called on the writer thread (again after a failed
    /// write).
    pub fn spawn(
        path: &str,
        capacity: usize,
        stats: &LogStats,
        mut open: Box<dyn FnMut() -> io::Result<Box<dyn Write + Send>> + Send>,
    ) -> io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::sync_channel::<Message>(capacity.max(1));
        let written = stats.counter(path, "written");
        let errors = stats.counter(path, "error");
        let batches = stats
            .batches
            .get_or_create(&LogLabels {
                path: path.to_owned(),
                result: "written",
            })
            .clone();
        let label = path.to_owned();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut sink: Option<Box<dyn Write + Send>> = None;
                let mut buf = Vec::with_capacity(BATCH_BYTES);
                // Blocks for the first entry, lets more gather, then writes what is queued
                // in batches of up to BATCH_BYTES.
                while let Ok(first) = rx.recv() {
                    std::thread::sleep(FLUSH_INTERVAL);
                    let mut next = Some(first);
                    while let Some((format, entry)) = next.take() {
                        entry.render(&format, &mut buf);
                        let mut n = 1u64;
                        while buf.len() < BATCH_BYTES {
                            let Ok((format, entry)) = rx.try_recv() else {
                                break;
                            };
                            entry.render(&format, &mut buf);
                            n += 1;
                        }
                        let full = buf.len() >= BATCH_BYTES;
                        let result = match &mut sink {
                            Some(s) => s.write_all(&buf).and_then(|()| s.flush()),
                            None => open().and_then(|mut s| {
                                let r = s.write_all(&buf).and_then(|()| s.flush());
                                sink = Some(s);
                                r
                            }),
                        };
                        match result {
                            Ok(()) => {
                                written.inc_by(n);
                                batches.inc();
                            }
                            Err(e) => {
                                errors.inc_by(n);
                                tracing::warn!(path = %label, error = %e, entries = n, "access log write failed; reopening on the next batch");
                                sink = None;
                            }
                        }
                        buf.clear();
                        // A full batch: more may be queued, write on without waiting.
                        if full {
                            next = rx.try_recv().ok();
                        }
                    }
                }
            })?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            dropped: stats.counter(path, "dropped"),
            tx,
        }))
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Queues an entry, never waiting: a full queue drops it (counted).
    pub fn log(&self, format: Arc<LogFormat>, entry: Arc<Entry>) {
        match self.tx.try_send((format, entry)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodemesh_config::access_log::{default_format, parse};

    fn entry() -> Entry {
        let mut request_headers = HeaderMap::new();
        request_headers.insert("user-agent", "curl/8".parse().expect("value"));
        Entry {
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_233_148_123),
            method: "GET".into(),
            path: "/admin?x=1".into(),
            authority: "shop".into(),
            protocol: "HTTP/1.1",
            request_headers,
            response_headers: HeaderMap::new(),
            response_code: 403,
            response_flags: Some("RBAC"),
            details: Some("rbac_access_denied_matched_policy[ns[a]-policy[b]-rule[0]]".into()),
            bytes_received: 0,
            bytes_sent: 19,
            duration: Duration::from_millis(3),
            upstream_host: None,
            upstream_cluster: Some("up".into()),
            route_name: None,
            remote: "198.18.0.9:0".parse().expect("addr"),
            direct_remote: "127.0.0.1:4000".parse().expect("addr"),
            local: "127.0.0.1:80".parse().expect("addr"),
            principal: None,
        }
    }

    #[test]
    fn json_lines_carry_envoys_fields_with_their_types() {
        let mut out = Vec::new();
        entry().render(&default_format(), &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&out).expect("one JSON object");
        assert_eq!(v["start_time"], "2026-12-02T17:39:08.123Z");
        assert_eq!(v["response_code"], 403);
        assert_eq!(v["response_flags"], "RBAC");
        assert_eq!(
            v["response_code_details"],
            "rbac_access_denied_matched_policy[ns[a]-policy[b]-rule[0]]"
        );
        assert_eq!(v["path"], "/admin?x=1");
        assert_eq!(v["user_agent"], "curl/8");
        assert_eq!(v["downstream_remote_address"], "198.18.0.9:0");
        assert_eq!(v["upstream_host"], Value::Null);
        assert_eq!(v["bytes_sent"], 19);
    }

    #[test]
    fn text_formats_render_dashes_for_what_is_missing() {
        let format = LogFormat::Text(
            parse("%REQ(:METHOD)% %REQ(X-MISSING)% %RESPONSE_CODE% %UPSTREAM_HOST%")
                .expect("parses"),
        );
        let mut out = Vec::new();
        entry().render(&format, &mut out);
        assert_eq!(String::from_utf8_lossy(&out), "GET - 403 -\n");
    }

    /// A sink stuck in its first write: the queue fills, further entries are dropped and
    /// counted, and `log` never waits.
    #[test]
    fn a_stuck_sink_drops_and_counts_instead_of_blocking() {
        struct Stuck {
            entered: mpsc::Sender<()>,
            release: mpsc::Receiver<()>,
        }
        impl Write for Stuck {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                let _ = self.entered.send(());
                let _ = self.release.recv();
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut registry = Registry::default();
        let stats = LogStats::register(&mut registry);
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        let mut once = Some(Stuck {
            entered: entered_tx,
            release: release_rx,
        });
        let writer = Writer::spawn(
            "stuck",
            4,
            &stats,
            Box::new(move || {
                once.take()
                    .map(|s| Box::new(s) as Box<dyn Write + Send>)
                    .ok_or_else(|| io::Error::other("opened twice"))
            }),
        )
        .expect("thread");
        let format = Arc::new(default_format());
        let e = Arc::new(entry());
        writer.log(format.clone(), e.clone());
        entered_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the writer reached the sink");
        for _ in 0..100 {
            writer.log(format.clone(), e.clone());
        }
        // The queue holds 4; the other 96 were dropped, none waited.
        assert_eq!(stats.counter("stuck", "dropped").get(), 96);
        assert_eq!(stats.counter("stuck", "written").get(), 0);
        drop(release_tx);
    }
}
