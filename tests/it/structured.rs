//! Structured output through the daemon: JSON-schema constrained replies and Qwen2.5 tool calls
//! on the demo model over the Unix socket and MQTT, every output checked with Python's
//! `jsonschema` (an implementation independent of llguidance); compile errors and cut-off
//! outputs on the tiny fixture.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use crate::common;
use crate::service_support::mqtt::{v5_client, Broker};
use crate::service_support::{gen, is_terminal, now_nanos, Inbox, Server, Spec};

/// Twenty things an edge box hears, each asked under each of the three schemas.
const PROMPTS: [&str; 20] = [
    "The kitchen lights are on and it is 22 degrees inside.",
    "Someone rang the front door bell twice.",
    "The garage door has been open for an hour.",
    "Play some jazz in the living room.",
    "The bedroom thermostat reads 19.5 degrees.",
    "It is going to rain this afternoon.",
    "The smoke detector on the second floor beeped.",
    "Turn off every light downstairs.",
    "The fridge temperature rose to 9 degrees.",
    "The bathroom fan has been running all night.",
    "Three motion sensors in the hall saw movement.",
    "Set the heating to 21 degrees at 6 am.",
    "The washing machine finished its cycle.",
    "The window in the office is open and it is 4 degrees outside.",
    "The baby monitor in the nursery detected crying.",
    "Dim the dining room lights to 30 percent.",
    "The water leak sensor under the sink is wet.",
    "The solar panels produced 12 kWh today.",
    "The dog door was used five times this morning.",
    "The attic humidity is 70 percent.",
];

const SYSTEM: &str = "You turn smart-home events into JSON. Reply with JSON only.";

fn schemas() -> Vec<(String, Json)> {
    let path = fixtures().join("schemas.json");
    let text = std::fs::read_to_string(&path).expect("schemas.json");
    let all: serde_json::Map<String, Json> = serde_json::from_str(&text).expect("schemas");
    all.into_iter().collect()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/structured")
}

/// Validates `(id, schema, text)` triples with Python's jsonschema; panics with its report.
fn validate(python: &Path, cases: &[(String, Json, String)]) {
    let list: Vec<Json> = cases
        .iter()
        .map(|(id, schema, text)| json!({"id": id, "schema": schema, "text": text}))
        .collect();
    let dir = tempfile_dir();
    let file = dir.join("cases.json");
    std::fs::write(&file, serde_json::to_string(&list).expect("json")).expect("write cases");
    let out = Command::new(python)
        .arg(fixtures().join("validate.py"))
        .arg(&file)
        .output()
        .expect("run python");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "jsonschema says:\n{report}");
    eprintln!("{}", report.trim());
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qwen2-edge-structured-{}", now_nanos()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Every (schema, prompt) pair as a greedy request constrained to the schema.
fn schema_requests(prefix: &str) -> Vec<(String, Json, Json)> {
    let mut out = Vec::new();
    for (name, schema) in schemas() {
        for (i, prompt) in PROMPTS.iter().enumerate() {
            let id = format!("{prefix}-{name}-{i}");
            let request = json!({
                "op": "generate", "id": id, "temperature": 0, "max_tokens": 96, "stream": false,
                "messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": prompt}],
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": name, "schema": schema, "strict": true}},
            });
            out.push((id, schema.clone(), request));
        }
    }
    out
}

/// Collects the terminal event of every id in `ids` from `inbox`.
fn terminals(inbox: &mut Inbox, ids: &[String], timeout: Duration) -> HashMap<String, Json> {
    let until = Instant::now() + timeout;
    let mut done = HashMap::new();
    while done.len() < ids.len() {
        let left = until.saturating_duration_since(Instant::now());
        let Some(m) = inbox.wait_for(left, |m| is_terminal(&m.json())) else {
            panic!(
                "{} of {} requests ended within {timeout:?}",
                done.len(),
                ids.len()
            );
        };
        let j = m.json();
        let id = j["id"].as_str().unwrap_or_default().to_string();
        done.insert(id, j);
    }
    done
}

