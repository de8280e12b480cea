//! nodemesh's kernel programs.
//!
//! One file per attach point, all maps in [`maps`]:
//! - [`connect`]: `cgroup/connect4` and `cgroup/connect6` send a mesh-enabled pod's TCP
//!   connects to the node proxy and remember where they were going;
//! - [`sockops`]: records the original destination under the connection's tuple once the
//!   source port is known, and puts both ends of local mesh connections into the SockHash;
//! - [`sk_msg`]: moves each message of such a connection straight to the peer socket.
//!
//! The programs never block a connection they do not own: anything unexpected (an unknown
//! pod, a full map) falls back to the normal stack and is counted in `NM_STATS`, except
//! a capture that cannot record its original destination, which is refused (fail closed,
//! so that a full map can never silently take a pod out of the mesh).
#![no_std]
#![no_main]

mod connect;
mod key;
mod maps;
mod sk_msg;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists to satisfy no_std.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
