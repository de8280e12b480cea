//! The protocol inspectors read the first bytes of every connection: hostile input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodemesh_http::detect::{Verdict, client_hello, http_version};

fuzz_target!(|data: &[u8]| {
    // A verdict for every prefix, and "yes" must stay "yes" as more bytes arrive.
    let http = http_version(data);
    let tls = client_hello(data);
    if let Verdict::Yes(h) = &tls {
        if let Some(name) = &h.server_name {
            assert_eq!(name, &name.to_ascii_lowercase());
        }
    }
    if !data.is_empty() {
        let shorter = http_version(&data[..data.len() - 1]);
        if matches!(shorter, Verdict::Yes(_)) {
            assert!(
                matches!(http, Verdict::Yes(_)),
                "a decided prefix changed its mind"
            );
        }
    }
});
