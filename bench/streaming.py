#!/usr/bin/env python
"""Data at real size: peak RSS of `keiryo compress` on image folders of 1,000 and 10,000 images (224x224).

The bench writes the folders (two classes of JPEG images, generated), then runs the same
`keiryo compress` on each in a fresh process and reads that process's peak RSS (VmHWM). The
recipe fine-tunes after structured pruning (one epoch over the streamed train split) and
quantizes to int8, so both the streamed training and the in-memory eval/calibration subsets
(--eval-size 200, --calib-size 64) are exercised. Target: peak RSS at 10,000 images within 15%
of the 1,000-image run.

    .venv/bin/python bench/streaming.py          # ~10 min on 2 cores (most of it writing and reading JPEGs)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _checks import report

RECIPE = """name: prune-ft-int8
steps:
  - type: prune.structured
    params: {ratio: 0.25, finetune: {epochs: 1, batch_size: 32}}
  - type: quantize.int8_static
"""

CHILD = """
import sys
from keiryo.cli import main
code = main(sys.argv[1:])
hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))
print('PEAK_RSS_KB', hwm, 'EXIT', code)
"""


def write_images(root: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, size=(64, 28, 28, 3))
    for i in range(n):
        cls = "a" if i % 2 == 0 else "b"
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        small = base[i % 64] * (0.6 if cls == "a" else 1.0)
        img = Image.fromarray(small.astype(np.uint8)).resize((224, 224), Image.Resampling.BILINEAR)
        img.save(d / f"{i:05d}.jpg", quality=85)


def run(folder: Path, out: Path, recipe: Path) -> tuple[float, float]:
    args = [
        "compress", "-m", "keiryo.testing:tiny_cnn", "--model-opt", "width=8", "-d", str(folder),
        "--data-opt", "size=224", "--eval-size", "200", "--calib-size", "64", "-r", str(recipe),
        "--iterations", "20", "-o", str(out), "--overwrite",
    ]  # fmt: skip
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    secs = time.perf_counter() - t
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("PEAK_RSS_KB")), None)
    if line is None or not line.endswith("EXIT 0"):
        raise SystemExit(f"compress failed on {folder}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return int(line.split()[1]) / 1024, secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--dir", type=Path, default=None, help="where to write the image folders (kept for reuse)")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="keiryo-bench-streaming-"))
    root.mkdir(parents=True, exist_ok=True)
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE)
    rows = []
    for n in args.sizes:
        folder = root / f"images-{n}"
        if not folder.exists():
            t = time.perf_counter()
            write_images(folder, n)
            print(f"wrote {n} images in {time.perf_counter() - t:.0f} s")
        rss, secs = run(folder, root / f"out-{n}", recipe)
        res = json.loads((root / f"out-{n}" / "results.json").read_text())
        rows.append((n, rss, secs, res["data"]["sizes"]))
        print(f"{n:6} images: peak RSS {rss:7.1f} MB, {secs:6.0f} s, splits {res['data']['sizes']}")
    base, last = rows[0], rows[-1]
    growth = last[1] / base[1] - 1
    checks = [
        (
            f"peak RSS at {last[0]} images within 15% of {base[0]}",
            growth <= 0.15,
            f"{base[1]:.0f} MB -> {last[1]:.0f} MB ({growth:+.1%})",
        ),
        ("train split streamed, not held", all(r[3]["train"] > 0 for r in rows), ", ".join(str(r[3]["train"]) for r in rows)),
    ]
    return report(checks, root)


if __name__ == "__main__":
    raise SystemExit(main())
