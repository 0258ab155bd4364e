//! The `qwen2-edge` binary: success paths on a fixture bundle, and every user error as one
//! clear line on stderr with a non-zero exit.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qwen2-edge"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run qwen2-edge")
}

fn tiny() -> String {
    common::fixture("tiny-tied")
        .join("bundle")
        .to_string_lossy()
        .into_owned()
}

/// Succeeded; else the failure shows stderr.
fn assert_ok(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
}

/// Fails with exactly one line on stderr that contains every `needles` entry.
fn assert_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} missing from: {stderr}");
    }
}

#[test]
fn generate_streams_text() {
    let bundle = tiny();
    for variant in ["fp32", "fp16"] {
        let out = run(&[
            "generate",
            "--bundle",
            &bundle,
            "--variant",
            variant,
            "--max-tokens",
            "5",
            "--threads",
            "2",
            "--seed",
            "3",
            "--temperature",
            "0.8",
            "hello",
        ]);
        assert_ok(&out);
        assert!(!out.stdout.is_empty());
    }
}

#[test]
fn raw_and_seeded_generation_reproduce() {
    let bundle = tiny();
    let args = [
        "generate",
        "--bundle",
        &bundle,
        "--raw",
        "--max-tokens",
        "12",
        "--temperature",
        "1.0",
        "--top-k",
        "50",
        "--top-p",
        "0.95",
        "--min-p",
        "0.01",
        "--repetition-penalty",
        "1.1",
        "--seed",
        "42",
        "--no-verify",
        "def f(x):",
    ];
    let (a, b) = (run(&args), run(&args));
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
}

/// `generate` on `bundle`: a raw prompt that repeats itself, 24 greedy tokens, with stats.
fn repeating_prompt(bundle: &str) -> [&str; 11] {
    [
        "generate",
        "--bundle",
        bundle,
        "--raw",
        "--max-tokens",
        "24",
        "--temperature",
        "0",
        "--no-verify",
        "--stats",
        "a b c a b c a b c",
    ]
}

#[test]
fn prompt_lookup_keeps_the_answer_and_prints_its_counts() {
    let bundle = tiny();
    let plain = repeating_prompt(&bundle);
    let with = |n: &'static str| {
        let mut args = plain.to_vec();
        args.extend(["--prompt-lookup", n]);
        run(&args)
    };
    let (a, b) = (run(&plain), with("8"));
    assert_ok(&a);
    assert_ok(&b);
    assert_eq!(a.stdout, b.stdout);
    let stats = String::from_utf8_lossy(&b.stderr);
    assert!(stats.contains("[speculative]"), "{stats}");
    assert!(!String::from_utf8_lossy(&a.stderr).contains("[speculative]"));
    // Over the limit: clap's error names the flag and the range.
    let out = with("33");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--prompt-lookup") && stderr.contains("0..=32"),
        "{stderr}"
    );
}

#[test]
fn a_draft_model_keeps_the_answer_and_a_foreign_vocabulary_is_refused() {
    let bundle = tiny();
    let draft = common::fixture("tiny-yarn").join("bundle");
    let foreign = common::fixture("tiny-untied").join("bundle");
    let plain = repeating_prompt(&bundle);
    let with = |extra: &[&str]| {
        let mut args = plain.to_vec();
        args.extend(extra);
        run(&args)
    };
    let a = run(&plain);
    let b = with(&[
        "--draft-bundle",
        &draft.to_string_lossy(),
        "--draft-variant",
        "fp32",
    ]);
    assert_ok(&a);
    assert_ok(&b);
    assert_eq!(a.stdout, b.stdout);
    assert!(String::from_utf8_lossy(&b.stderr).contains("[speculative]"));
    assert_error(
        &with(&[
            "--draft-bundle",
            &foreign.to_string_lossy(),
            "--draft-variant",
            "fp32",
        ]),
        &["draft model", "vocabulary"],
    );
    let both = with(&[
        "--draft-bundle",
        &draft.to_string_lossy(),
        "--prompt-lookup",
        "4",
    ]);
    // Prompt lookup's drafts first, the draft model's where it has none: the same answer.
    assert_ok(&both);
    assert_eq!(a.stdout, both.stdout);
}

