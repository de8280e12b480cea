//! `grpc-timeout` comes from the client.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(d) = nodemesh_http::router::parse_grpc_timeout(data) {
        assert!(d.as_secs() <= 99_999_999 * 3600);
    }
});
