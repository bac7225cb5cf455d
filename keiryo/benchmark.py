"""The measurement harness: latency percentiles at batch 1, throughput at a larger batch.

``run_benchmark`` times a session in this process. ``measure_file`` runs the same
harness in a fresh child process over a model *file*, so each candidate is
measured in isolation (no allocator or thread-pool state left by the previous
one) and its peak RSS is the child's own high-water mark.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.errors import RuntimeSessionError


class BenchConfig(KeiryoConfig):
    threads: int = Field(1, ge=1, description="intra-op threads of the runtime")
    warmup: int = Field(20, ge=0)
    iterations: int = Field(200, ge=5, description="timed runs for the latency percentiles")
    latency_batch: int = Field(1, ge=1, description="batch size of the latency runs (1: per-request latency)")
    throughput_batch: int = Field(32, ge=1)
    throughput_iterations: int = Field(20, ge=1)


@dataclass(frozen=True)
class BenchResult:
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    latency_mean_ms: float
    iterations: int
    throughput_batch: int
    throughput_per_s: float
    threads: int
    peak_rss_mb: float | None
    latency_batch: int = 1
    runtime_info: dict[str, Any] | None = None  # what the runtime reports of itself (the web runtime: browser, wasm features)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["runtime_info"] is None:
            del d["runtime_info"]  # only runtimes that describe themselves (the browser) carry it
        return d


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MB.

    On Linux this is VmHWM, which belongs to the address space and so starts afresh
    at exec; ``ru_maxrss`` would carry over the parent's peak into a spawned child.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024, 1)
    except (ImportError, OSError):  # pragma: no cover - Windows
        return None


def _rows(sample: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """``n`` rows made by repeating ``sample``'s rows, for every input."""
    out = {}
    for k, v in sample.items():
        reps = -(-n // len(v))
        out[k] = np.ascontiguousarray(np.concatenate([v] * reps)[:n])
    return out


def run_benchmark(
    session: Any, sample: dict[str, np.ndarray] | np.ndarray, cfg: BenchConfig | None = None, *, rss: bool = False
) -> BenchResult:
    """Time ``session`` on ``sample`` (named input rows, batch dim included) at ``cfg.latency_batch``."""
    cfg = cfg or BenchConfig()
    if isinstance(sample, np.ndarray):
        sample = {session.input_names[0]: sample}
    x1 = _rows({k: v[:1] for k, v in sample.items()}, cfg.latency_batch)
    xb = _rows(sample, cfg.throughput_batch)
    timed = getattr(session, "timed", None)
    if timed is not None:  # a runtime that times itself (the browser: no round trip to this process in the figure)
        ms = np.asarray(timed(x1, cfg.warmup, cfg.iterations), dtype=np.float64)
        tput = cfg.throughput_batch * cfg.throughput_iterations / (float(np.sum(timed(xb, 1, cfg.throughput_iterations))) / 1e3)
    else:
        for _ in range(cfg.warmup):
            session.run(x1)
        times = np.empty(cfg.iterations)
        for i in range(cfg.iterations):
            t = time.perf_counter()
            session.run(x1)
            times[i] = time.perf_counter() - t
        session.run(xb)
        t = time.perf_counter()
        for _ in range(cfg.throughput_iterations):
            session.run(xb)
        tput = cfg.throughput_batch * cfg.throughput_iterations / (time.perf_counter() - t)
        ms = times * 1e3
    return BenchResult(
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 95)),
        float(np.percentile(ms, 99)),
        float(ms.mean()),
        cfg.iterations,
        cfg.throughput_batch,
        float(tput),
        cfg.threads,
        # the browser's memory is not this process's: no RSS figure for a session that runs elsewhere
        _peak_rss_mb() if rss and timed is None else None,
        cfg.latency_batch,
        getattr(session, "info", None),
    )


@contextlib.contextmanager
def machine_lock(path: str | Path | None) -> Iterator[None]:
    """Hold an exclusive file lock while measuring, so parallel trials never time at the same moment."""
    if path is None:
        yield
        return
    import fcntl

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def measure_file(
    path: str | Path,
    runtime: str,
    sample: dict[str, np.ndarray],
    cfg: BenchConfig | None = None,
    lock: str | Path | None = None,
) -> BenchResult:
    """Benchmark a model file in a fresh child process (isolated; peak RSS is the child's).

    ``lock``: a lock file shared by every process on this machine that measures; while one
    measures, the others wait (their training and quantization keep running).
    """
    with machine_lock(lock):
        return _measure_file(path, runtime, sample, cfg)


def _measure_file(path: str | Path, runtime: str, sample: dict[str, np.ndarray], cfg: BenchConfig | None = None) -> BenchResult:
    cfg = cfg or BenchConfig()
    with tempfile.TemporaryDirectory() as td:
        npy = os.path.join(td, "sample.npz")
        np.savez(npy, **{k: np.ascontiguousarray(v) for k, v in sample.items()})  # type: ignore[arg-type]
        job = {"path": str(path), "runtime": runtime, "sample": npy, "config": cfg.model_dump()}
        env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}
        proc = subprocess.run(
            [sys.executable, "-m", "keiryo.benchmark"],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeSessionError(f"{path}: benchmark on {runtime} failed: {tail[:300]}")
    return BenchResult(**json.loads(proc.stdout.strip().splitlines()[-1]))


def _worker() -> None:
    job = json.loads(sys.stdin.read())
    from keiryo.runtime import open_session

    cfg = BenchConfig(**job["config"])
    with np.load(job["sample"], allow_pickle=False) as z:
        sample = {k: z[k] for k in z.files}
    with open_session(job["runtime"], job["path"], cfg.threads) as s:
        res = run_benchmark(s, sample, cfg, rss=True)
    print(json.dumps(res.to_dict()))


if __name__ == "__main__":
    _worker()
