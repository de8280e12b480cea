//! `sk_msg`: send each message of an accelerated socket straight into its peer's receive
//! queue, skipping TCP/IP and the veth/loopback hop.
//!
//! Ordering rule. The receiver reads redirected data (its psock queue) before data that came
//! through the stack. A stream that went "stack, then redirect" would therefore be read out
//! of order; "redirect, then stack" is safe. So a socket may redirect only while it has never
//! sent through the stack: `NM_ACCEL` marks the sockets for which that still holds, and the
//! first message that has to take the stack (peer not in the SockHash yet, or the sockmap
//! switch turned off) removes the mark for good. This is also what makes the run-time switch
//! safe in both directions: turning it off moves every socket to the stack at its next send,
//! and turning it on again only affects sockets established afterwards.
use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use nodemesh_common::{CONFIG_SOCKMAP, Counter, SockKey, v4_mapped};

use crate::maps::{ACCEL, SOCKS, add, config, count};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[sk_msg]
pub fn nm_sk_msg(ctx: SkMsgContext) -> u32 {
    let Some(key) = msg_key(&ctx) else {
        return SK_PASS;
    };
    // SAFETY: plain data lookup.
    if unsafe { ACCEL.get(key) }.is_none() {
        count(Counter::MsgStack);
        return SK_PASS;
    }
    if config().is_none_or(|cfg| cfg.flags & CONFIG_SOCKMAP == 0) {
        let _ = ACCEL.remove(key);
        count(Counter::MsgDisabled);
        return SK_PASS;
    }
    let mut peer = key.reversed();
    if SOCKS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == SK_PASS as i64 {
        count(Counter::MsgRedirected);
        add(Counter::MsgRedirectedBytes, u64::from(ctx.size()));
    } else {
        // No peer: this message takes the stack, and so must every later one.
        let _ = ACCEL.remove(key);
        count(Counter::MsgNoPeer);
    }
    // With a successful redirect the kernel sees the target set and redirects; without one,
    // SK_PASS sends the message through the stack.
    SK_PASS
}

#[inline(always)]
fn msg_key(ctx: &SkMsgContext) -> Option<SockKey> {
    let md = ctx.msg;
    // All fields read unconditionally, one volatile load each (see sockops::sock_key).
    // SAFETY: 4-byte loads of readable context fields.
    let (family, v4, v6, ports) = unsafe {
        let l = &(*md).local_ip6;
        let r = &(*md).remote_ip6;
        (
            read_volatile(&(*md).family),
            (
                read_volatile(&(*md).local_ip4),
                read_volatile(&(*md).remote_ip4),
            ),
            (
                [
                    read_volatile(&l[0]),
                    read_volatile(&l[1]),
                    read_volatile(&l[2]),
                    read_volatile(&l[3]),
                ],
                [
                    read_volatile(&r[0]),
                    read_volatile(&r[1]),
                    read_volatile(&r[2]),
                    read_volatile(&r[3]),
                ],
            ),
            (
                read_volatile(&(*md).local_port),
                read_volatile(&(*md).remote_port),
            ),
        )
    };
    let (local_ip, remote_ip) = match family {
        AF_INET => (v4_mapped(v4.0), v4_mapped(v4.1)),
        AF_INET6 => v6,
        _ => return None,
    };
    Some(SockKey {
        local_ip,
        remote_ip,
        // Host byte order.
        local_port: ports.0 as u16,
        // Network byte order in the upper 16 bits of the 32-bit field.
        remote_port: u32::from_be(ports.1) as u16,
    })
}
