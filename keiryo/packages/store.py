"""A filesystem registry of signed packages: immutable versions, movable aliases, an append-only log.

::

    ROOT/
      packages/NAME/VERSION/     a verified package, never modified after publishing
      aliases/NAME.json          {"production": "1.2.0", "staging": "1.3.0"}   (replaced atomically)
      log/NAME.jsonl             one JSON object per push / promote / rollback, appended, never rewritten
      .lock                      fcntl lock held while publishing or moving an alias

Publishing copies the package into a temporary folder inside ``packages/NAME``, verifies the copy
(signature and golden vectors) and renames it to its version under the lock, so a concurrent reader
or publisher never sees a half-written version, and two publishers of one version cannot both win.
ROOT may be any path or mount (``$KEIRYO_REGISTRY``, default ``~/.keiryo/registry``).
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

from keiryo._atomic import write_atomic
from keiryo.errors import ConfigError, PackageNotFoundError
from keiryo.packages.package import check_name, check_version, read_manifest, verify

ALIAS_RE_DOC = "lowercase letters, digits, '_' or '-'"


def default_root() -> Path:
    return Path(os.environ.get("KEIRYO_REGISTRY") or Path.home() / ".keiryo" / "registry")


def _check_alias(alias: str) -> str:
    import re

    if not re.match(r"^[a-z][a-z0-9_-]{0,31}$", alias):
        raise ConfigError(f"alias {alias!r}: expected {ALIAS_RE_DOC}, starting with a letter (at most 32)")
    return alias


class PackageStore:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_root()

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
        path = self.root / "log" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "name": name, **event})
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    # -- reading -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        d = self.root / "packages"
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def versions(self, name: str) -> list[str]:
        d = self._pkg_dir(name)
        if not d.is_dir():
            raise PackageNotFoundError(f"{self.root}: no package named {name!r}")
        present = {p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")}
        pushed = [e["version"] for e in self.log(name) if e["action"] == "push" and e["version"] in present]
        return list(dict.fromkeys([*pushed, *sorted(present)]))  # publishing order

    def aliases(self, name: str) -> dict[str, str]:
        p = self.root / "aliases" / f"{check_name(name, 'package name')}.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}

    def log(self, name: str) -> list[dict[str, Any]]:
        p = self.root / "log" / f"{check_name(name, 'package name')}.jsonl"
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()] if p.is_file() else []

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
            "aliases": [a for a, v in self.aliases(name).items() if v == version],
            "path": str(self._pkg_dir(name, version)),
            "manifest": m,
        }

    # -- writing -------------------------------------------------------------------------------
    def push(self, pkg: str | Path, public_key: str | Path, *, by: str | None = None) -> tuple[str, str]:
        """Verify ``pkg`` and publish it as an immutable version; returns (name, version)."""
        src = Path(pkg)
        verify(src, public_key)  # refuse early, before copying anything
        m = read_manifest(src)
        name, version = check_name(m["name"], "package name"), check_version(m["version"])
        parent = self._pkg_dir(name)
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=parent))
        try:
            staged = tmp / "pkg"
            shutil.copytree(src, staged)
            verify(staged, public_key)  # what is published is what was verified
            with self._lock():
                final = self._pkg_dir(name, version)
                if final.exists():
                    raise ConfigError(f"{self.root}: {name} {version} is already published; versions are immutable")
                staged.rename(final)
                self._log(name, {"action": "push", "version": version, "by": by or getpass.getuser()})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return name, version

    def promote(self, name: str, version: str, alias: str, *, by: str | None = None) -> str | None:
        """Point ``alias`` at ``version``; returns the version it pointed at before."""
        _check_alias(alias)
        with self._lock():
            if version not in self.versions(name):
                raise PackageNotFoundError(f"{self.root}: {name} has no version {version!r}")
            aliases = self.aliases(name)
            before = aliases.get(alias)
            aliases[alias] = version
            write_atomic(self.root / "aliases" / f"{name}.json", json.dumps(aliases, indent=2, sort_keys=True))
            self._log(name, {"action": "promote", "alias": alias, "from": before, "to": version, "by": by or getpass.getuser()})
        return before

    def rollback(self, name: str, alias: str, *, by: str | None = None) -> tuple[str, str]:
        """Move ``alias`` back to the version it pointed at before its current one; returns (from, to)."""
        _check_alias(alias)
        with self._lock():
            aliases = self.aliases(name)
            current = aliases.get(alias)
            if current is None:
                raise PackageNotFoundError(f"{self.root}: {name} has no alias {alias!r}")
            # the most recent promotion to the current version records where the alias came from
            # (rollbacks are skipped, so rolling back twice walks further back in history)
            promotions = [e for e in reversed(self.log(name)) if e.get("alias") == alias and e["action"] == "promote"]
            target = next((e.get("from") for e in promotions if e.get("to") == current), None)
            if target is None:
                raise ConfigError(f"{name}@{alias} has no earlier version to roll back to (it points at {current})")
            aliases[alias] = target
            write_atomic(self.root / "aliases" / f"{name}.json", json.dumps(aliases, indent=2, sort_keys=True))
            self._log(name, {"action": "rollback", "alias": alias, "from": current, "to": target, "by": by or getpass.getuser()})
        return current, target
