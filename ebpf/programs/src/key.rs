//! The [`SockKey`] of a socket, from the fields that the sock_ops and sk_msg contexts both
//! expose under the same names.
use nodemesh_common::{SockKey, v4_mapped};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// The raw tuple fields of a context, as read by [`read_tuple!`].
pub struct RawTuple {
    pub family: u32,
    pub local_ip4: u32,
    pub remote_ip4: u32,
    pub local_ip6: [u32; 4],
    pub remote_ip6: [u32; 4],
    /// Host byte order.
    pub local_port: u32,
    /// Network byte order in the upper 16 bits of the 32-bit field.
    pub remote_port: u32,
}

/// Reads the tuple fields of a `*mut bpf_sock_ops` or `*mut sk_msg_md`.
///
/// Every field is read unconditionally, one volatile 4-byte load each: if loads sat in
/// family branches, LLVM would merge them into one load through a computed context pointer,
/// which the verifier rejects ("dereference of modified ctx ptr"). That is why this is a
/// macro at the call site and not a function taking the pointer.
macro_rules! read_tuple {
    ($ctx:expr) => {{
        use core::ptr::read_volatile as rv;
        let c = $ctx;
        // SAFETY: 4-byte loads of readable fields of the program's own context.
        unsafe {
            let l = &(*c).local_ip6;
            let r = &(*c).remote_ip6;
            $crate::key::RawTuple {
                family: rv(&(*c).family),
                local_ip4: rv(&(*c).local_ip4),
                remote_ip4: rv(&(*c).remote_ip4),
                local_ip6: [rv(&l[0]), rv(&l[1]), rv(&l[2]), rv(&l[3])],
                remote_ip6: [rv(&r[0]), rv(&r[1]), rv(&r[2]), rv(&r[3])],
                local_port: rv(&(*c).local_port),
                remote_port: rv(&(*c).remote_port),
            }
        }
    }};
}
pub(crate) use read_tuple;

/// The key of the connection as this socket sees it; `None` for families other than
/// IPv4 and IPv6.
#[inline(always)]
pub fn sock_key(t: &RawTuple) -> Option<SockKey> {
    let (local_ip, remote_ip) = match t.family {
        AF_INET => (v4_mapped(t.local_ip4), v4_mapped(t.remote_ip4)),
        AF_INET6 => (t.local_ip6, t.remote_ip6),
        _ => return None,
    };
    Some(SockKey {
        local_ip,
        remote_ip,
        local_port: t.local_port as u16,
        remote_port: u32::from_be(t.remote_port) as u16,
    })
}
