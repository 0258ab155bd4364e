//! The ort and tract backends against transformers on every fixture model: logits within 1e-4
//! at every prefill position and decode step (fp32 variants), identical greedy tokens (fp32 and
//! fp16), both KV-cache wirings (Concat graphs and GroupQueryAttention's shared buffer), and
//! session reuse after truncate. Quantized variants are checked against their own dequantized
//! math by the exporter's tests; here they must run and keep the reference's greedy tokens
//! where the fixture's margins allow (reported, not asserted, for int4).

#![cfg(any(feature = "ort", feature = "tract"))]

use crate::common;

use std::sync::Arc;

use qwen2_edge::backend::{self, Backend, BackendKind, LoadOptions, Logits};
use qwen2_edge::bundle::{Bundle, Verify};

const TOLERANCE: f32 = 1e-4;

fn options() -> LoadOptions {
    LoadOptions {
        threads: 2,
        ..LoadOptions::default()
    }
}

/// The backend, or None when the ort library is not configured (visible skip).
fn load(kind: BackendKind, name: &str, variant: &str, test: &str) -> Option<Arc<dyn Backend>> {
    let mut o = options();
    if kind == BackendKind::Ort {
        o.ort.library = Some(common::ort_library(test)?);
    }
    let bundle = Bundle::open(common::fixture(name).join("bundle"), Verify::Full).unwrap();
    bundle.verify_variant(variant).unwrap();
    Some(
        backend::load(&bundle, kind, variant, &o)
            .unwrap_or_else(|e| panic!("{kind} {name} {variant}: {e:#}")),
    )
}

/// Prefill then the reference's decode tokens one at a time; returns the worst |diff| and
/// whether every greedy token matched.
fn trace(model: &dyn Backend, name: &str, check_logits: bool) -> (f32, bool) {
    let r = common::reference(name);
    let v = r.vocab;
    let mut session = model.new_session(64).unwrap();
    let prefill = session
        .forward(&r.prompt_ids, Logits::All)
        .unwrap()
        .to_vec();
    assert_eq!(prefill.len(), r.prompt_ids.len() * v);
    let mut worst = 0.0f32;
    for pos in 0..r.prompt_ids.len() {
        let d = common::max_abs_diff(&prefill[pos * v..][..v], &r.prefill_logits[pos * v..][..v]);
        if check_logits {
            assert!(
                d <= TOLERANCE,
                "{name}: prefill position {pos}: max |diff| {d}"
            );
        }
        worst = worst.max(d);
    }
    let mut last = prefill[(r.prompt_ids.len() - 1) * v..].to_vec();
    let mut greedy_ok = true;
    for (step, &fed) in r.decode_ids.iter().enumerate() {
        greedy_ok &= common::argmax(&last) == fed;
        last = session.forward(&[fed], Logits::Last).unwrap().to_vec();
        let d = common::max_abs_diff(&last, &r.decode_logits[step * v..][..v]);
        if check_logits {
            assert!(d <= TOLERANCE, "{name}: decode step {step}: max |diff| {d}");
        }
        worst = worst.max(d);
    }
    greedy_ok &=
        common::argmax(&last) == common::argmax(&r.decode_logits[(r.decode_ids.len() - 1) * v..]);
    (worst, greedy_ok)
}

fn fp32_matches_transformers(kind: BackendKind, variants: &[&str], test: &str) {
    for name in common::TINY {
        for &variant in variants {
            let Some(model) = load(kind, name, variant, test) else {
                return;
            };
            let (worst, greedy) = trace(model.as_ref(), name, true);
            assert!(greedy, "{kind} {name} {variant}: greedy tokens differ");
            eprintln!(
                "{kind} {name} {variant}: max |diff| {worst:.2e} ({})",
                model.device()
            );
        }
    }
}

fn lower_precision_runs(kind: BackendKind, variants: &[&str], strict_greedy: &[&str], test: &str) {
    for name in common::TINY {
        for &variant in variants {
            let Some(model) = load(kind, name, variant, test) else {
                return;
            };
            let (worst, greedy) = trace(model.as_ref(), name, false);
            eprintln!(
                "{kind} {name} {variant}: max |diff| {worst:.2e}, greedy tokens {}",
                if greedy { "identical" } else { "differ" }
            );
            assert!(
                worst.is_finite(),
                "{kind} {name} {variant}: non-finite logits"
            );
            if strict_greedy.contains(&variant) {
                assert!(
                    greedy,
                    "{kind} {name} {variant}: greedy tokens differ from transformers"
                );
            }
        }
    }
}

