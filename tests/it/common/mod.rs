//! Helpers shared by the integration tests: fixture paths, reference tensors, temp dirs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

pub const TINY: [&str; 4] = ["tiny-tied", "tiny-untied", "tiny-yarn", "tiny-moe"];

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The demo bundle from QWEN2_EDGE_DEMO_BUNDLE. Unset: None with a visible skip note, unless
/// CI is set, where the demo model is required and the test fails.
pub fn demo_bundle(test: &str) -> Option<PathBuf> {
    match std::env::var_os("QWEN2_EDGE_DEMO_BUNDLE") {
        Some(dir) if !dir.is_empty() => Some(PathBuf::from(dir)),
        _ => unavailable(test, "QWEN2_EDGE_DEMO_BUNDLE not set"),
    }
}

/// Something a test needs is missing: a failure in CI (where .ci/run provides everything),
/// else None with a skip note that stays visible in a plain `cargo test`.
/// The venv's Python with the test extras of `onnx-export` (`jsonschema`, `openai`,
/// `prometheus_client`): QWEN2_EDGE_PYTHON, set by scripts/test.sh.
pub fn python(test: &str) -> Option<PathBuf> {
    match std::env::var_os("QWEN2_EDGE_PYTHON") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => unavailable(test, "QWEN2_EDGE_PYTHON (the test venv's Python) not set"),
    }
}

pub fn unavailable<T>(test: &str, why: &str) -> Option<T> {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why} (required in CI)");
    }
    // Written to stderr directly: the test harness captures eprintln! of passing tests.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{test} skipped: {why}");
    None
}

/// Tensors of a fixture's reference.safetensors.
pub struct Reference {
    pub prompt_ids: Vec<u32>,
    pub prefill_logits: Vec<f32>,
    pub decode_ids: Vec<u32>,
    pub decode_logits: Vec<f32>,
    pub vocab: usize,
}

impl Reference {
    /// Every reference row in the order a teacher-forced trace produces them: the prompt
    /// positions, then each decode step.
    pub fn all_logits(&self) -> Vec<f32> {
        self.prefill_logits
            .iter()
            .chain(&self.decode_logits)
            .copied()
            .collect()
    }
}

pub fn reference(name: &str) -> Reference {
    let bytes = std::fs::read(fixture(name).join("reference.safetensors")).expect("reference");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let ids = |key: &str| -> Vec<u32> {
        let t = st.tensor(key).expect(key);
        assert_eq!(t.dtype(), safetensors::Dtype::I64, "{key}");
        t.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect()
    };
    let floats = |key: &str| -> (Vec<f32>, Vec<usize>) {
        let t = st.tensor(key).expect(key);
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{key}");
        let v = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (v, t.shape().to_vec())
    };
    let (prefill_logits, shape) = floats("prefill_logits");
    let (decode_logits, _) = floats("decode_logits");
    Reference {
        prompt_ids: ids("prompt_ids"),
        prefill_logits,
        decode_ids: ids("decode_ids"),
        decode_logits,
        vocab: shape[1],
    }
}

/// A fresh empty directory under the system temp dir (removed by `TempDir`'s drop).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("qwen2-edge-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Recursively copies a directory (to corrupt a bundle without touching the fixture).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// The ONNX Runtime library from ORT_DYLIB_PATH (scripts/test.sh sets it from the onnxruntime
/// wheel). Unset: None with a visible skip note, unless CI is set, where it is required.
pub fn ort_library(test: &str) -> Option<PathBuf> {
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
        _ => unavailable(
            test,
            "ORT_DYLIB_PATH not set (scripts/lib.sh ensure_ort_lib)",
        ),
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The ONNX backends' tests (built with their features) take greedy tokens with it.
#[cfg(any(feature = "ort", feature = "tract"))]
pub fn argmax(v: &[f32]) -> u32 {
    qwen2_edge::sampling::argmax(v)
}

/// Runs `cmd`, which must succeed; its stdout.
pub fn stdout_of(cmd: &mut std::process::Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A bundle on `backend` (sizes checked, hashes not), default kernels, `threads` (0: all cores).
pub fn engine(
    bundle: &Path,
    backend: qwen2_edge::backend::BackendKind,
    variant: &str,
    threads: usize,
    ort: qwen2_edge::backend::options::OrtOptions,
) -> qwen2_edge::engine::Engine {
    qwen2_edge::engine::Engine::load(&engine_options(bundle, backend, variant, threads, ort))
        .unwrap_or_else(|e| panic!("{backend} {variant}: {e:#}"))
}

/// `engine`'s options, for a test that changes one of them (the kernel set, the KV cache).
pub fn engine_options(
    bundle: &Path,
    backend: qwen2_edge::backend::BackendKind,
    variant: &str,
    threads: usize,
    ort: qwen2_edge::backend::options::OrtOptions,
) -> qwen2_edge::engine::EngineOptions {
    qwen2_edge::engine::EngineOptions {
        bundle: bundle.to_path_buf(),
        verify: qwen2_edge::bundle::Verify::SizesOnly,
        backend,
        variant: variant.to_string(),
        threads,
        kernels: String::new(),
        kv_cache: Default::default(),
        lm_head: Default::default(),
        prefix_cache_mib: 0,
        prefix_cache_file: None,
        no_mmap: false,
        ort,
        trusted_keys: Vec::new(),
    }
}

/// The greedy continuation of `prompt` (no repetition penalty), at most `max` tokens, ending
/// at the bundle's eos tokens when `stop_at_eos`.
pub fn greedy(
    engine: &qwen2_edge::engine::Engine,
    prompt: &[u32],
    max: usize,
    stop_at_eos: bool,
) -> qwen2_edge::generate::Generation {
    let options = qwen2_edge::generate::GenerateOptions {
        max_new_tokens: max,
        sampling: qwen2_edge::sampling::SamplingParams::greedy(),
        stop: Vec::new(),
        eos_token_ids: if stop_at_eos {
            engine.default_options().eos_token_ids
        } else {
            Vec::new()
        },
        prompt_lookup: 0,
    };
    let mut generator = engine.generator(Some(prompt.len() + max + 1)).unwrap();
    let cancel = qwen2_edge::generate::CancelHandle::new();
    generator
        .generate(&engine.tokenizer, prompt, &options, &cancel, &mut |_| {})
        .unwrap()
}

/// A fixture's bundle, sizes checked.
pub fn fixture_bundle(name: &str) -> qwen2_edge::bundle::Bundle {
    let dir = fixture(name).join("bundle");
    qwen2_edge::bundle::Bundle::open(dir, qwen2_edge::bundle::Verify::SizesOnly).unwrap()
}

/// The prompt of reference `r` run in two forward calls (the first half, then the rest with
/// every row's logits): the largest |difference| from the reference's prefill logits over the
/// second half's rows. The session is left holding the prompt.
pub fn split_prefill_error(session: &mut dyn qwen2_edge::backend::Session, r: &Reference) -> f32 {
    use qwen2_edge::backend::Logits;
    let v = r.vocab;
    let (a, b) = r.prompt_ids.split_at(r.prompt_ids.len() / 2);
    session.forward(a, Logits::Last).unwrap();
    let rows = session.forward(b, Logits::All).unwrap();
    (a.len()..r.prompt_ids.len())
        .enumerate()
        .map(|(i, pos)| max_abs_diff(&rows[i * v..][..v], &r.prefill_logits[pos * v..][..v]))
        .fold(0.0, f32::max)
}
