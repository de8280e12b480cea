//! Conversions between std's socket addresses and the kernel-side representation
//! (16-byte network-order words, IPv4-mapped; host-order ports). See `nodemesh-common`.
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use nodemesh_common::{OrigDst, SockKey};

/// The mark the proxy puts on its sockets unless configured otherwise.
pub const DEFAULT_PROXY_MARK: u32 = nodemesh_common::defaults::PROXY_MARK;

/// `ip` as the programs store it.
pub fn ip_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The inverse of [`ip_words`]; IPv4-mapped addresses come back as IPv4.
pub fn words_ip(words: &[u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Normalises an address seen by a socket (`::ffff:a.b.c.d` on a dual-stack socket) to the
/// form nodemesh reports.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The key of a connection as the end at `local` sees it.
pub fn sock_key(local: SocketAddr, remote: SocketAddr) -> SockKey {
    SockKey {
        local_ip: ip_words(local.ip()),
        remote_ip: ip_words(remote.ip()),
        local_port: local.port(),
        remote_port: remote.port(),
    }
}

/// `(local, remote)` of a key.
pub fn key_addrs(key: &SockKey) -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::new(words_ip(&key.local_ip), key.local_port),
        SocketAddr::new(words_ip(&key.remote_ip), key.remote_port),
    )
}

/// The original destination recorded for a redirected connection.
pub fn orig_dst_addr(orig: &OrigDst) -> SocketAddr {
    SocketAddr::new(words_ip(&orig.ip), orig.port)
}

/// Whether the programs can redirect to `addr` from both connect4 and connect6.
pub fn is_capturable_proxy_addr(addr: SocketAddr) -> bool {
    matches!(addr.ip(), IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_unspecified())
        && addr.port() != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_roundtrip_v4_and_v6() {
        for ip in ["198.18.0.2", "::1", "2001:db8::7"] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(words_ip(&ip_words(ip)), ip);
        }
    }

    #[test]
    fn v4_words_match_the_kernel_layout() {
        // What the programs compute with v4_mapped(user_ip4) for 198.18.0.2.
        let be = u32::from_ne_bytes([198, 18, 0, 2]);
        assert_eq!(
            ip_words("198.18.0.2".parse().expect("ip")),
            nodemesh_common::v4_mapped(be)
        );
    }

    #[test]
    fn keys_reverse_like_the_kernel_does() {
        let a: SocketAddr = "198.18.0.2:40000".parse().expect("addr");
        let b: SocketAddr = "198.18.0.1:15001".parse().expect("addr");
        assert_eq!(sock_key(a, b).reversed(), sock_key(b, a));
        assert_eq!(key_addrs(&sock_key(a, b)), (a, b));
    }

    #[test]
    fn only_routable_ipv4_can_be_the_proxy() {
        assert!(is_capturable_proxy_addr(
            "198.18.0.1:15001".parse().expect("addr")
        ));
        assert!(!is_capturable_proxy_addr(
            "127.0.0.1:15001".parse().expect("addr")
        ));
        assert!(!is_capturable_proxy_addr(
            "[2001:db8::1]:15001".parse().expect("addr")
        ));
        assert!(!is_capturable_proxy_addr(
            "198.18.0.1:0".parse().expect("addr")
        ));
    }
}
