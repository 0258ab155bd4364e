//! Hostile chat messages (template syntax in the content, deep nesting, odd keys, tools) sent
//! as a generate request's `messages`, rendered with Qwen2.5's chat template: an error or a
//! prompt, never a panic; and a user's text is data, never template code: it appears in the
//! prompt exactly as sent.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use qwen2_edge::guide::tools::Tools;
use qwen2_edge::service::fuzzing::fixture_tokenizer;
use qwen2_edge::service::protocol::{parse_request, Op, PromptInput, RequestLimits};

fuzz_target!(|data: &[u8]| {
    // The fuzzer's bytes are the request's `messages` (and whatever fields follow them).
    let mut line = br#"{"op":"generate","id":"f","messages":"#.to_vec();
    line.extend_from_slice(data);
    line.push(b'}');
    let limits = RequestLimits {
        max_new_tokens: 16,
        max_timeout: Duration::from_secs(1),
    };
    let Ok(request) = parse_request(&line, &limits) else {
        return;
    };
    let Op::Generate(g) = request.op else {
        return;
    };
    let PromptInput::Messages(messages) = &g.input else {
        return;
    };
    let tools = g.tools.as_ref().and_then(Tools::for_template);
    let Ok(prompt) = fixture_tokenizer().apply_chat_template(messages, tools.as_ref(), true) else {
        return;
    };
    for m in messages.iter().filter(|m| m.role == "user") {
        if let Some(text) = &m.content {
            assert!(
                prompt.contains(text.as_str()),
                "{text:?} not verbatim in {prompt:?}"
            );
        }
    }
});
