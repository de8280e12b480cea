//! The one place where nodemesh's kernel programs and its userspace agree on bytes.
//!
//! Everything a map holds is defined here, `#[repr(C)]` and padding-free, so the eBPF object
//! (built for `bpfel-unknown-none`) and the agent (built for the host) read the same layout.
//! With the `user` feature the types implement `aya::Pod` and can be used as map keys/values.
//!
//! Conventions, chosen once so that no reader has to guess:
//! - IP addresses are stored as the kernel hands them out: 16 bytes in network byte order,
//!   IPv4 as the IPv4-mapped IPv6 address (`::ffff:a.b.c.d`). A dual-stack socket connected
//!   to a mapped address and a plain IPv4 socket therefore produce the same key.
//! - Ports are stored in host byte order.
//!
//! This crate must stay `no_std` and free of dependencies on the kernel side.
#![no_std]

/// Name of the pinned-map ABI. Bump it whenever a map's key, value or type changes: the agent
/// pins under `<bpffs>/<ABI>/`, so an agent with a new layout never adopts maps of an old one.
pub const MAP_ABI: &str = "v1";

/// Names of the maps, as the kernel and bpffs know them (at most 15 bytes).
pub mod map_names {
    /// `Array<Config>` with one element: the proxy address and the run-time switches.
    pub const CONFIG: &str = "NM_CONFIG";
    /// `HashMap<u64 netns cookie, PodEntry>`: the pods whose traffic the mesh handles.
    pub const PODS: &str = "NM_PODS";
    /// `LruHashMap<u64 socket cookie, OrigDst>`: written by connect4/6, moved to
    /// [`ORIG_DST`] once the socket is established and its source port is known.
    pub const PENDING: &str = "NM_PENDING";
    /// `LruHashMap<SockKey, OrigDst>`: the original destination of a redirected connection,
    /// keyed by the connection's tuple as the client sees it. The proxy reads and deletes it.
    pub const ORIG_DST: &str = "NM_ORIG_DST";
    /// `SockHash<SockKey>`: both ends of accelerated local connections.
    pub const SOCKS: &str = "NM_SOCKS";
    /// `HashMap<SockKey, u32>`: sockets that may still use the sockmap fast path (see
    /// the sk_msg program: a socket that ever sent through the stack never redirects again).
    pub const ACCEL: &str = "NM_ACCEL";
    /// `PerCpuArray<u64>` indexed by [`crate::Counter`].
    pub const STATS: &str = "NM_STATS";
}

/// Names of the programs (the function names in `ebpf/programs`).
pub mod program_names {
    pub const CONNECT4: &str = "nm_connect4";
    pub const CONNECT6: &str = "nm_connect6";
    pub const SOCKOPS: &str = "nm_sockops";
    pub const SK_MSG: &str = "nm_sk_msg";
}

/// Default sizes; the agent may override each from its configuration.
pub mod defaults {
    pub const MAX_PODS: u32 = 4096;
    pub const MAX_PENDING: u32 = 65536;
    pub const MAX_ORIG_DST: u32 = 65536;
    pub const MAX_SOCKS: u32 = 65536;
    /// The mark the proxy puts on its own sockets (`SO_MARK`). "NM" in ASCII.
    pub const PROXY_MARK: u32 = 0x4e4d;
}

/// [`Config::flags`]: redirect messages socket to socket (sockops inserts, sk_msg redirects).
pub const CONFIG_SOCKMAP: u32 = 1 << 0;

/// Run-time configuration the agent writes into [`map_names::CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The node proxy's outbound listener (network byte order, IPv4-mapped).
    pub proxy_ip: [u32; 4],
    /// The node proxy's outbound listener port (host byte order).
    pub proxy_port: u16,
    pub _pad: u16,
    /// `SO_MARK` of the proxy's own sockets; connect hooks leave such sockets alone.
    pub proxy_mark: u32,
    /// `CONFIG_*` bits.
    pub flags: u32,
    pub _pad2: u32,
}

