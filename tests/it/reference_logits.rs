//! The native backend against transformers: logits at every prefill position and every decode
//! step within 1e-4 (fp32), identical greedy tokens (fp32 and fp16), on every fixture model.

use crate::common;

use common::max_abs_diff;
use qwen2_edge::backend::{self, BackendKind, KvCacheType, LoadOptions, Logits};
use qwen2_edge::bundle::{Bundle, Verify};
use qwen2_edge::sampling::argmax;

const TOLERANCE: f32 = 1e-4;

fn load_chunked(
    name: &str,
    variant: &str,
    threads: usize,
    prefill_chunk: usize,
) -> std::sync::Arc<dyn backend::Backend> {
    let bundle = Bundle::open(common::fixture(name).join("bundle"), Verify::Full).unwrap();
    bundle.verify_variant(variant).unwrap();
    let options = LoadOptions {
        threads,
        prefill_chunk,
        ..LoadOptions::default()
    };
    backend::load(&bundle, BackendKind::Native, variant, &options).unwrap()
}

fn load(name: &str, variant: &str, threads: usize) -> std::sync::Arc<dyn backend::Backend> {
    load_chunked(name, variant, threads, 0)
}

fn check_fp32(name: &str, threads: usize, prefill_chunk: usize) {
    check_variant(name, "fp32", threads, prefill_chunk);
}

fn check_variant(name: &str, variant: &str, threads: usize, prefill_chunk: usize) {
    let r = common::reference(name);
    let model = load_chunked(name, variant, threads, prefill_chunk);
    let v = r.vocab;
    let mut session = model
        .new_session(model.config().max_position_embeddings)
        .unwrap();

    let prefill = session
        .forward(&r.prompt_ids, Logits::All)
        .unwrap()
        .to_vec();
    let mut worst = 0.0f32;
    for pos in 0..r.prompt_ids.len() {
        let d = max_abs_diff(&prefill[pos * v..][..v], &r.prefill_logits[pos * v..][..v]);
        assert!(
            d <= TOLERANCE,
            "{name}: prefill position {pos}: max |diff| {d}"
        );
        worst = worst.max(d);
    }
    let mut last = prefill[(r.prompt_ids.len() - 1) * v..].to_vec();
    for (step, &fed) in r.decode_ids.iter().enumerate() {
        assert_eq!(
            argmax(&last),
            fed,
            "{name}: greedy token at decode step {step}"
        );
        last = session.forward(&[fed], Logits::Last).unwrap().to_vec();
        let d = max_abs_diff(&last, &r.decode_logits[step * v..][..v]);
        assert!(d <= TOLERANCE, "{name}: decode step {step}: max |diff| {d}");
        worst = worst.max(d);
    }
    let scale = r.prefill_logits.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    eprintln!(
        "{name} {variant} (threads {threads}, chunk {prefill_chunk}): {} prompt + {} decode positions, max |diff| {worst:.2e}, max |logit| {scale:.2}",
        r.prompt_ids.len(),
        r.decode_ids.len()
    );
}

#[test]
fn fp32_logits_match_transformers() {
    for name in common::TINY {
        check_fp32(name, 2, 0);
    }
}

#[test]
fn ort_profile_weights_serve_the_native_backend_too() {
    // Same Hugging Face names in the fp32-ort table (plus its rotary caches, unused here).
    check_variant("tiny-untied", "fp32-ort", 2, 0);
}

#[test]
fn fp32_single_thread_and_chunked_prefill_agree() {
    // One thread, a prompt computed 7 rows at a time, and a prompt split over two forward
    // calls all give the reference logits.
    let name = "tiny-yarn";
    check_fp32(name, 1, 0);
    check_fp32(name, 2, 7);
    let r = common::reference(name);
    let model = load(name, "fp32", 2);
    let mut session = model.new_session(64).unwrap();
    let d = common::split_prefill_error(session.as_mut(), &r);
    assert!(d <= TOLERANCE, "split prefill: {d}");
}

#[test]
fn fp16_greedy_tokens_match_transformers() {
    for name in common::TINY {
        let r = common::reference(name);
        let model = load(name, "fp16", 2);
        let mut session = model.new_session(128).unwrap();
        let mut logits = session
            .forward(&r.prompt_ids, Logits::Last)
            .unwrap()
            .to_vec();
        for (step, &want) in r.decode_ids.iter().enumerate() {
            assert_eq!(argmax(&logits), want, "{name} fp16: decode step {step}");
            logits = session.forward(&[want], Logits::Last).unwrap().to_vec();
        }
    }
}

