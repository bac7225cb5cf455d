"""A filesystem registry of signed packages: immutable versions, signed expiring aliases, TUF metadata, a log.

::

    ROOT/
      packages/NAME/VERSION/     a verified package, never modified after publishing
      tuf/                       TUF metadata (see :mod:`keiryo.packages.trust`): every package file by
                                 length and hash, bound to its name, version and serial; the aliases
      log/NAME.jsonl             one JSON object per push / promote / rollback, appended before the
                                 change it records is committed (a write-ahead log; a torn last line
                                 left by a crash is skipped)
      .lock                      fcntl lock held by every write
    ROOT.keys/                   the TUF role keys (``--keys``, ``$KEIRYO_REGISTRY_KEYS``); not published

A change is committed when ``tuf/timestamp.json`` is replaced: before that, clients and every
reading command see the previous state. Publishing copies the package into a temporary folder
inside ``packages/NAME``, verifies the copy (signature, golden vectors, and that its manifest
names this very name and version) and renames it to its version, all under the lock; folders left
by a killed write (``.*.partial-*``, a version directory never committed to the metadata) are
removed by the next write. ROOT may be any path or mount (``$KEIRYO_REGISTRY``, default
``~/.keiryo/registry``).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keiryo._atomic import append_line, copy_tree, fsync_dir, remove_stale, sync_tree
from keiryo._faults import fault_point
from keiryo.errors import ConfigError, PackageNotFoundError
from keiryo.packages.package import MANIFEST, check_identity, check_name, check_version, read_manifest, verify
from keiryo.packages.trust import TufRepository, alias_entry, alias_target, package_target, target_file
from keiryo.packages.verified import read_files

HISTORY = 20  # earlier versions an alias remembers for rollback
ALIAS_RE_DOC = "lowercase letters, digits, '_' or '-'"


def default_root() -> Path:
    return Path(os.environ.get("KEIRYO_REGISTRY") or Path.home() / ".keiryo" / "registry")


def _check_alias(alias: str) -> str:
    import re

    if not re.match(r"^[a-z][a-z0-9_-]{0,31}$", alias):
        raise ConfigError(f"alias {alias!r}: expected {ALIAS_RE_DOC}, starting with a letter (at most 32)")
    return alias


class PackageStore:
    def __init__(
        self, root: str | Path | None = None, keys: str | Path | None = None, *, expiry_days: dict[str, float] | None = None
    ):
        self.root = Path(root) if root else default_root()
        self.trust = TufRepository(self.root, keys, expiry_days=expiry_days)

    # -- layout --------------------------------------------------------------------------------
    def _pkg_dir(self, name: str, version: str | None = None) -> Path:
        d = self.root / "packages" / check_name(name, "package name")
        return d / check_version(version) if version else d

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _log(self, name: str, event: dict[str, Any]) -> None:
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "name": name, **event})
        append_line(self.root / "log" / f"{name}.jsonl", line)

    # -- reading (the committed, signed state) ------------------------------------------------------
    def _packages(self) -> dict[str, dict[str, dict[str, Any]]]:
        """name -> version -> signed custom data (serial, files), from the committed targets metadata."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for path, tf in self.trust.targets().items():
            k = (tf.custom or {}).get("keiryo") or {}
            if path.endswith("/keiryo.json") and "serial" in k:
                out.setdefault(k["name"], {})[k["version"]] = k
        return out

    def names(self) -> list[str]:
        return sorted(self._packages())

    def versions(self, name: str) -> list[str]:
        """Published versions of ``name`` in publishing order."""
        check_name(name, "package name")
        got = self._packages().get(name)
        if not got:
            raise PackageNotFoundError(f"{self.root}: no package named {name!r}")
        return sorted(got, key=lambda v: got[v]["serial"])

    def serial(self, name: str, version: str) -> int:
        return int(self._packages().get(name, {}).get(version, {}).get("serial", 0))

    def alias_records(self, name: str) -> dict[str, dict[str, Any]]:
        tf = self.trust.targets().get(alias_target(check_name(name, "package name")))
        return dict(((tf.custom or {}).get("keiryo") or {}).get("aliases", {})) if tf is not None else {}

    def aliases(self, name: str) -> dict[str, str]:
        return {a: r["version"] for a, r in self.alias_records(name).items()}

    def log(self, name: str) -> list[dict[str, Any]]:
        """The log's entries; each says whether the change it announced was ``committed`` (a crash can
        leave an entry whose change never was). Lines a crash tore are skipped."""
        p = self.root / "log" / f"{check_name(name, 'package name')}.jsonl"
        if not p.is_file():
            return []
        committed = self.trust.committed_version()
        out = []
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(e, dict) and "action" in e:
                out.append(e)
        # an entry took effect if its targets version was committed and no later entry claimed the
        # same version (a write killed after its log line is followed by one that reused the number)
        last = {e.get("targets_version"): i for i, e in enumerate(out)}
        for i, e in enumerate(out):
            e["committed"] = e.get("targets_version", 0) <= committed and last[e.get("targets_version")] == i
        return out

    def resolve(self, ref: str) -> tuple[str, str]:
        """``NAME``, ``NAME@ALIAS`` or ``NAME@VERSION`` -> (name, version). A bare name means its latest version."""
        name, _, tag = ref.partition("@")
        versions = self.versions(name)
        if not tag:
            return name, versions[-1]
        aliases = self.aliases(name)
        if tag in aliases:
            return name, aliases[tag]
        if tag in versions:
            return name, tag
        raise PackageNotFoundError(
            f"{self.root}: {name} has no alias or version {tag!r}; aliases: {', '.join(aliases) or 'none'}; "
            f"versions: {', '.join(versions)}"
        )

    def path(self, ref: str) -> Path:
        name, version = self.resolve(ref)
        return self._pkg_dir(name, version)

    def show(self, ref: str) -> dict[str, Any]:
        name, version = self.resolve(ref)
        m = read_manifest(self._pkg_dir(name, version))
        return {
            "name": name,
            "version": version,
            "serial": self.serial(name, version),
            "aliases": [a for a, v in self.aliases(name).items() if v == version],
            "path": str(self._pkg_dir(name, version)),
            "manifest": m,
        }

    # -- writing -------------------------------------------------------------------------------
    def init(self, *, root_keys: int = 1, root_threshold: int = 1) -> Path:
        """Create the TUF metadata and keys; returns the root metadata file devices must be given."""
        with self._lock():
            self.trust.init(root_keys=root_keys, root_threshold=root_threshold)
        return self.trust.meta / "1.root.json"

    def push(self, pkg: str | Path, public_key: str | Path, *, by: str | None = None) -> tuple[str, str]:
        """Verify ``pkg`` and publish it as an immutable version; returns (name, version)."""
        src = Path(pkg)
        m = read_manifest(src)
        # an encrypted model's golden vectors are checked where its key is (the device), not here
        golden = "encryption" not in m
        verify(src, public_key, golden=golden)  # refuse early, before copying anything
        name, version = check_name(m["name"], "package name"), check_version(m["version"])
        with self._lock():
            if not self.trust.exists():
                self.trust.init()
            parent = self._pkg_dir(name)
            parent.mkdir(parents=True, exist_ok=True)
            remove_stale(parent)
            if version in self._packages().get(name, {}):
                raise ConfigError(f"{self.root}: {name} {version} is already published; versions are immutable")
            final = self._pkg_dir(name, version)
            if final.exists():  # a push killed before its commit: never signed, so never seen by anyone
                shutil.rmtree(final)
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=parent))
            try:
                staged = tmp / "pkg"
                copy_tree(src, staged)
                fault_point("registry.push.copied")
                verify(staged, public_key, golden=golden)  # what is published is what was verified
                check_identity(read_manifest(staged), name, version, staged)
                sync_tree(staged)
                staged.rename(final)
                fsync_dir(parent)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            fault_point("registry.push.renamed")
            serial = 1 + max((int(k["serial"]) for n, vs in self._packages().items() for k in vs.values()), default=0)
            files = read_files(final)
            self._log(
                name,
                {
                    "action": "push",
                    "version": version,
                    "serial": serial,
                    "by": by or getpass.getuser(),
                    "targets_version": self.trust.committed_version() + 1,
                },
            )
            fault_point("registry.push.logged")

            records = self.alias_records(name)

            def add(targets: dict[str, Any]) -> None:
                # the name's entry names this version as its latest: a bare NAME resolves to it from this commit on
                targets[alias_target(name)] = alias_entry(name, records, version)
                ident = {"name": name, "version": version}
                for rel, data in files.items():
                    custom = {**ident, "serial": serial, "files": sorted(files)} if rel == MANIFEST else ident
                    targets[package_target(name, version, rel)] = target_file(
                        package_target(name, version, rel), data, {"keiryo": custom}
                    )

            self.trust.update_targets(add)
        return name, version

    def _set_alias(self, name: str, alias: str, record: dict[str, Any], event: dict[str, Any]) -> None:
        """Log, then commit the alias record (signed with the next targets version)."""
        self._log(name, {**event, "alias": alias, "targets_version": self.trust.committed_version() + 1})
        fault_point(f"registry.{event['action']}.logged")
        records = {**self.alias_records(name), alias: record}
        latest = self.versions(name)[-1]
        self.trust.update_targets(lambda t: t.__setitem__(alias_target(name), alias_entry(name, records, latest)))

    def promote(self, name: str, version: str, alias: str, *, by: str | None = None, downgrade: bool = False) -> str | None:
        """Point ``alias`` at ``version``; returns the version it pointed at before.

        Moving an alias to an older version than it holds is a rollback that devices must be told
        about: it needs ``downgrade`` (or :meth:`rollback`), and is signed as one."""
        _check_alias(alias)
        with self._lock():
            if version not in self._packages().get(name, {}):
                raise PackageNotFoundError(f"{self.root}: {name} has no version {version!r}")
            before = self.alias_records(name).get(alias)
            serial = self.serial(name, version)
            down = before is not None and serial < int(before["serial"])
            if before is not None and down and not downgrade:
                raise ConfigError(
                    f"{name}@{alias} is at {before['version']}, newer than {version}; devices refuse to go back "
                    f"unless told to: use `keiryo registry rollback` or pass --downgrade"
                )
            history = [*before["history"], before["version"]][-HISTORY:] if before else []
            record = {"version": version, "serial": serial, "history": history, "rollback": down}
            self._set_alias(
                name,
                alias,
                record,
                {"action": "promote", "from": before and before["version"], "to": version, "by": by or getpass.getuser()},
            )
        return before["version"] if before else None

    def rollback(self, name: str, alias: str, *, by: str | None = None) -> tuple[str, str]:
        """Move ``alias`` back to the version it pointed at before its current one (a signed rollback:
        devices accept going below the version they committed); returns (from, to)."""
        _check_alias(alias)
        with self._lock():
            current = self.alias_records(name).get(alias)
            if current is None:
                raise PackageNotFoundError(f"{self.root}: {name} has no alias {alias!r}")
            if not current["history"]:
                raise ConfigError(f"{name}@{alias} has no earlier version to roll back to (it points at {current['version']})")
            *history, target = current["history"]
            record = {"version": target, "serial": self.serial(name, target), "history": history, "rollback": True}
            self._set_alias(
                name,
                alias,
                record,
                {"action": "rollback", "from": current["version"], "to": target, "by": by or getpass.getuser()},
            )
        return current["version"], target

    def refresh(self) -> dict[str, str]:
        """Re-sign the timestamp (and what is near expiry); run it more often than the timestamp expires."""
        with self._lock():
            return self.trust.refresh()