/// [`PodEntry::flags`]: send the pod's outbound TCP connections to the node proxy.
pub const POD_CAPTURE: u32 = 1 << 0;
/// [`PodEntry::flags`]: short-circuit the pod's local hops with sockmap.
pub const POD_ACCELERATE: u32 = 1 << 1;

/// Value of [`map_names::PODS`]: one per mesh-enabled pod, keyed by its netns cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodEntry {
    /// The agent's handle for the pod (stable while the pod lives).
    pub pod_id: u32,
    /// `POD_*` bits.
    pub flags: u32,
}

/// The original destination of a redirected connection and who made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Network byte order, IPv4-mapped.
    pub ip: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
    /// [`PodEntry::pod_id`] of the pod that connected.
    pub pod_id: u32,
    /// Network namespace cookie of the socket that connected.
    pub netns_cookie: u64,
}

/// A TCP connection as one of its ends sees it. The peer's key is [`SockKey::reversed`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Network byte order, IPv4-mapped.
    pub local_ip: [u32; 4],
    /// Network byte order, IPv4-mapped.
    pub remote_ip: [u32; 4],
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
}

impl SockKey {
    /// The same connection seen from the other end.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self {
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// The `::ffff:0:0/96` prefix as the kernel's `__be32` words read on a little-endian host.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// `ip4` (network byte order, as the kernel stores `__be32`) as an IPv4-mapped IPv6 address.
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, ip4]
}

/// Whether `ip` (network byte order words) is an IPv4-mapped address.
#[inline(always)]
pub const fn is_v4_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD
}

/// Whether `ip` is loopback (`127.0.0.0/8` mapped, or `::1`). Loopback connections stay
/// inside one pod and are never captured or accelerated: their tuples are not unique on a node.
#[inline(always)]
pub const fn is_loopback(ip: &[u32; 4]) -> bool {
    if is_v4_mapped(ip) {
        // The first byte in network order is the lowest byte of the native-endian word.
        ip[3].to_ne_bytes()[0] == 127
    } else {
        ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == u32::from_ne_bytes([0, 0, 0, 1])
    }
}

macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $variant:ident = ($program:literal, $kind:ident, $name:literal), )*) => {
        /// Index into [`map_names::STATS`]. One numbered table shared by the kernel programs and
        /// the agent's metrics, so that a counter means the same thing on both sides.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $( $(#[doc = $doc])* $variant, )*
        }

        /// Every counter with the program that increments it, its kind and its metric name.
        pub const COUNTERS: &[CounterInfo] = &[
            $( CounterInfo {
                counter: Counter::$variant,
                program: $program,
                kind: CounterKind::$kind,
                name: $name,
            }, )*
        ];
    };
}

/// How `nodemesh status` groups a counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterKind {
    /// The program did its job (redirected, recorded, inserted).
    Hit,
    /// The program looked and correctly left the socket alone.
    Miss,
    /// The fast path was possible in principle but the slow path was taken.
    Fallback,
    /// Something that should not happen (a map full, a helper failing).
    Failure,
}

/// One row of [`COUNTERS`].
#[derive(Clone, Copy, Debug)]
pub struct CounterInfo {
    pub counter: Counter,
    pub program: &'static str,
    pub kind: CounterKind,
    pub name: &'static str,
}

