"""Running a model on a split: outputs per output, size of a file. The task turns outputs into metrics."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SizeInfo:
    size_bytes: int
    size_gzip_bytes: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def predict(session: Any, inputs: Any, batch_size: int = 32) -> list[np.ndarray]:
    """Every output of ``session`` for every row of ``inputs`` (a split, a dict of arrays or one array), in batches.

    Small batches keep a runtime's activation memory bounded on large inputs (224x224 images)."""
    return predict_with_targets(session, inputs, batch_size)[0]


def predict_with_targets(session: Any, inputs: Any, batch_size: int = 32) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Outputs (as :func:`predict`) and the split's targets, read in one pass (a streamed split is read once)."""
    if hasattr(inputs, "batches") and not hasattr(inputs, "numpy"):  # a streamed split
        chunks: list[list[np.ndarray]] = []
        ys = []
        for x, y in inputs.batches(batch_size):
            chunks.append(session.run({k: np.ascontiguousarray(v.numpy()) for k, v in x.items()}))
            if y is not None:
                ys.append(y.numpy())
        outs = [np.concatenate([p[j] for p in chunks]) for j in range(len(chunks[0]))] if chunks else []
        return outs, (np.concatenate(ys) if ys else None)
    targets = inputs.targets.numpy() if getattr(inputs, "targets", None) is not None else None
    if hasattr(inputs, "numpy") and hasattr(inputs, "inputs"):  # a MemorySplit
        arrays = inputs.numpy()
    elif isinstance(inputs, dict):
        arrays = {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in inputs.items()}
    else:
        arr = inputs.numpy() if hasattr(inputs, "numpy") else np.asarray(inputs)
        arrays = {session.input_names[0]: arr}
    n = len(next(iter(arrays.values())))
    parts: list[list[np.ndarray]] = []
    for i in range(0, n, batch_size):
        parts.append(session.run({k: np.ascontiguousarray(v[i : i + batch_size]) for k, v in arrays.items()}))
    if not parts:
        return [], targets
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))], targets


def size_of(path: str | Path) -> SizeInfo:
    """Raw and gzip (level 9) size of a file, or of a directory packed as tar."""
    p = Path(path)
    if p.is_dir():
        with tempfile.TemporaryDirectory() as td:
            tar = shutil.make_archive(os.path.join(td, "a"), "tar", root_dir=p)
            raw = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            return SizeInfo(raw, len(gzip.compress(Path(tar).read_bytes(), 9)))
    data = p.read_bytes()
    return SizeInfo(len(data), len(gzip.compress(data, 9)))
