"""Signing and verifying package directories with OpenSSF ``model-signing`` and an EC key (fully offline).

The signature (``model.sig``, a Sigstore bundle holding an in-toto statement of every file's
sha256) covers every file of the package except itself. Verification names each file that
changed, is missing, or was added since signing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from keiryo.errors import BackendUnavailableError, InputFileError, IntegrityError, first_line

SIGNATURE = "model.sig"


def _ms() -> Any:
    try:
        import model_signing
    except ImportError as e:
        raise BackendUnavailableError("model signing (model-signing)", "serve") from e
    return model_signing


def keygen(private_key: str | Path, public_key: str | Path | None = None, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new EC P-256 key pair as PEM: the private key (mode 0600) and its public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    priv = Path(private_key)
    pub = Path(public_key) if public_key else priv.with_name(priv.stem + ".pub.pem")
    for p in (priv, pub):
        if p.exists() and not overwrite:
            raise InputFileError(f"{p}: exists; refusing to overwrite a key (pass --overwrite)")
    key = ec.generate_private_key(ec.SECP256R1())
    priv.parent.mkdir(parents=True, exist_ok=True)
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # a fresh file (mkstemp: mode 0600) renamed over any old one: an overwritten key never keeps a wider mode
    fd, tmp = tempfile.mkstemp(prefix=f".{priv.name}.", dir=priv.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, priv)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _hashing(ms: Any, pkg: Path) -> Any:
    return ms.hashing.Config().set_ignored_paths(paths=[pkg.resolve() / SIGNATURE], ignore_git_paths=False)


def sign_dir(path: str | Path, private_key: str | Path) -> Path:
    """Sign every file under ``path`` into ``path/model.sig`` with an EC private key, offline.

    ``model_signing.signing.Config()`` sets up a Sigstore signer in its constructor, which fetches
    Sigstore's trust root over the network; this does what its ``sign`` does with the EC key signer only.
    """
    ms = _ms()
    from model_signing._signing import sign_ec_key, signing

    p, key = Path(path).resolve(), Path(private_key)  # model_signing compares ignored paths resolved
    if not key.is_file():
        raise InputFileError(f"{key}: private key not found")
    try:
        signer = sign_ec_key.Signer(key)
    except (ValueError, TypeError) as e:
        raise InputFileError(f"{key}: not a usable EC private key in PEM ({first_line(e, 200)})") from e
    manifest = _hashing(ms, p).hash(p)
    signer.sign(signing.Payload(manifest)).write(p / SIGNATURE)
    return p / SIGNATURE


def _files(manifest: Any) -> dict[str, str]:
    return {str(d.identifier): d.digest.digest_hex for d in manifest.resource_descriptors()}


def _signed_digests(where: Path, signature: bytes, public_key: str | Path) -> dict[str, str]:
    """{file: sha256} that ``signature`` (the bytes of ``model.sig``) vouches for, if made with ``public_key``."""
    _ms()
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    key = Path(public_key)
    if not key.is_file():
        raise InputFileError(f"{key}: public key not found")
    try:
        verifier = sign_ec_key.Verifier(key)
        bundle = sign_sigstore_pb.Signature(sign_sigstore_pb.bundle_pb.Bundle().from_json(signature.decode()))
    except Exception as e:
        raise IntegrityError(f"{where}: unreadable signature or key ({type(e).__name__}: {first_line(e, 200)})") from e
    try:
        expected = verifier.verify(bundle)
    except Exception as e:
        raise IntegrityError(f"{where}: the signature was not made with {key.name} (unknown or wrong key)") from e
    return _files(expected)


def _compare(where: Path, want: dict[str, str], got: dict[str, str]) -> None:
    if want != got:
        changed = sorted(f for f in want.keys() & got.keys() if want[f] != got[f])
        missing = sorted(want.keys() - got.keys())
        extra = sorted(got.keys() - want.keys())
        parts = [f"{what}: {', '.join(fs)}" for what, fs in (("changed", changed), ("missing", missing), ("extra", extra)) if fs]
        raise IntegrityError(f"{where}: does not match its signature; " + "; ".join(parts))


def verify_dir(path: str | Path, public_key: str | Path) -> dict[str, str]:
    """Check ``path`` against its signature with ``public_key``; return {file: sha256} of the signed files.

    Raises :class:`IntegrityError` naming every changed, missing or extra file, or saying that the
    signature was not made with this key.
    """
    ms = _ms()
    p = Path(path).resolve()  # model_signing compares ignored paths resolved
    if not (p / SIGNATURE).is_file():
        raise IntegrityError(f"{p}: not signed (no {SIGNATURE})")
    want = _signed_digests(p, (p / SIGNATURE).read_bytes(), public_key)
    _compare(p, want, _files(_hashing(ms, p).hash(p)))
    return want


def verify_files(where: str | Path, files: dict[str, bytes], public_key: str | Path) -> dict[str, str]:
    """Check a package held in memory ({relative path: bytes}, ``model.sig`` among them) against its
    signature; the digests compared are those of these very bytes, so what is loaded next is what was checked."""
    import hashlib

    where = Path(where)
    if SIGNATURE not in files:
        raise IntegrityError(f"{where}: not signed (no {SIGNATURE})")
    want = _signed_digests(where, files[SIGNATURE], public_key)
    _compare(where, want, {f: hashlib.sha256(b).hexdigest() for f, b in files.items() if f != SIGNATURE})
    return want