counters! {
    /// A TCP connect of an enabled pod was sent to the node proxy.
    Connect4Redirected = ("connect4", Hit, "redirected"),
    /// The socket's network namespace is not an enabled pod.
    Connect4NotEnabled = ("connect4", Miss, "not_enabled"),
    /// The socket carries the proxy's mark (the proxy's own upstream connection).
    Connect4ProxyOwned = ("connect4", Miss, "proxy_owned"),
    /// Loopback destination (stays inside the pod).
    Connect4Loopback = ("connect4", Miss, "loopback"),
    /// The destination already is the node proxy.
    Connect4ToProxy = ("connect4", Miss, "to_proxy"),
    /// Recording the original destination failed; the connect was refused (fail closed).
    Connect4Failed = ("connect4", Failure, "record_failed"),
    Connect6Redirected = ("connect6", Hit, "redirected"),
    Connect6NotEnabled = ("connect6", Miss, "not_enabled"),
    Connect6ProxyOwned = ("connect6", Miss, "proxy_owned"),
    Connect6Loopback = ("connect6", Miss, "loopback"),
    Connect6ToProxy = ("connect6", Miss, "to_proxy"),
    /// A native IPv6 destination: not captured yet (see ARCHITECTURE.md).
    Connect6NativeV6 = ("connect6", Fallback, "native_ipv6"),
    Connect6Failed = ("connect6", Failure, "record_failed"),
    /// An active socket of a redirected connect was established; its tuple was recorded.
    SockopsOrigDstRecorded = ("sockops", Hit, "orig_dst_recorded"),
    /// Recording the tuple failed (the proxy will refuse the connection).
    SockopsOrigDstFailed = ("sockops", Failure, "orig_dst_failed"),
    /// A socket was put into the SockHash.
    SockopsSockhashInserted = ("sockops", Hit, "sockhash_inserted"),
    /// The sockmap switch was off when the socket was established.
    SockopsSockmapDisabled = ("sockops", Fallback, "sockmap_disabled"),
    /// Inserting into the SockHash (or the accel map) failed.
    SockopsSockhashFailed = ("sockops", Failure, "sockhash_failed"),
    /// A message went straight to the peer socket.
    MsgRedirected = ("sk_msg", Hit, "redirected"),
    /// Bytes of the messages that went straight to the peer socket.
    MsgRedirectedBytes = ("sk_msg", Hit, "redirected_bytes"),
    /// The peer was not in the SockHash; the socket falls back to the stack for good.
    MsgNoPeer = ("sk_msg", Fallback, "no_peer"),
    /// The sockmap switch is off; the socket falls back to the stack for good.
    MsgDisabled = ("sk_msg", Fallback, "disabled"),
    /// The socket already fell back earlier, so it keeps using the stack (ordering).
    MsgStack = ("sk_msg", Fallback, "stack"),
}

impl Counter {
    /// Number of counters, the size of [`map_names::STATS`].
    pub const COUNT: u32 = COUNTERS.len() as u32;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, and have no padding (explicit `_pad`
    // fields fill the gaps), so every bit pattern is valid and they can cross the syscall.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::PodEntry {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(core::mem::size_of::<Config>(), 32);
        assert_eq!(core::mem::size_of::<PodEntry>(), 8);
        assert_eq!(core::mem::size_of::<OrigDst>(), 32);
        assert_eq!(core::mem::size_of::<SockKey>(), 36);
    }

    #[test]
    fn counters_are_numbered_by_position() {
        for (i, info) in COUNTERS.iter().enumerate() {
            assert_eq!(info.counter as usize, i, "{}", info.name);
        }
    }

    #[test]
    fn loopback_detection() {
        let lo = u32::from_ne_bytes([127, 0, 0, 1]);
        let pod = u32::from_ne_bytes([198, 18, 0, 2]);
        assert!(is_loopback(&v4_mapped(lo)));
        assert!(!is_loopback(&v4_mapped(pod)));
        assert!(is_loopback(&[0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]));
        assert!(is_v4_mapped(&v4_mapped(pod)));
    }

    #[test]
    fn reversed_swaps_ends() {
        let k = SockKey {
            local_ip: v4_mapped(1),
            remote_ip: v4_mapped(2),
            local_port: 3,
            remote_port: 4,
        };
        assert_eq!(k.reversed().reversed(), k);
        assert_eq!(k.reversed().local_port, 4);
    }
}
