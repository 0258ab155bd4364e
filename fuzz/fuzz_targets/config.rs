//! The service's TOML config → a config or one line naming the key, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qwen2_edge::config::ServiceConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = ServiceConfig::parse(text) {
        assert!(!e.0.contains('\n'), "{e}");
    }
});
