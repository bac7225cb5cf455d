#!/usr/bin/env python
"""Cold start of the server image's command (what a Knative scale-from-zero pays): `keiryo serve` process start ->
first answered inference.

Packages a `keiryo demo` candidate (int8 by default), publishes it in a temporary registry at alias `production`,
then --runs times starts `keiryo serve` as the image of `keiryo deploy docker` does (registry, trusted root, an
empty TUF cache) and sends a JSON inference request every 10 ms until one answers 200.

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
    times = []
    for i in range(args.runs):
        port = free_port()
        cmd = [exe, "serve", "--registry", str(registry), "--model", "demo@production", "--public-key", str(pub)]
        cmd += ["--trusted-root", str(registry / "tuf" / "1.root.json"), "--tuf-cache", str(work / f"cache{i}")]
        cmd += ["--port", str(port), "--poll-s", "0"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, env={**os.environ, "KEIRYO_API_KEYS": KEY}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            while True:
                if proc.poll() is not None:
                    print(f"keiryo serve exited with {proc.returncode}", file=sys.stderr)
                    return 1
                try:
                    r = httpx.post(
                        f"http://127.0.0.1:{port}/v2/models/demo/infer", content=body, headers={"Authorization": f"Bearer {KEY}"}
                    )
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)
            times.append(time.perf_counter() - t0)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"keiryo serve cold start, process start -> first 200 (s): {[round(t, 3) for t in times]}")
    print(f"median {statistics.median(times):.3f} s over {len(times)} runs ({args.candidate} of {args.reuse})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
