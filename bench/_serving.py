"""Shared by the serving benches: the demo's candidate signed and published in a registry of its own, the input
it takes, and the bare onnxruntime call every server's added latency is measured against."""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keiryo.packages import keygen, package, read_manifest
from keiryo.packages.store import PackageStore


@dataclass
class Published:
    work: Path  # a fresh temporary folder holding all of it
    pub: Path  # the signer's public key
    pkg: Path  # the package folder
    registry: Path  # demo 1 at alias production
    manifest: dict[str, Any]
    input: dict[str, Any]  # the manifest's (one) input
    shape: list[int]  # that input at batch 1
    x: np.ndarray  # a reproducible sample of it

    @property
    def model(self) -> Path:
        return self.pkg / self.manifest["model_file"]


def publish_demo(reuse: Path, candidate: str, what: str) -> Published:
    """Package ``candidate`` of a `keiryo demo` output as demo 1, publish it at demo@production."""
    work = Path(tempfile.mkdtemp(prefix=f"keiryo-bench-{what}-"))
    priv, pub = keygen(work / "key.pem")
    pkg = package(reuse, name="demo", version="1", private_key=priv, out=work / "pkg", candidate=candidate)
    store = PackageStore(work / "registry")
    store.push(pkg, pub)
    store.promote("demo", "1", "production")
    manifest = read_manifest(pkg)
    inp = manifest["inputs"][0]
    if len(manifest["inputs"]) != 1 or inp["datatype"] != "FP32":
        raise SystemExit(f"the serving benches send one FP32 input; the package takes {manifest['inputs']}")
    shape = [1, *(d if d > 0 else 1 for d in inp["shape"][1:])]
    x = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    return Published(work, pub, pkg, store.root, manifest, inp, shape, x)


def bare_p50_ms(model: Path, feed: dict[str, np.ndarray], threads: int, runs: int = 2000) -> float:
    """The median of ``runs`` direct onnxruntime calls on ``feed`` (after 200 warm-up calls), in ms."""
    from keiryo.runtime import open_session

    with open_session("onnxruntime", model, threads) as s:
        for _ in range(200):
            s.run(feed)
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            s.run(feed)
            ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3
