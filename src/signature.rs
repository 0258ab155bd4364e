//! Signed bundles: an Ed25519 signature over `bundle.json`, which holds every file's size and
//! sha256, in `bundle.sig` beside it (written by `python -m qwen2_export sign`). A box that lists
//! trusted keys (`[model] trusted_keys`) loads only bundles one of them signed; the format is in
//! docs/bundle-format.md.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The signature's file name inside a bundle directory.
pub const SIGNATURE_FILE: &str = "bundle.sig";
const FORMAT: &str = "qwen2-edge-signature";
const FORMAT_VERSION: u32 = 1;
/// What is signed: this line, the signer's name and a newline, then bundle.json's exact bytes
/// (the prefix keeps a bundle signature from being valid as anything else the key signs).
const CONTEXT: &[u8] = b"qwen2-edge bundle signature v1\n";
const KEY_PREFIX: &str = "ed25519:";

/// A public key a box trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    /// Short fingerprint for logs: the first 16 hex digits of the key's sha256.
    pub id: String,
    key: VerifyingKey,
}

impl TrustedKey {
    /// `ed25519:<base64 of the 32-byte public key>` (what `qwen2_export keygen` prints and
    /// writes to its `.pub` file), or the path of a file holding that line.
    pub fn parse(spec: &str) -> Result<Self> {
        let spec = spec.trim();
        if spec.starts_with(KEY_PREFIX) {
            return Self::from_text(spec);
        }
        let text = std::fs::read_to_string(spec).with_context(|| {
            format!("trusted key {spec}: not `ed25519:…` and not a readable file")
        })?;
        Self::from_text(text.trim()).with_context(|| format!("trusted key file {spec}"))
    }

    fn from_text(text: &str) -> Result<Self> {
        let encoded = text
            .strip_prefix(KEY_PREFIX)
            .ok_or_else(|| anyhow!("a public key must start with {KEY_PREFIX}"))?;
        let bytes: [u8; 32] = BASE64
            .decode(encoded.trim())
            .map_err(|e| anyhow!("public key: bad base64 ({e})"))?
            .try_into()
            .map_err(|b: Vec<u8>| anyhow!("public key: {} bytes, Ed25519 keys have 32", b.len()))?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| anyhow!("public key: not a valid Ed25519 point"))?;
        Ok(Self {
            id: key_id(&bytes),
            key,
        })
    }
}

fn key_id(bytes: &[u8; 32]) -> String {
    let digest = Sha256::digest(bytes);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// What is known about a bundle's signature after opening it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SignatureStatus {
    /// No bundle.sig.
    #[default]
    Unsigned,
    /// A bundle.sig, not checked: this box trusts no keys.
    NotChecked { key_id: String, signer: String },
    /// Checked against one of the trusted keys.
    Verified { key_id: String, signer: String },
}

