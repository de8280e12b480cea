//! Request paths come from the client: normalization must never panic, must yield an
//! absolute path without dot segments, and must be idempotent.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if !path.starts_with('/') {
        return;
    }
    let once = nodemesh_http::sanitize::normalize_path(path);
    assert!(once.starts_with('/'), "{path:?} -> {once:?}");
    assert!(
        !once.split('/').any(|s| s == "." || s == ".."),
        "{path:?} -> {once:?}"
    );
    assert_eq!(nodemesh_http::sanitize::normalize_path(&once), once, "{path:?}");
});
