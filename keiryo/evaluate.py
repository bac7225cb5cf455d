"""Task metric, fidelity and size of a model, run on its own runtime."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class SizeInfo:
    size_bytes: int
    size_gzip_bytes: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def predict(session: Any, x: torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits for every row of ``x``, in batches."""
    arr = x.numpy() if isinstance(x, torch.Tensor) else x
    return np.concatenate([session.run(np.ascontiguousarray(arr[i : i + batch_size]))[0] for i in range(0, len(arr), batch_size)])


def accuracy(logits: np.ndarray, labels: np.ndarray | torch.Tensor) -> float:
    y = labels.numpy() if isinstance(labels, torch.Tensor) else labels
    return float((logits.argmax(1) == y).mean())


def fidelity(logits: np.ndarray, reference_pred: np.ndarray) -> float:
    """Share of samples whose top-1 prediction equals the fp32 baseline's."""
    return float((logits.argmax(1) == reference_pred).mean())


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
