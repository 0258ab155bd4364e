//! The fuzz crate's bookkeeping (the targets themselves run under libFuzzer, scripts/fuzz.sh):
//! every target has its source and committed seeds. Git keeps no empty folder, so a target whose
//! seeds were never written has no seed folder in a fresh clone, and its fuzzing run fails there.

use std::path::Path;

#[test]
fn every_fuzz_target_has_its_source_and_seeds() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest: toml::Table = std::fs::read_to_string(fuzz.join("Cargo.toml"))
        .expect("fuzz/Cargo.toml")
        .parse()
        .expect("fuzz/Cargo.toml is TOML");
    let bins = manifest["bin"].as_array().expect("[[bin]] tables");
    assert!(bins.len() >= 7, "the fuzz targets: {bins:?}");
    for bin in bins {
        let name = bin["name"].as_str().expect("a target's name");
        let path = bin["path"].as_str().expect("a target's path");
        assert!(
            fuzz.join(path).is_file(),
            "fuzz target {name}: {path} is missing"
        );
        let seeds = fuzz.join("seeds").join(name);
        let files = std::fs::read_dir(&seeds)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().is_file())
                    .count()
            })
            .unwrap_or(0);
        assert!(
            files > 0,
            "fuzz target {name}: no seed files in {}",
            seeds.display()
        );
    }
}
