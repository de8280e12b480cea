//! Configuration comes from files and control planes: any text must give a result or an
//! error, never a panic, and a translated snapshot must be internally consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = nodemesh_config::load_bootstrap(text) {
        assert_eq!(t.snapshot.is_some(), t.diagnostics.errors.is_empty());
    }
    let _ = nodemesh_config::load_config_dump(text);
});
