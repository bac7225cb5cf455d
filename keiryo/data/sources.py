"""One reader per data source; each returns :class:`RawData`."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.data.splits import DataSpec, RawData
from keiryo.errors import ConfigError, DataError, InputFileError


class ImageOptions(KeiryoConfig):
    size: int | None = Field(None, ge=2, le=1024, description="resize to size x size (None keeps the original)")
    channels: int = Field(1, description="1 (grey) or 3 (RGB)")

    def model_post_init(self, _: Any) -> None:
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}")


class CsvOptions(KeiryoConfig):
    label: str = Field("label", description="name of the label column")


def _resize(x: np.ndarray, size: int | None, channels: int) -> np.ndarray:
    """x: (N, C, H, W) float32 in [0, 1] -> resized, with 1 or 3 channels."""
    import torch
    from torch.nn import functional as F

    t = torch.from_numpy(x)
    if size is not None and tuple(t.shape[-2:]) != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    if t.shape[1] != channels:
        t = t.mean(dim=1, keepdim=True) if channels == 1 else t.expand(-1, channels, -1, -1)
    return np.ascontiguousarray(t.numpy(), dtype=np.float32)


def read_digits(spec: DataSpec) -> RawData:
    from sklearn.datasets import load_digits

    opts = ImageOptions.parse(spec.options, where="digits options")
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    x = _resize(x, opts.size, opts.channels)
    prep = {
        "source": "sklearn.load_digits",
        "scale": "pixel / 16",
        "size": opts.size or 8,
        "channels": opts.channels,
        "layout": "NCHW",
        "resize": "bilinear",
    }
    return RawData(x, d.target.astype(np.int64), [str(i) for i in range(10)], prep)


def read_npz(spec: DataSpec) -> RawData:
    if spec.options:
        raise ConfigError(f"{spec.source}: .npz data takes no options, got {sorted(spec.options)}")
    path = Path(spec.source)
    _require_file(path, "an .npz file with arrays 'x' and 'y'")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"x", "y"} - set(z.files)
            if missing:
                raise DataError(f"{path}: missing array(s) {sorted(missing)}; expected arrays 'x' and 'y', found {z.files}")
            x, y = z["x"], z["y"]
    except DataError:
        raise
    except ValueError as e:
        raise InputFileError(f"{path}: cannot read .npz ({e}); object arrays (pickles) are refused") from e
    except Exception as e:
        raise InputFileError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    return RawData(
        x.astype(np.float32) if np.issubdtype(x.dtype, np.number) else x, y, [], {"source": "npz", "scale": "as stored"}
    )


def read_csv(spec: DataSpec) -> RawData:
    import csv

    opts = CsvOptions.parse(spec.options, where=f"{spec.source} options")
    path = Path(spec.source)
    _require_file(path, "a CSV file with a header row")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(f"{path}: cannot read CSV ({e})") from e
    if len(rows) < 2:
        raise DataError(f"{path}: expected a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if opts.label not in header:
        raise DataError(f"{path}: label column {opts.label!r} not found; columns are {header}")
    li = header.index(opts.label)
    labels_raw = [r[li].strip() for r in rows[1:] if r]
    classes = sorted(set(labels_raw), key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))
    cmap = {c: i for i, c in enumerate(classes)}
    feats = []
    for n, r in enumerate(rows[1:], start=2):
        if not r:
            continue
        if len(r) != len(header):
            raise DataError(f"{path}: line {n} has {len(r)} fields, expected {len(header)}")
        try:
            feats.append([float(v) for i, v in enumerate(r) if i != li])
        except ValueError as e:
            raise DataError(f"{path}: line {n}: non-numeric feature ({e})") from e
    x = np.asarray(feats, dtype=np.float32)
    y = np.asarray([cmap[v] for v in labels_raw], dtype=np.int64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    x = (x - mean) / std
    prep = {
        "source": "csv",
        "label": opts.label,
        "features": [h for i, h in enumerate(header) if i != li],
        "standardize": {"mean": mean.tolist(), "std": std.tolist()},
    }
    return RawData(x, y, classes, prep)


def read_image_folder(spec: DataSpec) -> RawData:
    from PIL import Image, UnidentifiedImageError

    opts = ImageOptions.parse(spec.options, where=f"{spec.source} options")
    root = Path(spec.source)
    if not root.is_dir():
        raise InputFileError(f"{root}: not a directory; expected an image folder with one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class sub-folder(s); expected one sub-folder per class, at least 2")
    size = opts.size or 32
    mode = "L" if opts.channels == 1 else "RGB"
    xs, ys = [], []
    for ci, c in enumerate(classes):
        files = sorted(p for p in (root / c).iterdir() if p.is_file() and not p.name.startswith("."))
        for f in files:
            try:
                with Image.open(f) as im:
                    arr = np.asarray(im.convert(mode).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError) as e:
                raise InputFileError(f"{f}: not a readable image ({e})") from e
            xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            ys.append(ci)
    if not xs:
        raise DataError(f"{root}: no images found in the class sub-folders")
    prep = {"source": "image_folder", "scale": "pixel / 255", "size": size, "channels": opts.channels, "layout": "NCHW"}
    return RawData(np.stack(xs), np.asarray(ys, dtype=np.int64), classes, prep)


def read_factory(spec: DataSpec) -> RawData:
    """``module:function`` returning a Dataset, a (train, val, test) tuple, or a dict of those splits."""
    import torch
    from torch.utils.data import Dataset

    from keiryo._imports import resolve_callable

    fn = resolve_callable(spec.source, "data factory")
    params = inspect.signature(fn).parameters
    kwargs = dict(spec.options)
    if "seed" in params and "seed" not in kwargs:
        kwargs["seed"] = spec.seed
    try:
        out = fn(**kwargs)
    except TypeError as e:
        raise ConfigError(f"data factory {spec.source!r}: calling it with {sorted(kwargs)} failed: {e}") from e

    def materialize(ds: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(ds, Dataset):
            raise DataError(f"data factory {spec.source!r}: {name} is a {type(ds).__name__}, expected a torch Dataset")
        n = len(ds)  # type: ignore[arg-type]
        if n == 0:
            raise DataError(f"data factory {spec.source!r}: {name} is empty")
        xs, ys = [], []
        for i in range(n):
            item = ds[i]
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise DataError(f"data factory {spec.source!r}: {name}[{i}] must be a (input, label) pair")
            xs.append(torch.as_tensor(item[0], dtype=torch.float32))
            ys.append(int(item[1]))
        return torch.stack(xs).numpy(), np.asarray(ys, dtype=np.int64)

    prep = {"source": "factory", "factory": spec.source}
    if isinstance(out, dict):
        parts = {k: materialize(out[k], k) for k in ("train", "val", "test") if k in out}
        if "train" not in parts:
            raise DataError(f"data factory {spec.source!r}: the dict must hold 'train' (and 'val', 'test')")
        return _presplit_or_pool(parts, prep)
    if isinstance(out, (tuple, list)):
        if len(out) != 3:
            raise DataError(f"data factory {spec.source!r}: expected (train, val, test), got a sequence of {len(out)}")
        names = ("train", "val", "test")
        return _presplit_or_pool({n: materialize(d, n) for n, d in zip(names, out, strict=True)}, prep)
    x, y = materialize(out, "dataset")
    return RawData(x, y, [], prep)


def _presplit_or_pool(parts: dict[str, tuple[np.ndarray, np.ndarray]], prep: dict[str, Any]) -> RawData:
    if set(parts) == {"train", "val", "test"}:
        x = np.concatenate([parts[k][0] for k in parts])
        y = np.concatenate([parts[k][1] for k in parts])
        return RawData(x, y, [], prep, presplit=parts)
    x, y = parts["train"]
    return RawData(x, y, [], prep)


def _require_file(path: Path, expected: str) -> None:
    if not path.exists():
        raise InputFileError(f"{path}: file not found; expected {expected}")
    if not path.is_file():
        raise InputFileError(f"{path}: not a file; expected {expected}")


def read_source(spec: DataSpec) -> RawData:
    src = spec.source
    if src == "digits":
        return read_digits(spec)
    p = Path(src)
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return read_npz(spec)
    if suffix == ".csv":
        return read_csv(spec)
    if p.is_dir() or src.endswith("/"):
        return read_image_folder(spec)
    if ":" in src:
        return read_factory(spec)
    raise ConfigError(
        f"data {src!r}: expected 'digits', a .npz or .csv file, an image folder, or 'module:function'"
        + ("" if p.exists() else " (no such file or directory)")
    )
