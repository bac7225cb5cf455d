"""Splits of named input arrays plus targets, streamed or held in memory.

A source adapter returns :class:`RawData`: a dataset of items ``({name: array}, target)``
and, when it can give them without reading every item, the targets for stratified
splitting. ``load_data`` splits it deterministically into train / val / test and a
calibration subset drawn from train. **Train streams** through a DataLoader (batches,
workers); val, test and calib are held in memory, each capped by an option
(``val_size``, ``eval_size``, ``calib_size``), so a folder of 10,000 large images costs
no more memory than one of 1,000.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.errors import ConfigError, DataError
from keiryo.model.io import Batch, TensorSpec, dtype_name


class DataSpec(KeiryoConfig):
    """Where the data comes from and how it is split. Recorded in results.json."""

    source: str = Field(
        "digits", description="digits | sensors | tokens | file.npz | file.safetensors | image dir | file.csv | module:function"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="source options, e.g. size=16")
    seed: int = 0
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    calib_size: int = Field(256, ge=1, description="calibration samples drawn from train (held in memory)")
    eval_size: int = Field(2000, ge=1, description="test samples evaluated (held in memory; the rest are not read)")
    val_size: int = Field(1000, ge=1, description="validation samples (read batch by batch when a pass scores on them)")
    workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes for the streamed train split")


@dataclass(frozen=True)
class TargetInfo:
    """What the targets are: dtype and per-sample shape; ``label_count`` = max label + 1 for integer labels."""

    dtype: str
    shape: tuple[int, ...]
    label_count: int | None = None

    @property
    def is_integer(self) -> bool:
        return self.dtype.startswith("int") or self.dtype.startswith("uint")


class Split:
    """A split: ``len()``, ``batches()`` of (named inputs, targets) and ``take(n)`` into memory."""

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[Batch, torch.Tensor | None]]:
        raise NotImplementedError

    def take(self, n: int | None = None) -> MemorySplit:
        raise NotImplementedError

    def held(self, max_bytes: int = 1 << 30) -> Split:
        """This split in memory when its inputs take at most ``max_bytes`` (a pass that scores on it many times
        reads it once), else itself, streamed."""
        return self


@dataclass(frozen=True)
class MemorySplit(Split):
    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor | None

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    @property
    def y(self) -> torch.Tensor | None:
        return self.targets

    def numpy(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.inputs.items()}

    def __getitem__(self, idx: slice | np.ndarray | torch.Tensor) -> MemorySplit:
        return MemorySplit({k: v[idx] for k, v in self.inputs.items()}, None if self.targets is None else self.targets[idx])

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[Batch, torch.Tensor | None]]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        for i in range(0, n, batch_size):
            b = self[order[i : i + batch_size]] if order is not None else self[i : i + batch_size]
            yield b.inputs, b.targets

    def take(self, n: int | None = None) -> MemorySplit:
        return self if n is None or n >= len(self) else self[:n]


class StreamSplit(Split):
    """Items of a dataset read as they are needed, through a DataLoader."""

    def __init__(self, dataset: Any, indices: np.ndarray, workers: int = 0):
        self.dataset, self.indices, self.workers = dataset, indices, workers

    def __len__(self) -> int:
        return len(self.indices)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[Batch, torch.Tensor | None]]:
        from torch.utils.data import DataLoader, Subset

        loader = DataLoader(
            Subset(self.dataset, self.indices.tolist()),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.workers,
            collate_fn=collate,
        )
        yield from loader

    def take(self, n: int | None = None) -> MemorySplit:
        idx = self.indices if n is None else self.indices[:n]
        return StreamSplit(self.dataset, idx, self.workers).materialize()

    def held(self, max_bytes: int = 1 << 30) -> Split:
        if not len(self):
            return self
        first = self.dataset[int(self.indices[0])][0]
        per_item = sum(np.asarray(v).nbytes for v in first.values())
        return self.materialize() if per_item * len(self) <= max_bytes else self

    def materialize(self) -> MemorySplit:
        parts = list(self.batches(256))
        if not parts:
            raise DataError("cannot hold an empty split in memory")
        inputs = {k: torch.cat([b[0][k] for b in parts]) for k in parts[0][0]}
        targets = None if parts[0][1] is None else torch.cat([b[1] for b in parts])  # type: ignore[misc]
        return MemorySplit(inputs, targets)


def collate(items: list[tuple[Mapping[str, Any], Any]]) -> tuple[Batch, torch.Tensor | None]:
    first = items[0][0]
    inputs = {k: torch.stack([torch.as_tensor(np.asarray(it[0][k])) for it in items]) for k in first}
    if items[0][1] is None:
        return inputs, None
    return inputs, torch.as_tensor(np.stack([np.asarray(it[1]) for it in items]))


@dataclass(frozen=True)
class DataSplits:
    """train and val stream (val is read batch by batch when a training pass or the per-layer fallback
    scores on it); test and calib are held in memory, each capped by an option."""

    train: Split
    val: Split
    test: MemorySplit
    calib: MemorySplit
    inputs: list[TensorSpec]
    target: TargetInfo | None
    spec: DataSpec
    class_names: list[str] = field(default_factory=list)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    total: int = 0
    calib_source: dict[str, Any] | None = None  # set by with_calibration: where calib came from (default: train)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The per-sample shape of the first input (what zoo models are built for)."""
        return self.inputs[0].sample_shape

    @property
    def label_count(self) -> int | None:
        return self.target.label_count if self.target else None

    def fingerprint(self) -> str:
        """sha256 over the spec and the in-memory splits (and the train indices): equal data, equal fingerprint."""
        h = hashlib.sha256(self.spec.model_dump_json().encode())
        if isinstance(self.train, MemorySplit):
            parts: list[MemorySplit] = [self.train]
        else:
            h.update(np.asarray(self.train.indices).tobytes())  # type: ignore[attr-defined]
            parts = []
        for split in (*parts, self.test, self.calib):
            for k, v in split.inputs.items():
                h.update(k.encode())
                h.update(v.numpy().tobytes())
            if split.targets is not None:
                h.update(split.targets.numpy().tobytes())
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.spec.source,
            "options": dict(self.spec.options),
            "seed": self.spec.seed,
            "inputs": [t.model_dump(mode="json") for t in self.inputs],
            "target": None
            if self.target is None
            else {"dtype": self.target.dtype, "shape": list(self.target.shape), "label_count": self.target.label_count},
            "class_names": self.class_names,
            "sizes": {
                "total": self.total,
                "train": len(self.train),
                "val": len(self.val),
                "test": len(self.test),
                "calib": len(self.calib),
            },
            "streamed": not isinstance(self.train, MemorySplit),
            "preprocessing": self.preprocessing,
            "calibration": self.calib_source or {"source": "train", "rows": len(self.calib), "train_split": True},
        }