/// The done events' texts, checked: complete under the grammar, ended by the model.
fn outputs(
    cases: &[(String, Json, Json)],
    done: &HashMap<String, Json>,
) -> Vec<(String, Json, String)> {
    cases
        .iter()
        .map(|(id, schema, _)| {
            let e = &done[id];
            assert_eq!(e["event"], "done", "{id}: {e}");
            assert_eq!(e["finish_reason"], "stop", "{id}: {e}");
            assert_eq!(e["grammar_complete"], true, "{id}: {e}");
            let text = e["text"].as_str().expect("text").to_string();
            (id.clone(), schema.clone(), text)
        })
        .collect()
}

fn demo_spec(bundle: &Path, mqtt: Option<Vec<String>>) -> Spec {
    let mut spec = Spec::tiny().limits(&["max_concurrent = 4", "max_queue = 64"]);
    if let Some(lines) = mqtt {
        spec = spec.mqtt(lines);
    }
    spec.bundle = bundle.to_path_buf();
    spec.variant = "int8".into();
    spec
}

/// What the demo-model tests need: the daemon (socket and MQTT), its broker, and a Python
/// with jsonschema. Fields drop in order: the daemon stops before its broker.
struct DemoRig {
    server: Server,
    broker: Broker,
    python: PathBuf,
}

fn demo_rig(test: &str) -> Option<DemoRig> {
    let bundle = common::demo_bundle(test)?;
    let python = common::python(test)?;
    let broker = Broker::start(test)?;
    let server = Server::start(&demo_spec(&bundle, Some(broker.service_lines(&[]))));
    Some(DemoRig {
        server,
        broker,
        python,
    })
}

#[test]
fn json_schema_outputs_validate_over_both_transports() {
    let Some(rig) = demo_rig("json_schema_outputs_validate_over_both_transports") else {
        return;
    };
    let (server, broker, python) = (&rig.server, &rig.broker, &rig.python);
    let timeout = Duration::from_secs(900);

    // Unix socket: all sixty at once (four decode together, the rest queue).
    let cases = schema_requests("uds");
    let mut c = server.connect();
    for (_, _, request) in &cases {
        c.send(request);
    }
    let ids: Vec<String> = cases.iter().map(|(id, _, _)| id.clone()).collect();
    let done = terminals(&mut c.inbox, &ids, timeout);
    let mut checked = outputs(&cases, &done);

    // MQTT 5: the same sixty.
    let cases = schema_requests("mqtt");
    let (mut m, reply) = v5_client(broker.port, "structured");
    for (_, _, request) in &cases {
        m.request("qwen2-edge", request, &reply);
    }
    let ids: Vec<String> = cases.iter().map(|(id, _, _)| id.clone()).collect();
    let done = terminals(&mut m.inbox, &ids, timeout);
    // Greedy and batch-independent: both transports give the same text.
    for (id, _, text) in outputs(&cases, &done) {
        let twin = id.replacen("mqtt-", "uds-", 1);
        let uds = checked.iter().find(|(i, _, _)| *i == twin).expect("twin");
        assert_eq!(text, uds.2, "{id} differs from {twin}");
        checked.push((id, uds.1.clone(), text));
    }
    assert_eq!(checked.len(), 120);
    validate(python, &checked);
}

fn home_tools() -> Json {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city"], "additionalProperties": false}}},
        {"type": "function", "function": {
            "name": "set_light",
            "description": "Switch a room's light on or off, optionally dimmed.",
            "parameters": {"type": "object", "properties": {
                "room": {"enum": ["kitchen", "living room", "bedroom", "hall"]},
                "on": {"type": "boolean"},
                "brightness": {"type": "integer", "minimum": 0, "maximum": 100}},
                "required": ["room", "on"], "additionalProperties": false}}}
    ])
}

