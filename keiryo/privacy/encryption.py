"""Encrypted model files: AES-256-GCM envelope encryption with ``cryptography``.

A fresh 256-bit data key encrypts the model file (AES-256-GCM, 96-bit nonce, the package's name, version and
file name as associated data); the data key is wrapped (AES key wrap, RFC 3394) for one recipient:

- a **public key** (``--encrypt-to device.pub.pem``, X25519 or an EC key such as P-256): an ephemeral key pair,
  ECDH with the recipient, HKDF-SHA256 -> the wrapping key (ECIES); the device decrypts with its private key;
- a **symmetric key file** (32 random bytes, raw, hex or base64): it wraps the data key directly.

The package is signed after encryption, so the signature covers the ciphertext and the ``encryption`` block of
the manifest. Decryption happens in memory (:func:`decrypt_model` takes and returns bytes); a missing key or
the wrong one is refused naming the fingerprint of the key the package expects.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keiryo.errors import ConfigError, InputFileError, IntegrityError
from keiryo.privacy._backend import require

KEY_ENV = "KEIRYO_DECRYPTION_KEY"  # a private key (PEM) or a symmetric key (hex / base64), or a path to one
SCHEME = "keiryo-envelope-v1"
_HKDF_INFO = b"keiryo model key wrap v1"


def _crypto() -> Any:
    return require("cryptography", "cryptography (encrypted packages)", "privacy")


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: str, what: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise IntegrityError(f"encryption.{what}: not base64") from e


@dataclass(frozen=True)
class Key:
    """A recipient (public) or decryption (private / symmetric) key, with its fingerprint."""

    kind: str  # "symmetric" | "x25519" | "ec"
    public: Any = None  # X25519PublicKey | EllipticCurvePublicKey
    private: Any = None  # X25519PrivateKey | EllipticCurvePrivateKey
    secret: bytes | None = None  # the symmetric key

    @property
    def fingerprint(self) -> str:
        """``sha256:`` + 16 bytes of hex: of the public key (SubjectPublicKeyInfo DER), or of a tagged symmetric key."""
        from cryptography.hazmat.primitives import serialization

        if self.secret is not None:
            digest = hashlib.sha256(b"keiryo symmetric key fingerprint\0" + self.secret).hexdigest()
        else:
            der = self.public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            digest = hashlib.sha256(der).hexdigest()
        return f"sha256:{digest[:32]}"


def _symmetric(text: bytes) -> bytes | None:
    """32 raw bytes, or 32 bytes written as hex or base64 (surrounding whitespace ignored)."""
    if len(text) == 32 and b"-----BEGIN" not in text:
        return text
    raw = text.strip()
    candidates = []
    try:
        candidates.append(bytes.fromhex(raw.decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        pass
    try:
        candidates.append(base64.b64decode(raw, validate=True))
    except (ValueError, binascii.Error):
        pass
    return next((k for k in candidates if len(k) == 32), None)


def load_key(data: bytes, where: str) -> Key:
    """A PEM public or private key (X25519 or EC), or a 32-byte symmetric key (raw, hex or base64)."""
    _crypto()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, x25519

    if b"-----BEGIN" in data:
        try:
            if b"PRIVATE KEY" in data:
                priv = serialization.load_pem_private_key(data, password=None)
                pub = priv.public_key()
            else:
                priv, pub = None, serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as e:
            raise InputFileError(f"{where}: not a readable PEM key ({e})") from e
        if isinstance(pub, x25519.X25519PublicKey):
            return Key("x25519", pub, priv)
        if isinstance(pub, ec.EllipticCurvePublicKey):
            return Key("ec", pub, priv)
        raise ConfigError(f"{where}: a {type(pub).__name__}; expected an X25519 or EC public/private key")
    secret = _symmetric(data)
    if secret is None:
        raise ConfigError(f"{where}: expected a PEM key (X25519 or EC) or a 32-byte symmetric key (raw, hex or base64)")
    return Key("symmetric", secret=secret)


def read_key(path: str | Path) -> Key:
    p = Path(path)
    try:
        return load_key(p.read_bytes(), str(p))
    except FileNotFoundError as e:
        raise InputFileError(f"{p}: key file not found") from e


def decryption_key(source: str | Path | None = None) -> Key | None:
    """The key from ``source`` (a file), else ``$KEIRYO_DECRYPTION_KEY`` (the key itself, or a path); None if neither."""
    if source is not None:
        return read_key(source)
    value = os.environ.get(KEY_ENV)
    if not value:
        return None
    if "-----BEGIN" not in value and Path(value).is_file():
        return read_key(value)
    return load_key(value.encode(), f"${KEY_ENV}")


def _kek(ephemeral_private: Any, peer_public: Any, kind: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    shared = ephemeral_private.exchange(ec.ECDH(), peer_public) if kind == "ec" else ephemeral_private.exchange(peer_public)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(shared)


def encrypt_model(plaintext: bytes, recipient: Key, aad: str) -> tuple[bytes, dict[str, Any]]:
    """``(ciphertext, encryption block for the manifest)``: AES-256-GCM under a fresh data key wrapped for ``recipient``."""
    _crypto()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, x25519
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap

    dek = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(12)
    ciphertext = AESGCM(dek).encrypt(nonce, plaintext, aad.encode())
    block: dict[str, Any] = {
        "scheme": SCHEME,
        "cipher": "AES-256-GCM",
        "nonce": _b64(nonce),
        "aad": aad,
        "recipient": recipient.fingerprint,
    }
    if recipient.kind == "symmetric":
        assert recipient.secret is not None  # a symmetric Key always holds its secret
        block.update(key_wrap="AES-KW", wrapped_key=_b64(aes_key_wrap(recipient.secret, dek)))
        return ciphertext, block
    if recipient.kind == "x25519":
        eph: Any = x25519.X25519PrivateKey.generate()
        wrap = "X25519-HKDF-SHA256+AES-KW"
    else:
        eph = ec.generate_private_key(recipient.public.curve)
        wrap = f"ECDH-{recipient.public.curve.name}-HKDF-SHA256+AES-KW"
    eph_pub = eph.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    block.update(
        key_wrap=wrap,
        ephemeral_public_key=eph_pub.decode("ascii"),
        wrapped_key=_b64(aes_key_wrap(_kek(eph, recipient.public, recipient.kind), dek)),
    )
    return ciphertext, block


def decrypt_model(ciphertext: bytes, block: dict[str, Any], key: Key | None) -> bytes:
    """The plaintext model bytes, in memory. ``key``: the recipient's private key or the symmetric key.

    This is the hook for the server and the agent: call it on the verified model bytes of a package whose
    manifest has an ``encryption`` block, with :func:`decryption_key` (a file or ``$KEIRYO_DECRYPTION_KEY``).
    """
    _crypto()
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

    want = block.get("recipient", "?")
    if block.get("scheme") != SCHEME:
        raise IntegrityError(f"encrypted model: unknown scheme {block.get('scheme')!r}; expected {SCHEME}")
    if key is None:
        raise ConfigError(
            f"the model is encrypted for key {want}; no decryption key given (a key file, or ${KEY_ENV} with the key or its path)"
        )
    if key.fingerprint != want:
        raise IntegrityError(f"the model is encrypted for key {want}, but the decryption key given is {key.fingerprint}")
    try:
        if key.kind == "symmetric":
            assert key.secret is not None
            kek = key.secret
        else:
            if key.private is None:
                raise ConfigError(f"key {key.fingerprint} is a public key; decryption needs the matching private key")
            eph = serialization.load_pem_public_key(block["ephemeral_public_key"].encode())
            kek = _kek(key.private, eph, key.kind)
        dek = aes_key_unwrap(kek, _unb64(block["wrapped_key"], "wrapped_key"))
        return AESGCM(dek).decrypt(_unb64(block["nonce"], "nonce"), ciphertext, str(block["aad"]).encode())
    except (InvalidUnwrap, InvalidTag, KeyError, ValueError) as e:
        raise IntegrityError(
            f"the encrypted model does not decrypt with key {key.fingerprint} (changed ciphertext or envelope)"
        ) from e


def encrypt_file(path: Path, recipient: Key, aad: str) -> dict[str, Any]:
    """Replace the file at ``path`` by its ciphertext; returns the manifest's ``encryption`` block."""
    if not path.is_file():
        raise ConfigError(f"{path}: only single-file models can be encrypted (a Core ML .mlpackage is a directory)")
    ciphertext, block = encrypt_model(path.read_bytes(), recipient, aad)
    path.write_bytes(ciphertext)
    return block


def write_symmetric_key(path: str | Path, *, overwrite: bool = False) -> Path:
    """A new 32-byte random key, hex-encoded, mode 0600."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise InputFileError(f"{p}: exists; refusing to overwrite a key (pass --overwrite)")
    _write_secret(p, (os.urandom(32).hex() + "\n").encode())
    return p


def _write_secret(path: Path, data: bytes) -> None:
    """Write key material readable by its owner only (created 0600 before any byte is written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(data)


def write_x25519_pair(private_key: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """A device key pair: the private key (PEM, mode 0600) and NAME.pub.pem beside it."""
    _crypto()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import x25519

    priv = Path(private_key)
    pub = priv.with_name(priv.stem + ".pub.pem")
    for p in (priv, pub):
        if p.exists() and not overwrite:
            raise InputFileError(f"{p}: exists; refusing to overwrite a key (pass --overwrite)")
    key = x25519.X25519PrivateKey.generate()
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_secret(priv, data)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub
