"""keygen, sign and export --sign-key: the signature verifies over bundle.json's exact bytes (checked
here with the `cryptography` package's own verification; tests/it/signed_bundles.rs checks it with the
Rust binary), keys are private and never overwritten, bad inputs are one clear error."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys

import pytest
from conftest import FIXTURES

from qwen2_export.errors import ExportError
from qwen2_export.signing import CONTEXT, keygen, load_private_key, sign_bundle


def _verify(bundle) -> dict:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    record = json.loads((bundle / "bundle.sig").read_text())
    raw = base64.b64decode(record["public_key"].removeprefix("ed25519:"))
    message = CONTEXT + record["signer"].encode() + b"\n" + (bundle / "bundle.json").read_bytes()
    Ed25519PublicKey.from_public_bytes(raw).verify(base64.b64decode(record["signature"]), message)
    return record


def test_keygen_writes_a_private_key_and_its_public_line(tmp_path):
    public_path, spec = keygen(tmp_path / "release.key")
    assert public_path == tmp_path / "release.pub"
    assert public_path.read_text().strip() == spec and spec.startswith("ed25519:")
    assert len(base64.b64decode(spec.removeprefix("ed25519:"))) == 32
    assert (tmp_path / "release.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ExportError, match="never overwritten"):
        keygen(tmp_path / "release.key")


def test_sign_then_verify(tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(FIXTURES / "tiny-tied" / "bundle", bundle)
    keygen(tmp_path / "k.key")
    sign_bundle(bundle, load_private_key(tmp_path / "k.key"), "release team")
    record = _verify(bundle)
    assert record["signer"] == "release team"
    assert record["public_key"] == (tmp_path / "k.pub").read_text().strip()
    assert [p.name for p in bundle.glob(".bundle.sig-*")] == []


def test_export_signs_before_the_bundle_appears(tmp_path):
    keygen(tmp_path / "k.key")
    out = tmp_path / "b"
    run = subprocess.run([sys.executable, "-m", "qwen2_export", "export", "--from",
                          str(FIXTURES / "tiny-tied" / "checkpoint"), "--out", str(out), "--variants", "int8",
                          "--profiles", "portable", "--sign-key", str(tmp_path / "k.key")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert _verify(out)["signer"] == "k"  # the key file's name


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such key file"),
    (b"not a key", "not an unencrypted PEM private key"),
])
def test_bad_keys(tmp_path, content, message):
    key = tmp_path / "bad.key"
    if content is not None:
        key.write_bytes(content)
    with pytest.raises(ExportError, match=message):
        load_private_key(key)


def test_other_key_types_are_refused(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    (tmp_path / "ec.key").write_bytes(pem)
    with pytest.raises(ExportError, match="not an Ed25519 key"):
        load_private_key(tmp_path / "ec.key")


def test_signer_is_one_printable_line(tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(FIXTURES / "tiny-tied" / "bundle", bundle)
    keygen(tmp_path / "k.key")
    with pytest.raises(ExportError, match="one line"):
        sign_bundle(bundle, load_private_key(tmp_path / "k.key"), "two\nlines")
    assert not (bundle / "bundle.sig").exists()


def test_sign_refuses_what_is_not_a_bundle(tmp_path):
    keygen(tmp_path / "k.key")
    run = subprocess.run([sys.executable, "-m", "qwen2_export", "sign", "--bundle", str(tmp_path), "--key",
                          str(tmp_path / "k.key")], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "not a model bundle" in run.stderr
