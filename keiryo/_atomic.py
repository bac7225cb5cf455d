"""Durable writes: readers see the old content or the new, never half of it, and what is
renamed into place has reached the disk first (temp file + fsync + rename + directory fsync).

Every write here is tracked until it is fsynced, so that a simulated power cut
(:func:`discard_unsynced`, reached through :mod:`keiryo._faults`) can throw away exactly what
a real one would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# path -> number of leading bytes known to be on disk; written but not yet fsynced
_UNSYNCED: dict[str, int] = {}


def discard_unsynced() -> None:
    """Cut every file written since its last fsync back to what was synced (a simulated power cut)."""
    for path, durable in list(_UNSYNCED.items()):
        with contextlib.suppress(OSError):
            os.truncate(path, durable)
    _UNSYNCED.clear()


def fsync_dir(path: str | Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DurableFile:
    """A binary file opened for appending whose unsynced tail is tracked; ``sync()`` makes it durable."""

    def __init__(self, path: str | Path, mode: str = "ab"):
        self.path = str(path)
        self.f: BinaryIO = open(path, mode)  # type: ignore[assignment]  # noqa: SIM115 - closed in close()
        self._synced = self.f.tell() if "a" in mode else 0
        _UNSYNCED[self.path] = self._synced

    def write(self, data: bytes) -> None:
        self.f.write(data)

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self._synced = self.f.tell()
        _UNSYNCED.pop(self.path, None)

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> DurableFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def append_line(path: str | Path, line: str) -> None:
    """Append one line durably; a torn last line left by an earlier crash is closed off first."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with DurableFile(p) as f:
        torn = f.f.tell() > 0 and not _ends_with_newline(p)
        f.write((("\n" if torn else "") + line + "\n").encode())
        f.sync()


def _ends_with_newline(p: Path) -> bool:
    with open(p, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".partial", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        fsync_dir(p.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def sync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (and ``root`` itself)."""
    root = Path(root)
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            _UNSYNCED.pop(str(f), None)
        elif f.is_dir():
            fsync_dir(f)
    fsync_dir(root)


def copy_tree(src: str | Path, dst: str | Path) -> None:
    """Copy a directory tree, every file tracked as unsynced until :func:`sync_tree` runs on it."""
    shutil.copytree(src, dst)
    for f in Path(dst).rglob("*"):
        if f.is_file():
            _UNSYNCED[str(f)] = 0


def copy_file(src: str | Path, dst: str | Path) -> None:
    """Copy one file, tracked as unsynced until :func:`sync_tree` (or a power cut) deals with it."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    _UNSYNCED[str(dst)] = 0


def remove_stale(parent: str | Path, prefix: str = ".") -> list[Path]:
    """Remove the ``.*.partial-*`` / ``.*.old-*`` leftovers of interrupted writes under ``parent``."""
    gone = []
    parent = Path(parent)
    if parent.is_dir():
        for p in parent.iterdir():
            if p.name.startswith(prefix) and (".partial-" in p.name or ".old-" in p.name or p.name.endswith(".partial")):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                gone.append(p)
    return gone


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it into place only when the block succeeds.

    Files written inside are fsynced before the rename; on any failure (or kill) the temporary
    folder is removed, or left as an obvious ``.NAME.partial-*`` sibling that readers ignore and
    the next writer removes. With ``replace`` an existing ``final`` is first renamed to
    ``.NAME.old-*`` (its content is never lost: a reader finds either ``final`` or that sibling,
    and :func:`recover_dir` puts it back), then removed once the new one is in place.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    _remove_orphans(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
        sync_tree(tmp)
        from keiryo._faults import fault_point

        fault_point("atomic_dir.before_swap")
        if final.exists():
            if not replace:
                raise FileExistsError(final)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
            fsync_dir(final.parent)
            fault_point("atomic_dir.mid_swap")
            os.rename(tmp, final)
            fsync_dir(final.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_orphans(final: Path) -> None:
    """Remove temporary siblings of ``final`` left by writers that died (their process is gone)."""
    import re

    pattern = re.compile(rf"^\.{re.escape(final.name)}\.partial-(\d+)-")
    for p in final.parent.iterdir():
        m = pattern.match(p.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dir(final: str | Path) -> Path | None:
    """If a swap into ``final`` was interrupted after the old copy was moved aside, move it back."""
    final = Path(final)
    if final.exists() or not final.parent.is_dir():
        return None
    olds = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return None
    os.rename(olds[-1], final)
    fsync_dir(final.parent)
    return final
