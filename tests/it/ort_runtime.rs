//! The ort backend's contact with the outside: the ONNX Runtime library (found, checked, or a
//! clear error), execution-provider fall-back and `strict`, the optimized-model cache, and a
//! Qwen2 graph exported by Hugging Face Optimum rather than by our exporter.

#![cfg(feature = "ort")]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use qwen2_edge::backend::options::{OrtOptions, Provider};
use qwen2_edge::backend::ort::OrtBackend;
use qwen2_edge::backend::{self, Backend, BackendKind, LoadOptions, Logits};
use qwen2_edge::bundle::Bundle;

fn bundle(name: &str) -> Bundle {
    common::fixture_bundle(name)
}

fn options(library: PathBuf, providers: &[Provider], strict: bool) -> LoadOptions {
    LoadOptions {
        threads: 2,
        ort: OrtOptions {
            library: Some(library),
            execution_providers: providers.to_vec(),
            strict,
            ..OrtOptions::default()
        },
        ..LoadOptions::default()
    }
}

/// The tiny fixture and options asking for CUDA, then the CPU (None: no ONNX Runtime, skipped).
fn cuda_then_cpu(test: &str, strict: bool) -> Option<(Bundle, LoadOptions)> {
    let lib = common::ort_library(test)?;
    let providers = [Provider::Cuda, Provider::Cpu];
    Some((bundle("tiny-tied"), options(lib, &providers, strict)))
}

/// Greedy tokens of the fixture's reference, checked through `model`.
fn assert_reference(model: &dyn Backend, name: &str) {
    let r = common::reference(name);
    let v = r.vocab;
    let mut s = model.new_session(64).unwrap();
    let prefill = s.forward(&r.prompt_ids, Logits::All).unwrap().to_vec();
    let d = common::max_abs_diff(&prefill, &r.prefill_logits);
    assert!(d <= 1e-4, "{name}: prefill max |diff| {d}");
    let mut last = prefill[(r.prompt_ids.len() - 1) * v..].to_vec();
    for (step, &fed) in r.decode_ids.iter().enumerate() {
        assert_eq!(common::argmax(&last), fed, "{name}: greedy token {step}");
        last = s.forward(&[fed], Logits::Last).unwrap().to_vec();
        let d = common::max_abs_diff(&last, &r.decode_logits[step * v..][..v]);
        assert!(d <= 1e-4, "{name}: decode step {step}: max |diff| {d}");
    }
}

#[test]
fn unavailable_provider_falls_back_to_cpu_with_a_report() {
    let Some((b, o)) = cuda_then_cpu("provider fall-back", false) else {
        return;
    };
    let model = backend::load(&b, BackendKind::Ort, "fp32", &o).unwrap();
    let device = model.device();
    // The CPU wheel of CI has no CUDA provider; a GPU wheel on a box without a GPU fails at
    // session creation instead. Either way the report says CPU and why CUDA is not used.
    assert!(device.contains("CPUExecutionProvider"), "{device}");
    assert!(device.contains("cuda unavailable"), "{device}");
    assert_reference(model.as_ref(), "tiny-tied");
}

#[test]
fn unavailable_provider_is_an_error_when_strict() {
    let Some((b, o)) = cuda_then_cpu("strict providers", true) else {
        return;
    };
    let err = backend::load(&b, BackendKind::Ort, "fp32", &o)
        .err()
        .expect("strict must refuse an unusable provider");
    let text = format!("{err:#}");
    assert!(text.contains("cuda") && text.contains("strict"), "{text}");
}

#[test]
fn missing_library_is_the_documented_error() {
    let b = bundle("tiny-tied");
    let missing = PathBuf::from("/nonexistent/qwen2-edge-test/libonnxruntime.so");
    let o = options(missing.clone(), &[Provider::Cpu], false);
    let err = backend::load(&b, BackendKind::Ort, "fp32", &o)
        .err()
        .expect("a missing library must be an error");
    let text = format!("{err:#}");
    assert!(text.contains(&missing.display().to_string()), "{text}");
    assert!(
        text.contains("onnxruntime-gpu") && text.contains("ORT_DYLIB_PATH"),
        "{text}"
    );
}

#[test]
fn command_line_reports_a_missing_library_and_a_bad_provider() {
    let exe = env!("CARGO_BIN_EXE_qwen2-edge");
    let bundle_dir = common::fixture("tiny-tied").join("bundle");
    let run = |extra: &[&str]| {
        let out = Command::new(exe)
            .args(["generate", "--bundle"])
            .arg(&bundle_dir)
            .args(["--backend", "ort", "--max-tokens", "2"])
            .args(extra)
            .arg("hi")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--ort-library", "/nonexistent/libonnxruntime.so"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with("error: ONNX Runtime library /nonexistent/libonnxruntime.so"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let (code, err) = run(&["--ort-providers", "cuda,gpu"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unknown execution provider \"gpu\""), "{err}");
}

