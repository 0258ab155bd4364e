//! Batched decoding, the prefix cache and the context policy, through the scheduler in
//! process (the same engine thread the daemon runs) and through the native backend.

use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use qwen2_edge::backend::{self, BackendKind, LoadOptions, Logits, StepInput};
use qwen2_edge::bundle::Verify;
use qwen2_edge::engine::{Engine, EngineOptions};
use qwen2_edge::service::metrics::Transport;
use qwen2_edge::service::protocol::{
    parse_request, ErrorCode, Event, EventBody, Op, RequestLimits, Stats,
};
use qwen2_edge::service::scheduler::{EventSink, Scheduler, SchedulerConfig};

use crate::common;

struct Collect(Mutex<mpsc::Sender<Event>>);

impl EventSink for Collect {
    fn send(&self, event: Event) {
        let _ = self.0.lock().unwrap().send(event);
    }
}

fn engine(bundle: &std::path::Path, variant: &str, prefix_cache_mib: usize) -> Arc<Engine> {
    Arc::new(
        Engine::load(&EngineOptions {
            bundle: bundle.to_path_buf(),
            verify: Verify::SizesOnly,
            backend: BackendKind::Native,
            variant: variant.into(),
            threads: 2,
            kernels: String::new(),
            kv_cache: Default::default(),
            lm_head: Default::default(),
            prefix_cache_mib,
            prefix_cache_file: None,
            no_mmap: false,
            ort: Default::default(),
            trusted_keys: Vec::new(),
        })
        .unwrap_or_else(|e| panic!("{variant}: {e:#}")),
    )
}

fn scheduler(engine: Arc<Engine>, max_concurrent: usize, max_prompt: usize) -> Scheduler {
    paced_scheduler(engine, max_concurrent, max_prompt, Duration::ZERO)
}

/// A scheduler that pauses `interval` between decode steps.
fn paced_scheduler(
    engine: Arc<Engine>,
    max_concurrent: usize,
    max_prompt: usize,
    interval: Duration,
) -> Scheduler {
    drafting_scheduler(engine, max_concurrent, max_prompt, interval, 0)
}

/// A scheduler whose decode steps draft up to `prompt_lookup` tokens by prompt lookup.
fn drafting_scheduler(
    engine: Arc<Engine>,
    max_concurrent: usize,
    max_prompt: usize,
    interval: Duration,
    prompt_lookup: usize,
) -> Scheduler {
    Scheduler::start(
        engine,
        SchedulerConfig {
            name: "test".into(),
            max_concurrent,
            max_queue: 16,
            max_prompt_tokens: max_prompt,
            max_new_tokens: 256,
            request_timeout: Duration::from_secs(300),
            min_token_interval: interval,
            prompt_lookup,
            draft: None,
        },
    )
    .expect("scheduler starts")
}

/// Submits one generate request line; the receiver gets its events.
fn submit(s: &Scheduler, line: &str) -> Result<mpsc::Receiver<Event>, Event> {
    let limits = RequestLimits {
        max_new_tokens: 256,
        max_timeout: Duration::from_secs(300),
    };
    let request = parse_request(line.as_bytes(), &limits).expect("a valid request");
    let Op::Generate(g) = request.op else {
        panic!("not a generate request: {line}")
    };
    let (tx, rx) = mpsc::channel();
    s.submit(*g, Transport::UnixSocket, Arc::new(Collect(Mutex::new(tx))))?;
    Ok(rx)
}

/// The terminal event of a request.
fn terminal(rx: &mpsc::Receiver<Event>) -> Event {
    loop {
        let e = rx
            .recv_timeout(Duration::from_secs(300))
            .expect("a terminal event");
        if e.is_terminal() {
            return e;
        }
    }
}

fn done_text(e: &Event) -> String {
    match &e.body {
        EventBody::Done { text, .. } => text.clone(),
        other => panic!("expected done, got {other:?}"),
    }
}

fn stats(s: &Scheduler) -> Stats {
    s.stats()
}

fn greedy_request(id: &str, messages: &str, max_tokens: usize) -> String {
    format!(
        r#"{{"op":"generate","id":"{id}","messages":{messages},"max_tokens":{max_tokens},"temperature":0,"repetition_penalty":1}}"#
    )
}

