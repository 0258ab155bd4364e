//! `qwen2-edge bundle install | rollback | status`: the store keeps a verified version current
//! whatever happens to an install, and the daemon serves it through the `current` link.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::json;

use crate::common::{self, TempDir};
use crate::service_support::{Server, Spec, BIN};

/// Every step after which `install` can be interrupted (store::failpoint names).
const STEPS: &[&str] = &[
    "staged",
    "verified",
    "smoke-tested",
    "renamed",
    "previous-set",
    "current-set",
];

fn qwen2_edge(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run qwen2-edge")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fixture_bundle(name: &str) -> String {
    common::fixture(name)
        .join("bundle")
        .to_string_lossy()
        .into_owned()
}

fn install(store: &Path, source: &str, env: &[(&str, &str)]) -> Output {
    install_with(store, source, &[], env)
}

/// `bundle install SOURCE` as model `tiny` of `store`, with more arguments.
fn install_with(store: &Path, source: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let store = store.to_string_lossy();
    let mut args = vec![
        "bundle", "install", source, "--store", &store, "--name", "tiny",
    ];
    args.extend_from_slice(extra);
    qwen2_edge(&args, env)
}

fn link(store: &Path, name: &str) -> Option<String> {
    std::fs::read_link(store.join("tiny").join(name))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// `current` names a complete bundle: every size and hash checks out.
fn assert_current_verifies(store: &Path) {
    let current: PathBuf = store.join("tiny/current");
    ok(&qwen2_edge(
        &["info", "--bundle", &current.to_string_lossy()],
        &[],
    ));
}

fn leftovers(store: &Path) -> Vec<String> {
    std::fs::read_dir(store.join("tiny"))
        .expect("store")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn an_install_killed_at_any_step_leaves_a_verified_version_current() {
    for (i, step) in STEPS.iter().enumerate() {
        let store = TempDir::new("store-crash");
        ok(&install(&store.0, &fixture_bundle("tiny-tied"), &[]));
        let v1 = link(&store.0, "current").expect("v1 current");
        let failpoint = format!("install:{step}");
        let out = install(
            &store.0,
            &fixture_bundle("tiny-untied"),
            &[("QWEN2_EDGE_FAILPOINT", &failpoint)],
        );
        assert!(
            !out.status.success(),
            "{step}: the failpoint did not stop it"
        );
        assert_current_verifies(&store.0);
        let current = link(&store.0, "current").expect("current");
        let flipped = STEPS
            .iter()
            .position(|s| *s == "current-set")
            .expect("step");
        if i < flipped {
            assert_eq!(
                current, v1,
                "killed after {step}: the old version stays current"
            );
        } else {
            assert_ne!(
                current, v1,
                "killed after {step}: the new version is current"
            );
        }
        // The next install finishes the job and cleans up.
        ok(&install(&store.0, &fixture_bundle("tiny-untied"), &[]));
        assert_current_verifies(&store.0);
        assert_ne!(link(&store.0, "current").expect("current"), v1, "{step}");
        assert_eq!(
            link(&store.0, "previous").as_deref(),
            Some(v1.as_str()),
            "{step}"
        );
        assert_eq!(leftovers(&store.0), Vec::<String>::new(), "{step}");
    }
}

#[test]
fn rollback_switches_back_and_forth_and_old_versions_are_pruned() {
    let store = TempDir::new("store-rollback");
    let s = store.0.to_string_lossy().into_owned();
    let rollback = || {
        qwen2_edge(
            &["bundle", "rollback", "--store", &s, "--name", "tiny"],
            &[],
        )
    };
    ok(&install(&store.0, &fixture_bundle("tiny-tied"), &[]));
    let err = rollback();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("no previous version"));
    let v1 = link(&store.0, "current").expect("v1");
    ok(&install(&store.0, &fixture_bundle("tiny-untied"), &[]));
    let v2 = link(&store.0, "current").expect("v2");
    ok(&rollback());
    assert_eq!(link(&store.0, "current"), Some(v1.clone()));
    assert_eq!(link(&store.0, "previous"), Some(v2.clone()));
    ok(&rollback());
    assert_eq!(link(&store.0, "current"), Some(v2.clone()));
    // Installing the same bundle again is a no-op on the versions.
    ok(&install(&store.0, &fixture_bundle("tiny-untied"), &[]));
    assert_eq!(link(&store.0, "current"), Some(v2.clone()));
    // A third version: the oldest (neither current nor previous) is removed.
    ok(&install(&store.0, &fixture_bundle("tiny-yarn"), &[]));
    let status = ok(&qwen2_edge(
        &["bundle", "status", "--store", &s, "--name", "tiny"],
        &[],
    ));
    assert!(!status.contains(&v1), "{status}");
    assert!(status.contains(&format!("{v2}\tprevious")), "{status}");
}

#[test]
fn a_bundle_that_fails_verification_never_enters_the_store() {
    let store = TempDir::new("store-refuse");
    ok(&install(&store.0, &fixture_bundle("tiny-tied"), &[]));
    let v1 = link(&store.0, "current").expect("v1");
    // A corrupt weight file.
    let bad = TempDir::new("store-bad-source");
    common::copy_dir(&common::fixture("tiny-untied").join("bundle"), &bad.0);
    let data = bad.0.join("onnx/fp32/model.onnx.data");
    let mut bytes = std::fs::read(&data).expect("read");
    bytes[64] ^= 0x40;
    std::fs::write(&data, bytes).expect("write");
    let out = install(&store.0, &bad.0.to_string_lossy(), &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sha256"));
    // Unsigned where a signature is required.
    let key = {
        use base64::Engine as _;
        let public = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        format!(
            "ed25519:{}",
            base64::engine::general_purpose::STANDARD.encode(public.as_bytes())
        )
    };
    let out = install_with(
        &store.0,
        &fixture_bundle("tiny-untied"),
        &["--trusted-key", &key],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not signed"));
    // A smoke test that cannot run (no such variant): nothing staged is left behind.
    let out = install_with(
        &store.0,
        &fixture_bundle("tiny-untied"),
        &["--variant", "int3"],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("smoke test"));
    assert_eq!(link(&store.0, "current"), Some(v1));
    assert_eq!(leftovers(&store.0), Vec::<String>::new());
    let versions = std::fs::read_dir(store.0.join("tiny"))
        .expect("dir")
        .count();
    assert_eq!(versions, 2, "v1 and its current link only");
}

#[test]
fn the_daemon_serves_the_current_version() {
    let store = TempDir::new("store-serve");
    ok(&install(&store.0, &fixture_bundle("tiny-tied"), &[]));
    let version = link(&store.0, "current").expect("current");
    // Installed files are read-only: the daemon maps them, and a file rewritten in place would
    // fault a running model.
    use std::os::unix::fs::PermissionsExt;
    let data = store.0.join("tiny/current/onnx/fp32/model.onnx.data");
    let mode = std::fs::metadata(&data)
        .expect("installed data")
        .permissions()
        .mode();
    assert_eq!(mode & 0o222, 0, "{} is writable: {mode:o}", data.display());
    let mut spec = Spec::tiny();
    spec.bundle = store.0.join("tiny/current");
    let server = Server::start(&spec);
    let mut c = server.connect();
    c.send(&json!({"op": "health", "id": "h"}));
    let h = c.next(Duration::from_secs(10)).expect("health");
    let served = h["bundle"].as_str().expect("bundle path");
    assert!(served.ends_with(&format!("/tiny/{version}")), "{served}");
}

#[test]
fn move_takes_the_source_in_and_gives_it_back_on_failure() {
    let store = TempDir::new("store-move");
    let src = TempDir::new("store-move-src");
    let bundle = src.0.join("bundle");
    common::copy_dir(&common::fixture("tiny-tied").join("bundle"), &bundle);
    let b = bundle.to_string_lossy().into_owned();
    // The smoke test fails (no such variant): the bundle is back where it was.
    let out = install_with(&store.0, &b, &["--move", "--variant", "int3"], &[]);
    assert!(!out.status.success());
    assert!(
        bundle.join("bundle.json").exists(),
        "the moved source was not given back"
    );
    assert_eq!(leftovers(&store.0), Vec::<String>::new());
    ok(&install_with(&store.0, &b, &["--move"], &[]));
    assert!(!bundle.exists(), "moved, not copied");
    assert_current_verifies(&store.0);
}

#[test]
fn with_several_models_the_config_model_names_its_store_directory() {
    let store = TempDir::new("store-models");
    let s = store.0.to_string_lossy().into_owned();
    let config = store.0.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[[model]]\nname = \"quick\"\nbundle = {:?}\n\
             [[model]]\nname = \"assistant\"\nbundle = {:?}\n",
            store.0.join("small/current").display().to_string(),
            store.0.join("big/current").display().to_string()
        ),
    )
    .expect("config");
    let c = config.to_string_lossy().into_owned();
    let install = |name: &str| {
        qwen2_edge(
            &[
                "bundle",
                "install",
                &fixture_bundle("tiny-tied"),
                "--store",
                &s,
                "--config",
                &c,
                "--name",
                name,
            ],
            &[],
        )
    };
    // Which model is ambiguous without a name.
    let err = qwen2_edge(&["bundle", "status", "--store", &s, "--config", &c], &[]);
    assert!(!err.status.success());
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("--name"),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );
    // The config's name leads to the store directory its bundle path names.
    ok(&install("assistant"));
    assert!(store.0.join("big/current").exists());
    assert!(!store.0.join("assistant").exists());
    // A store name works as well.
    ok(&install("small"));
    assert!(store.0.join("small/current").exists());
    let status = ok(&qwen2_edge(
        &[
            "bundle", "status", "--store", &s, "--config", &c, "--name", "quick",
        ],
        &[],
    ));
    assert!(status.contains("current"), "{status}");
}