#[test]
fn command_line_warns_and_falls_back() {
    let Some(lib) = common::ort_library("command-line fall-back") else {
        return;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_qwen2-edge"))
        .args(["info", "--bundle"])
        .arg(common::fixture("tiny-tied").join("bundle"))
        .args([
            "--backend",
            "ort",
            "--ort-providers",
            "cuda,cpu",
            "--ort-library",
        ])
        .arg(&lib)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("WARN") && stderr.contains("cuda"),
        "no warning: {stderr}"
    );
    assert!(
        stdout.contains("backend     ort on variant fp32: onnxruntime"),
        "{stdout}"
    );
    assert!(stdout.contains("CPUExecutionProvider"), "{stdout}");
}

#[test]
fn optimum_export_matches_transformers() {
    let Some(lib) = common::ort_library("optimum export") else {
        return;
    };
    let dir = common::fixture("tiny-tied").join("optimum");
    let o = options(lib, &[Provider::Cpu], false);
    let model = OrtBackend::load_onnx(&dir.join("model.onnx"), &dir.join("config.json"), &o)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_reference(&model, "tiny-tied");
    // Truncate and reuse work on its Concat cache too.
    let r = common::reference("tiny-tied");
    let mut s = model.new_session(64).unwrap();
    s.forward(&r.prompt_ids, Logits::Last).unwrap();
    s.forward(&r.decode_ids[..2], Logits::Last).unwrap();
    s.truncate(r.prompt_ids.len());
    let again = s
        .forward(&r.decode_ids[..1], Logits::Last)
        .unwrap()
        .to_vec();
    assert!(common::max_abs_diff(&again, &r.decode_logits[..r.vocab]) <= 1e-4);
}

#[test]
fn optimized_model_cache_is_written_then_used() {
    let Some(lib) = common::ort_library("optimized-model cache") else {
        return;
    };
    let tmp = common::TempDir::new("ort-cache");
    let b = bundle("tiny-untied");
    for variant in ["fp32", "int4-ort"] {
        let mut o = options(lib.clone(), &[Provider::Cpu], false);
        o.ort.optimized_model_cache = Some(tmp.0.clone());
        let first = backend::load(&b, BackendKind::Ort, variant, &o).unwrap();
        let saved = onnx_files(&tmp.0);
        assert!(
            !saved.is_empty(),
            "{variant}: nothing saved in {}",
            tmp.0.display()
        );
        let second = backend::load(&b, BackendKind::Ort, variant, &o).unwrap();
        assert_eq!(
            onnx_files(&tmp.0),
            saved,
            "{variant}: the second start re-optimized"
        );
        let r = common::reference("tiny-untied");
        let run = |m: &dyn Backend| {
            let mut s = m.new_session(64).unwrap();
            s.forward(&r.prompt_ids, Logits::Last).unwrap().to_vec()
        };
        let d = common::max_abs_diff(&run(first.as_ref()), &run(second.as_ref()));
        assert!(
            d <= 1e-5,
            "{variant}: cached graph gives different logits ({d})"
        );
    }
}

fn onnx_files(dir: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".onnx"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The OpenVINO provider (the one NPU-family provider that runs on these x86 machines, device
/// CPU): same greedy tokens as ONNX Runtime's CPU provider. Opt-in: QWEN2_EDGE_ORT_OPENVINO names
/// the libonnxruntime.so of an `onnxruntime-openvino` wheel (scripts/lib.sh extract_ort_lib).
/// Runs the command line, since one process holds one ONNX Runtime library.
#[test]
fn openvino_provider_matches_cpu() {
    let Some(lib) = std::env::var_os("QWEN2_EDGE_ORT_OPENVINO").filter(|v| !v.is_empty()) else {
        eprintln!("openvino provider skipped: QWEN2_EDGE_ORT_OPENVINO not set");
        return;
    };
    let bundle_dir = common::fixture("tiny-untied").join("bundle");
    let run = |variant: &str, providers: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_qwen2-edge"))
            .args([
                "generate",
                "--raw",
                "--temperature",
                "0",
                "--max-tokens",
                "8",
                "--bundle",
            ])
            .arg(&bundle_dir)
            .args([
                "--backend",
                "ort",
                "--variant",
                variant,
                "--ort-strict",
                "--ort-library",
            ])
            .arg(&lib)
            .args(providers)
            .arg("def reverse(s):")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{variant} {providers:?}: {stderr}");
        out.stdout
    };
    for variant in ["fp32", "fp32-ort"] {
        let cpu = run(variant, &["--ort-providers", "cpu"]);
        let openvino = run(
            variant,
            &[
                "--ort-providers",
                "openvino,cpu",
                "--ort-provider-option",
                "openvino.precision=FP32",
            ],
        );
        assert_eq!(openvino, cpu, "{variant}: OpenVINO and CPU disagree");
    }
}