/// The same prompts one at a time and four at once must give the same greedy text, and the
/// four must actually have been decoded in one batch.
fn same_text_alone_and_batched(bundle: &std::path::Path, variant: &str, max_tokens: usize) {
    // Paced, so that the first request is still decoding when the fourth is submitted, even
    // on a loaded machine (the tiny model decodes 16 tokens in about a millisecond).
    let pace = Duration::from_millis(5);
    let s = paced_scheduler(engine(bundle, variant, 16), 4, 512, pace);
    let questions = [
        "What is the capital of France?",
        "Name three primary colours.",
        "Write a haiku about rust.",
        "What is 12 times 13?",
    ];
    let requests: Vec<String> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let m = format!(r#"[{{"role":"user","content":"{q}"}}]"#);
            greedy_request(&format!("q{i}"), &m, max_tokens)
        })
        .collect();
    let alone: Vec<String> = requests
        .iter()
        .map(|r| done_text(&terminal(&submit(&s, r).expect("accepted"))))
        .collect();
    assert_eq!(stats(&s).max_batch, 1, "{variant}: one at a time");
    let receivers: Vec<_> = requests
        .iter()
        .map(|r| submit(&s, r).expect("accepted"))
        .collect();
    let batched: Vec<String> = receivers
        .iter()
        .map(|rx| done_text(&terminal(rx)))
        .collect();
    let st = stats(&s);
    assert_eq!(st.max_batch, 4, "{variant}: the four were decoded together");
    assert!(
        st.decode_step_tokens > st.decode_steps,
        "{variant}: batched steps"
    );
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert!(!a.is_empty(), "{variant}: request {i} answered");
        assert_eq!(a, b, "{variant}: request {i} alone vs in a batch of 4");
    }
    s.shutdown(Duration::from_secs(10));
}

#[test]
fn greedy_output_does_not_depend_on_the_batch_tiny() {
    same_text_alone_and_batched(&common::fixture("tiny-tied/bundle"), "fp32", 16);
    // Dual Chunk Attention: the sequences' chunks lie at different places in each step.
    same_text_alone_and_batched(&common::fixture("tiny-dca/bundle"), "fp32", 16);
}

#[test]
fn greedy_output_does_not_depend_on_the_batch_demo() {
    let Some(bundle) = common::demo_bundle("greedy_output_does_not_depend_on_the_batch_demo")
    else {
        return;
    };
    for variant in ["int8", "int4", "int4k"] {
        same_text_alone_and_batched(&bundle, variant, 24);
    }
}

/// Four requests at once (a code edit that copies its input, greedy; the others sampled with
/// a seed) through an engine that drafts by prompt lookup, each verified in the shared step:
/// every text is the one plain decoding gives, and drafts were made and accepted.
fn prompt_lookup_keeps_every_answer(bundle: &std::path::Path, variant: &str, max_tokens: usize) {
    let code = "def area(width, height):\\n    return width * height\\n\\nprint(area(3, 4))";
    let requests = [
        format!(
            r#"{{"op":"generate","id":"edit","messages":[{{"role":"user","content":"Rename width to w in this code and print it again:\n{code}"}}],"max_tokens":{max_tokens},"temperature":0}}"#
        ),
        format!(
            r#"{{"op":"generate","id":"copy","messages":[{{"role":"user","content":"Repeat exactly: {code}"}}],"max_tokens":{max_tokens},"temperature":0.7,"top_p":0.9,"seed":7}}"#
        ),
        format!(
            r#"{{"op":"generate","id":"colours","messages":[{{"role":"user","content":"Name three colours."}}],"max_tokens":{max_tokens},"temperature":1.0,"seed":3}}"#
        ),
        greedy_request(
            "sum",
            r#"[{"role":"user","content":"What is 2 plus 2?"}]"#,
            max_tokens,
        ),
    ];
    let answers = |prompt_lookup: usize| {
        let pace = Duration::from_millis(2);
        let s = drafting_scheduler(engine(bundle, variant, 0), 4, 512, pace, prompt_lookup);
        let receivers: Vec<_> = requests
            .iter()
            .map(|r| submit(&s, r).expect("accepted"))
            .collect();
        let texts: Vec<String> = receivers
            .iter()
            .map(|rx| done_text(&terminal(rx)))
            .collect();
        let st = stats(&s);
        s.shutdown(Duration::from_secs(10));
        (texts, st)
    };
    let (plain, plain_stats) = answers(0);
    let (drafted, st) = answers(8);
    assert_eq!(plain_stats.counts.draft_tokens, 0);
    for (i, (a, b)) in plain.iter().zip(&drafted).enumerate() {
        assert!(!a.is_empty(), "{variant}: request {i} answered");
        assert_eq!(a, b, "{variant}: request {i} with prompt lookup");
    }
    assert!(st.max_batch > 1, "{variant}: decoded together");
    let (made, kept) = (st.counts.draft_tokens, st.counts.accepted_draft_tokens);
    eprintln!("{variant}: {kept} of {made} drafted tokens accepted");
    assert!(
        kept > 0 && kept <= made,
        "{variant}: {kept} of {made} accepted"
    );
}

