//! `cgroup/connect4` and `cgroup/connect6`: capture a mesh-enabled pod's TCP connects.
//!
//! For a TCP socket whose network namespace is an enabled pod, rewrite the destination to
//! the node proxy's listener and record the original destination under the socket's cookie
//! (`NM_PENDING`). The cookie is assigned by the kernel and unique per socket, so concurrent
//! connects cannot collide and a pod cannot forge an entry; sockops moves the record to the
//! connection's tuple once the source port is known.
//!
//! Left alone: other namespaces, sockets carrying the proxy's mark (the proxy's own
//! upstream connections, opened inside the pod's namespace), loopback, and connects that
//! already target the proxy. connect6 captures IPv4-mapped destinations (dual-stack
//! sockets talking IPv4); native IPv6 destinations are counted and passed through.
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _, bindings::bpf_sock_addr, helpers::bpf_get_netns_cookie,
    helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use aya_log_ebpf::{debug, warn};
use nodemesh_common::{Counter, OrigDst, POD_CAPTURE, is_loopback, is_v4_mapped, v4_mapped};

use crate::maps::{PENDING, config, count, pod};

const ALLOW: i32 = 1;
/// The connect fails with EPERM.
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;

/// Per-family counters, so both hooks share one decision procedure.
struct Counters {
    redirected: Counter,
    not_enabled: Counter,
    proxy_owned: Counter,
    loopback: Counter,
    to_proxy: Counter,
    failed: Counter,
}

const V4: Counters = Counters {
    redirected: Counter::Connect4Redirected,
    not_enabled: Counter::Connect4NotEnabled,
    proxy_owned: Counter::Connect4ProxyOwned,
    loopback: Counter::Connect4Loopback,
    to_proxy: Counter::Connect4ToProxy,
    failed: Counter::Connect4Failed,
};

const V6: Counters = Counters {
    redirected: Counter::Connect6Redirected,
    not_enabled: Counter::Connect6NotEnabled,
    proxy_owned: Counter::Connect6ProxyOwned,
    loopback: Counter::Connect6Loopback,
    to_proxy: Counter::Connect6ToProxy,
    failed: Counter::Connect6Failed,
};

#[cgroup_sock_addr(connect4)]
pub fn nm_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the verifier-checked context; each field is read with one 4-byte load.
    let (ip, port) = unsafe { (v4_mapped(read_volatile(&(*sa).user_ip4)), user_port(sa)) };
    match decide(&ctx, &ip, port, &V4) {
        Decision::Redirect(proxy_ip, proxy_port) => {
            // SAFETY: 4-byte stores to the writable user_ip4/user_port context fields.
            unsafe {
                write_volatile(&mut (*sa).user_ip4, proxy_ip[3]);
                write_volatile(&mut (*sa).user_port, u32::from(proxy_port.to_be()));
            }
            count(V4.redirected);
            ALLOW
        }
        Decision::Allow => ALLOW,
        Decision::Refuse => REFUSE,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn nm_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in connect4; user_ip6 only allows 4-byte loads, hence one per word.
    let (ip, port) = unsafe {
        let w = &(*sa).user_ip6;
        (
            [
                read_volatile(&w[0]),
                read_volatile(&w[1]),
                read_volatile(&w[2]),
                read_volatile(&w[3]),
            ],
            user_port(sa),
        )
    };
    if !is_v4_mapped(&ip) {
        if is_enabled_tcp(&ctx) {
            count(Counter::Connect6NativeV6);
        }
        return ALLOW;
    }
    match decide(&ctx, &ip, port, &V6) {
        Decision::Redirect(proxy_ip, proxy_port) => {
            // SAFETY: 4-byte stores to the writable user_ip6 words and user_port.
            unsafe {
                let w = &mut (*sa).user_ip6;
                write_volatile(&mut w[0], proxy_ip[0]);
                write_volatile(&mut w[1], proxy_ip[1]);
                write_volatile(&mut w[2], proxy_ip[2]);
                write_volatile(&mut w[3], proxy_ip[3]);
                write_volatile(&mut (*sa).user_port, u32::from(proxy_port.to_be()));
            }
            count(V6.redirected);
            ALLOW
        }
        Decision::Allow => ALLOW,
        Decision::Refuse => REFUSE,
    }
}

enum Decision {
    Allow,
    Refuse,
    /// Rewrite the destination to this address and port.
    Redirect([u32; 4], u16),
}

/// `user_port` holds the port in network byte order in its low 16 bits.
///
/// # Safety
/// `sa` must be the program's context.
#[inline(always)]
unsafe fn user_port(sa: *mut bpf_sock_addr) -> u16 {
    // SAFETY: guaranteed by the caller.
    u16::from_be(unsafe { read_volatile(&(*sa).user_port) } as u16)
}

#[inline(always)]
fn is_tcp(ctx: &SockAddrContext) -> bool {
    // SAFETY: 4-byte load of a readable context field.
    unsafe { read_volatile(&(*ctx.sock_addr).type_) == SOCK_STREAM }
}

#[inline(always)]
fn is_enabled_tcp(ctx: &SockAddrContext) -> bool {
    // SAFETY: the helper only reads the context's socket.
    is_tcp(ctx) && pod(unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }).is_some()
}

#[inline(always)]
fn decide(ctx: &SockAddrContext, ip: &[u32; 4], port: u16, c: &Counters) -> Decision {
    if !is_tcp(ctx) {
        return Decision::Allow;
    }
    // SAFETY: the helper only reads the context's socket.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(entry) = pod(netns_cookie) else {
        count(c.not_enabled);
        return Decision::Allow;
    };
    let Some(cfg) = config() else {
        count(c.not_enabled);
        return Decision::Allow;
    };
    if entry.flags & POD_CAPTURE == 0 {
        count(c.not_enabled);
        return Decision::Allow;
    }
    // SAFETY: `sk` is always set for sock_addr programs; `mark` is a readable bpf_sock field.
    let mark = unsafe { read_volatile(&(*(*ctx.sock_addr).__bindgen_anon_1.sk).mark) };
    if mark == cfg.proxy_mark {
        count(c.proxy_owned);
        return Decision::Allow;
    }
    if is_loopback(ip) {
        count(c.loopback);
        return Decision::Allow;
    }
    if *ip == cfg.proxy_ip && port == cfg.proxy_port {
        count(c.to_proxy);
        return Decision::Allow;
    }
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        ip: *ip,
        port,
        _pad: 0,
        pod_id: entry.pod_id,
        netns_cookie,
    };
    if PENDING.insert(cookie, orig, 0).is_err() {
        count(c.failed);
        warn!(
            ctx,
            "connect: cannot record the original destination (NM_PENDING); refused"
        );
        return Decision::Refuse;
    }
    debug!(
        ctx,
        "connect: pod {} port {} -> node proxy", entry.pod_id, port
    );
    Decision::Redirect(cfg.proxy_ip, cfg.proxy_port)
}