class ArrayDataset:
    """Named arrays of equal length (and optional targets) as a map-style dataset."""

    def __init__(self, inputs: dict[str, np.ndarray], targets: np.ndarray | None):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def __getitem__(self, i: int) -> tuple[dict[str, np.ndarray], Any]:
        return {k: v[i] for k, v in self.inputs.items()}, None if self.targets is None else self.targets[i]

    def split(self, idx: np.ndarray) -> MemorySplit:
        inputs = {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in self.inputs.items()}
        return MemorySplit(inputs, None if self.targets is None else torch.from_numpy(np.ascontiguousarray(self.targets[idx])))


@dataclass
class RawData:
    """What a source adapter returns.

    ``dataset`` yields ``({name: array}, target or None)``; an :class:`ArrayDataset` is held in
    memory, anything else is streamed. ``targets`` (all of them, in order) drive stratified
    splitting when known without reading the inputs. ``presplit`` maps train/val/test to
    datasets when the source is already split.
    """

    dataset: Any
    targets: np.ndarray | None
    class_names: list[str]
    preprocessing: dict[str, Any]
    presplit: dict[str, Any] | None = None


def check_arrays(inputs: Mapping[str, np.ndarray], y: np.ndarray | None, where: str) -> None:
    """Validate named input arrays and targets with one-line errors naming the source."""
    if not inputs:
        raise DataError(f"{where}: no input arrays")
    n = None
    for name, x in inputs.items():
        if x.ndim < 1:
            raise DataError(f"{where}: input {name!r} must have a batch dimension, got shape {x.shape}")
        if n is None:
            n = x.shape[0]
        elif x.shape[0] != n:
            raise DataError(f"{where}: input {name!r} has {x.shape[0]} samples but the others have {n}")
        if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise DataError(f"{where}: input {name!r} must be numeric, got dtype {x.dtype}")
        if np.issubdtype(x.dtype, np.floating):
            bad = ~np.isfinite(x)
            if bad.any():
                idx = int(np.argwhere(bad.reshape(x.shape[0], -1).any(axis=1))[0][0])
                raise DataError(
                    f"{where}: {name} contains {int(bad.sum())} NaN/Inf values (first in sample {idx}); expected finite numbers"
                )
    if y is None:
        return
    if y.shape[:1] != (n,):
        raise DataError(f"{where}: targets must hold one entry per sample ({n}), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.number) and y.dtype != np.bool_:
        raise DataError(f"{where}: targets must be numeric, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all():
        raise DataError(f"{where}: targets contain NaN/Inf; expected finite numbers")


def _normalise_targets(y: np.ndarray) -> np.ndarray:
    """Integer targets become int64, float64 becomes float32; the task decides what they mean."""
    if np.issubdtype(y.dtype, np.integer) and y.dtype != np.int64:
        return y.astype(np.int64)
    if y.dtype == np.float64:
        return y.astype(np.float32)
    return y


def _split_indices(n: int, y: np.ndarray | None, spec: DataSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    strat = None
    if y is not None and y.ndim == 1 and np.issubdtype(y.dtype, np.integer) and y.min() >= 0:
        counts = np.bincount(y)
        strat = y if counts[counts > 0].min() >= 3 else None
    val_f = spec.val_fraction / (1 - spec.test_fraction)
    try:
        try:
            rest, test = train_test_split(idx, test_size=spec.test_fraction, random_state=spec.seed, stratify=strat)
            strat_rest = strat[rest] if strat is not None else None
            train, val = train_test_split(rest, test_size=val_f, random_state=spec.seed, stratify=strat_rest)
        except ValueError:
            if strat is None:
                raise
            # more classes than a split has samples: stratification is impossible, split at random
            rest, test = train_test_split(idx, test_size=spec.test_fraction, random_state=spec.seed)
            train, val = train_test_split(rest, test_size=val_f, random_state=spec.seed)
    except ValueError as e:
        raise DataError(f"{spec.source}: cannot split {n} samples into train/val/test: {e}") from e
    return np.sort(train), np.sort(val), np.sort(test)


def _subsample(idx: np.ndarray, cap: int, seed: int) -> np.ndarray:
    if len(idx) <= cap:
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, size=cap, replace=False))


def _part(ds: Any, idx: np.ndarray, workers: int, stream: bool) -> Split:
    if isinstance(ds, ArrayDataset):
        return ds.split(idx)
    s = StreamSplit(ds, idx, workers)
    return s if stream else s.materialize()


def _describe(split: MemorySplit, where: str) -> tuple[list[TensorSpec], TargetInfo | None]:
    specs = []
    for name, t in split.inputs.items():
        shape: list[int | str] = ["batch", *t.shape[1:]]
        specs.append(TensorSpec(name=name, dtype=dtype_name(t.dtype), shape=shape))  # type: ignore[arg-type]
    if split.targets is None:
        return specs, None
    y = split.targets
    return specs, TargetInfo(dtype_name(y.dtype), tuple(y.shape[1:]))


def load_data(spec: DataSpec | str | None = None, **options: Any) -> DataSplits:
    """Load ``spec`` (a DataSpec or a source string) into deterministic splits."""
    from keiryo.data import sources

    if spec is None or isinstance(spec, str):
        spec = DataSpec(source=spec or "digits", options=options)
    raw = sources.read_source(spec)
    where = spec.source
    rng_seed = spec.seed + 1
    if raw.presplit is not None:
        missing = {"train", "val", "test"} - set(raw.presplit)
        if missing:
            raise DataError(f"{where}: a pre-split source must provide train, val and test (missing {sorted(missing)})")
        ds = raw.presplit
        train_ds = ds["train"]
        train = _part(train_ds, np.arange(len(train_ds)), spec.workers, stream=True)
        val = _part(ds["val"], _subsample(np.arange(len(ds["val"])), spec.val_size, rng_seed), 0, stream=True)
        test = _part(ds["test"], _subsample(np.arange(len(ds["test"])), spec.eval_size, rng_seed), 0, stream=False)
        total = sum(len(d) for d in ds.values())
        cal_idx = _subsample(np.arange(len(train_ds)), spec.calib_size, rng_seed)
        calib = _part(train_ds, cal_idx, 0, stream=False)
    else:
        n = len(raw.dataset)
        if n < 3:
            raise DataError(f"{where}: found {n} sample(s); expected at least 3 to split into train/val/test")
        tr, va, te = _split_indices(n, raw.targets, spec)
        train = _part(raw.dataset, tr, spec.workers, stream=True)
        val = _part(raw.dataset, _subsample(va, spec.val_size, rng_seed), 0, stream=True)
        test = _part(raw.dataset, _subsample(te, spec.eval_size, rng_seed), 0, stream=False)
        calib = _part(raw.dataset, _subsample(tr, spec.calib_size, rng_seed), 0, stream=False)
        total = n
    assert isinstance(test, MemorySplit) and isinstance(calib, MemorySplit)
    inputs, target = _describe(test, where)
    for name, part in (("calib", calib),):
        other, _ = _describe(part, where)
        if [(t.name, t.dtype, t.shape) for t in other] != [(t.name, t.dtype, t.shape) for t in inputs]:
            raise DataError(f"{where}: {name} and test samples differ in names, dtypes or shapes")
    if target is not None and target.is_integer and target.shape == ():
        ys = [s.targets for s in (test, calib) if s.targets is not None]
        known = raw.targets if raw.targets is not None else torch.cat(ys).numpy()
        if known.min() < 0:
            raise DataError(f"{where}: labels must be integers 0..K-1, found {int(known.min())}")
        target = TargetInfo(target.dtype, target.shape, int(known.max()) + 1)
    names = raw.class_names
    if names and target is not None and target.label_count is not None and len(names) < target.label_count:
        raise DataError(f"{where}: {len(names)} class names for labels up to {target.label_count - 1}")
    return DataSplits(train, val, test, calib, inputs, target, spec, names, raw.preprocessing, total)


def with_calibration(data: DataSplits, source: str, size: int | None = None, seed: int = 0) -> DataSplits:
    """``data`` with its calibration split taken from ``source`` instead of the (private) train split:
    ``synthetic`` (uniform [0, 1) float inputs of the data's shapes) or any data source (its calib split,
    ``size`` rows). What was used is recorded in ``summary()['calibration']``, so in results.json."""
    import dataclasses

    size = size or len(data.calib)
    if source == "train":
        return data
    if source == "synthetic":
        gen = torch.Generator().manual_seed(seed)
        inputs = {}
        for t in data.inputs:
            if not t.dtype.startswith("float"):
                raise ConfigError(
                    f"--calib-data synthetic: input {t.name!r} is {t.dtype}; synthetic calibration covers float inputs, "
                    "give a public data source instead"
                )
            inputs[t.name] = torch.rand((size, *t.sample_shape), generator=gen).to(getattr(torch, t.dtype))
        calib = MemorySplit(inputs, None)
        rec = {"source": "synthetic", "distribution": "uniform [0, 1)", "rows": size, "seed": seed, "train_split": False}
    else:
        public = load_data(DataSpec(source=source, calib_size=size, seed=seed))
        want = [(t.name, t.dtype, t.shape) for t in data.inputs]
        got = [(t.name, t.dtype, t.shape) for t in public.inputs]
        if want != got:
            raise DataError(f"--calib-data {source}: inputs {got} do not match the model's data {want}")
        calib = public.calib
        rec = {"source": source, "rows": len(calib), "seed": seed, "train_split": False}
    return dataclasses.replace(data, calib=calib, calib_source=rec)


def arrays_dataset(inputs: dict[str, np.ndarray], y: np.ndarray | None, where: str) -> tuple[ArrayDataset, np.ndarray | None]:
    """Check and wrap named arrays (float64 inputs and targets become float32, integer targets int64)."""
    check_arrays(inputs, y, where)
    y = None if y is None else _normalise_targets(y)
    fixed = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in inputs.items()}
    return ArrayDataset(fixed, y), y


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
