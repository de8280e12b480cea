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
use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use nodemesh_common::{CONFIG_SOCKMAP, Counter, SockKey};

use crate::key;
use crate::maps::{ACCEL, SOCKS, add, config, count};

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
    // Unlike sockops, no loopback filter: only sockets sockops (or the agent's self-test)
    // put into the SockHash reach this program, and the self-test uses loopback.
    key::sock_key(&key::read_tuple!(ctx.msg))
}