/// Split prefill, Logits::All on a later chunk, and truncate-then-continue give the same
/// logits as one pass.
fn reuse_after_truncate(kind: BackendKind, variant: &str, test: &str) {
    let name = "tiny-untied";
    let Some(model) = load(kind, name, variant, test) else {
        return;
    };
    let r = common::reference(name);
    let v = r.vocab;
    let mut s = model.new_session(64).unwrap();
    let d = common::split_prefill_error(s.as_mut(), &r);
    assert!(d <= TOLERANCE, "{kind} {variant}: split prefill: {d}");
    s.forward(&r.decode_ids[..3], Logits::Last).unwrap();
    assert_eq!(s.len(), r.prompt_ids.len() + 3);
    s.truncate(r.prompt_ids.len());
    assert_eq!(s.len(), r.prompt_ids.len());
    let again = s
        .forward(&r.decode_ids[..1], Logits::Last)
        .unwrap()
        .to_vec();
    let d = common::max_abs_diff(&again, &r.decode_logits[..v]);
    assert!(d <= TOLERANCE, "{kind} {variant}: after truncate: {d}");
    s.truncate(0);
    let fresh = s.forward(&r.prompt_ids, Logits::Last).unwrap().to_vec();
    let d = common::max_abs_diff(&fresh, &r.prefill_logits[(r.prompt_ids.len() - 1) * v..]);
    assert!(d <= TOLERANCE, "{kind} {variant}: after truncate(0): {d}");
    // Bad input is an error, never a panic, and leaves the session usable.
    assert!(s.forward(&[], Logits::Last).is_err());
    assert!(s.forward(&[v as u32], Logits::Last).is_err());
    let mut small = model.new_session(4).unwrap();
    assert!(small
        .forward(&r.prompt_ids, Logits::Last)
        .unwrap_err()
        .to_string()
        .contains("context full"));
    assert!(model.new_session(0).is_err());
}

/// A model with Dual Chunk Attention on an ONNX backend (plain attention in its graphs): its
/// sessions hold at most one chunk (6 positions of tiny-dca), where DCA is plain attention, and
/// there it gives the authors' logits; a longer session is refused with the reason.
#[cfg(any(feature = "ort", feature = "tract"))]
fn dual_chunk_model_runs_one_chunk(kind: BackendKind, variant: &str, test: &str) {
    let Some(model) = load(kind, "tiny-dca", variant, test) else {
        return;
    };
    assert_eq!(model.max_positions(), 6);
    let err = model
        .new_session(7)
        .err()
        .expect("a session past one chunk");
    assert!(
        format!("{err:#}").contains("Dual Chunk Attention"),
        "{err:#}"
    );
    let r = common::reference("tiny-dca");
    let v = r.vocab;
    let mut session = model.new_session(6).unwrap();
    let logits = session.forward(&r.prompt_ids[..6], Logits::All).unwrap();
    let d = common::max_abs_diff(logits, &r.prefill_logits[..6 * v]);
    assert!(d <= TOLERANCE, "{kind} one chunk: max |diff| {d}");
}

#[cfg(feature = "ort")]
mod ort {
    use super::*;

    #[test]
    fn fp32_logits_match_transformers() {
        fp32_matches_transformers(BackendKind::Ort, &["fp32", "fp32-ort"], "ort fp32");
    }

    #[test]
    fn a_dual_chunk_model_runs_one_chunk() {
        for variant in ["fp32", "fp32-ort"] {
            dual_chunk_model_runs_one_chunk(BackendKind::Ort, variant, "ort dca");
        }
    }

    /// The minor version in a `libonnxruntime.so.1.x.y` name (None for an unversioned name).
    fn library_minor(library: &std::path::Path) -> Option<u32> {
        let name = library.file_name()?.to_str()?;
        name.strip_prefix("libonnxruntime.so.1.")?
            .split('.')
            .next()?
            .parse()
            .ok()
    }

    #[test]
    fn every_other_variant_runs() {
        let Some(library) = common::ort_library("ort variants") else {
            return;
        };
        // The gpu profile (float16 activations and KV cache) runs on the CPU provider too, with
        // the Casts ONNX Runtime inserts around operators it has no float16 CPU kernel for.
        let mut variants = vec![
            "fp16", "fp16-ort", "int8", "int4", "int4k", "int4-ort", "fp16-gpu", "int4-gpu",
        ];
        if library_minor(&library).is_some_and(|minor| minor < 22) {
            // 8-bit MatMulNBits came with 1.22: older libraries get the documented refusal.
            let mut o = options();
            o.ort.library = Some(library);
            let bundle = common::fixture_bundle("tiny-untied");
            let err = backend::load(&bundle, BackendKind::Ort, "int8-ort", &o)
                .err()
                .expect("int8-ort before ONNX Runtime 1.22");
            assert!(err.to_string().contains("from 1.22 on"), "{err:#}");
        } else {
            variants.push("int8-ort");
        }
        lower_precision_runs(
            BackendKind::Ort,
            &variants,
            &["fp16", "fp16-ort", "fp16-gpu"],
            "ort variants",
        );
    }

