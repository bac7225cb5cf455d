"""Reading a registry as a TUF client: python-tuf's ``ngclient`` over HTTP(S) or a directory.

``TrustedRegistry(source, trusted_root, cache)`` refreshes root -> timestamp -> snapshot -> targets
with every check of the TUF client workflow (signatures and thresholds, expiry, version rollback,
snapshot/targets consistency, metadata length caps), keeping what it trusts in ``cache`` so that
a later refresh can never go back. Then:

- ``alias(name, alias)`` -> the signed :class:`AliasRecord` (version, serial, rollback flag);
- ``files(name, version)`` -> {relative path: (length, sha256)} of the package, from signed metadata;
- ``fetch(name, version, rel)`` -> the file's bytes, read at most to its signed length and hashed;
- ``download(name, version, rel, dest)`` -> the same into a file, resumable (HTTP ``Range``).

``source`` is an ``http(s)://`` URL of a registry root (``keiryo registry serve`` or any static file
server) or a local directory. A refresh that fails raises :class:`TrustError` with one line naming
the metadata file and the rule it broke; what was trusted before stays trusted.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keiryo.errors import BackendUnavailableError, IntegrityError, PackageNotFoundError, TransferError, TrustError
from keiryo.packages.trust import alias_target, package_target

CHUNK = 1 << 16
SYNC_EVERY = 1 << 20  # bytes of a download between fsyncs


@dataclass(frozen=True)
class AliasRecord:
    name: str
    alias: str
    version: str
    serial: int
    rollback: bool = False  # a signed rollback: a device may go below the version it committed
    history: list[str] = field(default_factory=list)


def _is_url(source: str | Path) -> bool:
    return str(source).startswith(("http://", "https://"))


def _base_url(source: str | Path) -> str:
    return str(source).rstrip("/") + "/" if _is_url(source) else Path(source).resolve().as_uri() + "/"


def _file_fetcher() -> Any:
    from tuf.api import exceptions
    from tuf.ngclient.fetcher import FetcherInterface

    class FileFetcher(FetcherInterface):
        """ngclient fetcher for ``file://`` URLs (a registry on a local disk or mount)."""

        def _fetch(self, url: str) -> Iterator[bytes]:
            path = Path(urllib.request.url2pathname(url.removeprefix("file://")))
            try:
                f = open(path, "rb")  # noqa: SIM115 - closed by the generator
            except FileNotFoundError as e:
                raise exceptions.DownloadHTTPError(f"{path}: not found", 404) from e
            return self._chunks(f)

        @staticmethod
        def _chunks(f: Any) -> Iterator[bytes]:
            with f:
                while chunk := f.read(CHUNK):
                    yield chunk

    return FileFetcher()


def _refused(e: BaseException, base: str) -> TrustError:
    """One line naming the file and the rule for every ngclient failure."""
    from tuf.api import exceptions as x

    rule = {
        x.ExpiredMetadataError: "expired (a frozen or stale registry)",
        x.BadVersionNumberError: "version went back or did not move (a rollback or replay)",
        x.UnsignedMetadataError: "not signed by the trusted keys (threshold not met)",
        x.LengthOrHashMismatchError: "length or hash does not match what the signed metadata says",
        x.DownloadLengthMismatchError: "longer than allowed (endless data)",
        x.DownloadHTTPError: "not available",
        x.RepositoryError: "refused",
        x.DownloadError: "could not be downloaded",
    }
    why = next((v for k, v in rule.items() if isinstance(e, k)), "refused")
    return TrustError(f"{base}: TUF metadata {why}: {e}")


