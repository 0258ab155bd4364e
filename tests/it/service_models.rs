//! Several models in one daemon (`[[model]]`): a request picks one by `"model"`, `health`,
//! `stats`, `/v1/models` and `/metrics` show each; a reload replaces only the model that
//! changed, by its `reload_strategy` (`swap` frees the old version before loading the new one,
//! and brings it back if the new one fails); a reload can come over MQTT on `<prefix>/reload`;
//! and a stream of requests over both transports across an install and a reload loses none,
//! each ending on the version it started on.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use crate::common::TempDir;
use crate::service_support::http::{self, Addr};
use crate::service_support::mqtt::{free_port, retained_status, v5_client, Broker};
use crate::service_support::{
    damaged_current, done_of, fixture, gen, health_until, stdout_of, store_install, Server, Spec,
    UdsClient, BIN,
};

const T: Duration = Duration::from_secs(30);

/// `[[model]]` tables: (name, bundle, more lines); not verified unless a line says so.
fn tables(models: &[(&str, &Path, &[&str])]) -> String {
    let mut t = String::new();
    for (name, bundle, lines) in models {
        t += &format!(
            "[[model]]\nname = {name:?}\nbundle = {:?}\n",
            bundle.display().to_string()
        );
        if !lines.iter().any(|l| l.starts_with("verify")) {
            t += "verify = false\n";
        }
        for l in *lines {
            t += l;
            t.push('\n');
        }
        t.push('\n');
    }
    t
}

/// Greedy, 8 tokens: each fixture model answers this its own way.
fn ask(c: &mut UdsClient, id: &str, model: Option<&str>) -> Json {
    let mut extra = json!({"max_tokens": 8, "temperature": 0});
    if let Some(m) = model {
        extra["model"] = m.into();
    }
    c.send(&gen(id, "Hello", extra));
    c.until_terminal(id, T).pop().expect("a terminal event")
}

fn text(event: &Json) -> String {
    assert_eq!(event["event"], "done", "{event}");
    event["text"].as_str().expect("text").to_string()
}

/// What a one-model service on `fixture_name` answers.
fn alone(fixture_name: &str) -> String {
    let mut spec = Spec::tiny();
    spec.bundle = fixture(fixture_name).join("bundle");
    let server = Server::start(&spec);
    text(&ask(&mut server.connect(), "alone", None))
}

fn install(store: &Path, name: &str, fixture_name: &str) -> String {
    store_install(store, name, fixture_name)
}

