//! bundle.json as a damaged or hostile bundle would have it (paths out of the bundle, lying
//! sizes, missing files, wrong types) → an error or a bundle whose variants resolve, never a
//! panic. The bundle is a scratch directory holding the tiny fixture's small files.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use qwen2_edge::bundle::{Bundle, Verify};
use qwen2_edge::service::fuzzing::fixture_bundle;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let fixture = fixture_bundle();
        let dir =
            std::env::temp_dir().join(format!("qwen2-edge-fuzz-bundle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        for name in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            std::fs::copy(fixture.join(name), dir.join(name)).expect("copy fixture file");
        }
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    std::fs::write(dir.join("bundle.json"), data).expect("write bundle.json");
    if let Ok(bundle) = Bundle::open(dir, Verify::Full) {
        for name in bundle.variant_names() {
            let _ = bundle.variant(name);
        }
    }
});