class TrustedRegistry:
    def __init__(self, source: str | Path, trusted_root: str | Path, cache: str | Path):
        try:
            import tuf.ngclient  # noqa: F401
        except ImportError as e:
            raise BackendUnavailableError("TUF client (tuf)", "serve") from e
        self.source = str(source)
        self.base = _base_url(source)
        self.trusted_root = Path(trusted_root)
        self.cache = Path(cache)
        self._updater: Any = None
        # ngclient keeps its cache with non-atomic steps (root.json is removed, then linked again):
        # one refresh at a time per process; readers use the last updater that refreshed cleanly
        self._refreshing = threading.Lock()

    def refresh(self) -> int:
        """Refresh the metadata; returns the trusted targets version. Raises :class:`TrustError`."""
        with self._refreshing:
            up = self._new_updater()
            try:
                up.refresh()
            except Exception as e:
                raise _refused(e, self.source) from e
            self._updater = up
            return int(up._trusted_set.targets.version)  # noqa: SLF001 - informational only

    def _new_updater(self) -> Any:
        from tuf.ngclient import Updater, UpdaterConfig

        meta = self.cache / "metadata"
        meta.mkdir(parents=True, exist_ok=True)
        bootstrap = None
        if not (meta / "root.json").exists():
            try:
                bootstrap = self.trusted_root.read_bytes()
            except OSError as e:
                raise TrustError(f"{self.trusted_root}: the trusted root metadata cannot be read ({e.strerror})") from e
        cfg = UpdaterConfig(prefix_targets_with_hash=False, timestamp_max_length=16384, snapshot_max_length=1 << 22)
        fetcher = None if _is_url(self.source) else _file_fetcher()
        try:
            return Updater(str(meta), self.base + "tuf/", str(self.cache / "targets"), self.base, fetcher, cfg, bootstrap)
        except Exception as e:
            raise _refused(e, str(meta / "root.json")) from e

    def _info(self, path: str) -> Any:
        if self._updater is None:
            self.refresh()
        try:
            return self._updater.get_targetinfo(path)
        except Exception as e:
            raise _refused(e, self.source) from e

    def _entry(self, name: str) -> dict[str, Any]:
        info = self._info(alias_target(name))
        if info is None:
            raise PackageNotFoundError(f"{self.source}: the signed metadata has no package named {name!r}")
        return dict((info.custom or {}).get("keiryo") or {})

    def resolve(self, ref: str) -> tuple[str, str]:
        """``NAME`` (its latest version), ``NAME@ALIAS`` or ``NAME@VERSION`` -> (name, version), from signed metadata only."""
        name, _, tag = ref.partition("@")
        entry = self._entry(name)
        if not tag:
            return name, str(entry["latest"])
        if tag in entry.get("aliases", {}):
            return name, str(entry["aliases"][tag]["version"])
        self.package(name, tag)  # raises when no such signed version
        return name, tag

    def names(self) -> list[str]:
        """Every package name in the signed targets metadata."""
        if self._updater is None:
            self.refresh()
        targets = self._updater._trusted_set.targets.targets  # noqa: SLF001 - ngclient keeps no public listing
        prefix = alias_target("")
        return sorted(p[len(prefix) :] for p in targets if p.startswith(prefix))

    def aliases(self, name: str) -> list[str]:
        """The signed aliases of ``name`` (``production``, ``staging``, ...)."""
        return sorted(self._entry(name).get("aliases", {}))

    def alias(self, name: str, alias: str) -> AliasRecord:
        aliases = self._entry(name).get("aliases", {})
        if alias not in aliases:
            raise PackageNotFoundError(f"{self.source}: the signed metadata has no alias {name}@{alias}")
        a = aliases[alias]
        return AliasRecord(name, alias, str(a["version"]), int(a["serial"]), bool(a.get("rollback")), list(a.get("history", [])))

    def package(self, name: str, version: str) -> dict[str, Any]:
        """The signed custom data of a package (name, version, serial, files)."""
        info = self._info(package_target(name, version, "keiryo.json"))
        if info is None:
            raise PackageNotFoundError(f"{self.source}: the signed metadata has no package {name} {version}")
        custom = (info.custom or {}).get("keiryo") or {}
        if (custom.get("name"), custom.get("version")) != (name, version):
            raise TrustError(
                f"{self.source}: signed metadata binds {package_target(name, version, 'keiryo.json')} to another package"
            )
        return dict(custom)

    def files(self, name: str, version: str) -> dict[str, tuple[int, str]]:
        out = {}
        for rel in self.package(name, version)["files"]:
            info = self._info(package_target(name, version, rel))
            if info is None:
                raise TrustError(f"{self.source}: {package_target(name, version, rel)} is not in the signed targets metadata")
            out[rel] = (int(info.length), str(info.hashes["sha256"]))
        return out

    def fetch_package(self, name: str, version: str) -> tuple[dict[str, bytes], dict[str, tuple[int, str]]]:
        """Every file of a package as bytes checked against the signed metadata, and that metadata."""
        trusted = self.files(name, version)
        return {rel: self.fetch(name, version, rel, exp) for rel, exp in trusted.items()}, trusted

    def _url(self, name: str, version: str, rel: str) -> str:
        return self.base + package_target(name, version, rel)

    def fetch(self, name: str, version: str, rel: str, expected: tuple[int, str]) -> bytes:
        """The file's bytes, never more than its signed length, checked against its signed hash."""
        h = hashlib.sha256()
        buf = bytearray()
        for chunk in self._stream(self._url(name, version, rel), 0, expected[0]):
            h.update(chunk)
            buf += chunk
        _check(self._url(name, version, rel), len(buf), h.hexdigest(), expected)
        return bytes(buf)

    def download(self, name: str, version: str, rel: str, expected: tuple[int, str], dest: Path, *, on_chunk: Any = None) -> Path:
        """Download into ``dest`` (``dest.part`` while it arrives: a later call resumes from its end)."""
        from keiryo._atomic import DurableFile

        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > expected[0]:
            part.unlink()
            have = 0
        h = hashlib.sha256()
        if have:
            with open(part, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
        url = self._url(name, version, rel)
        with DurableFile(part) as out:
            n = synced = have
            for chunk in self._stream(url, have, expected[0]):
                h.update(chunk)
                out.write(chunk)
                n += len(chunk)
                if n - synced >= SYNC_EVERY:  # what a power cut keeps is what was synced: resume from there
                    out.sync()
                    synced = n
                if on_chunk is not None:
                    on_chunk(n)
            out.sync()
        try:
            _check(url, n, h.hexdigest(), expected)
        except IntegrityError:
            part.unlink(missing_ok=True)  # a bad file is never resumed
            raise
        os.replace(part, dest)
        return dest

    def _stream(self, url: str, start: int, length: int) -> Iterator[bytes]:
        """Chunks of ``url`` from byte ``start``, refusing anything past ``length`` (endless data)."""
        if start >= length:
            return
        if url.startswith("file://"):
            path = Path(urllib.request.url2pathname(url.removeprefix("file://")))
            try:
                f = open(path, "rb")  # noqa: SIM115
            except OSError as e:
                raise TransferError(f"{path}: cannot be read ({e.strerror})") from e
            with f:
                f.seek(start)
                yield from _capped(iter(lambda: f.read(CHUNK), b""), start, length, url)
            return
        req = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
        try:
            resp = urllib.request.urlopen(req, timeout=30)  # noqa: S310 - http(s) only, checked above
        except urllib.error.HTTPError as e:
            raise TransferError(f"{url}: HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, OSError) as e:
            raise TransferError(f"{url}: download failed ({e})") from e
        with resp:
            if start and resp.status != 206:
                raise TransferError(f"{url}: the server ignored the Range request (status {resp.status}); cannot resume")
            try:
                yield from _capped(iter(lambda: resp.read(CHUNK), b""), start, length, url)
            except (OSError, http.client.HTTPException) as e:
                raise TransferError(f"{url}: the download broke off ({e})") from e


def _capped(chunks: Iterator[bytes], start: int, length: int, url: str) -> Iterator[bytes]:
    n = start
    for chunk in chunks:
        n += len(chunk)
        if n > length:
            raise IntegrityError(f"{url}: longer than its signed length {length} bytes (endless data); refused")
        yield chunk


def _check(url: str, n: int, digest: str, expected: tuple[int, str]) -> None:
    if n < expected[0] and not url.startswith("file://"):  # a stream that ended early: kept for a resume
        raise TransferError(f"{url}: the download broke off at {n} of {expected[0]} bytes")
    if n != expected[0]:
        raise IntegrityError(f"{url}: {n} bytes, the signed metadata says {expected[0]}")
    if digest != expected[1]:
        raise IntegrityError(f"{url}: sha256 does not match the signed metadata")


def open_registry(
    source: str | Path | None, trusted_root: str | Path | None = None, cache: str | Path | None = None
) -> TrustedRegistry:
    """A :class:`TrustedRegistry` with keiryo's defaults.

    ``trusted_root``: the root metadata the client starts from (give devices the registry's
    ``tuf/1.root.json`` out of band); default ``$KEIRYO_TRUSTED_ROOT``, or for a local registry its
    own ``tuf/1.root.json`` (trust on first use: the cache then pins it, so a later swap is refused).
    ``cache``: where the trusted metadata is kept between runs (default ``$XDG_CACHE_HOME/keiryo/tuf/<registry>``,
    ``~/.cache`` without it).
    """
    from keiryo.errors import ConfigError
    from keiryo.packages.store import default_root

    src = str(source) if source else str(default_root())
    root = trusted_root or os.environ.get("KEIRYO_TRUSTED_ROOT")
    if root is None:
        if _is_url(src):
            raise ConfigError(f"{src}: a registry over HTTP needs --trusted-root (its tuf/1.root.json, copied out of band)")
        root = Path(src) / "tuf" / "1.root.json"
    if cache is None:
        cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        cache = cache_home / "keiryo" / "tuf" / hashlib.sha256(_base_url(src).encode()).hexdigest()[:16]
    return TrustedRegistry(src, root, cache)
