//! One socket line / MQTT payload → a request or one error event, never a panic; every event
//! the parser produces is one line of JSON.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use qwen2_edge::service::protocol::{parse_request, RequestLimits};

fuzz_target!(|data: &[u8]| {
    let limits = RequestLimits {
        max_new_tokens: 1024,
        max_timeout: Duration::from_secs(120),
    };
    if let Err(rejection) = parse_request(data, &limits) {
        let line = rejection.event.to_line();
        assert!(!line.contains('\n'), "{line}");
        let back: serde_json::Value = serde_json::from_str(&line).expect("an event is JSON");
        assert_eq!(back["event"], "error");
    }
});
