"""A package verified in memory: every file read once, checked against its signature (and, from a
registry, against the TUF targets metadata), and loaded from those same bytes.

Verifying files on disk and then opening them again leaves a window in which they can be swapped
(a time-of-check to time-of-use race); a :class:`VerifiedPackage` closes it: the session is opened
from the bytes whose digests were checked.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keiryo.errors import IntegrityError
from keiryo.packages.package import MANIFEST, check_golden, check_identity, parse_manifest
from keiryo.packages.signing import verify_files

MAX_PACKAGE_BYTES = 2 << 30  # a package larger than 2 GiB is refused rather than read into memory


@dataclass(frozen=True)
class VerifiedPackage:
    path: Path
    manifest: dict[str, Any]
    files: dict[str, bytes]  # relative path -> the bytes that were verified

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def model_bytes(self) -> bytes:
        return self.files[self.manifest["model_file"]]

    def open_session(self, threads: int = 1, decryption_key: str | Path | None = None) -> Any:
        """A session over the verified model bytes (Core ML, a directory, opens from its path). An
        encrypted model is decrypted in memory with ``decryption_key`` (a file, else ``$KEIRYO_DECRYPTION_KEY``);
        its plaintext never touches the disk."""
        from keiryo.runtime import open_session

        m = self.manifest
        source: Any = self.path / m["model_file"] if m["format"] == "coreml" else self.model_bytes
        if "encryption" in m:
            from keiryo.privacy.encryption import decrypt_model
            from keiryo.privacy.encryption import decryption_key as find_key

            source = decrypt_model(self.model_bytes, m["encryption"], find_key(decryption_key))
        return open_session(m["runtime"], source, threads)


def read_files(pkg: str | Path) -> dict[str, bytes]:
    """Every regular file under ``pkg`` as {relative path: bytes}; symlinks and special files are refused."""
    root = Path(pkg)
    if not root.is_dir() or root.is_symlink():
        raise IntegrityError(f"{root}: expected a package directory")
    out: dict[str, bytes] = {}
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            f = Path(dirpath) / n
            st = f.lstat()
            rel = f.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode) or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise IntegrityError(f"{root}: {rel} is not a plain file (links and special files are refused)")
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
                if total > MAX_PACKAGE_BYTES:
                    raise IntegrityError(f"{root}: larger than {MAX_PACKAGE_BYTES >> 20} MiB")
                out[rel] = f.read_bytes()
    return out


def check_trusted(where: str | Path, files: dict[str, bytes], trusted: dict[str, tuple[int, str]]) -> None:
    """Compare the files with what the signed registry metadata lists ({path: (length, sha256)}): same set, same bytes."""
    extra = sorted(files.keys() - trusted.keys())
    missing = sorted(trusted.keys() - files.keys())
    bad = sorted(f for f in files.keys() & trusted.keys() if (len(files[f]), hashlib.sha256(files[f]).hexdigest()) != trusted[f])
    if extra or missing or bad:
        parts = [f"{w}: {', '.join(fs)}" for w, fs in (("changed", bad), ("missing", missing), ("extra", extra)) if fs]
        raise IntegrityError(f"{where}: does not match the registry's signed targets metadata; " + "; ".join(parts))


def load_verified(
    pkg: str | Path | None,
    public_key: str | Path,
    *,
    files: dict[str, bytes] | None = None,
    name: str | None = None,
    version: str | None = None,
    trusted: dict[str, tuple[int, str]] | None = None,
    golden: bool = True,
    threads: int = 1,
    decryption_key: str | Path | None = None,
) -> tuple[VerifiedPackage, Any]:
    """Verify a package (from ``pkg`` on disk, or ``files`` already in memory) and open its session.

    Checks, in order: the TUF targets metadata (``trusted``), the signature over every file, the
    manifest (schema, plain model file), that it is ``name`` ``version`` when those are given, and
    that the golden vectors reproduce on the session that is returned. Raises and opens nothing
    that stays open if any check fails.
    """
    where = Path(pkg) if pkg is not None else Path(f"{name}-{version}")
    data = files if files is not None else read_files(where)
    if trusted is not None:
        check_trusted(where, data, trusted)
    verify_files(where, data, public_key)
    if MANIFEST not in data:
        raise IntegrityError(f"{where}: not a keiryo package (no {MANIFEST})")
    manifest = parse_manifest(data[MANIFEST], where / MANIFEST)
    if name is not None and version is not None:
        check_identity(manifest, name, version, where)
    if manifest["format"] != "coreml" and manifest["model_file"] not in data:
        raise IntegrityError(f"{where}: model_file {manifest['model_file']} is not a signed file of the package")
    vp = VerifiedPackage(where, manifest, data)
    session = vp.open_session(threads, decryption_key)
    try:
        if golden and "golden" in manifest:
            check_golden(
                where / manifest["model_file"],
                manifest["runtime"],
                manifest["golden"],
                session=session,
                inputs=manifest["inputs"],
            )
    except BaseException:
        session.close()
        raise
    return vp, session
