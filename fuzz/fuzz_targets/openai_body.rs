//! An HTTP request body for /v1/chat/completions or /v1/completions → a request or an OpenAI
//! error, never a panic. The first byte picks the endpoint.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use qwen2_edge::service::fuzzing::openai_body;
use qwen2_edge::service::protocol::RequestLimits;

fuzz_target!(|data: &[u8]| {
    let Some((first, body)) = data.split_first() else {
        return;
    };
    let limits = RequestLimits {
        max_new_tokens: 1024,
        max_timeout: Duration::from_secs(120),
    };
    openai_body(first & 1 == 0, body, &limits);
});