#[test]
fn two_models_answer_side_by_side() {
    let tied = alone("tiny-tied");
    let untied = alone("tiny-untied");
    assert_ne!(tied, untied, "the fixtures must answer differently");

    let port = free_port();
    let mut spec = Spec::tiny()
        .http(vec![format!("listen = [\"127.0.0.1:{port}\"]")])
        .limits(&["max_concurrent = 2"]);
    spec.model_tables = Some(tables(&[
        ("small", &fixture("tiny-tied").join("bundle"), &[]),
        ("other", &fixture("tiny-untied").join("bundle"), &[]),
    ]));
    let server = Server::start(&spec);
    let mut c = server.connect();
    assert_eq!(text(&ask(&mut c, "default", None)), tied);
    assert_eq!(text(&ask(&mut c, "small", Some("small"))), tied);
    assert_eq!(text(&ask(&mut c, "other", Some("other"))), untied);
    // Both at once: each on its own model.
    for (id, model) in [("a", "small"), ("b", "other")] {
        c.send(&gen(
            id,
            "Hello",
            json!({"max_tokens": 8, "temperature": 0, "model": model}),
        ));
    }
    assert_eq!(text(done_of(&c.until_terminal("a", T))), tied);
    assert_eq!(text(done_of(&c.until_terminal("b", T))), untied);
    // `ask --model` picks one too.
    let printed = stdout_of(
        Command::new(BIN)
            .args(["ask", "--socket"])
            .arg(&server.socket)
            .args([
                "--model",
                "other",
                "--temperature",
                "0",
                "--max-tokens",
                "8",
                "Hello",
            ]),
        "ask",
    );
    assert_eq!(printed.trim_end(), untied);
    let e = ask(&mut c, "nope", Some("big"));
    assert_eq!(e["code"], "bad_request", "{e}");
    let message = e["message"].as_str().unwrap_or("");
    assert!(
        message.contains("\"big\"")
            && message.contains("\"small\"")
            && message.contains("\"other\""),
        "{e}"
    );

    c.send(&json!({"op": "health", "id": "h"}));
    let h = c.next(T).expect("health");
    let models = h["models"].as_array().expect("models");
    assert_eq!(models.len(), 2, "{h}");
    for (m, (name, dir)) in models
        .iter()
        .zip([("small", "tiny-tied"), ("other", "tiny-untied")])
    {
        assert_eq!(m["name"], name, "{h}");
        assert_eq!(m["status"], "ok", "{h}");
        assert!(
            m["bundle"]
                .as_str()
                .is_some_and(|b| b.ends_with(&format!("{dir}/bundle"))),
            "{h}"
        );
    }
    c.send(&json!({"op": "stats", "id": "s"}));
    let s = c.next(T).expect("stats");
    let per: Vec<(String, u64)> = s["models"]
        .as_array()
        .expect("models")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or("").to_string(),
                m["served"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        per,
        [("small".to_string(), 3), ("other".to_string(), 3)],
        "{s}"
    );
    // The top level is the default model's; the unknown model's refusal is counted there.
    assert_eq!(s["served"], 3, "{s}");
    assert_eq!(s["rejected"], 1, "{s}");

    // HTTP: the names are the OpenAI model ids.
    let tcp = Addr::Tcp(port);
    let r = http::get(&tcp, "/v1/models").expect("models");
    let listed = r.json();
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .map(|d| d.iter().filter_map(|m| m["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, ["small", "other"], "{}", r.text());
    let body = json!({"model": "other", "messages": [{"role": "user", "content": "Hello"}],
                      "max_tokens": 8, "temperature": 0});
    let r = http::post_json(&tcp, "/v1/chat/completions", &[], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let reply = r.json();
    assert_eq!(reply["model"], "other", "{reply}");
    assert_eq!(reply["choices"][0]["message"]["content"], untied.as_str());
    let mut unknown = body.clone();
    unknown["model"] = "gpt-4".into();
    let r = http::post_json(&tcp, "/v1/chat/completions", &[], &unknown);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let metrics = http::get(&tcp, "/metrics").expect("metrics").text();
    for line in [
        r#"qwen2_edge_requests_total{model="other",transport="http",outcome="served"} 1"#,
        r#"qwen2_edge_requests_total{model="small",transport="unix_socket",outcome="served"} 3"#,
        r#"qwen2_edge_model_info{model="other","#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
}

#[test]
fn a_swap_reload_frees_the_old_version_first_and_leaves_the_other_model_alone() {
    let store = TempDir::new("swap-store");
    let v1 = install(&store.0, "swapped", "tiny-tied");
    let mut spec = Spec::tiny().limits(&["max_concurrent = 2", "min_token_interval_ms = 50"]);
    spec.model_tables = Some(tables(&[
        ("fixed", &fixture("tiny-untied").join("bundle"), &[]),
        (
            "swapped",
            &store.0.join("swapped/current"),
            &["verify = true", "reload_strategy = \"swap\""],
        ),
    ]));
    let server = Server::start(&spec);
    let mut old = server.connect();
    old.send(&gen(
        "old",
        "Count to forty.",
        json!({"max_tokens": 40, "temperature": 0, "model": "swapped"}),
    ));
    old.inbox
        .wait_for(T, |m| {
            m.json()["id"] == "old" && m.json()["event"] == "token"
        })
        .expect("a first token");
    let v2 = install(&store.0, "swapped", "tiny-untied");
    server.signal("HUP");
    // While the old version drains, the model takes no new requests; the other one does.
    let h = health_until(&server, "swap under way", |h| {
        h["models"][1]["status"] == "unloaded"
    });
    assert_eq!(h["models"][1]["reload"]["state"], "in_progress", "{h}");
    assert_eq!(h["models"][0]["status"], "ok", "{h}");
    let mut c = server.connect();
    let e = ask(&mut c, "during", Some("swapped"));
    assert_eq!(e["code"], "busy", "{e}");
    assert!(
        e["message"].as_str().is_some_and(|m| m.contains("reload")),
        "{e}"
    );
    text(&ask(&mut c, "fixed", Some("fixed")));
    let h = health_until(&server, "swap done", |h| h["reload"]["state"] == "done");
    let m = &h["models"][1];
    assert_eq!(m["status"], "ok", "{h}");
    assert_eq!(m["reload"]["state"], "done", "{h}");
    assert!(
        m["bundle"].as_str().is_some_and(|b| b.ends_with(&v2)),
        "{h}"
    );
    assert_eq!(h["models"][0]["reload"]["state"], "none", "{h}");
    // The request accepted before the reload ran to its end on the old version.
    let done = old.until_terminal("old", T).pop().expect("terminal");
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["finish_reason"], "length", "{done}");
    text(&ask(&mut c, "after", Some("swapped")));
    // Swap: the old version was unloaded before the new one was loaded; the other model was
    // not touched.
    let log = server.log();
    let unloaded = log
        .find("reload (swap): model \"swapped\" unloaded")
        .unwrap_or_else(|| panic!("no unload in\n{log}"));
    let loaded_again = log
        .rfind("model \"swapped\": loaded ")
        .unwrap_or_else(|| panic!("no load in\n{log}"));
    assert!(unloaded < loaded_again, "{log}");
    let line = log[loaded_again..].lines().next().unwrap_or("");
    assert!(line.contains(&v2) && !line.contains(&v1), "{line}");
    assert_eq!(log.matches("model \"fixed\": loaded").count(), 1, "{log}");
}

#[test]
fn a_failed_swap_brings_the_old_version_back() {
    let store = TempDir::new("swap-fail");
    let v1 = install(&store.0, "tiny", "tiny-tied");
    let mut spec = Spec::tiny();
    spec.model_tables = Some(tables(&[(
        "tiny",
        &store.0.join("tiny/current"),
        &["verify = true", "reload_strategy = \"swap\""],
    )]));
    let server = Server::start(&spec);
    let before = text(&ask(&mut server.connect(), "before", None));
    // A damaged version made current behind the store's back.
    damaged_current(&store.0, "tiny");
    server.signal("HUP");
    let h = health_until(&server, "failed swap", |h| h["reload"]["state"] == "failed");
    let error = h["reload"]["error"].as_str().unwrap_or("");
    assert!(
        error.contains("sha256") && error.contains("previous version serves again"),
        "{h}"
    );
    assert_eq!(h["models"][0]["status"], "ok", "{h}");
    assert!(
        h["bundle"].as_str().is_some_and(|b| b.ends_with(&v1)),
        "{h}"
    );
    assert_eq!(text(&ask(&mut server.connect(), "after", None)), before);
}

/// One client's loop: the same greedy request again and again until `stop`; every terminal
/// event it got.
fn keep_asking(stop: &AtomicBool, mut send: impl FnMut(&str) -> Json) -> Vec<Json> {
    let mut got = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        got.push(send(&format!("q{n}")));
    }
    got
}

#[test]
fn a_stream_of_requests_over_both_transports_survives_an_install_and_an_mqtt_reload() {
    let Some(broker) = Broker::start("a_stream_of_requests_survives_a_reload") else {
        return;
    };
    let store = TempDir::new("stream-store");
    install(&store.0, "tiny", "tiny-tied");
    let mut spec = Spec::tiny()
        .limits(&["max_concurrent = 2", "min_token_interval_ms = 20"])
        .mqtt(broker.service_lines(&["allow_reload = true", "token_interval_ms = 0"]));
    spec.bundle = store.0.join("tiny/current");
    spec.verify = true;
    let server = Server::start(&spec);
    let v1_text = text(&ask(&mut server.connect(), "v1", None));

    let stop = Arc::new(AtomicBool::new(false));
    let socket_client = {
        let stop = Arc::clone(&stop);
        let mut c = server.connect();
        std::thread::spawn(move || keep_asking(&stop, |id| ask(&mut c, id, None)))
    };
    let port = broker.port;
    let mqtt_client = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let (mut c, reply) = v5_client(port, "stream");
            keep_asking(&stop, |id| {
                c.request(
                    "qwen2-edge",
                    &gen(id, "Hello", json!({"max_tokens": 8, "temperature": 0})),
                    &reply,
                );
                let m = c
                    .inbox
                    .wait_for(T, |m| {
                        let j = m.json();
                        m.topic == reply
                            && j["id"] == id
                            && (j["event"] == "done" || j["event"] == "error")
                    })
                    .unwrap_or_else(|| panic!("no answer to {id} over MQTT"));
                m.json()
            })
        })
    };
    std::thread::sleep(Duration::from_millis(800));
    let v2 = install(&store.0, "tiny", "tiny-untied");
    // The operator's reload, on the reload topic.
    let (mut operator, reply) = v5_client(port, "operator");
    operator.publish(
        "qwen2-edge/reload",
        json!({"op": "reload", "id": "r"}).to_string().into_bytes(),
        Some(&reply),
        Some(&b"r"[..]),
    );
    let answer = operator
        .inbox
        .wait_for(T, |m| m.topic == reply)
        .expect("an answer to the reload")
        .json();
    assert_eq!(answer["event"], "health", "{answer}");
    let until = Instant::now() + T;
    loop {
        let text = retained_status(port, "qwen2-edge/health").unwrap_or_default();
        let h: Json = serde_json::from_str(&text).unwrap_or(Json::Null);
        if h["reload"]["state"] == "done" {
            // What a fleet dashboard reads: per model, its name, version, variant and signer.
            let m = &h["models"][0];
            assert_eq!(m["name"], "tiny", "{h}");
            assert_eq!(m["version"], v2.as_str(), "{h}");
            assert_eq!(m["variant"], "fp32", "{h}");
            assert_eq!(m["signature"]["state"], "unsigned", "{h}");
            break;
        }
        assert!(Instant::now() < until, "retained health {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    let v2_text = text(&ask(&mut server.connect(), "v2", None));
    assert_ne!(v1_text, v2_text);
    let mut seen = [0usize; 2];
    for (transport, got) in [
        ("socket", socket_client.join().expect("socket client")),
        ("mqtt", mqtt_client.join().expect("mqtt client")),
    ] {
        assert!(got.len() >= 2, "{transport}: {got:?}");
        for e in got {
            // None lost, none cut short, each the whole answer of one version.
            let t = text(&e);
            assert_eq!(e["finish_reason"], "length", "{transport}: {e}");
            let version = [&v1_text, &v2_text]
                .iter()
                .position(|v| **v == t)
                .unwrap_or_else(|| panic!("{transport}: {t:?} is neither version's answer"));
            seen[version] += 1;
        }
    }
    assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
}

/// `[[model]] draft`: another model of the config proposes tokens that this one verifies. The
/// answers are exactly those of the same model without a draft, greedy and sampled, whether
/// the draft is another model (tiny-yarn: the same vocabulary, other weights, so drafts are
/// rejected too), the same weights (every draft kept), or another model after prompt lookup.
#[test]
fn a_draft_model_leaves_every_answer_as_the_model_gives_it() {
    let (tied, yarn) = (
        fixture("tiny-tied").join("bundle"),
        fixture("tiny-yarn").join("bundle"),
    );
    let mut spec = Spec::tiny();
    spec.model_tables = Some(tables(&[
        ("plain", &tied, &[]),
        ("yarn", &yarn, &[]),
        ("drafted", &tied, &["draft = \"yarn\"", "draft_tokens = 4"]),
        ("self", &tied, &["draft = \"plain\"", "draft_tokens = 6"]),
        ("both", &tied, &["draft = \"yarn\"", "prompt_lookup = 8"]),
    ]));
    let server = Server::start(&spec);
    let mut c = server.connect();
    let long = "The greenhouse controller reads every soil sensor once a minute. ".repeat(3);
    let prompts = [
        "Hello",
        "Count from one to ten:",
        "The quick brown fox",
        // Over a prefill slice: the draft model catches it up a slice per step first.
        long.as_str(),
    ];
    for (i, prompt) in prompts.iter().enumerate() {
        for extra in [
            json!({"max_tokens": 24, "temperature": 0}),
            json!({"max_tokens": 24, "temperature": 0.9, "seed": 7 + i}),
        ] {
            let answer = |c: &mut UdsClient, model: &str| {
                let id = format!("{model}-{i}");
                let mut extra = extra.clone();
                extra["model"] = model.into();
                c.send(&gen(&id, prompt, extra));
                text(&c.until_terminal(&id, T).pop().expect("a terminal event"))
            };
            let plain = answer(&mut c, "plain");
            assert_eq!(answer(&mut c, "drafted"), plain, "{prompt:?} {extra}");
            assert_eq!(answer(&mut c, "self"), plain, "{prompt:?} {extra}");
            assert_eq!(answer(&mut c, "both"), plain, "{prompt:?} {extra}");
        }
    }
    c.send(&json!({"op": "stats", "id": "s"}));
    let stats = c.next(T).expect("stats");
    let counts = |name: &str| {
        let m = stats["models"]
            .as_array()
            .expect("models")
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {stats}"))
            .clone();
        (
            m["draft_tokens"].as_u64().unwrap_or(0),
            m["accepted_draft_tokens"].as_u64().unwrap_or(0),
        )
    };
    let (drafted, accepted) = counts("drafted");
    assert!(drafted > 0 && accepted < drafted, "{stats}");
    let (drafted, accepted) = counts("self");
    assert!(drafted > 0 && accepted > 0, "{stats}");
    let (drafted, _) = counts("both");
    assert!(drafted > 0, "{stats}");
    assert_eq!(counts("plain"), (0, 0));
}

/// Four requests decoding at once with a draft model: each step gives drafts only the rows a
/// pass over the weights takes (none with three or more decoding, `DRAFT_MODEL_STEP_ROWS`),
/// and every answer is still the model's own, whatever mix of steps with and without drafts
/// it went through.
#[test]
fn a_draft_model_serving_four_at_once_leaves_every_answer_as_the_model_gives_it() {
    let tied = fixture("tiny-tied").join("bundle");
    let mut spec = Spec::tiny().limits(&["max_concurrent = 4"]);
    spec.model_tables = Some(tables(&[
        ("plain", &tied, &[]),
        ("self", &tied, &["draft = \"plain\"", "draft_tokens = 6"]),
        ("both", &tied, &["draft = \"plain\"", "prompt_lookup = 8"]),
    ]));
    let server = Server::start(&spec);
    let mut c = server.connect();
    let prompts = [
        "Hello",
        "Count from one to ten:",
        "The quick brown fox",
        "Once upon",
    ];
    let extra = |model: &str, i: usize| json!({"max_tokens": 32, "temperature": 0.8, "seed": 3 + i, "model": model});
    let mut plain = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let id = format!("plain-{i}");
        c.send(&gen(&id, prompt, extra("plain", i)));
        plain.push(text(
            &c.until_terminal(&id, T).pop().expect("a terminal event"),
        ));
    }
    // With prompt lookup too.
    for model in ["self", "both"] {
        for (i, prompt) in prompts.iter().enumerate() {
            c.send(&gen(&format!("{model}-{i}"), prompt, extra(model, i)));
        }
        for (i, want) in plain.iter().enumerate() {
            let id = format!("{model}-{i}");
            let got = text(&c.until_terminal(&id, T).pop().expect("a terminal event"));
            assert_eq!(&got, want, "{model} {:?}", prompts[i]);
        }
    }
}

#[test]
fn a_draft_model_of_another_vocabulary_stops_the_start_with_a_reason() {
    let mut spec = Spec::tiny();
    spec.model_tables = Some(tables(&[
        ("untied", &fixture("tiny-untied").join("bundle"), &[]),
        ("tied", &tiny_bundle(), &["draft = \"untied\""]),
    ]));
    let mut server = Server::launch_spec(&spec);
    let status = server.wait_exit(T);
    assert!(!status.success());
    assert!(server.log().contains("vocabulary"), "{}", server.log());
}

fn tiny_bundle() -> std::path::PathBuf {
    fixture("tiny-tied").join("bundle")
}