#[test]
fn prompt_lookup_in_the_engine_keeps_every_answer_tiny() {
    for (fixture, variant) in [
        ("tiny-tied/bundle", "fp32"),
        ("tiny-untied/bundle", "int4"),
        ("tiny-moe/bundle", "int8"),
    ] {
        prompt_lookup_keeps_every_answer(&common::fixture(fixture), variant, 48);
    }
}

#[test]
fn prompt_lookup_in_the_engine_keeps_every_answer_demo() {
    let Some(bundle) = common::demo_bundle("prompt_lookup_in_the_engine_keeps_every_answer_demo")
    else {
        return;
    };
    for variant in ["int8", "int4k"] {
        prompt_lookup_keeps_every_answer(&bundle, variant, 48);
    }
}

/// An engine step that mixes a prompt slice and a token with drafts to verify (every row's
/// logits) with other sequences' decode tokens (one forward on quantized weights; on float ones
/// the slice runs first, alone) gives each sequence the logits it gets alone, bit for bit:
/// what keeps a request's output independent of the requests that join while it decodes.
#[test]
fn a_prompt_slice_sharing_a_step_gives_the_logits_it_gets_alone() {
    let histories: [&[u32]; 4] = [&[1, 2, 3], &[4, 5, 6, 7, 8], &[9], &[20, 21]];
    let inputs = [
        StepInput::last(&[10, 11, 12, 13, 14, 15, 16]),
        StepInput::last(&[17]),
        StepInput::last(&[18]),
        StepInput {
            tokens: &[22, 23, 24],
            logits: Logits::Each,
        },
    ];
    // tiny-dca: the histories and inputs cross its chunks of 6 positions.
    let fixtures = [
        "tiny-tied/bundle",
        "tiny-untied/bundle",
        "tiny-moe/bundle",
        "tiny-dca/bundle",
    ];
    for fixture in fixtures {
        for variant in ["fp32", "fp16", "int8", "int4", "int4k"] {
            let engine = engine(&common::fixture(fixture), variant, 0);
            let backend = &engine.backend;
            let prepared = || {
                let mut sessions = Vec::new();
                for h in histories {
                    let mut s = backend.new_session(32).unwrap();
                    s.forward(h, Logits::Last).unwrap();
                    sessions.push(s);
                }
                sessions
            };
            let mut alone = prepared();
            let expected: Vec<Vec<f32>> = alone
                .iter_mut()
                .zip(inputs)
                .map(|(s, input)| s.forward(input.tokens, input.logits).unwrap().to_vec())
                .collect();
            let mut together = prepared();
            let mut got = vec![Vec::new(); inputs.len()];
            {
                let mut refs: Vec<&mut dyn backend::Session> = Vec::new();
                for s in together.iter_mut() {
                    refs.push(s.as_mut());
                }
                backend
                    .step_batch(&mut refs, &inputs, &mut |i, logits| {
                        got[i] = logits.to_vec()
                    })
                    .unwrap();
            }
            for (i, (a, b)) in expected.iter().zip(&got).enumerate() {
                let same =
                    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same,
                    "{fixture} {variant}: sequence {i} in the step vs alone"
                );
                assert_eq!(
                    together[i].len(),
                    alone[i].len(),
                    "{fixture} {variant}: {i}"
                );
            }
        }
    }
}

