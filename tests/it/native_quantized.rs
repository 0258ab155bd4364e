//! The native backend's int8 / int4 / int4k weights (and fp32 on the portable kernels) against
//! transformers on every fixture model, with the best kernels this CPU has and with the
//! forced generic ones (the code path an ARM box without dot-product falls back to).
//!
//! Bounds: the exporter's (onnx-export/tests/test_reference.py QUANT_BOUNDS), which ONNX
//! Runtime meets on the same bundles: max |Δlogit| and top-1 agreement over every prefill
//! position and decode step.

use crate::common;

use common::max_abs_diff;
use qwen2_edge::backend::native::kernels;
use qwen2_edge::backend::{self, BackendKind, KvCacheType, LmHead, LoadOptions, Logits};

use qwen2_edge::sampling::argmax;

/// An int8 KV cache against f32 on the tiny fixtures: max |Δlogit| measured 0.037–0.059 on
/// every tier (2026-11, AVX2 and generic); 0.1 leaves room for other tiers' summation order.
const INT8_KV_TOLERANCE: f32 = 0.1;

/// (max |Δlogit|, top-1 agreement) per precision.
fn bounds(variant: &str) -> (f32, f64) {
    match variant {
        "fp32" => (1e-4, 1.0),
        "int8" => (0.3, 0.85),
        "int4" => (2.5, 0.40),
        "int4k" => (3.0, 0.35),
        other => panic!("no bound for {other}"),
    }
}

/// Every kernel set this CPU can run (under `QEMU_CPU=max`: neon-dotprod, neon and generic).
fn kernel_sets() -> Vec<&'static str> {
    kernels::available().iter().map(|k| k.name).collect()
}

fn trace(name: &str, variant: &str, kernels: &str, prefill_chunk: usize) -> Vec<f32> {
    trace_with(name, variant, kernels, prefill_chunk, KvCacheType::F32)
}

fn trace_with(
    name: &str,
    variant: &str,
    kernels: &str,
    prefill_chunk: usize,
    kv_cache: KvCacheType,
) -> Vec<f32> {
    let options = LoadOptions {
        threads: 2,
        prefill_chunk,
        kernels: kernels.into(),
        kv_cache,
        ..LoadOptions::default()
    };
    trace_options(name, variant, &options)
}

/// The logits of the reference prompt and decode steps with these load options.
fn trace_options(name: &str, variant: &str, options: &LoadOptions) -> Vec<f32> {
    let bundle = common::fixture_bundle(name);
    let model = backend::load(&bundle, BackendKind::Native, variant, options).unwrap();
    assert_eq!(model.kernels().as_deref(), Some(options.kernels.as_str()));
    let r = common::reference(name);
    let mut session = model.new_session(64).unwrap();
    let mut all = session
        .forward(&r.prompt_ids, Logits::All)
        .unwrap()
        .to_vec();
    for &t in &r.decode_ids {
        all.extend_from_slice(session.forward(&[t], Logits::Last).unwrap());
    }
    all
}

/// The share of rows (of `vocab` logits each) whose argmax is the reference's.
fn top1_agreement(got: &[f32], want: &[f32], vocab: usize) -> f64 {
    let rows = want.len() / vocab;
    let row = |l: &[f32], i: usize| argmax(&l[i * vocab..(i + 1) * vocab]);
    (0..rows).filter(|&i| row(got, i) == row(want, i)).count() as f64 / rows as f64
}

fn check(name: &str, variant: &str, kernels: &str, prefill_chunk: usize) {
    let r = common::reference(name);
    let want = r.all_logits();
    let got = trace(name, variant, kernels, prefill_chunk);
    let v = r.vocab;
    let err = max_abs_diff(&got, &want);
    let agree = top1_agreement(&got, &want, v);
    let (max_err, min_agree) = bounds(variant);
    eprintln!(
        "{name} {variant} [{kernels}, chunk {prefill_chunk}]: max |Δ| {err:.3e}, top-1 {:.0}%",
        agree * 100.0
    );
    assert!(
        err <= max_err,
        "{name} {variant} [{kernels}]: max |Δlogit| {err} > {max_err}"
    );
    assert!(
        agree >= min_agree,
        "{name} {variant} [{kernels}]: top-1 agreement {agree}"
    );
}

/// `check` of `variant` on every tiny fixture with every kernel set this CPU runs.
fn check_everywhere(variant: &str) {
    for kernels in kernel_sets() {
        for name in common::TINY {
            check(name, variant, kernels, 0);
        }
    }
}

#[test]
fn int8_within_the_exporters_bounds() {
    check_everywhere("int8");
}

#[test]
fn int4_within_the_exporters_bounds() {
    check_everywhere("int4");
}

#[test]
fn int4k_within_the_exporters_bounds() {
    check_everywhere("int4k");
}

#[test]
fn fp32_on_every_kernel_set_matches_transformers() {
    check_everywhere("fp32");
}

