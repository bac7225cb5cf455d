#!/usr/bin/env python
"""Edge updates (issue: trusted updates), measured in one run on loopback.

1. Builds two versions of a 2.2 M-parameter MobileNetV2 (int8 ONNX, about 2.5 MB; random weights:
   an update's cost does not depend on accuracy), publishes them in a registry with TUF metadata
   and serves it with `keiryo registry serve` (HTTP, Range).
2. A device (`keiryo agent` with its local endpoint) runs 1.0.0 under a steady local load (2 client
   threads, JSON). 2.0.0 is promoted; one update cycle runs: check -> download -> stage -> smoke test
   -> swap -> health window -> commit. Reported: time per phase, failed local requests during it.
3. 3.0.0 fails its health check (the health command exits 1): time from the swap to the old model
   back in service, against the health window.
4. The crash matrix: every named fault point x (SIGKILL, power cut) x --trials, each followed by a
   restart that must serve a verified model and converge. Reported: trials, and how many passed.

    .venv/bin/python bench/update.py            # ~2 min
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from _checks import cpu_line, report

from keiryo.agent import Agent, AgentConfig
from keiryo.agent.agent import FAULT_POINTS
from keiryo.agent.endpoint import Endpoint
from keiryo.packages import keygen, package
from keiryo.packages.http import make_server
from keiryo.packages.store import PackageStore
from keiryo.packages.verified import load_verified
from keiryo.testing.faults import run_killed


def build(work: Path, seed: int) -> Path:
    import torch

    from keiryo.benchmark import BenchConfig
    from keiryo.data import DataSpec, load_data
    from keiryo.model import load_model
    from keiryo.pipeline import RunOptions, compress, load_recipe

    torch.manual_seed(seed)
    data = load_data(DataSpec(source="digits", options={"size": 16}, calib_size=32, eval_size=64))
    h = load_model("zoo:mobilenetv2", data, options={"width": 1.0})
    out = work / f"out-{seed}"
    opts = RunOptions(bench=BenchConfig(iterations=5, warmup=1, throughput_iterations=1), progress=False)
    compress(h, data, [load_recipe("int8")], out, opts=opts)
    return out


class Load:
    """Steady local inference requests from ``n`` threads; counts answers by status and version."""

    def __init__(self, url: str, name: str, x: np.ndarray, n: int = 2):
        self.body = json.dumps(
            {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        )
        self.url = f"{url}/v2/models/{name}/infer"
        self.stop = threading.Event()
        self.codes: list[tuple[int, str]] = []
        self.threads = [threading.Thread(target=self._run) for _ in range(n)]

    def _run(self) -> None:
        with httpx.Client(timeout=10) as c:
            while not self.stop.is_set():
                r = c.post(self.url, content=self.body, headers={"Content-Type": "application/json"})
                self.codes.append((r.status_code, r.json().get("model_version", "?") if r.status_code == 200 else r.text[:80]))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--health-window", type=float, default=1.0, help="seconds a new version is watched")
    ap.add_argument("--trials", type=int, default=2, help="crash-matrix repetitions per point and mode")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="keiryo-bench-update-"))
    priv, pub = keygen(work / "key.pem")
    outs = [build(work, seed) for seed in (0, 1)]
    pkgs = {
        v: package(outs[i], name="mnv2", version=v, private_key=priv, out=work / f"pkg-{v}", candidate="int8")
        for v, i in (("1.0.0", 0), ("2.0.0", 1), ("3.0.0", 0))
    }
    size = (pkgs["2.0.0"] / "model.onnx").stat().st_size
    store = PackageStore(work / "registry")
    for v in pkgs:
        store.push(pkgs[v], pub)
    store.promote("mnv2", "1.0.0", "production")
    srv = make_server(store.root, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    cfg = AgentConfig(
        source=url,
        name="mnv2",
        trusted_root=str(store.root / "tuf" / "1.root.json"),
        public_key=str(pub),
        state_dir=str(work / "device"),
        health_window_s=args.health_window,
        health_interval_s=0.2,
    )
    agent = Agent(cfg)
    agent.recover()
    assert agent.check() == "updated"
    x = np.random.default_rng(0).uniform(0, 1, (1, 1, 16, 16)).astype(np.float32)

    # 2. an update under a steady local load
    store.promote("mnv2", "2.0.0", "production")
    with Endpoint(agent, port=0) as ep, Load(f"http://127.0.0.1:{ep.port}", "mnv2", x) as load:
        time.sleep(1.0)
        t0 = time.perf_counter()
        outcome = agent.check()
        total = time.perf_counter() - t0
        time.sleep(1.0)
    committed = agent.dir.events()[-1]
    failed = [c for c in load.codes if c[0] != 200]
    versions = sorted({v for code, v in load.codes if code == 200})
    without_health = total - committed["health_s"]

    # 3. a version that fails its health check
    store.promote("mnv2", "3.0.0", "production")
    bad = Agent(cfg.model_copy(update={"health_command": "exit 1"}))
    bad.recover()
    assert bad.check() == "rolled_back"
    ev = bad.dir.events()
    swapped = next(e for e in reversed(ev) if e["event"] == "swapped")
    rolled = ev[-1]
    back_s = rolled["t"] - swapped["t"]

    # 4. the crash matrix, against a device at 1.0.0 whose alias says 2.0.0 (a health-failing update for rollback points)
    store.promote("mnv2", "1.0.0", "production", downgrade=True)
    base = work / "base"
    seed_agent = Agent(cfg.model_copy(update={"state_dir": str(base), "health_window_s": 0.2}))
    seed_agent.recover()
    seed_agent.check()
    store.promote("mnv2", "2.0.0", "production")
    rollback_points = {"agent.rollback.mid", "agent.rollback.done"}
    trials = passed = 0
    for point in FAULT_POINTS:
        for mode in ("", ":powerloss"):
            for k in range(args.trials):
                state = work / f"crash-{point}{mode}-{k}"
                shutil.copytree(base, state, symlinks=True)
                c = cfg.model_copy(
                    update={
                        "state_dir": str(state),
                        "health_window_s": 0.2,
                        "health_command": "exit 1" if point in rollback_points else None,
                    }
                )

                def cycle(c: AgentConfig = c) -> None:
                    a = Agent(c)
                    a.recover()
                    a.check()

                trials += 1
                reached = run_killed(point + mode, cycle) is not None
                a = Agent(c)
                served = a.recover()
                ok = reached and served is not None
                if ok:
                    _, s = load_verified(a.dir.version_dir(served), pub, name="mnv2", version=served)
                    s.close()
                    a.check()
                    want = "1.0.0" if point in rollback_points else "2.0.0"
                    ok = a.rec.committed is not None and a.rec.committed.version == want and a.active.version == want
                passed += ok
    srv.shutdown()

    print(
        f"CPU: {cpu_line(cfg.threads)}; model: MobileNetV2 2.24 M parameters, int8 ONNX {size / 1e6:.2f} MB; registry over HTTP on loopback"
    )
    print(
        f"update check -> committed: {total:.2f} s ({outcome}); phases: download {committed['download_s']:.3f} s, "
        f"stage {committed['stage_s']:.3f} s, smoke test {committed['smoke_s']:.3f} s, health window {committed['health_s']:.2f} s"
    )
    checks = [
        ("update check -> committed, health window excluded, <= 2 s", without_health <= 2.0, f"{without_health:.2f} s"),
        (
            "zero failed local requests during the update",
            not failed and len(load.codes) > 0,
            f"{len(failed)} failed of {len(load.codes)}; versions answered {versions}",
        ),
        (
            "rollback after a failed health check within one window (+1 s to reload the old model)",
            back_s <= args.health_window + 1.0,
            f"old model back {back_s:.2f} s after the swap (window {args.health_window:.1f} s; {rolled['reason']})",
        ),
        (
            "100% of crash-matrix trials end serving a verified model and converge",
            passed == trials,
            f"{passed}/{trials} ({len(FAULT_POINTS)} points x kill/power cut x {args.trials})",
        ),
    ]
    raise SystemExit(report(checks, work))


if __name__ == "__main__":
    main()
