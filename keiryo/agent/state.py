"""The agent's durable state: a state file written ahead of every change, and an event log.

::

    STATE_DIR/
      state.json        the state machine's record (replaced atomically; written *before* the change it announces)
      events.jsonl      one JSON line per transition, rejection and rollback (machine-readable reasons)
      tuf/              the TUF client's trusted metadata (never goes back)
      downloads/NAME-VERSION/   files arriving (``*.part`` resume from their end)
      versions/NAME-VERSION/    complete packages, fsynced, renamed into place whole
      current           symlink to the active version, replaced atomically (rename of a new link)

States (see docs/updates.md for the diagram)::

    idle -> downloading -> staged -> swapped (health window) -> idle (committed)
                                  \\-> idle (rejected)        \\-> rolling_back -> idle

On start, :meth:`Agent.recover` reads this record: a crash before ``swapped`` leaves ``current`` on
the committed version (downloads resume); a crash in ``swapped`` or ``rolling_back`` points
``current`` back at the committed version and counts a failed attempt against the candidate.
"""

from __future__ import annotations

import json
import os
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from keiryo._atomic import append_line, fsync_dir, write_atomic
from keiryo.errors import InputFileError


class State(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    STAGED = "staged"
    SWAPPED = "swapped"  # the candidate is active, inside its health window, not yet committed
    ROLLING_BACK = "rolling_back"


class Version(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str
    serial: int


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: State = State.IDLE
    committed: Version | None = None  # the version this device committed and serves
    floor: int = 0  # anti-rollback: the serial of the last commit; below it only through a signed rollback
    candidate: Version | None = None
    attempts: dict[str, int] = Field(default_factory=dict)  # failed attempts per candidate version
    bad: list[str] = Field(default_factory=list)  # versions refused for good (until a newer alias record)
    last_check: float | None = None  # last successful metadata refresh (offline staleness is counted from it)


class StateDir:
    def __init__(self, root: str | Path, name: str):
        self.root = Path(root)
        self.name = name
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    def version_dir(self, version: str) -> Path:
        return self.root / "versions" / f"{self.name}-{version}"

    def download_dir(self, version: str) -> Path:
        return self.root / "downloads" / f"{self.name}-{version}"

    @property
    def current(self) -> Path:
        return self.root / "current"

    def load(self) -> Record:
        p = self.state_file
        if not p.exists():
            return Record()
        try:
            return Record.model_validate_json(p.read_bytes())
        except ValueError as e:
            raise InputFileError(f"{p}: unreadable agent state ({str(e).splitlines()[0]}); move it aside to start afresh") from e

    def save(self, rec: Record) -> None:
        write_atomic(self.state_file, rec.model_dump_json(indent=2))

    def event(self, event: str, **fields: Any) -> None:
        now = time.time()
        line = json.dumps(
            {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "t": round(now, 3), "event": event, **fields}
        )
        append_line(self.root / "events.jsonl", line)

    def events(self) -> list[dict[str, Any]]:
        p = self.root / "events.jsonl"
        out = []
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines() if p.exists() else []:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a crash
        return out

    def active(self) -> str | None:
        """The version ``current`` points at, or None."""
        try:
            target = os.readlink(self.current)
        except OSError:
            return None
        base = Path(target).name
        return base.removeprefix(f"{self.name}-") if base.startswith(f"{self.name}-") else None

    def point_current(self, version: str | None) -> None:
        """Atomically point ``current`` at ``version`` (or remove it): a new link renamed over the old."""
        from keiryo._faults import fault_point

        if version is None:
            self.current.unlink(missing_ok=True)
            fsync_dir(self.root)
            return
        tmp = self.root / f".current.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(self.version_dir(version), self.root), tmp)
        fault_point("agent.swap.link_made")
        os.replace(tmp, self.current)
        fsync_dir(self.root)
