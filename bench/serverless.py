#!/usr/bin/env python
"""Serverless cold start (issue 14, point 4): process start -> first response of keiryo.serverless:handler.

Packages a `keiryo demo` candidate (int8 by default), then --runs times starts a fresh Python process that
imports the handler (which verifies the package and opens its session at init) and answers one binary
OIP request; the time is measured from just before the process is spawned to its answer on stdout.

    .venv/bin/python bench/serverless.py --reuse keiryo-demo
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _checks import report

from keiryo.packages import keygen, package

_CHILD = """
import base64, json
import numpy as np
from keiryo.serverless import handler
x = np.zeros({shape}, np.float32)
raw = x.tobytes()
head = json.dumps({{"inputs": [{{"name": "{name}", "datatype": "FP32", "shape": {shape},
    "parameters": {{"binary_data_size": len(raw)}}}}], "parameters": {{"binary_data_output": True}}}}).encode()
r = handler({{"httpMethod": "POST", "path": "/v2/models/demo/infer", "isBase64Encoded": True,
    "headers": {{"Inference-Header-Content-Length": str(len(head))}}, "body": base64.b64encode(head + raw).decode()}})
print(r["statusCode"], flush=True)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", type=Path, required=True, help="a `keiryo demo` output directory")
    ap.add_argument("--candidate", default="int8")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="keiryo-bench-serverless-"))
    priv, pub = keygen(work / "key.pem")
    pkg = package(args.reuse, name="demo", version="1", private_key=priv, out=work / "pkg", candidate=args.candidate)
    manifest = json.loads((pkg / "keiryo.json").read_text())
    inp = manifest["inputs"][0]
    shape = [1, *(d if d > 0 else 1 for d in inp["shape"][1:])]
    code = _CHILD.format(shape=shape, name=inp["name"])
    env = {**os.environ, "KEIRYO_PACKAGE": str(pkg), "KEIRYO_PUBLIC_KEY": str(pub)}
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        times.append(time.perf_counter() - t)
        if r.returncode != 0 or r.stdout.strip() != "200":
            print(r.stderr[-2000:])
            raise SystemExit("the handler did not answer 200")
    cold = statistics.median(times)
    print(f"cold start (process start -> first response), demo {args.candidate}: " + ", ".join(f"{t:.3f}" for t in times) + " s")
    return report([("serverless cold start <= 1.0 s (median)", cold <= 1.0, f"{cold:.3f} s")], work)


if __name__ == "__main__":
    raise SystemExit(main())