#[test]
fn quantized_prefill_in_chunks_matches_one_chunk() {
    // The prefill GEMM path (several rows) and the decode GEMV path (one row) agree: a prompt
    // run 1, 3 or all rows at a time gives the same logits.
    for variant in ["int8", "int4", "int4k"] {
        let whole = trace("tiny-untied", variant, kernel_sets()[0], 0);
        for chunk in [1, 3] {
            let parts = trace("tiny-untied", variant, kernel_sets()[0], chunk);
            let d = max_abs_diff(&whole, &parts);
            assert!(d < 1e-3, "{variant} chunk {chunk}: {d}");
        }
    }
}

#[test]
fn weights_read_into_memory_give_the_logits_of_the_mapped_file() {
    // `mmap = false`: the same bytes, so the same logits exactly, also after the embedding's
    // gathered pages were released (dropping pages of an anonymous copy would zero them).
    for name in common::TINY {
        for variant in ["fp32", "int8", "int4", "int4k"] {
            let options = |no_mmap| LoadOptions {
                threads: 2,
                kernels: kernel_sets()[0].into(),
                no_mmap,
                ..LoadOptions::default()
            };
            let mapped = trace_options(name, variant, &options(false));
            let read = trace_options(name, variant, &options(true));
            assert_eq!(mapped, read, "{name} {variant}");
        }
    }
}

#[test]
fn unknown_kernel_set_is_a_clear_error() {
    let bundle = common::fixture_bundle("tiny-tied");
    let options = LoadOptions {
        kernels: "sse9".into(),
        ..LoadOptions::default()
    };
    let err = backend::load(&bundle, BackendKind::Native, "fp32", &options)
        .err()
        .expect("unknown kernel set");
    assert!(
        err.to_string().contains("not available on this CPU"),
        "{err}"
    );
}

#[test]
fn int8_ort_blocks_are_refused_with_the_variant_to_use() {
    // int8-ort's 8-bit MatMulNBits blocks are ONNX Runtime's layout, not the native kernels'.
    let bundle = common::fixture_bundle("tiny-untied");
    let err = backend::load(
        &bundle,
        BackendKind::Native,
        "int8-ort",
        &LoadOptions::default(),
    )
    .err()
    .expect("int8-ort on the native backend");
    let message = format!("{err:#}");
    assert!(
        message.contains("8-bit blocks") && message.contains("runs the int8 variant"),
        "{message}"
    );
}

#[test]
fn an_int4_lm_head_stays_within_int4s_bounds() {
    // The int8 head requantized to int4 blocks at load: within the bounds the exporter's int4
    // meets (its layers quantized too), and not the bundle head's logits (it took effect).
    for kernels in kernel_sets() {
        for name in common::TINY {
            for variant in ["int8", "int4"] {
                let options = |lm_head| LoadOptions {
                    threads: 2,
                    kernels: kernels.into(),
                    lm_head,
                    ..LoadOptions::default()
                };
                let got = trace_options(name, variant, &options(LmHead::Int4));
                let stored = trace_options(name, variant, &options(LmHead::Bundle));
                let r = common::reference(name);
                let (want, v) = (r.all_logits(), r.vocab);
                let err = max_abs_diff(&got, &want);
                let agree = top1_agreement(&got, &want, v);
                let what = format!("{name} {variant} [{kernels}], int4 head");
                eprintln!(
                    "{what}: max |Δ| {err:.3e} ({:.3e} from the stored head), top-1 {:.0}%",
                    max_abs_diff(&got, &stored),
                    agree * 100.0
                );
                let (max_err, min_agree) = bounds("int4");
                assert!(err <= max_err, "{what}: max |Δlogit| {err}");
                assert!(agree >= min_agree, "{what}: top-1 agreement {agree}");
                assert!(max_abs_diff(&got, &stored) > 0.0, "{what}: head unchanged");
            }
        }
    }
}

#[test]
fn int8_kv_cache_stays_close_to_f32() {
    // Keys and values as int8 with a scale per head and position (max |x| / 127): a relative
    // error of at most 1/254 per element.
    for kernels in kernel_sets() {
        for name in common::TINY {
            let r = common::reference(name);
            let want = r.all_logits();
            let got = trace_with(name, "fp32", kernels, 0, KvCacheType::Int8);
            let err = max_abs_diff(&got, &want);
            assert!(
                err < INT8_KV_TOLERANCE,
                "{name} [{kernels}] int8 KV: max |Δlogit| {err}"
            );
        }
    }
}

#[test]
fn f16_kv_cache_keeps_logits_and_greedy_tokens() {
    // Keys and values rounded to f16: logits move by far less than the quantization bounds,
    // and every argmax stays the reference's.
    for kernels in kernel_sets() {
        for name in common::TINY {
            let r = common::reference(name);
            let want = r.all_logits();
            let got = trace_with(name, "fp32", kernels, 0, KvCacheType::F16);
            let err = max_abs_diff(&got, &want);
            assert!(err < 2e-2, "{name} [{kernels}] f16 KV: max |Δlogit| {err}");
            let v = r.vocab;
            for i in 0..want.len() / v {
                assert_eq!(
                    argmax(&got[i * v..(i + 1) * v]),
                    argmax(&want[i * v..(i + 1) * v]),
                    "{name} [{kernels}] f16 KV: argmax at row {i}"
                );
            }
        }
    }
}
