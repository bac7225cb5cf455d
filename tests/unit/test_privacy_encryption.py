"""AES-256-GCM envelope encryption of model files: public-key and symmetric recipients, in-memory decryption,
and the refusals (no key, wrong key, changed ciphertext) naming the key the package expects."""

from __future__ import annotations

import os

import pytest

from keiryo.errors import ConfigError, IntegrityError
from keiryo.privacy.encryption import (
    KEY_ENV,
    decrypt_model,
    decryption_key,
    encrypt_model,
    read_key,
    write_symmetric_key,
    write_x25519_pair,
)

PLAIN = os.urandom(4096)
AAD = "keiryo:tiny:1.0.0:model.onnx"


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    return write_x25519_pair(tmp_path_factory.mktemp("dev") / "device.pem")


def test_public_key_envelope_round_trips_in_memory_and_hides_the_model(device):
    priv, pub = device
    ct, block = encrypt_model(PLAIN, read_key(pub), AAD)
    assert PLAIN not in ct and len(ct) == len(PLAIN) + 16  # GCM tag
    assert block["cipher"] == "AES-256-GCM" and block["key_wrap"] == "X25519-HKDF-SHA256+AES-KW"
    assert block["recipient"] == read_key(priv).fingerprint == read_key(pub).fingerprint
    assert decrypt_model(ct, block, read_key(priv)) == PLAIN
    # a fresh data key and nonce every time
    ct2, block2 = encrypt_model(PLAIN, read_key(pub), AAD)
    assert ct2 != ct and block2["wrapped_key"] != block["wrapped_key"]


def test_ec_p256_and_symmetric_keys(tmp_path):
    from keiryo.packages import keygen

    priv, pub = keygen(tmp_path / "ec.pem")
    ct, block = encrypt_model(PLAIN, read_key(pub), AAD)
    assert block["key_wrap"] == "ECDH-secp256r1-HKDF-SHA256+AES-KW" and decrypt_model(ct, block, read_key(priv)) == PLAIN
    sym = write_symmetric_key(tmp_path / "model.key")
    assert oct(sym.stat().st_mode & 0o777) == "0o600"
    ct, block = encrypt_model(PLAIN, read_key(sym), AAD)
    assert block["key_wrap"] == "AES-KW" and decrypt_model(ct, block, read_key(sym)) == PLAIN


def test_missing_wrong_or_public_only_keys_and_changed_bytes_are_refused(device, tmp_path, monkeypatch):
    priv, pub = device
    ct, block = encrypt_model(PLAIN, read_key(pub), AAD)
    want = block["recipient"]
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"encrypted for key {want}; no decryption key given"):
        decrypt_model(ct, block, decryption_key(None))
    other, _ = write_x25519_pair(tmp_path / "other.pem")
    with pytest.raises(IntegrityError, match=f"encrypted for key {want}, but the decryption key given is sha256:"):
        decrypt_model(ct, block, read_key(other))
    with pytest.raises(ConfigError, match="is a public key; decryption needs the matching private key"):
        decrypt_model(ct, block, read_key(pub))
    with pytest.raises(IntegrityError, match="does not decrypt"):
        decrypt_model(ct[:-1] + bytes([ct[-1] ^ 1]), block, read_key(priv))
    with pytest.raises(IntegrityError, match="does not decrypt"):  # the associated data binds name and version
        decrypt_model(ct, {**block, "aad": "keiryo:tiny:2.0.0:model.onnx"}, read_key(priv))
    # the key from the environment: the PEM itself, or a path to it
    monkeypatch.setenv(KEY_ENV, priv.read_text())
    assert decrypt_model(ct, block, decryption_key(None)) == PLAIN
    monkeypatch.setenv(KEY_ENV, str(priv))
    assert decrypt_model(ct, block, decryption_key(None)) == PLAIN