#[test]
fn chat_keeps_the_conversation() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_qwen2-edge"))
        .args(["chat", "--bundle", &tiny(), "--max-tokens", "4", "--stats"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hi\nand again\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stats: Vec<&str> = stderr.lines().filter(|l| l.contains("prompt")).collect();
    assert_eq!(stats.len(), 2, "{stderr}");
    // The second turn reuses the first turn's cache.
    assert!(!stats[1].contains("(0 cached)"), "{stderr}");
}

#[test]
fn a_moe_bundle_lists_its_experts_and_answers_alike_on_every_backend() {
    let bundle = common::fixture("tiny-moe").join("bundle");
    let bundle = bundle.to_string_lossy();
    let out = run(&["info", "--bundle", &bundle]);
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "experts     8 per sparse layer (2 of 3), 2 per token, width 32; shared expert width 48"
        ),
        "{text}"
    );
    // The reference prompt: its 8 greedy tokens have clear margins (make_fixtures.py checks).
    let prompt = "def reverse(s):\n    return s[::-1]  # 你好 🙂";
    let answer = |backend: &str| {
        let out = run(&[
            "generate",
            "--bundle",
            &bundle,
            "--variant",
            "fp32",
            "--backend",
            backend,
            "--raw",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--no-verify",
            prompt,
        ]);
        assert_ok(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let native = answer("native");
    assert!(!native.trim().is_empty());
    assert_eq!(answer("tract"), native, "tract");
    if common::ort_library("a_moe_bundle_lists_its_experts_and_answers_alike_on_every_backend")
        .is_some()
    {
        assert_eq!(answer("ort"), native, "ort");
    }
}

#[test]
fn info_and_bench() {
    let out = run(&["info", "--bundle", &tiny()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("fp32") && text.contains("int4-ort"), "{text}");
    let out = run(&[
        "bench",
        "--bundle",
        &tiny(),
        "--threads",
        "1",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--long-prompt-tokens",
        "0",
        "--json",
    ]);
    assert_ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["prompt_tokens"], 16);
    assert_eq!(report["gen_tokens"], 4);
    assert!(report["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn missing_bundle() {
    let out = run(&["generate", "--bundle", "/nonexistent/bundle", "hi"]);
    assert_error(&out, &["/nonexistent/bundle", "not found"]);
}

fn corrupt_copy(tag: &str, edit: impl FnOnce(&Path)) -> (common::TempDir, String) {
    corrupt_fixture_copy("tiny-tied", tag, edit)
}

/// A copy of fixture `model`'s bundle edited by `edit`: the temporary directory and the path.
fn corrupt_fixture_copy(
    model: &str,
    tag: &str,
    edit: impl FnOnce(&Path),
) -> (common::TempDir, String) {
    let dir = common::TempDir::new(tag);
    let bundle = dir.0.join("bundle");
    common::copy_dir(&common::fixture(model).join("bundle"), &bundle);
    edit(&bundle);
    let path = bundle.to_string_lossy().into_owned();
    (dir, path)
}

#[test]
fn corrupt_bundle_json() {
    let (_dir, bundle) = corrupt_copy("json", |b| {
        std::fs::write(
            b.join("bundle.json"),
            "{\"format\": \"qwen2-edge-bundle\", ",
        )
        .unwrap()
    });
    assert_error(
        &run(&["generate", "--bundle", &bundle, "hi"]),
        &["bundle.json"],
    );
    assert_error(&run(&["info", "--bundle", &bundle]), &["bundle.json"]);
}

#[test]
fn truncated_and_tampered_files() {
    let data = "onnx/fp32/model.onnx.data";
    let (_dir, bundle) = corrupt_copy("trunc", |b| {
        let bytes = std::fs::read(b.join(data)).unwrap();
        std::fs::write(b.join(data), &bytes[..bytes.len() - 64]).unwrap();
    });
    // Sizes are checked even with --no-verify.
    let out = run(&["generate", "--bundle", &bundle, "--no-verify", "hi"]);
    assert_error(&out, &[data, "size"]);

    let (_dir2, bundle) = corrupt_copy("tamper", |b| {
        let mut bytes = std::fs::read(b.join(data)).unwrap();
        bytes[100] ^= 0x40;
        std::fs::write(b.join(data), &bytes).unwrap();
    });
    assert_error(
        &run(&["generate", "--bundle", &bundle, "hi"]),
        &[data, "sha256"],
    );

    let (_dir3, bundle) = corrupt_copy("missing", |b| {
        std::fs::remove_file(b.join("tokenizer.json")).unwrap()
    });
    assert_error(
        &run(&["info", "--bundle", &bundle]),
        &["tokenizer.json", "missing"],
    );
}

/// An edit of a weight's `quant` record in bundle.json.
type QuantEdit = fn(&mut serde_json::Value);

/// Each edit of the first `scheme` matrix of fixture `model`'s int4k variant must stop the load
/// with one line naming the variant and what is wrong (its needle), never a panic or garbage.
fn int4k_edits_are_refused(model: &str, scheme: &str, edits: &[(&str, QuantEdit)]) {
    for (i, (needle, edit)) in edits.iter().enumerate() {
        let (_dir, bundle) = corrupt_fixture_copy(model, &format!("{scheme}{i}"), |b| {
            let path = b.join("bundle.json");
            let mut manifest: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let variant = manifest["variants"]
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .find(|v| v["name"] == "int4k")
                .unwrap();
            let quant = variant["weights"]
                .as_object_mut()
                .unwrap()
                .values_mut()
                .find_map(|w| (w["quant"]["scheme"] == scheme).then_some(&mut w["quant"]))
                .unwrap();
            edit(quant);
            std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
        });
        let out = run(&["generate", "--bundle", &bundle, "--variant", "int4k", "hi"]);
        assert_error(&out, &["int4k", needle]);
    }
}

#[test]
fn int4k_weights_with_missing_or_wrong_parts_are_refused() {
    int4k_edits_are_refused(
        "tiny-tied",
        "kquant",
        &[
            ("lacks its codes", |q| {
                q.as_object_mut().unwrap().remove("codes");
            }),
            ("super_block", |q| q["super_block"] = 16.into()),
            ("super-block scales must be", |q| {
                q["d"]["nbytes"] = 2.into()
            }),
        ],
    );
}

#[test]
fn q6k_weights_with_missing_or_wrong_parts_are_refused() {
    // tiny-untied's int4k holds q6k matrices (layer 2's value and down projections).
    int4k_edits_are_refused(
        "tiny-untied",
        "q6k",
        &[
            ("lacks its top bits", |q| {
                q.as_object_mut().unwrap().remove("high");
            }),
            ("super_block", |q| q["super_block"] = 8.into()),
            ("scale codes must be", |q| {
                q["scale"]["dtype"] = "uint8".into()
            }),
        ],
    );
}

#[test]
fn a_prompt_from_standard_input_answers_as_the_argument() {
    // `-` reads the prompt from stdin: for documents past the 128 KiB an argument may hold.
    use std::io::Write;
    let bundle = tiny();
    let args = [
        "generate",
        "--bundle",
        &bundle,
        "--raw",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    ];
    let prompt = "def f(x):\n    return";
    let direct = run(&[&args[..], &[prompt]].concat());
    assert_ok(&direct);
    let mut child = Command::new(env!("CARGO_BIN_EXE_qwen2-edge"))
        .args(args)
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run qwen2-edge");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(prompt.as_bytes())
        .expect("write the prompt");
    drop(stdin);
    let piped = child.wait_with_output().expect("wait");
    assert_ok(&piped);
    assert_eq!(piped.stdout, direct.stdout);
    assert!(!direct.stdout.is_empty());
}

#[test]
fn prompt_over_the_context_limit() {
    // The tiny model's context is 256 positions.
    let long = "word ".repeat(600);
    let out = run(&["generate", "--bundle", &tiny(), "--raw", &long]);
    assert_error(&out, &["prompt too long", "256"]);
}

#[test]
fn invalid_sampling_values() {
    let bundle = tiny();
    let cases: [(&[&str], &str); 6] = [
        (&["--temperature", "-0.5"], "temperature"),
        (&["--top-p", "0"], "top_p"),
        (&["--top-p", "1.5"], "top_p"),
        (&["--min-p", "2"], "min_p"),
        (&["--repetition-penalty", "0"], "repetition_penalty"),
        (&["--max-tokens", "0"], "max-tokens"),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["generate", "--bundle", bundle.as_str()];
        args.extend_from_slice(flags);
        args.push("hi");
        assert_error(&run(&args), &[needle]);
    }
}

#[test]
fn unavailable_backend_and_variant() {
    let bundle = tiny();
    let out = run(&["generate", "--bundle", &bundle, "--backend", "gpu", "hi"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected native, ort or tract"));
    let out = run(&["generate", "--bundle", &bundle, "--variant", "bf16", "hi"]);
    assert_error(&out, &["no variant \"bf16\""]);
}

/// Every setting: flag > environment variable > config file > default.
#[test]
fn a_flag_beats_the_environment_which_beats_the_default() {
    let bundle = tiny();
    let generate = |flags: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qwen2-edge"));
        cmd.args(["generate", "--bundle", &bundle, "--max-tokens", "2"])
            .args(flags)
            .arg("hi")
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run qwen2-edge")
    };
    // The log's fields are colored (ANSI escapes between a name and its value): strip them.
    let log = |out: &Output| {
        let mut text = String::new();
        let raw = String::from_utf8_lossy(&out.stderr).into_owned();
        let mut it = raw.chars();
        while let Some(c) = it.next() {
            if c == '\u{1b}' {
                it.by_ref().find(|&d| d == 'm');
            } else {
                text.push(c);
            }
        }
        text
    };
    // The environment names a set no CPU has: the flag must win without looking at it.
    let env = [
        ("QWEN2_EDGE_KERNELS", "sse9"),
        ("QWEN2_EDGE_KV_CACHE", "f64"),
    ];
    let out = generate(&["--kernels", "generic", "--kv-cache", "f16"], &env);
    assert!(out.status.success(), "{}", log(&out));
    assert!(log(&out).contains("kernels=\"generic\""), "{}", log(&out));
    assert!(log(&out).contains("kv_cache=\"f16\""), "{}", log(&out));
    // Without the flags the environment applies, and a bad value is an error naming it.
    let out = generate(&[], &env[..1]);
    assert!(!out.status.success());
    assert!(log(&out).contains("\"sse9\""), "{}", log(&out));
    let out = generate(&["--kernels", "generic"], &env[1..]);
    assert!(!out.status.success());
    assert!(
        log(&out).contains("QWEN2_EDGE_KV_CACHE=\"f64\""),
        "{}",
        log(&out)
    );
    let out = generate(&[], &[("QWEN2_EDGE_KERNELS", "generic")]);
    assert!(out.status.success(), "{}", log(&out));
    assert!(log(&out).contains("kernels=\"generic\""), "{}", log(&out));
}

#[test]
fn output_that_cannot_be_written_ends_the_command_without_a_panic() {
    let info = |stdout: std::process::Stdio| {
        Command::new(env!("CARGO_BIN_EXE_qwen2-edge"))
            .args(["info", "--bundle", &tiny()])
            .env_remove("RUST_LOG")
            .stdout(stdout)
            .output()
            .expect("run qwen2-edge")
    };
    // The reader went away (`info | head -1`): quietly done.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = info(writer.into());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A full disk: one error line.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    assert_error(&info(full.into()), &["cannot write to stdout"]);
}