#[test]
fn session_reuse_after_truncate() {
    let name = "tiny-tied";
    let r = common::reference(name);
    let model = load(name, "fp32", 2);
    let v = r.vocab;
    let mut session = model.new_session(64).unwrap();
    session.forward(&r.prompt_ids, Logits::Last).unwrap();
    session.forward(&r.decode_ids[..3], Logits::Last).unwrap();
    // Rewind to the prompt and decode again: same logits as the first time.
    session.truncate(r.prompt_ids.len());
    let again = session
        .forward(&r.decode_ids[..1], Logits::Last)
        .unwrap()
        .to_vec();
    let d = max_abs_diff(&again, &r.decode_logits[..v]);
    assert!(d <= TOLERANCE, "after truncate: {d}");
}

#[test]
fn the_yarn_fixture_depends_on_yarn() {
    // With plain RoPE instead of YaRN the reference is missed: the YaRN check above is real.
    let dir = common::TempDir::new("yarn");
    let bundle = dir.0.join("bundle");
    common::copy_dir(&common::fixture("tiny-yarn").join("bundle"), &bundle);
    let config = std::fs::read_to_string(bundle.join("config.json")).unwrap();
    let plain = config.replace("\"yarn\"", "\"default\"");
    // Same byte size (bundle.json records it): drop the padding the longer name costs.
    let plain = plain.replacen("  ", "", (plain.len() - config.len()).div_ceil(2));
    let plain = format!("{plain:<width$}", width = config.len());
    assert_eq!(plain.len(), config.len());
    std::fs::write(bundle.join("config.json"), plain).unwrap();

    let b = Bundle::open(&bundle, Verify::SizesOnly).unwrap();
    let model = backend::load(&b, BackendKind::Native, "fp32", &LoadOptions::default()).unwrap();
    let r = common::reference("tiny-yarn");
    let mut session = model.new_session(64).unwrap();
    let logits = session.forward(&r.prompt_ids, Logits::All).unwrap();
    let d = max_abs_diff(logits, &r.prefill_logits);
    assert!(
        d > 1e-2,
        "plain RoPE still matches the YaRN reference ({d})"
    );
}

/// Dual Chunk Attention (chunks of 6 positions; the 28-token prompt and 8 decode steps span six)
/// against the authors' implementation (tests/fixtures/tiny-dca, made with ChunkLlama's code):
/// the whole prompt at once, 5 rows at a time (chunk boundaries inside a forward call), on one
/// thread, and over an f16 and an int8 KV cache (their greedy tokens).
#[test]
fn dual_chunk_attention_matches_the_authors_implementation() {
    let name = "tiny-dca";
    check_fp32(name, 2, 0);
    check_fp32(name, 1, 5);
    let r = common::reference(name);
    for kv_cache in [KvCacheType::F16, KvCacheType::Int8] {
        let bundle = Bundle::open(common::fixture(name).join("bundle"), Verify::Full).unwrap();
        let options = LoadOptions {
            kv_cache,
            ..LoadOptions::default()
        };
        let model = backend::load(&bundle, BackendKind::Native, "fp32", &options).unwrap();
        let mut session = model.new_session(64).unwrap();
        let mut logits = session
            .forward(&r.prompt_ids, Logits::Last)
            .unwrap()
            .to_vec();
        for (step, &want) in r.decode_ids.iter().enumerate() {
            assert_eq!(
                argmax(&logits),
                want,
                "{kv_cache:?} cache: decode step {step}"
            );
            logits = session.forward(&[want], Logits::Last).unwrap().to_vec();
        }
    }
}

#[test]
fn the_dca_fixture_depends_on_dca() {
    // Without dual_chunk_attention_config (plain attention) the reference is missed past the
    // first chunk and its successor's exact distances (position 9 on): the check above is real.
    let dir = common::TempDir::new("dca");
    let bundle = dir.0.join("bundle");
    common::copy_dir(&common::fixture("tiny-dca").join("bundle"), &bundle);
    let config = std::fs::read_to_string(bundle.join("config.json")).unwrap();
    let plain = config.replace("dual_chunk_attention_config", "dual_chunk_attention_unused");
    assert_eq!(plain.len(), config.len());
    std::fs::write(bundle.join("config.json"), plain).unwrap();

    let b = Bundle::open(&bundle, Verify::SizesOnly).unwrap();
    let model = backend::load(&b, BackendKind::Native, "fp32", &LoadOptions::default()).unwrap();
    let r = common::reference("tiny-dca");
    let mut session = model.new_session(64).unwrap();
    let logits = session.forward(&r.prompt_ids, Logits::All).unwrap();
    let v = r.vocab;
    let near = max_abs_diff(&logits[..9 * v], &r.prefill_logits[..9 * v]);
    let far = max_abs_diff(&logits[9 * v..], &r.prefill_logits[9 * v..]);
    assert!(
        near <= TOLERANCE,
        "plain attention differs within exact distances ({near})"
    );
    assert!(
        far > 1e-2,
        "plain attention still matches the DCA reference ({far})"
    );
}
