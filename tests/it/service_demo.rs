//! The daemon on the demo model (Qwen2.5-Coder-0.5B-Instruct, int8): over the Unix socket and
//! over MQTT the streamed answer equals `qwen2-edge generate`. Needs QWEN2_EDGE_DEMO_BUNDLE
//! (skipped visibly without it, required when CI is set) and mosquitto.

use crate::common;
use crate::service_support;

use std::time::Duration;

use serde_json::json;
use service_support::mqtt::{Broker, Client, Version};
use service_support::{generate, now_nanos, streamed_text, Server, Spec};

#[test]
fn demo_model_streams_the_same_answer_as_generate_over_both_transports() {
    let test = "demo_model_streams_the_same_answer_as_generate_over_both_transports";
    let Some(bundle) = common::demo_bundle(test) else {
        return;
    };
    let Some(broker) = Broker::start(test) else {
        return;
    };
    let prompt = "What is the capital of France?";
    // `qwen2-edge generate`'s greedy answer, without its final newline.
    let greedy = |extra: &[&str]| {
        let flags = [
            "--variant",
            "int8",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
        ];
        let out = generate(&bundle, &[&flags[..], extra].concat(), prompt);
        out.strip_suffix('\n').unwrap_or(&out).to_string()
    };
    let expected = greedy(&[]);
    assert!(expected.contains("Paris"), "{expected:?}");

    let mut spec = Spec::tiny().mqtt(broker.service_lines(&[]));
    spec.bundle = bundle.clone();
    spec.variant = "int8".into();
    let server = Server::start(&spec);
    let request = json!({"op": "generate", "id": "paris", "temperature": 0, "max_tokens": 24,
                         "messages": [{"role": "user", "content": prompt}]});
    let t = Duration::from_secs(120);

    let mut c = server.connect();
    c.send(&request);
    let events = c.until_terminal("paris", t);
    assert_eq!(streamed_text(&events), expected);

    // Over MQTT a raw prompt (no chat template): a prompt that shares no prefix with the
    // previous one, so the session's prefix reuse (logits of the one-token path instead of
    // the batched prompt pass) cannot make it differ from `generate` in the last bits.
    let expected = greedy(&["--raw"]);
    let request = json!({"op": "generate", "id": "raw", "temperature": 0, "max_tokens": 24,
                         "prompt": prompt});
    let id = format!("demo-{}", now_nanos());
    let mut m = Client::connect(broker.port, Version::V5, &id, false);
    let reply = format!("test/{id}/reply");
    m.subscribe(&reply);
    m.request("qwen2-edge", &request, &reply);
    let events = m.inbox.until_terminal("raw", t);
    assert_eq!(streamed_text(&events), expected);
    let done = events.last().expect("done");
    assert_eq!(done["event"], "done");
    assert_eq!(done["text"], expected.as_str());
}
