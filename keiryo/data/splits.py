"""The in-memory split container and the source dispatcher."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.errors import ConfigError, DataError


class DataSpec(KeiryoConfig):
    """Where the data comes from and how it is split. Recorded in results.json."""

    source: str = Field("digits", description="digits | file.npz | image dir | file.csv | module:function")
    options: dict[str, Any] = Field(default_factory=dict, description="source options, e.g. size=16")
    seed: int = 0
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    calib_size: int = Field(256, ge=1, description="calibration samples drawn from train")


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.x[i : i + batch_size], self.y[i : i + batch_size]) for i in range(0, len(self), batch_size)]


@dataclass(frozen=True)
class DataSplits:
    train: Split
    val: Split
    test: Split
    calib: Split
    num_classes: int
    spec: DataSpec
    class_names: list[str] = field(default_factory=list)
    preprocessing: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def fingerprint(self) -> str:
        """sha256 over the split tensors: equal data, equal fingerprint."""
        import hashlib

        h = hashlib.sha256()
        for split in (self.train, self.val, self.test, self.calib):
            h.update(split.x.numpy().tobytes())
            h.update(split.y.numpy().tobytes())
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.spec.source,
            "options": dict(self.spec.options),
            "seed": self.spec.seed,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test), "calib": len(self.calib)},
            "preprocessing": self.preprocessing,
        }


@dataclass
class RawData:
    """What a source adapter returns: arrays plus metadata; pre-split parts are optional."""

    x: np.ndarray
    y: np.ndarray
    class_names: list[str]
    preprocessing: dict[str, Any]
    presplit: dict[str, tuple[np.ndarray, np.ndarray]] | None = None


def check_arrays(x: np.ndarray, y: np.ndarray, where: str) -> None:
    """Validate sample/label arrays with one-line errors naming the source."""
    if x.ndim < 2:
        raise DataError(f"{where}: x must have a batch dimension plus at least one feature dimension, got shape {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{where}: y must be 1-D with one label per sample ({x.shape[0]}), got shape {y.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{where}: x must be numeric, got dtype {x.dtype}")
    bad = ~np.isfinite(x.astype(np.float64, copy=False))
    if bad.any():
        idx = int(np.argwhere(bad.reshape(x.shape[0], -1).any(axis=1))[0][0])
        raise DataError(f"{where}: x contains {int(bad.sum())} NaN/Inf values (first in sample {idx}); expected finite numbers")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            return
        raise DataError(f"{where}: labels y must be integers 0..K-1, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise DataError(f"{where}: labels y must be integers 0..K-1, found {int(y.min())}")


def _stratified_split(y: np.ndarray, fractions: tuple[float, float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    val_f, test_f = fractions
    counts = np.bincount(y)
    strat = y if counts[counts > 0].min() >= 3 else None
    try:
        rest, test = train_test_split(idx, test_size=test_f, random_state=seed, stratify=strat)
        strat_rest = y[rest] if strat is not None else None
        train, val = train_test_split(rest, test_size=val_f / (1 - test_f), random_state=seed, stratify=strat_rest)
    except ValueError as e:
        raise DataError(f"cannot split {len(y)} samples into train/val/test: {e}") from e
    return np.sort(train), np.sort(val), np.sort(test)


def _as_split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64)))


def load_data(spec: DataSpec | str | None = None, **options: Any) -> DataSplits:
    """Load ``spec`` (a DataSpec or a source string) into deterministic splits."""
    from keiryo.data import sources

    if spec is None or isinstance(spec, str):
        spec = DataSpec(source=spec or "digits", options=options)
    raw = sources.read_source(spec)
    where = spec.source
    if raw.presplit is not None:
        parts = {k: v for k, v in raw.presplit.items()}
        for k, (xa, ya) in parts.items():
            check_arrays(xa, ya, f"{where} [{k}]")
        if "val" not in parts or "test" not in parts:
            raise DataError(f"{where}: a pre-split source must provide train, val and test")
        train, val, test = (_as_split(*parts[k]) for k in ("train", "val", "test"))
        y_all = np.concatenate([parts[k][1] for k in ("train", "val", "test")]).astype(np.int64)
    else:
        check_arrays(raw.x, raw.y, where)
        y_all = raw.y.astype(np.int64)
        tr, va, te = _stratified_split(y_all, (spec.val_fraction, spec.test_fraction), spec.seed)
        train, val, test = _as_split(raw.x[tr], y_all[tr]), _as_split(raw.x[va], y_all[va]), _as_split(raw.x[te], y_all[te])
    num_classes = int(y_all.max()) + 1
    if num_classes < 2:
        raise DataError(f"{where}: found {num_classes} class; expected at least 2")
    shapes = {tuple(s.x.shape[1:]) for s in (train, val, test)}
    if len(shapes) != 1:
        raise DataError(f"{where}: train/val/test sample shapes differ: {sorted(shapes)}")
    rng = np.random.default_rng(spec.seed + 1)
    n_cal = min(spec.calib_size, len(train))
    cal_idx = np.sort(rng.choice(len(train), size=n_cal, replace=False))
    calib = Split(train.x[cal_idx], train.y[cal_idx])
    names = raw.class_names or [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise DataError(f"{where}: {len(names)} class names for {num_classes} classes")
    return DataSplits(train, val, test, calib, num_classes, spec, names, raw.preprocessing)


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """Parse ``key=value`` CLI pairs; values are read as YAML scalars (ints, floats, lists)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or []:
        for item in _split_top_level(pair):
            if "=" not in item:
                raise ConfigError(f"option {item!r}: expected key=value")
            k, v = item.split("=", 1)
            try:
                out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
            except yaml.YAMLError as e:
                raise ConfigError(f"option {item!r}: cannot parse value ({e})") from e
    return out


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside brackets, so hidden=[64,32] stays whole."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return [p for p in (x.strip() for x in parts) if p]
