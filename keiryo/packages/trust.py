"""The registry's TUF repository, kept with python-tuf's Metadata API (the TUF specification's format).

::

    ROOT/tuf/                 published beside the packages; what clients (server, agent) refresh from
      1.root.json 2.root.json ...   every root version (clients walk the chain on key rotation)
      N.targets.json          every package file by length and sha256, custom {"keiryo": name, version, serial};
                              one zero-length entry ``aliases/NAME`` per package whose custom holds its aliases
      N.snapshot.json         the version of targets
      timestamp.json          the version of snapshot; the one mutable file, replaced last (the commit point)
    KEYS/ (default ROOT.keys, never inside ROOT)
      root-1.pem ...          root role keys (threshold in root.json), targets.pem, snapshot.pem, timestamp.pem

Consistent snapshots: a targets or snapshot version is never rewritten once timestamp points at it,
so a client reading during a commit sees the old state or the new, never a mix. Every write
takes the registry lock. Expiry: root 365 days, targets 90, snapshot 30, timestamp 1
(``keiryo registry refresh`` re-signs timestamp, run it daily: a registry left alone goes stale
on purpose, which is how devices notice a mirror that freezes them on old metadata).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from keiryo._atomic import fsync_dir, write_atomic
from keiryo._faults import fault_point
from keiryo.errors import BackendUnavailableError, ConfigError, InputFileError, TrustError

ROLES = ("root", "targets", "snapshot", "timestamp")
EXPIRY_DAYS = {"root": 365, "targets": 90, "snapshot": 30, "timestamp": 1}
ALIAS_PREFIX = "aliases/"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def _tuf() -> Any:
    try:
        import tuf.api.metadata as md
    except ImportError as e:
        raise BackendUnavailableError("TUF metadata (tuf)", "serve") from e
    return md


def _expires(role: str, days: dict[str, float] | None = None) -> datetime:
    d = (days or {}).get(role, EXPIRY_DAYS[role])
    return (datetime.now(UTC) + timedelta(days=d)).replace(microsecond=0)


def default_keys(root: Path) -> Path:
    return Path(os.environ.get("KEIRYO_REGISTRY_KEYS") or f"{Path(root).resolve()}.keys")


def alias_target(name: str) -> str:
    return f"{ALIAS_PREFIX}{name}"


def package_target(name: str, version: str, rel: str) -> str:
    return f"packages/{name}/{version}/{rel}"


class TufRepository:
    """Maintains ``ROOT/tuf`` with keys from ``keys``; every change is one signed commit."""

    def __init__(self, root: str | Path, keys: str | Path | None = None, *, expiry_days: dict[str, float] | None = None):
        self.root = Path(root)
        self.meta = self.root / "tuf"
        self.keys = Path(keys) if keys else default_keys(self.root)
        self.expiry_days = expiry_days

    # -- keys ------------------------------------------------------------------------------------
    def _key_files(self, role: str) -> list[Path]:
        if role == "root":
            return sorted(f for f in self.keys.glob("root-*.pem") if ".revoked-" not in f.name)
        return [self.keys / f"{role}.pem"]

    def _signers(self, role: str) -> list[Any]:
        files = [f for f in self._key_files(role) if f.is_file()]
        if not files:
            raise InputFileError(f"{self.keys}: no {role} key ({role}.pem); the registry's keys are needed to change it")
        return [self._signer_from(f) for f in files]

    def _signer_from(self, f: Path) -> Any:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        from securesystemslib.signer import CryptoSigner

        try:
            return CryptoSigner(load_pem_private_key(f.read_bytes(), None))
        except (ValueError, TypeError) as e:
            raise InputFileError(f"{f}: not a usable private key in PEM ({e})") from e

    def _new_key(self, path: Path) -> Any:
        from securesystemslib.signer import CryptoSigner

        signer = CryptoSigner.generate_ed25519()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(signer.private_bytes)
            f.flush()
            os.fsync(f.fileno())
        return signer

    # -- reading ---------------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.meta / "1.root.json").is_file()

    def _read(self, filename: str) -> Any:
        md = _tuf()
        path = self.meta / filename
        try:
            return md.Metadata.from_file(str(path))
        except FileNotFoundError as e:
            raise TrustError(f"{path}: missing; the registry's TUF metadata is incomplete") from e
        except Exception as e:
            raise TrustError(f"{path}: unreadable TUF metadata ({type(e).__name__}: {e})") from e

    def root_md(self) -> Any:
        versions = sorted(int(p.name.split(".")[0]) for p in self.meta.glob("*.root.json") if p.name.split(".")[0].isdigit())
        if not versions:
            raise TrustError(f"{self.meta}: no root metadata; run `keiryo registry init` or push a package")
        return self._read(f"{versions[-1]}.root.json")

    def timestamp_md(self) -> Any:
        return self._read("timestamp.json")

    def snapshot_md(self) -> Any:
        return self._read(f"{self.timestamp_md().signed.snapshot_meta.version}.snapshot.json")

    def targets_md(self) -> Any:
        return self._read(f"{self.snapshot_md().signed.meta['targets.json'].version}.targets.json")

    def targets(self) -> dict[str, Any]:
        """Path -> TargetFile of the committed targets metadata (empty before the first commit)."""
        return dict(self.targets_md().signed.targets) if self.exists() else {}

    def committed_version(self) -> int:
        return int(self.targets_md().signed.version) if self.exists() else 0

    # -- writing ---------------------------------------------------------------------------------
    def _write(self, md: Any, filename: str) -> None:
        from tuf.api.serialization.json import JSONSerializer

        write_atomic(self.meta / filename, md.to_bytes(JSONSerializer(compact=False)))

    def _sign(self, md: Any, role: str, extra: list[Any] | None = None) -> Any:
        md.signatures.clear()
        for s in [*self._signers(role), *(extra or [])]:
            md.sign(s, append=True)
        return md

    def init(self, *, root_keys: int = 1, root_threshold: int = 1) -> None:
        """Create the keys (``root_keys`` root keys, one per other role) and version 1 of every role."""
        md = _tuf()
        if self.exists():
            raise ConfigError(f"{self.meta}: the registry already has TUF metadata")
        if not 1 <= root_threshold <= root_keys:
            raise ConfigError(f"root threshold {root_threshold}: expected between 1 and the number of root keys ({root_keys})")
        signers: dict[str, list[Any]] = {}
        for role in ROLES:
            files = [self.keys / f"root-{i + 1}.pem" for i in range(root_keys)] if role == "root" else self._key_files(role)
            signers[role] = [self._signer_from(f) if f.exists() else self._new_key(f) for f in files]
        root = md.Root(expires=_expires("root", self.expiry_days), consistent_snapshot=True)
        for role, ss in signers.items():
            for s in ss:
                root.add_key(s.public_key, role)
        root.roles["root"].threshold = root_threshold
        targets = md.Targets(expires=_expires("targets", self.expiry_days))
        self.meta.mkdir(parents=True, exist_ok=True)
        self._write(self._sign(md.Metadata(root), "root"), "1.root.json")
        self._commit_targets(md.Metadata(targets), first=True)

    def _commit_targets(self, targets: Any, *, first: bool = False) -> int:
        """Sign ``targets`` as the next version, then snapshot, then timestamp (the commit point)."""
        md = _tuf()
        if not first:
            targets.signed.version = self.committed_version() + 1
        targets.signed.expires = _expires("targets", self.expiry_days)
        self._write(self._sign(targets, "targets"), f"{targets.signed.version}.targets.json")
        fault_point("tuf.targets_written")
        snap_version = 1 if first else self.snapshot_md().signed.version + 1
        snapshot = md.Metadata(
            md.Snapshot(
                version=snap_version,
                expires=_expires("snapshot", self.expiry_days),
                meta={"targets.json": md.MetaFile(version=targets.signed.version)},
            )
        )
        self._write(self._sign(snapshot, "snapshot"), f"{snap_version}.snapshot.json")
        fault_point("tuf.snapshot_written")
        self._bump_timestamp(snap_version, first=first)
        return int(targets.signed.version)

    def _bump_timestamp(self, snapshot_version: int, *, first: bool = False) -> None:
        md = _tuf()
        version = 1 if first else self.timestamp_md().signed.version + 1
        ts = md.Metadata(
            md.Timestamp(
                version=version,
                expires=_expires("timestamp", self.expiry_days),
                snapshot_meta=md.MetaFile(version=snapshot_version),
            )
        )
        self._write(self._sign(ts, "timestamp"), "timestamp.json")
        fsync_dir(self.meta)

    def update_targets(self, change: Callable[[dict[str, Any]], None]) -> int:
        """Apply ``change`` to a copy of the committed targets ({path: TargetFile}) and commit it; returns the new version."""
        current = self.targets_md()
        new = copy.deepcopy(current)
        change(new.signed.targets)
        return self._commit_targets(new)

    def refresh(self) -> dict[str, str]:
        """Re-sign timestamp (and snapshot/targets when past half their lifetime); returns {role: new expiry}."""
        now = datetime.now(UTC)
        out = {}
        targets = self.targets_md()
        half = timedelta(days=EXPIRY_DAYS["targets"] / 2)
        if targets.signed.expires - now < half:
            self._commit_targets(copy.deepcopy(targets))
            out["targets"] = out["snapshot"] = "re-signed"
        else:
            self._bump_timestamp(self.timestamp_md().signed.snapshot_meta.version)
        out["timestamp"] = self.timestamp_md().signed.expires.isoformat()
        return out

    def rotate(self, role: str) -> list[Path]:
        """Replace every key of ``role`` with as many new keys (same threshold): a new root version,
        signed by the old root keys (clients trust those) and, for root, by the new ones too (so that
        clients accept the next version). The old keys are kept aside as ``*.revoked-N.pem``. Returns
        the new key files."""
        if role not in ROLES:
            raise ConfigError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        old_root_signers = self._signers("root")
        root = copy.deepcopy(self.root_md())
        old_files = [f for f in self._key_files(role) if f.is_file()]
        if role == "root":
            first = 1 + max((int(f.name.split(".")[0].split("-")[1]) for f in self.keys.glob("root-*.pem")), default=0)
            new_files = [self.keys / f"root-{first + i}.pem" for i in range(len(old_files))]
        else:
            new_files = [self.keys / f"{role}.pem.new"]
        (self.keys / f"{role}.pem.new").unlink(missing_ok=True)  # left by a rotation killed before it finished
        signers = [self._new_key(f) for f in new_files]
        threshold = root.signed.roles[role].threshold
        for keyid in list(root.signed.roles[role].keyids):
            root.signed.revoke_key(keyid, role)
        for s in signers:
            root.signed.add_key(s.public_key, role)
        root.signed.roles[role].threshold = min(threshold, len(signers))
        root.signed.version += 1
        root.signed.expires = _expires("root", self.expiry_days)
        root.signatures.clear()
        for s in [*old_root_signers, *signers] if role == "root" else old_root_signers:
            root.sign(s, append=True)
        self._write(root, f"{root.signed.version}.root.json")
        fault_point("tuf.root_rotated")
        for f in old_files:  # the old keys are kept aside, never reused
            os.replace(f, f.with_name(f.name.replace(".pem", f".revoked-{root.signed.version}.pem")))
        if role != "root":
            os.replace(new_files[0], self.keys / f"{role}.pem")
            new_files = [self.keys / f"{role}.pem"]
        fsync_dir(self.keys)
        if role in ("targets", "snapshot"):
            self._commit_targets(copy.deepcopy(self.targets_md()))  # re-signed under the new key
        elif role == "timestamp":
            self._bump_timestamp(self.timestamp_md().signed.snapshot_meta.version)
        return new_files


def target_file(path: str, data: bytes, custom: dict[str, Any]) -> Any:
    md = _tuf()
    tf = md.TargetFile.from_data(path, data, ["sha256"])
    tf.unrecognized_fields["custom"] = custom
    return tf


def alias_entry(name: str, aliases: dict[str, Any], latest: str) -> Any:
    """The zero-length target ``aliases/NAME`` whose signed custom data holds the package's aliases and latest version."""
    md = _tuf()
    custom = {"keiryo": {"name": name, "aliases": aliases, "latest": latest}}
    return md.TargetFile(0, {"sha256": EMPTY_SHA256}, alias_target(name), {"custom": custom})
