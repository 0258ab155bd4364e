"""Ed25519 signatures of bundles (docs/bundle-format.md, "Signatures"): make a key pair, sign a bundle.

bundle.json lists every file's size and sha256, so signing its bytes vouches for the whole bundle.
The signature goes to bundle.sig beside it; the daemon checks it against `[model] trusted_keys`.
The cryptography is the `cryptography` package's (OpenSSL's Ed25519), none of it written here.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path

from .errors import ExportError

SIGNATURE_FILE = "bundle.sig"
FORMAT = "qwen2-edge-signature"
FORMAT_VERSION = 1
# Signed: this line, the signer's name and a newline, then bundle.json's bytes (the prefix keeps a
# bundle signature from being valid for anything else the key signs).
CONTEXT = b"qwen2-edge bundle signature v1\n"
KEY_PREFIX = "ed25519:"


def public_spec(public_key) -> str:
    """`ed25519:<base64 of the raw 32-byte key>`, the form `[model] trusted_keys` takes."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return KEY_PREFIX + base64.b64encode(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def keygen(private_path: Path) -> tuple[Path, str]:
    """Writes a new private key to `private_path` (PKCS#8 PEM, mode 0600, never over an existing file)
    and its public key to the same name with `.pub`; returns that path and the public key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    private_path = Path(private_path)
    public_path = private_path.with_suffix(".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise ExportError(f"{path}: already exists (a key is never overwritten)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise ExportError(f"{private_path}: cannot create ({e.strerror})") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    spec = public_spec(key.public_key())
    public_path.write_text(spec + "\n", encoding="ascii")
    return public_path, spec


def load_private_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise ExportError(f"{path}: no such key file") from None
    except (ValueError, TypeError) as e:
        raise ExportError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ExportError(f"{path}: not an Ed25519 key (make one with `python -m qwen2_export keygen`)")
    return key


def check_signer(signer: str) -> str:
    if not signer or any(ord(c) < 32 or ord(c) == 127 for c in signer) or len(signer) > 200:
        raise ExportError(f"signer {signer!r}: 1-200 printable characters, one line")
    return signer


def sign_bundle(bundle: Path, key, signer: str) -> Path:
    """Signs `bundle`'s bundle.json with `key` (a loaded private key) as `signer`; writes bundle.sig
    atomically (a reader sees the old signature or the new one)."""
    bundle = Path(bundle)
    check_signer(signer)
    try:
        manifest = (bundle / "bundle.json").read_bytes()
    except FileNotFoundError:
        raise ExportError(f"{bundle}: no bundle.json (not a model bundle)") from None
    signature = key.sign(CONTEXT + signer.encode("utf-8") + b"\n" + manifest)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "algorithm": "ed25519",
        "public_key": public_spec(key.public_key()),
        "signer": signer,
        "signature": base64.b64encode(signature).decode(),
    }
    fd, tmp = tempfile.mkstemp(prefix=".bundle.sig-", dir=bundle)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, bundle / SIGNATURE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return bundle / SIGNATURE_FILE