    /// The float16 shared buffers: a sequence truncated and continued computes what a fresh one
    /// does (the truncated positions are overwritten, never read).
    #[test]
    fn float16_cache_reuse_after_truncate() {
        let name = "tiny-untied";
        let Some(model) = load(BackendKind::Ort, name, "fp16-gpu", "ort fp16-gpu truncate") else {
            return;
        };
        let r = common::reference(name);
        let mut fresh = model.new_session(64).unwrap();
        fresh.forward(&r.prompt_ids, Logits::Last).unwrap();
        let want = fresh
            .forward(&r.decode_ids[..1], Logits::Last)
            .unwrap()
            .to_vec();
        let mut reused = model.new_session(64).unwrap();
        reused.forward(&r.prompt_ids, Logits::Last).unwrap();
        for &t in &r.decode_ids[3..6] {
            reused.forward(&[t], Logits::Last).unwrap();
        }
        reused.truncate(r.prompt_ids.len());
        let got = reused.forward(&r.decode_ids[..1], Logits::Last).unwrap();
        let d = common::max_abs_diff(got, &want);
        // Same operations on the same values: only a changed summation split could differ.
        assert!(d <= 1e-3, "after truncate: {d}");
    }

    #[test]
    fn concat_cache_reuse_after_truncate() {
        reuse_after_truncate(BackendKind::Ort, "fp32", "ort portable truncate");
    }

    #[test]
    fn shared_buffer_cache_reuse_after_truncate() {
        reuse_after_truncate(BackendKind::Ort, "fp32-ort", "ort shared-buffer truncate");
    }
}

#[cfg(feature = "tract")]
mod tract {
    use super::*;

    #[test]
    fn fp32_logits_match_transformers() {
        fp32_matches_transformers(BackendKind::Tract, &["fp32"], "tract fp32");
    }

    #[test]
    fn a_dual_chunk_model_runs_one_chunk() {
        dual_chunk_model_runs_one_chunk(BackendKind::Tract, "fp32", "tract dca");
    }

    #[test]
    fn other_portable_variants_run() {
        lower_precision_runs(
            BackendKind::Tract,
            &["fp16", "int8", "int4", "int4k"],
            &["fp16"],
            "tract variants",
        );
    }

    #[test]
    fn reuse_after_truncate_works() {
        reuse_after_truncate(BackendKind::Tract, "fp32", "tract truncate");
    }

    #[test]
    fn ort_profile_is_refused_clearly() {
        let bundle = common::fixture_bundle("tiny-tied");
        for variant in ["fp32-ort", "int4-ort"] {
            let err = backend::load(
                &bundle,
                BackendKind::Tract,
                variant,
                &LoadOptions::default(),
            )
            .err()
            .expect("profile ort must be refused");
            let text = err.to_string();
            assert!(
                text.contains("profile ort") && text.contains("GroupQueryAttention"),
                "{text}"
            );
        }
    }
}

/// Quantized portable variants: tract and ONNX Runtime compute the same dequantized math, so
/// their logits agree as closely as fp32 does (the transformers reference does not apply).
#[cfg(all(feature = "ort", feature = "tract"))]
#[test]
fn quantized_variants_agree_between_ort_and_tract() {
    for name in common::TINY {
        for variant in ["int8", "int4", "int4k"] {
            let Some(ort) = load(BackendKind::Ort, name, variant, "quantized agreement") else {
                return;
            };
            let tract = load(BackendKind::Tract, name, variant, "quantized agreement").unwrap();
            let r = common::reference(name);
            let run = |m: &dyn Backend| {
                let mut s = m.new_session(64).unwrap();
                let mut rows = s.forward(&r.prompt_ids, Logits::All).unwrap().to_vec();
                for &t in &r.decode_ids {
                    rows.extend_from_slice(s.forward(&[t], Logits::Last).unwrap());
                }
                rows
            };
            let d = common::max_abs_diff(&run(ort.as_ref()), &run(tract.as_ref()));
            assert!(
                d <= TOLERANCE,
                "{name} {variant}: ort vs tract max |diff| {d}"
            );
        }
    }
}