impl std::fmt::Display for SignatureStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unsigned => write!(f, "unsigned"),
            Self::NotChecked { key_id, signer } => {
                write!(
                    f,
                    "signed by {signer:?} (key {key_id}), not checked: no trusted keys"
                )
            }
            Self::Verified { key_id, signer } => {
                write!(f, "signed by {signer:?} (key {key_id}), verified")
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureFile {
    format: String,
    format_version: u32,
    algorithm: String,
    public_key: String,
    signer: String,
    signature: String,
}

/// Checks the signature of the bundle in `dir` whose bundle.json bytes are `manifest`. With
/// trusted keys, the bundle must be signed by one of them; without, a signature is only read.
pub fn check(dir: &Path, manifest: &[u8], trusted: &[TrustedKey]) -> Result<SignatureStatus> {
    let path = dir.join(SIGNATURE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if trusted.is_empty() {
                return Ok(SignatureStatus::Unsigned);
            }
            bail!(
                "bundle {} is not signed (no {SIGNATURE_FILE}) but model.trusted_keys is set; \
                 sign it with `python -m qwen2_export sign`",
                dir.display()
            );
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let file: SignatureFile = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: not a bundle signature ({e})", path.display()))?;
    if file.format != FORMAT || file.format_version != FORMAT_VERSION || file.algorithm != "ed25519"
    {
        bail!(
            "{}: unsupported signature ({} version {}, {}; this build reads {FORMAT} version \
             {FORMAT_VERSION}, ed25519)",
            path.display(),
            file.format,
            file.format_version,
            file.algorithm
        );
    }
    let key = TrustedKey::from_text(&file.public_key)
        .with_context(|| format!("{}: public_key", path.display()))?;
    if trusted.is_empty() {
        return Ok(SignatureStatus::NotChecked {
            key_id: key.id,
            signer: file.signer,
        });
    }
    if !trusted.contains(&key) {
        bail!(
            "bundle {} is signed by key {} ({:?}), which is not among model.trusted_keys",
            dir.display(),
            key.id,
            file.signer
        );
    }
    let signature: [u8; 64] = BASE64
        .decode(file.signature.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| anyhow!("{}: signature is not 64 base64 bytes", path.display()))?;
    key.key
        .verify_strict(
            &signed_message(&file.signer, manifest),
            &Signature::from_bytes(&signature),
        )
        .map_err(|_| {
            anyhow!(
                "bundle {}: the signature in {SIGNATURE_FILE} does not match bundle.json (changed \
                 after it was signed, or signed with another key)",
                dir.display()
            )
        })?;
    Ok(SignatureStatus::Verified {
        key_id: key.id,
        signer: file.signer,
    })
}

fn signed_message(signer: &str, manifest: &[u8]) -> Vec<u8> {
    [CONTEXT, signer.as_bytes(), b"\n".as_slice(), manifest].concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn spec(key: &SigningKey) -> String {
        format!(
            "{KEY_PREFIX}{}",
            BASE64.encode(key.verifying_key().as_bytes())
        )
    }

    /// A bundle directory with `manifest` signed by `key` as `signer`.
    fn signed_dir(
        name: &str,
        key: &SigningKey,
        signer: &str,
        manifest: &[u8],
    ) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("qwen2-edge-sig-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let signature = key.sign(&signed_message(signer, manifest));
        let file = serde_json::json!({
            "format": FORMAT, "format_version": FORMAT_VERSION, "algorithm": "ed25519",
            "public_key": spec(key), "signer": signer,
            "signature": BASE64.encode(signature.to_bytes()),
        });
        std::fs::write(dir.join(SIGNATURE_FILE), file.to_string()).expect("write");
        dir
    }

    #[test]
    fn a_signature_is_checked_against_the_trusted_keys() {
        let release = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[9; 32]);
        let trusted = [TrustedKey::parse(&spec(&release)).expect("key")];
        let manifest = br#"{"files": {}}"#;
        let dir = signed_dir("ok", &release, "release team", manifest);
        let status = check(&dir, manifest, &trusted).expect("verifies");
        assert_eq!(
            status,
            SignatureStatus::Verified {
                key_id: trusted[0].id.clone(),
                signer: "release team".into()
            }
        );
        // No trusted keys: read, not checked.
        assert!(matches!(
            check(&dir, manifest, &[]).expect("reads"),
            SignatureStatus::NotChecked { .. }
        ));
        // One byte of bundle.json changed.
        let err = check(&dir, br#"{"files": {} }"#, &trusted).unwrap_err();
        assert!(
            format!("{err:#}").contains("does not match bundle.json"),
            "{err:#}"
        );
        // Signed by a key this box does not trust.
        let stranger = signed_dir("stranger", &other, "someone", manifest);
        let err = check(&stranger, manifest, &trusted).unwrap_err();
        assert!(
            format!("{err:#}").contains("not among model.trusted_keys"),
            "{err:#}"
        );
        // The signer's name is signed too: renaming it breaks the signature.
        let text = std::fs::read_to_string(dir.join(SIGNATURE_FILE)).expect("read");
        let renamed = text.replace("release team", "release tean");
        std::fs::write(dir.join(SIGNATURE_FILE), renamed).expect("write");
        assert!(check(&dir, manifest, &trusted).is_err());
        // Unsigned: fine without keys, refused with them.
        std::fs::remove_file(dir.join(SIGNATURE_FILE)).expect("remove");
        assert_eq!(
            check(&dir, manifest, &[]).expect("unsigned"),
            SignatureStatus::Unsigned
        );
        let err = check(&dir, manifest, &trusted).unwrap_err();
        assert!(format!("{err:#}").contains("is not signed"), "{err:#}");
        for d in [dir, stranger] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    #[test]
    fn bad_key_specs_are_refused_clearly() {
        for (bad, message) in [
            ("ed25519:!!!", "bad base64"),
            ("ed25519:AAAA", "3 bytes"),
            ("/no/such/key.pub", "not a readable file"),
        ] {
            let err = format!("{:#}", TrustedKey::parse(bad).unwrap_err());
            assert!(err.contains(message), "{bad}: {err}");
        }
    }
}