/// The parameter schema of the tool a call names.
fn parameters_of(name: &str) -> Json {
    home_tools()
        .as_array()
        .expect("tools")
        .iter()
        .find(|t| t["function"]["name"] == name)
        .unwrap_or_else(|| panic!("no tool {name}"))["function"]["parameters"]
        .clone()
}

/// The calls of a done event, as (id, parameter schema, arguments text) for the validator.
fn calls_of(id: &str, done: &Json) -> Vec<(String, Json, String)> {
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["finish_reason"], "tool_calls", "{done}");
    let calls = done["tool_calls"].as_array().expect("tool_calls");
    assert!(!calls.is_empty(), "{done}");
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["type"], "function", "{c}");
            assert!(
                c["id"].as_str().is_some_and(|s| s.starts_with("call_")),
                "{c}"
            );
            let name = c["function"]["name"].as_str().expect("name");
            let args = c["function"]["arguments"].as_str().expect("arguments text");
            (format!("{id}#{i}"), parameters_of(name), args.to_string())
        })
        .collect()
}

#[test]
fn tool_calls_validate_and_a_follow_up_turn_answers() {
    let Some(rig) = demo_rig("tool_calls_validate_and_a_follow_up_turn_answers") else {
        return;
    };
    let (server, broker, python) = (&rig.server, &rig.broker, &rig.python);
    let t = Duration::from_secs(300);
    let tools = home_tools();
    let mut c = server.connect();
    let mut checked = Vec::new();

    // `required`: a call is forced, and its arguments follow the tool's schema.
    let ask = |id: &str, prompt: &str, choice: Json| {
        gen(
            id,
            prompt,
            json!({"temperature": 0, "max_tokens": 96, "tools": tools,
                               "tool_choice": choice}),
        )
    };
    for (id, prompt) in [
        ("req-light", "Turn on the kitchen light at half brightness."),
        ("req-weather", "Is it cold in Oslo right now?"),
        ("req-chat", "Tell me a joke."),
    ] {
        c.send(&ask(id, prompt, json!("required")));
        let done = c.until_terminal(id, t).pop().expect("done");
        checked.extend(calls_of(id, &done));
    }
    // A named function: that one, whatever the question.
    let named = json!({"type": "function", "function": {"name": "set_light"}});
    c.send(&ask("named", "What is the weather in Rome?", named));
    let done = c.until_terminal("named", t).pop().expect("done");
    let calls = calls_of("named", &done);
    assert!(
        done["tool_calls"][0]["function"]["name"] == "set_light",
        "{done}"
    );
    checked.extend(calls);

    // `auto`: the model decides; asked about the weather, it calls get_weather.
    let system = "You are a helpful home assistant. After a tool result, answer the user in one plain sentence.";
    let question = "What is the weather like in Paris today?";
    let mut auto = ask("auto", question, json!("auto"));
    auto["messages"] = json!([{"role": "system", "content": system},
                              {"role": "user", "content": question}]);
    c.send(&auto);
    let done = c.until_terminal("auto", t).pop().expect("done");
    checked.extend(calls_of("auto", &done));
    let call = done["tool_calls"][0].clone();
    assert_eq!(call["function"]["name"], "get_weather", "{done}");

    // The next turn: the assistant's call and the tool's result; the model answers in text.
    let messages = json!([
        {"role": "system", "content": system},
        {"role": "user", "content": question},
        {"role": "assistant", "content": done["text"], "tool_calls": [call.clone()]},
        {"role": "tool", "tool_call_id": call["id"],
         "content": "{\"city\": \"Paris\", \"temperature_c\": 18, \"condition\": \"light rain\"}"}
    ]);
    // `none`: shown the tools again, the 0.5B model calls them again rather than answer.
    c.send(
        &json!({"op": "generate", "id": "answer", "temperature": 0, "max_tokens": 96,
                   "tools": tools, "tool_choice": "none", "messages": messages}),
    );
    let done = c.until_terminal("answer", t).pop().expect("done");
    assert_eq!(done["finish_reason"], "stop", "{done}");
    assert!(done.get("tool_calls").is_none(), "{done}");
    let answer = done["text"].as_str().expect("text");
    assert!(
        answer.contains("18") || answer.contains("rain"),
        "{answer:?}"
    );

    // Over MQTT, `required` as well.
    let (mut m, reply) = v5_client(broker.port, "tools");
    m.request(
        "qwen2-edge",
        &ask(
            "mqtt-light",
            "Switch off the hall light.",
            json!("required"),
        ),
        &reply,
    );
    let done = m.inbox.until_terminal("mqtt-light", t).pop().expect("done");
    checked.extend(calls_of("mqtt-light", &done));
    validate(python, &checked);
}

