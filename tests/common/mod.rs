//! Helpers shared by the integration tests: fixture paths, reference tensors, temp dirs.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

pub const TINY: [&str; 3] = ["tiny-tied", "tiny-untied", "tiny-yarn"];

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
        _ => {
            if std::env::var_os("CI").is_some() {
                panic!("{test}: QWEN2_EDGE_DEMO_BUNDLE must be set in CI");
            }
            // Written to stderr directly: the test harness captures eprintln! of passing
            // tests, and a skip must be visible in a plain `cargo test`.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "{test} skipped: QWEN2_EDGE_DEMO_BUNDLE not set"
            );
            None
        }
    }
}

/// Tensors of a fixture's reference.safetensors.
pub struct Reference {
    pub prompt_ids: Vec<u32>,
    pub prefill_logits: Vec<f32>,
    pub decode_ids: Vec<u32>,
    pub decode_logits: Vec<f32>,
    pub vocab: usize,
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
        _ => {
            if std::env::var_os("CI").is_some() {
                panic!("{test}: ORT_DYLIB_PATH must be set in CI (scripts/lib.sh ensure_ort_lib)");
            }
            eprintln!("{test} skipped: ORT_DYLIB_PATH not set");
            None
        }
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn argmax(v: &[f32]) -> u32 {
    qwen2_edge::sampling::argmax(v)
}