/// Logits of a prompt whose first blocks came from the prefix cache against the same prompt
/// computed cold, on a fresh session of the same backend.
fn cached_prefix_matches_cold(bundle: &std::path::Path, variant: &str, tol: f32) {
    let bundle = qwen2_edge::bundle::Bundle::open(bundle, Verify::SizesOnly).unwrap();
    let b = backend::load(
        &bundle,
        BackendKind::Native,
        variant,
        &LoadOptions {
            threads: 2,
            prefix_cache_bytes: 64 << 20,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let vocab = bundle.config.vocab_size as u32;
    // 100 tokens: three whole blocks of 32 can be reused, the last 4 run.
    let prompt: Vec<u32> = (0..100u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let mut cold = b.new_session(128).unwrap();
    let cold_logits = cold.forward(&prompt, Logits::Last).unwrap().to_vec();
    cold.save_prefix(&prompt);

    let mut warm = b.new_session(128).unwrap();
    let held = warm.restore_prefix(&prompt[..prompt.len() - 1], 0);
    assert_eq!(held, 96, "{variant}: three blocks restored");
    warm.truncate(held);
    let warm_logits = warm.forward(&prompt[held..], Logits::Last).unwrap();
    let diff = common::max_abs_diff(warm_logits, &cold_logits);
    assert!(
        diff <= tol,
        "{variant}: cached vs cold logits differ by {diff}"
    );
    let stats = b.prefix_cache().expect("the prefix cache is on");
    assert_eq!((stats.hits, stats.tokens_saved), (1, 96), "{variant}");
    assert_eq!(stats.blocks, 3, "{variant}");
    // A prompt that differs inside the first block finds nothing.
    let mut other = prompt.clone();
    other[5] = (other[5] + 1) % vocab;
    let mut third = b.new_session(128).unwrap();
    assert_eq!(third.restore_prefix(&other[..99], 0), 0);
    assert_eq!(b.prefix_cache().map(|s| s.misses), Some(1));
}

#[test]
fn a_cached_prefix_gives_the_logits_of_a_cold_prompt_tiny() {
    // The rest of the prompt runs as a GEMM of another shape than in the cold run: float
    // sums in another order, far below the 1e-4 the fixture references are held to.
    cached_prefix_matches_cold(&common::fixture("tiny-tied/bundle"), "fp32", 1e-4);
    // Dual Chunk Attention: cached keys are rotated at their positions within their chunks.
    cached_prefix_matches_cold(&common::fixture("tiny-dca/bundle"), "fp32", 1e-4);
}

#[test]
fn a_cached_prefix_gives_the_logits_of_a_cold_prompt_demo() {
    let Some(bundle) =
        common::demo_bundle("a_cached_prefix_gives_the_logits_of_a_cold_prompt_demo")
    else {
        return;
    };
    // Quantized products are exact per row (kernels::batched_rows_equal_single_rows), and
    // the keys and values are copied bit for bit: the logits must be identical.
    cached_prefix_matches_cold(&bundle, "int8", 0.0);
}

#[test]
fn a_shared_system_prompt_is_prefilled_once() {
    let e = engine(&common::fixture("tiny-tied/bundle"), "fp32", 16);
    let s = scheduler(e, 2, 250);
    let system = "You are the controller of greenhouse 7. ".repeat(3);
    let line = |id: &str, q: &str| {
        let m = format!(
            r#"[{{"role":"system","content":"{system}"}},{{"role":"user","content":"{q}"}}]"#
        );
        greedy_request(id, &m, 4)
    };
    let first = terminal(&submit(&s, &line("a", "Is it warm?")).unwrap());
    let second = terminal(&submit(&s, &line("b", "Is it dry?")).unwrap());
    let (EventBody::Done { usage: u1, .. }, EventBody::Done { usage: u2, .. }) =
        (&first.body, &second.body)
    else {
        panic!("both answered: {first:?} {second:?}");
    };
    assert!(u1.prompt_tokens >= 64, "a long system prompt: {u1:?}");
    let st = stats(&s);
    let p = st.prefix_cache.expect("prefix cache stats");
    assert_eq!(p.hits, 1, "{p:?}");
    assert!(p.tokens_saved >= 32, "{p:?}, prompts {u1:?} {u2:?}");
    assert!(p.bytes > 0 && p.bytes <= p.budget_bytes, "{p:?}");
    s.shutdown(Duration::from_secs(10));
}

#[test]
fn a_prompt_and_max_tokens_that_do_not_fit_are_too_long() {
    let e = engine(&common::fixture("tiny-tied/bundle"), "fp32", 0);
    let context = e.max_context();
    let s = scheduler(Arc::clone(&e), 1, context);
    let text = "count the sheep ".repeat(10);
    let prompt = e.raw_prompt(&text).unwrap().len();
    // The scheduler's sessions hold min(max_prompt + max_new, context) = context positions.
    let room = context - prompt;
    let raw = |id: &str, max: Option<usize>| {
        let max = max.map_or(String::new(), |m| format!(r#","max_tokens":{m}"#));
        format!(r#"{{"op":"generate","id":"{id}","prompt":"{text}","temperature":0{max}}}"#)
    };
    if room < 256 {
        let refused = submit(&s, &raw("over", Some(room + 1))).expect_err("refused at once");
        match refused.body {
            EventBody::Error { code, message } => {
                assert_eq!(code, ErrorCode::TooLong);
                for n in [prompt, room + 1, prompt + room + 1, context] {
                    assert!(message.contains(&n.to_string()), "{n} in {message:?}");
                }
            }
            other => panic!("expected too_long, got {other:?}"),
        }
    }
    let fits = terminal(&submit(&s, &raw("fits", Some(room.min(256)))).unwrap());
    assert!(matches!(fits.body, EventBody::Done { .. }), "{fits:?}");
    // Without max_tokens the reply may use what the context has left, never more.
    let open = terminal(&submit(&s, &raw("open", None)).unwrap());
    match open.body {
        EventBody::Done { usage, .. } => assert!(usage.completion_tokens <= room),
        other => panic!("expected done, got {other:?}"),
    }
    s.shutdown(Duration::from_secs(10));
}