#[test]
fn bad_constraints_are_refused_and_a_cut_output_says_so() {
    let server = Server::start(&Spec::tiny());
    let mut c = server.connect();
    let t = Duration::from_secs(60);
    for (id, extra, needle) in [
        (
            "schema",
            json!({"response_format": {"type": "json_schema",
                   "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}}),
            "does not compile",
        ),
        (
            "lark",
            json!({"grammar": {"type": "lark", "value": "start: undefined_rule"}}),
            "does not compile",
        ),
        (
            "kind",
            json!({"grammar": {"type": "ebnf", "value": "x"}}),
            "grammar must be",
        ),
        (
            "format",
            json!({"response_format": {"type": "yaml"}}),
            "response_format must be",
        ),
        (
            "both",
            json!({"response_format": {"type": "json_object"},
                   "grammar": {"type": "regex", "value": "a+"}}),
            "not both",
        ),
        (
            "tool",
            json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                   "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            "not in tools",
        ),
    ] {
        c.send(&gen(id, "hi", extra));
        let events = c.until_terminal(id, t);
        assert_eq!(
            events.len(),
            1,
            "{id}: no token before the error: {events:?}"
        );
        let e = &events[0];
        assert_eq!(e["event"], "error", "{id}: {e}");
        assert_eq!(e["code"], "bad_request", "{id}: {e}");
        let message = e["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{id}: {message}");
    }
    // A regex the tiny model follows token by token; cut by max_tokens before it can end.
    c.send(&gen(
        "cut",
        "hi",
        json!({"max_tokens": 3, "grammar": {"type": "regex", "value": "(ab){10}"}}),
    ));
    let done = c.until_terminal("cut", t).pop().expect("done");
    assert_eq!(done["finish_reason"], "length", "{done}");
    assert_eq!(done["grammar_complete"], false, "{done}");
    let text = done["text"].as_str().expect("text");
    assert!(
        !text.is_empty() && "abababababababababab".starts_with(text),
        "{text:?}"
    );
    // And one that fits: the text is exactly the regex's only match.
    c.send(&gen(
        "whole",
        "hi",
        json!({"max_tokens": 40, "grammar": {"type": "regex", "value": "(ab){3}"}}),
    ));
    let done = c.until_terminal("whole", t).pop().expect("done");
    assert_eq!(done["text"], "ababab", "{done}");
    assert_eq!(done["finish_reason"], "stop", "{done}");
    assert_eq!(done["grammar_complete"], true, "{done}");
}

#[test]
fn every_backend_follows_a_grammar_from_the_command_line() {
    let test = "every_backend_follows_a_grammar_from_the_command_line";
    let dir = tempfile_dir();
    let grammar = dir.join("g.lark");
    std::fs::write(&grammar, "start: /(ab){3}/\n").expect("write grammar");
    let grammar = grammar.to_str().expect("utf-8 path").to_string();
    let mut runs = vec![("native", "fp32"), ("tract", "fp32")];
    if common::ort_library(test).is_some() {
        runs.push(("ort", "fp32-ort"));
    }
    for (backend, variant) in runs {
        let flags = [
            "--backend",
            backend,
            "--variant",
            variant,
            "--grammar",
            &grammar,
        ];
        let out = crate::service_support::generate(&crate::service_support::tiny(), &flags, "hi");
        assert_eq!(out, "ababab\n", "{backend}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
