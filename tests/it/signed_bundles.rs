//! Signed bundles end to end: keys made and bundles signed by the exporter (Python's
//! `cryptography`), checked by the binary (`ed25519-dalek`) in `info` and in the daemon.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::json;

use crate::common::{self, TempDir};
use crate::service_support::{Server, Spec, BIN};

/// The exporter's command line.
fn exporter(python: &Path, args: &[&str]) -> String {
    common::stdout_of(
        Command::new(python).args(["-m", "qwen2_export"]).args(args),
        &format!("qwen2_export {}", args.join(" ")),
    )
}

/// A copy of the tiny fixture bundle signed by a new key named `release`; the bundle and the
/// key's .pub file.
fn signed_copy(python: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let bundle = dir.join("bundle");
    common::copy_dir(&common::fixture("tiny-tied").join("bundle"), &bundle);
    let key = dir.join("release.key");
    let spec = exporter(python, &["keygen", "--out", &key.to_string_lossy()]);
    assert!(spec.trim().starts_with("ed25519:"), "{spec}");
    exporter(
        python,
        &[
            "sign",
            "--bundle",
            &bundle.to_string_lossy(),
            "--key",
            &key.to_string_lossy(),
            "--signer",
            "release team",
        ],
    );
    (bundle, dir.join("release.pub"))
}

fn info(bundle: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .arg("info")
        .arg("--bundle")
        .arg(bundle)
        .args(extra)
        .env_remove("RUST_LOG")
        .output()
        .expect("run info")
}

fn one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
}

#[test]
fn info_checks_a_signature_against_the_trusted_keys() {
    let Some(python) = common::python("info_checks_a_signature_against_the_trusted_keys") else {
        return;
    };
    let dir = TempDir::new("signed");
    let (bundle, public) = signed_copy(&python, &dir.0);
    let public = public.to_string_lossy().into_owned();
    let out = info(&bundle, &["--trusted-key", &public]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("signed by \"release team\"") && stdout.contains("verified"),
        "{stdout}"
    );
    // The key given inline works as the file does.
    let inline = std::fs::read_to_string(&public).expect("pub");
    assert!(info(&bundle, &["--trusted-key", inline.trim()])
        .status
        .success());

    // Another key, trusted instead.
    let other = TempDir::new("other-key");
    let other_key = other.0.join("other.key");
    exporter(&python, &["keygen", "--out", &other_key.to_string_lossy()]);
    let other_pub = other.0.join("other.pub").to_string_lossy().into_owned();
    one_line_error(
        &info(&bundle, &["--trusted-key", &other_pub]),
        "not among model.trusted_keys",
    );
    // A signature vouches for the files through their hashes: they must be checked.
    one_line_error(
        &info(&bundle, &["--no-verify", "--trusted-key", &public]),
        "need the bundle's files hashed",
    );

    // A weight file changed after signing: its hash no longer matches the signed bundle.json.
    let data = bundle.join("onnx/fp32/model.onnx.data");
    let mut bytes = std::fs::read(&data).expect("read");
    bytes[100] ^= 1;
    std::fs::write(&data, &bytes).expect("write");
    one_line_error(&info(&bundle, &["--trusted-key", &public]), "sha256");
    bytes[100] ^= 1;
    std::fs::write(&data, &bytes).expect("write");
    assert!(info(&bundle, &["--trusted-key", &public]).status.success());

    // bundle.json changed after signing (a hash edited to match a changed file, say).
    let manifest = bundle.join("bundle.json");
    let text = std::fs::read_to_string(&manifest).expect("read");
    std::fs::write(&manifest, text.replacen("\"size\"", "\"size\" ", 1)).expect("write");
    one_line_error(
        &info(&bundle, &["--trusted-key", &public]),
        "does not match bundle.json",
    );

    // Unsigned: shown as such without keys, refused with them.
    std::fs::write(&manifest, text).expect("write");
    std::fs::remove_file(bundle.join("bundle.sig")).expect("rm");
    let out = info(&bundle, &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("signature   unsigned"));
    one_line_error(&info(&bundle, &["--trusted-key", &public]), "is not signed");
}

#[test]
fn the_daemon_serves_only_bundles_its_keys_signed() {
    let Some(python) = common::python("the_daemon_serves_only_bundles_its_keys_signed") else {
        return;
    };
    let keys = TempDir::new("daemon-keys");
    let (bundle, public) = signed_copy(&python, &keys.0);
    let mut spec = Spec::tiny();
    spec.bundle = bundle.clone();
    spec.verify = true;
    spec.model = vec![format!(
        "trusted_keys = [{:?}]",
        public.display().to_string()
    )];

    let server = Server::start(&spec);
    let mut c = server.connect();
    c.send(&json!({"op": "health", "id": "h"}));
    let h = c.next(Duration::from_secs(10)).expect("health");
    assert_eq!(h["status"], "ok");
    assert_eq!(h["signature"]["state"], "verified", "{h}");
    assert_eq!(h["signature"]["signer"], "release team");
    assert_eq!(h["variant"], "fp32");
    let resolved = std::fs::canonicalize(&bundle).expect("canonical");
    assert_eq!(h["bundle"], resolved.display().to_string());
    assert!(server.log().contains("verified"), "{}", server.log());
    drop(server);

    // The same bundle unsigned: refused before anything is bound or loaded.
    std::fs::remove_file(bundle.join("bundle.sig")).expect("rm");
    let dir = TempDir::new("daemon-unsigned");
    let config = dir.0.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\nbundle = {:?}\nverify = true\ntrusted_keys = [{:?}]\n[unix_socket]\npath = {:?}\n",
            bundle.display().to_string(),
            public.display().to_string(),
            dir.0.join("s.sock").display().to_string()
        ),
    )
    .expect("config");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .output()
        .expect("serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("is not signed"), "{stderr}");
    assert!(!dir.0.join("s.sock").exists());

    // Keys without hash checks: a config error.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .expect("read")
            .replace("verify = true", "verify = false"),
    )
    .expect("config");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .expect("serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("model.trusted_keys needs model.verify = true"),
        "{stderr}"
    );
}
