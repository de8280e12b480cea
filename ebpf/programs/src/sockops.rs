//! `sockops`: bookkeeping at connection establishment and close.
//!
//! - Active side (the connecting socket): if connect4/6 redirected it, move its original
//!   destination from the socket cookie (`NM_PENDING`) to the connection's tuple
//!   (`NM_ORIG_DST`), where the proxy finds it after `accept()`. This runs when the SYN-ACK
//!   is processed, before the final ACK is sent, so the entry exists before the proxy can
//!   accept the connection. Then, if the socket's namespace is an accelerated pod (the pod's
//!   app socket, or the proxy's upstream socket opened inside the pod), accelerate it.
//! - Passive side (the accepted socket): accelerate it only if its peer already is (the
//!   peer's active callback ran before the ACK that establishes this side) and it belongs to
//!   the proxy's listener or to an accelerated pod. Pods outside the mesh are never touched.
//! - Close: forget what was recorded for the socket.
//!
//! "Accelerate" means: put the socket into `NM_SOCKS` (the SockHash the sk_msg program
//! redirects through) and mark it in `NM_ACCEL` (see `sk_msg` for why both).
use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, bpf_sock_ops,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::warn;
use nodemesh_common::{
    CONFIG_SOCKMAP, Config, Counter, POD_ACCELERATE, SockKey, is_loopback, is_v4_mapped,
};

use crate::{
    key,
    maps::{ACCEL, ORIG_DST, PENDING, SOCKS, config, count, pod},
};

const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn nm_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => active_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => passive_established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => closed(&ctx),
        _ => {}
    }
    1
}

fn active_established(ctx: &SockOpsContext) {
    let Some(key) = sock_key(ctx) else { return };
    let mut watch_close = false;

    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: plain data copied out of the map.
    if let Some(orig) = unsafe { PENDING.get(cookie) }.copied() {
        let _ = PENDING.remove(cookie);
        if ORIG_DST.insert(key, orig, 0).is_ok() {
            count(Counter::SockopsOrigDstRecorded);
            watch_close = true;
        } else {
            count(Counter::SockopsOrigDstFailed);
            warn!(
                ctx,
                "sockops: cannot record the original destination (NM_ORIG_DST)"
            );
        }
    }

    // SAFETY: the helper only reads the context's socket.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    if pod(netns_cookie).is_some_and(|p| p.flags & POD_ACCELERATE != 0)
        && let Some(cfg) = config()
    {
        watch_close |= accelerate(ctx, &key, cfg);
    }
    if watch_close {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
}

fn passive_established(ctx: &SockOpsContext) {
    let Some(key) = sock_key(ctx) else { return };
    // SAFETY: plain data lookup.
    if unsafe { ACCEL.get(key.reversed()) }.is_none() {
        return;
    }
    let Some(cfg) = config() else { return };
    let is_proxy_listener = key.local_ip == cfg.proxy_ip && key.local_port == cfg.proxy_port;
    let is_accelerated_pod = || {
        // SAFETY: the helper only reads the context's socket.
        let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
        pod(netns_cookie).is_some_and(|p| p.flags & POD_ACCELERATE != 0)
    };
    if (is_proxy_listener || is_accelerated_pod()) && accelerate(ctx, &key, cfg) {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
}

fn closed(ctx: &SockOpsContext) {
    let Some(key) = sock_key(ctx) else { return };
    let _ = ACCEL.remove(key);
    let _ = ORIG_DST.remove(key);
}

/// Puts the socket on the fast path; returns whether it did.
fn accelerate(ctx: &SockOpsContext, key: &SockKey, cfg: &Config) -> bool {
    if cfg.flags & CONFIG_SOCKMAP == 0 {
        count(Counter::SockopsSockmapDisabled);
        return false;
    }
    // NM_ACCEL first: once the socket is in the SockHash its sk_msg program runs and must
    // find the mark, or it would fall back to the stack at its first message.
    if ACCEL.insert(key, 1, BPF_ANY as u64).is_err() {
        count(Counter::SockopsSockhashFailed);
        warn!(ctx, "sockops: NM_ACCEL is full; socket not accelerated");
        return false;
    }
    let mut key = *key;
    // SAFETY: `ctx.ops` is the program's context, which the helper expects.
    let ops: &mut bpf_sock_ops = unsafe { &mut *ctx.ops };
    if let Err(e) = SOCKS.update(&mut key, ops, BPF_ANY as u64) {
        let _ = ACCEL.remove(key);
        count(Counter::SockopsSockhashFailed);
        warn!(
            ctx,
            "sockops: SockHash insert failed ({}); socket not accelerated", e
        );
        return false;
    }
    count(Counter::SockopsSockhashInserted);
    true
}

/// The connection as this socket sees it; `None` for what nodemesh never handles
/// (loopback, native IPv6, other families).
#[inline(always)]
fn sock_key(ctx: &SockOpsContext) -> Option<SockKey> {
    let key = key::sock_key(&key::read_tuple!(ctx.ops))?;
    if !is_v4_mapped(&key.local_ip) || is_loopback(&key.local_ip) || is_loopback(&key.remote_ip) {
        return None;
    }
    Some(key)
}
