"""``Agent``: keeps one device's model current, safely.

One update cycle (:meth:`Agent.check`): refresh the registry's TUF metadata (python-tuf ngclient:
rollback, freeze, fast-forward, mix-and-match, arbitrary-package and endless-data attacks are
refused there); read the signed alias record; refuse a version below the one this device committed
unless the record is a signed rollback; download each file capped at its signed length and hashed
as it arrives (resumable); stage the package whole (fsync, rename); smoke-test it (signature,
identity, golden vectors on this device's runtime, latency and memory budgets); swap ``current``
atomically and switch the local endpoint to it; watch a health window; then commit (the floor
rises) or roll back, writing the reason. Every step is announced in ``state.json`` before it is
taken, so :meth:`recover` knows after a crash what to undo. The agent imports no torch.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from keiryo._atomic import atomic_dir, copy_file, remove_stale
from keiryo._faults import fault_point
from keiryo.agent.state import State, StateDir, Version
from keiryo.config import KeiryoConfig
from keiryo.errors import IntegrityError, KeiryoError, RuntimeSessionError, TransferError

# every named point of the update cycle a crash test can kill the agent at (see keiryo._faults)
FAULT_POINTS = (
    "agent.download.mid",
    "agent.download.done",
    "agent.stage.mid",
    "atomic_dir.before_swap",
    "agent.stage.done",
    "agent.smoke.done",
    "agent.swap.before",
    "agent.swap.link_made",
    "agent.swap.done",
    "agent.health.during",
    "agent.commit.before",
    "agent.commit.done",
    "agent.rollback.mid",  # reached only when the health window fails
    "agent.rollback.done",
)


class AgentConfig(KeiryoConfig):
    source: str = Field(description="registry: an http(s):// URL (keiryo registry serve, any static server) or a directory")
    name: str = Field(description="the package this device runs")
    alias: str = Field("production", description="the alias it follows")
    trusted_root: str = Field(description="the registry's tuf/1.root.json, provisioned out of band")
    public_key: str = Field(description="the package signer's public key (PEM)")
    state_dir: str = Field(description="where versions, state and trusted metadata live")
    threads: int = Field(1, ge=1)
    decryption_key: str | None = Field(None, description="key file for encrypted packages (default $KEIRYO_DECRYPTION_KEY)")
    poll_s: float = Field(30.0, gt=0, description="how often to check for an update")
    health_window_s: float = Field(10.0, ge=0, description="how long a new version is watched before it is committed")
    health_interval_s: float = Field(1.0, gt=0, description="golden-vector checks inside the window")
    max_errors: int = Field(0, ge=0, description="local inference errors tolerated inside the window")
    health_command: str | None = Field(None, description="a command run in the window; non-zero exit = unhealthy")
    latency_budget_ms: float | None = Field(None, gt=0, description="smoke test: p50 of one golden row must be under this")
    memory_budget_mb: float | None = Field(None, gt=0, description="smoke test: loading must not grow RSS past this")
    max_staleness_s: float | None = Field(7 * 86400.0, gt=0, description="refuse to serve after this long without a good check")
    offline: bool = Field(False, description="never contact the registry; serve the committed version within max staleness")
    max_attempts: int = Field(3, ge=1, description="failed attempts (crashes in the window) before a version is refused")


class Active:
    """The model the local endpoint serves: a verified package and its session; errors counted."""

    def __init__(self, version: str, serial: int, pkg: Any, session: Any):
        self.version, self.serial, self.pkg, self.session = version, serial, pkg, session
        self.errors = 0
        self.requests = 0
        self._lock = threading.Lock()

    @property
    def manifest(self) -> dict[str, Any]:
        return self.pkg.manifest  # type: ignore[no-any-return]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:  # one session run at a time: sessions are opened with a fixed thread count
            self.requests += 1
            try:
                outs = self.session.run(feed)
            except Exception:
                self.errors += 1
                raise
        return {o["name"]: np.asarray(v) for o, v in zip(self.manifest["outputs"], outs, strict=True)}


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class Agent:
    def __init__(self, cfg: AgentConfig, *, log: Callable[[str], None] | None = None):
        from keiryo.packages.package import check_name

        check_name(cfg.name, "package name")
        self.cfg = cfg
        self.dir = StateDir(cfg.state_dir, cfg.name)
        self.rec = self.dir.load()
        self._active: Active | None = None
        self._swap_lock = threading.Lock()
        self._log = log or (lambda s: None)
        self._registry: Any = None
        self.timings: dict[str, float] = {}

    # -- the active model (what the endpoint serves) --------------------------------------------
    @property
    def active(self) -> Active | None:
        return self._active

    def stale_reason(self) -> str | None:
        """Why the model must not serve now (too long without a good check), or None."""
        limit, last = self.cfg.max_staleness_s, self.rec.last_check
        if limit is None or self._active is None:
            return None
        if last is None or time.time() - last > limit:
            age = "never" if last is None else f"{time.time() - last:.0f} s ago"
            return f"stale: the last good update check was {age}, over the maximum staleness of {limit:.0f} s"
        return None

    def infer(self, feed: dict[str, np.ndarray]) -> tuple[Active, dict[str, np.ndarray]]:
        act = self._active
        if act is None:
            raise RuntimeSessionError(f"{self.cfg.name}: no verified model is active on this device yet")
        if (why := self.stale_reason()) is not None:
            raise RuntimeSessionError(f"{self.cfg.name} {act.version}: {why}")
        return act, act.run(feed)

    def _activate(self, version: str, serial: int, pkg: Any, session: Any) -> None:
        with self._swap_lock:
            old, self._active = self._active, Active(version, serial, pkg, session)
        if old is not None and old.session is not session:
            with old._lock:  # in-flight requests on the old session finish first  # noqa: SLF001
                old.session.close()

    def _load(self, version: str, *, trusted: dict[str, tuple[int, str]] | None = None) -> tuple[Any, Any]:
        from keiryo.packages.verified import load_verified

        return load_verified(
            self.dir.version_dir(version),
            self.cfg.public_key,
            name=self.cfg.name,
            version=version,
            trusted=trusted,
            threads=self.cfg.threads,
            decryption_key=self.cfg.decryption_key,
        )

    # -- state -------------------------------------------------------------------------------------
    def _save(self, **changes: Any) -> None:
        self.rec = self.rec.model_copy(update=changes)
        self.dir.save(self.rec)

    def _event(self, event: str, **fields: Any) -> None:
        self.dir.event(event, name=self.cfg.name, **fields)
        self._log(f"{event} {fields}")

    def recover(self) -> str | None:
        """After a start or a crash: undo an uncommitted swap, then serve the committed version,
        verified. Returns the version now served (None if there is none yet)."""
        rec = self.rec
        cand = rec.candidate
        if rec.state in (State.SWAPPED, State.ROLLING_BACK) and cand is not None:
            self._save(state=State.ROLLING_BACK)
            self.dir.point_current(rec.committed.version if rec.committed else None)
            tries = {**rec.attempts, cand.version: rec.attempts.get(cand.version, 0) + 1}
            bad = rec.bad + [cand.version] if tries[cand.version] >= self.cfg.max_attempts else rec.bad
            self._save(state=State.IDLE, candidate=None, attempts=tries, bad=bad)
            self._event(
                "rollback",
                version=cand.version,
                to=rec.committed and rec.committed.version,
                reason="interrupted",
                detail=f"restart found {rec.state.value}; attempt {tries[cand.version]}",
            )
        elif rec.state != State.IDLE:
            self._save(state=State.IDLE)  # downloads resume; a staged folder is complete or absent
        for d in (self.dir.root / "versions", self.dir.root):
            remove_stale(d)
        committed = self.rec.committed
        if committed is not None and self.dir.active() != committed.version:
            self.dir.point_current(committed.version)
        if committed is not None:
            try:
                pkg, session = self._load(committed.version)
            except KeiryoError as e:
                self._event("corrupt", version=committed.version, reason="verify_failed", detail=str(e))
                shutil.rmtree(self.dir.version_dir(committed.version), ignore_errors=True)
                self.dir.point_current(None)
                self._save(committed=None)  # the next check downloads it again; the floor stays
                return None
            self._activate(committed.version, committed.serial, pkg, session)
            return committed.version
        return None

    # -- one update cycle ------------------------------------------------------------------------
    def registry(self) -> Any:
        if self._registry is None:
            from keiryo.packages.remote import TrustedRegistry

            self._registry = TrustedRegistry(self.cfg.source, self.cfg.trusted_root, self.dir.root / "tuf")
        return self._registry

    def check(self) -> str:
        """One update cycle; returns what happened:
        current | updated | rolled_back | rejected | refused | unavailable (a download broke off) | offline."""
        if self.cfg.offline:
            return "offline"
        reg = self.registry()
        try:
            reg.refresh()
            target = reg.alias(self.cfg.name, self.cfg.alias)
        except KeiryoError as e:
            self._event("refused", reason="metadata", detail=str(e))
            return "refused"
        self._save(last_check=time.time())
        committed = self.rec.committed
        if committed is not None and target.version == committed.version:
            return "current"
        if target.version in self.rec.bad:
            return "rejected"
        if target.serial < self.rec.floor and not target.rollback:
            self._event(
                "refused",
                version=target.version,
                reason="below_floor",
                detail=f"{target.version} (serial {target.serial}) is older than what this device committed "
                f"(serial {self.rec.floor}) and the signed alias is not a rollback",
            )
            return "refused"
        cand = Version(version=target.version, serial=target.serial)
        t = self.timings = {"start": time.monotonic()}
        try:
            trusted = self._download(reg, cand)
            t["download_s"] = time.monotonic() - t["start"]
            self._stage(cand)
            t["stage_s"] = time.monotonic() - t["start"] - t["download_s"]
            pkg, session = self._smoke(cand, trusted)
            t["smoke_s"] = time.monotonic() - t["start"] - t["download_s"] - t["stage_s"]
        except TransferError as e:  # the network, not the package: keep what arrived, try again next cycle
            self._save(state=State.IDLE, candidate=None)
            self._event("download_failed", version=cand.version, reason="transfer", detail=str(e))
            return "unavailable"
        except KeiryoError as e:
            self._reject(cand, "smoke_test" if isinstance(e, _SmokeFailed) else "download_or_verify", str(e))
            return "rejected"
        return self._swap_and_watch(cand, pkg, session)

    def _download(self, reg: Any, cand: Version) -> dict[str, tuple[int, str]]:
        self._save(state=State.DOWNLOADING, candidate=cand)
        trusted = reg.files(self.cfg.name, cand.version)
        dest = self.dir.download_dir(cand.version)
        for rel, expected in sorted(trusted.items()):
            final = dest / rel
            if final.is_file() and final.stat().st_size == expected[0]:
                continue  # downloaded before a crash; its hash is checked again when staged
            reg.download(
                self.cfg.name,
                cand.version,
                rel,
                expected,
                final,
                on_chunk=lambda n: fault_point("agent.download.mid") if n > 4096 else None,
            )
        fault_point("agent.download.done")
        return trusted

    def _stage(self, cand: Version) -> None:
        final = self.dir.version_dir(cand.version)
        if final.exists():
            shutil.rmtree(final)  # a staged copy from an earlier attempt is rebuilt, never trusted as is
        src = self.dir.download_dir(cand.version)
        with atomic_dir(final, replace=False) as tmp:
            for f in sorted(src.rglob("*")):
                if f.is_file() and not f.name.endswith(".part"):
                    copy_file(f, tmp / f.relative_to(src))
                    fault_point("agent.stage.mid")
        self._save(state=State.STAGED)
        fault_point("agent.stage.done")
        shutil.rmtree(src, ignore_errors=True)

    def _smoke(self, cand: Version, trusted: dict[str, tuple[int, str]]) -> tuple[Any, Any]:
        before = _rss_mb()
        pkg, session = self._load(cand.version, trusted=trusted)
        try:
            grown = (_rss_mb() or 0) - (before or 0)
            if self.cfg.memory_budget_mb is not None and before is not None and grown > self.cfg.memory_budget_mb:
                raise _SmokeFailed(
                    f"loading {cand.version} grew memory by {grown:.1f} MB > budget {self.cfg.memory_budget_mb} MB"
                )
            if self.cfg.latency_budget_ms is not None:
                p50 = _golden_p50_ms(pkg, session)
                if p50 > self.cfg.latency_budget_ms:
                    raise _SmokeFailed(
                        f"{cand.version}: p50 {p50:.2f} ms on this device > budget {self.cfg.latency_budget_ms} ms"
                    )
        except BaseException:
            session.close()
            raise
        fault_point("agent.smoke.done")
        return pkg, session

    def _reject(self, cand: Version, reason: str, detail: str) -> None:
        shutil.rmtree(self.dir.version_dir(cand.version), ignore_errors=True)
        shutil.rmtree(self.dir.download_dir(cand.version), ignore_errors=True)
        self._save(state=State.IDLE, candidate=None, bad=[*self.rec.bad, cand.version])
        self._event("rejected", version=cand.version, reason=reason, detail=detail)

    def _swap_and_watch(self, cand: Version, pkg: Any, session: Any) -> str:
        previous = self._active
        self._save(state=State.SWAPPED)  # announced before the link moves: a crash from here rolls back
        fault_point("agent.swap.before")
        self.dir.point_current(cand.version)
        fault_point("agent.swap.done")
        self._activate(cand.version, cand.serial, pkg, session)
        self._event("swapped", version=cand.version, previous=previous and previous.version)
        health_start = time.monotonic()
        problem = self._health_window()
        self.timings["health_s"] = time.monotonic() - health_start
        if problem is None:
            fault_point("agent.commit.before")
            old = self.rec.committed
            # the floor follows what was committed: up normally, down only through a signed rollback
            self._save(state=State.IDLE, committed=cand, candidate=None, floor=cand.serial)
            fault_point("agent.commit.done")
            took = {k: round(v, 4) for k, v in self.timings.items() if k.endswith("_s")}
            self._event(
                "committed",
                version=cand.version,
                serial=cand.serial,
                previous=old and old.version,
                total_s=round(time.monotonic() - self.timings["start"], 4),
                **took,
            )
            self._prune(keep={cand.version, *(old and [old.version] or [])})
            return "updated"
        code, detail = problem
        self._save(state=State.ROLLING_BACK)
        fault_point("agent.rollback.mid")
        back = self.rec.committed
        self.dir.point_current(back.version if back else None)
        if back is not None:
            old_pkg, old_session = self._load(back.version)
            self._activate(back.version, back.serial, old_pkg, old_session)
        fault_point("agent.rollback.done")
        self._save(state=State.IDLE, candidate=None, bad=[*self.rec.bad, cand.version])
        self._event("rollback", version=cand.version, to=back and back.version, reason=code, detail=detail)
        shutil.rmtree(self.dir.version_dir(cand.version), ignore_errors=True)
        return "rolled_back"

    def _health_window(self) -> tuple[str, str] | None:
        """Watch the active candidate; returns (reason code, detail) of the first problem, or None."""
        from keiryo.packages.package import check_golden

        act = self._active
        assert act is not None
        deadline = time.monotonic() + self.cfg.health_window_s
        first = True
        while True:
            if act.errors > self.cfg.max_errors:
                return "health_errors", f"{act.errors} failed local inference requests (tolerated {self.cfg.max_errors})"
            try:
                with act._lock:  # noqa: SLF001
                    m = act.manifest
                    if "golden" in m:
                        check_golden(Path(m["model_file"]), m["runtime"], m["golden"], session=act.session, inputs=m["inputs"])
            except (IntegrityError, RuntimeSessionError) as e:
                return "health_golden", str(e)
            if self.cfg.health_command and first:
                r = subprocess.run(
                    self.cfg.health_command, shell=True, capture_output=True, timeout=max(self.cfg.health_window_s, 5)
                )  # noqa: S602 - the operator's own command
                if r.returncode != 0:
                    return "health_command", f"exit {r.returncode}: {r.stderr.decode(errors='replace').strip()[:200]}"
            if first:
                fault_point("agent.health.during")
                first = False
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(self.cfg.health_interval_s, max(0.0, deadline - time.monotonic())))

    def _prune(self, keep: set[str]) -> None:
        versions = self.dir.root / "versions"
        for d in versions.iterdir() if versions.is_dir() else []:
            if d.is_dir() and d.name.removeprefix(f"{self.cfg.name}-") not in keep and not d.name.startswith("."):
                shutil.rmtree(d, ignore_errors=True)

    # -- the loop --------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self.recover()
        while not stop.is_set():
            try:
                self.check()
            except Exception as e:  # the loop outlives any one bad cycle; the model keeps serving
                self._event("error", reason="cycle_failed", detail=f"{type(e).__name__}: {e}")
            stop.wait(self.cfg.poll_s)


class _SmokeFailed(KeiryoError):
    pass


def _golden_p50_ms(pkg: Any, session: Any, n: int = 20) -> float:
    from keiryo.packages.package import golden_inputs

    x = {k: v[:1] for k, v in golden_inputs(pkg.manifest["inputs"]).items()}
    session.run(x)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        session.run(x)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))
