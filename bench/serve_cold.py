#!/usr/bin/env python
"""Cold start of the image's two commands, process start -> first answered inference: `keiryo serve` (the image's
entry point: Docker, Kubernetes) and the serverless function `python -m keiryo.serverless_http` (what a Knative
scale-from-zero of `keiryo deploy knative`'s Service pays).

Packages a `keiryo demo` candidate (int8 by default), publishes it in a temporary registry at alias `production`,
then --runs times starts each command as the image does (registry, trusted root, an empty TUF cache), the two
interleaved, and sends a JSON inference request every 10 ms until one answers 200.

    .venv/bin/python bench/serve_cold.py --reuse keiryo-demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from _serving import publish_demo

from keiryo.testing.live import free_port

KEY = "bench-cold-start-key-0123"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", type=Path, required=True, help="a `keiryo demo` output directory")
    ap.add_argument("--candidate", default="int8")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    demo = publish_demo(args.reuse, args.candidate, "serve-cold")
    work, pub, inp, shape, registry = demo.work, demo.pub, demo.input, demo.shape, demo.registry
    body = json.dumps({"inputs": [{"name": inp["name"], "datatype": "FP32", "shape": shape, "data": [0.0] * math.prod(shape)}]})
    exe = str(Path(sys.executable).with_name("keiryo"))
    image_env = {  # what `keiryo deploy knative`'s Service sets for the function
        "KEIRYO_REGISTRY": str(registry),
        "KEIRYO_MODEL": "demo@production",
        "KEIRYO_PUBLIC_KEY": str(pub),
        "KEIRYO_TRUSTED_ROOT": str(registry / "tuf" / "1.root.json"),
    }
    times: dict[str, list[float]] = {"keiryo serve": [], "function (keiryo.serverless_http)": []}
    for i in range(args.runs):  # the two commands interleaved, so the shared cores' load hits both alike
        for what in times:
            port = free_port()
            env = {**os.environ, "KEIRYO_API_KEYS": KEY}
            if what == "keiryo serve":
                cmd = [exe, "serve", "--registry", str(registry), "--model", "demo@production", "--public-key", str(pub)]
                cmd += ["--trusted-root", str(registry / "tuf" / "1.root.json"), "--tuf-cache", str(work / f"cache{i}")]
                cmd += ["--port", str(port), "--poll-s", "0"]
            else:
                cmd = [sys.executable, "-m", "keiryo.serverless_http", "--host", "127.0.0.1", "--port", str(port)]
                env.update(image_env, KEIRYO_TUF_CACHE=str(work / f"fn-cache{i}"))
            t = first_answer(cmd, env, port, body)
            if t is None:
                return 1
            times[what].append(t)
    for what, ts in times.items():
        print(f"{what:34s} cold start, process start -> first 200 (s): {[round(t, 3) for t in ts]}")
        print(f"{'':34s} median {statistics.median(ts):.3f} s over {len(ts)} runs ({args.candidate} of {args.reuse})")
    return 0


def first_answer(cmd: list[str], env: dict[str, str], port: int, body: str) -> float | None:
    """Seconds from spawning ``cmd`` to its first answered inference (a JSON request every 10 ms until a 200)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                print(f"{cmd[:3]} exited with {proc.returncode}", file=sys.stderr)
                return None
            try:
                r = httpx.post(
                    f"http://127.0.0.1:{port}/v2/models/demo/infer", content=body, headers={"Authorization": f"Bearer {KEY}"}
                )
                if r.status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    sys.exit(main())
