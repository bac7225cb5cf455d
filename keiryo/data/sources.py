"""One reader per data source; each returns :class:`RawData` (named input arrays + targets).

Built-in sources: ``digits`` (scikit-learn's bundled images), ``font-digits`` (digits rendered from the
fonts inside matplotlib, preprocessed like ``digits``: public data for pretraining), ``sensors`` (generated
sensor windows with a numeric target: regression), ``tokens`` (generated token-id
sequences with an attention mask: sequence classification). Files: ``.npz`` and
``.safetensors`` of named arrays, ``.csv``, image folders (read lazily, with declared
preprocessing), and ``module:function`` returning torch Datasets.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.data.splits import DataSpec, RawData, arrays_dataset
from keiryo.errors import ConfigError, DataError, InputFileError, first_line


class ImageOptions(KeiryoConfig):
    size: int | None = Field(None, ge=2, le=2048, description="resize to size x size (None keeps the original)")
    channels: int = Field(1, description="1 (grey) or 3 (RGB)")
    name: str = Field("image", description="the model input's name")

    def model_post_init(self, _: Any) -> None:
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}")


class FolderOptions(KeiryoConfig):
    """Image folders: declared preprocessing, recorded in the manifest so a server or device reproduces it."""

    size: int = Field(32, ge=2, le=4096, description="resize the shorter side to this (then crop)")
    crop: int | None = Field(None, ge=2, le=4096, description="center crop to crop x crop (default: size x size, no crop)")
    channels: int = Field(3, description="1 (grey) or 3 (RGB)")
    mean: list[float] | None = Field(None, description="per-channel mean subtracted after scaling to [0, 1]")
    std: list[float] | None = Field(None, description="per-channel std divided after the mean")
    channel_order: Literal["RGB", "BGR"] = "RGB"
    name: str = Field("image", description="the model input's name")

    def model_post_init(self, _: Any) -> None:
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}")
        for k in ("mean", "std"):
            v = getattr(self, k)
            if v is not None and len(v) != self.channels:
                raise ConfigError(f"{k} needs {self.channels} value(s), got {len(v)}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ConfigError(f"std values must be > 0, got {self.std}")


class CsvOptions(KeiryoConfig):
    label: str | None = Field("label", description="the target column (None: no targets)")
    features: list[str] | None = Field(None, description="feature columns (default: every other column)")
    name: str = Field("features", description="the model input's name")
    standardize: bool = Field(True, description="subtract the mean and divide by the std of each feature")


class ArraysOptions(KeiryoConfig):
    label: str | None = Field("y", description="the array holding the targets (None: no targets)")
    inputs: list[str] | None = Field(None, description="input arrays in the model's order (default: all other arrays)")


class FontDigitOptions(ImageOptions):
    samples: int = Field(10000, ge=10, le=1_000_000, description="how many digits to render (classes balanced)")


class SensorOptions(KeiryoConfig):
    samples: int = Field(2000, ge=10, le=1_000_000)
    channels: int = Field(3, ge=1, le=64)
    length: int = Field(64, ge=8, le=4096)


class TokenOptions(KeiryoConfig):
    samples: int = Field(2000, ge=10, le=1_000_000)
    vocab: int = Field(1000, ge=16, le=1_000_000)
    seq: int = Field(32, ge=4, le=4096)
    classes: int = Field(2, ge=2, le=100)


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
    return _digit_images(d.images, d.target.astype(np.int64), opts, "sklearn.load_digits", "digits")


def _digit_images(images: np.ndarray, y: np.ndarray, opts: ImageOptions, source: str, where: str) -> RawData:
    """8x8 digit images of ink counts 0..16 (the UCI preprocessing), scaled to [0, 1] and resized as asked."""
    x = _resize((images.astype(np.float32) / 16.0)[:, None], opts.size, opts.channels)
    prep = {
        "source": source,
        "scale": "pixel / 16",
        "size": opts.size or 8,
        "channels": opts.channels,
        "layout": "NCHW",
        "resize": "bilinear",
    }
    ds, yy = arrays_dataset({opts.name: x}, y, where)
    return RawData(ds, yy, [str(i) for i in range(10)], prep)


def read_font_digits(spec: DataSpec) -> RawData:
    """Digits rendered from fonts (keiryo.data.fonts), the same scale, layout and names as ``digits``."""
    from keiryo.data.fonts import render_digits

    opts = FontDigitOptions.parse(spec.options, where="font-digits options")
    images, y = render_digits(opts.samples, spec.seed + 4242)
    return _digit_images(images, y, opts, "keiryo.data.fonts", "font-digits")


def read_sensors(spec: DataSpec) -> RawData:
    """Multichannel sensor windows; the target is the next value of channel 0 (a forecasting regression)."""
    opts = SensorOptions.parse(spec.options, where="sensors options")
    rng = np.random.default_rng(spec.seed + 12345)
    n, c, length = opts.samples, opts.channels, opts.length
    t = np.arange(length + 1, dtype=np.float64)
    freq = rng.uniform(0.02, 0.2, size=(n, c, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(n, c, 1))
    amp = rng.uniform(0.5, 2.0, size=(n, c, 1))
    trend = rng.normal(0, 0.01, size=(n, c, 1)) * t
    series = amp * np.sin(2 * np.pi * freq * t + phase) + trend + rng.normal(0, 0.05, size=(n, c, length + 1))
    x = series[:, :, :length].astype(np.float32)
    y = series[:, 0, length].astype(np.float32)
    prep = {"source": "generated sensors", "layout": "NCL", "target": "next value of channel 0"}
    ds, yy = arrays_dataset({"series": x}, y, "sensors")
    return RawData(ds, yy, [], prep)


def read_tokens(spec: DataSpec) -> RawData:
    """Padded token-id sequences and masks; the class is which keyword family appears most."""
    opts = TokenOptions.parse(spec.options, where="tokens options")
    rng = np.random.default_rng(spec.seed + 777)
    n, seq, k = opts.samples, opts.seq, opts.classes
    ids = rng.integers(k * 4 + 2, opts.vocab, size=(n, seq), dtype=np.int64)
    lengths = rng.integers(seq // 3, seq + 1, size=n)
    y = rng.integers(0, k, size=n).astype(np.int64)
    for i in range(n):
        pos = rng.choice(lengths[i], size=max(1, lengths[i] // 6), replace=False)
        ids[i, pos] = 2 + y[i] * 4 + rng.integers(0, 4, size=len(pos))  # class keywords
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)  # 0 = padding
    ids[:, 0] = 1  # 1 = [CLS]
    prep = {"source": "generated tokens", "vocab": opts.vocab, "seq": seq, "pad_id": 0, "cls_id": 1}
    ds, yy = arrays_dataset({"input_ids": ids, "attention_mask": mask}, y, "tokens")
    return RawData(ds, yy, [f"class{i}" for i in range(k)], prep)


def _named_arrays(arrays: dict[str, np.ndarray], opts: ArraysOptions, path: Path) -> RawData:
    if not arrays:
        raise DataError(f"{path}: holds no arrays; expected named input arrays and a label array")
    if opts.label is not None and opts.label not in arrays:
        raise DataError(
            f"{path}: label array {opts.label!r} not found; arrays are {sorted(arrays)} "
            "(set --data-opt label=NAME, or label=null for no targets)"
        )
    names = opts.inputs or [k for k in arrays if k != opts.label]
    missing = [k for k in names if k not in arrays]
    if missing:
        raise DataError(f"{path}: input array(s) {missing} not found; arrays are {sorted(arrays)}")
    if not names:
        raise DataError(f"{path}: no input arrays besides the label array {opts.label!r}")
    y = arrays[opts.label] if opts.label is not None else None
    ds, yy = arrays_dataset({k: arrays[k] for k in names}, y, str(path))
    return RawData(ds, yy, [], {"source": path.suffix.lstrip("."), "scale": "as stored", "inputs": names})


def read_npz(spec: DataSpec) -> RawData:
    opts = ArraysOptions.parse(spec.options, where=f"{spec.source} options")
    path = Path(spec.source)
    _require_file(path, "an .npz file of named arrays (inputs and a label array)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        raise InputFileError(f"{path}: cannot read .npz ({e}); object arrays (pickles) are refused") from e
    except Exception as e:
        raise InputFileError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    return _named_arrays(arrays, opts, path)


def read_safetensors(spec: DataSpec) -> RawData:
    opts = ArraysOptions.parse(spec.options, where=f"{spec.source} options")
    path = Path(spec.source)
    _require_file(path, "a .safetensors file of named arrays (inputs and a label array)")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputFileError(f"{path}: not a valid safetensors file ({e})") from e
    return _named_arrays(dict(arrays), opts, path)


def read_csv(spec: DataSpec) -> RawData:
    import csv

    opts = CsvOptions.parse(spec.options, where=f"{spec.source} options")
    path = Path(spec.source)
    _require_file(path, "a CSV file with a header row")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r]
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(f"{path}: cannot read CSV ({e})") from e
    if len(rows) < 2:
        raise DataError(f"{path}: expected a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if opts.label is not None and opts.label not in header:
        raise DataError(f"{path}: label column {opts.label!r} not found; columns are {header}")
    feat_names = opts.features or [h for h in header if h != opts.label]
    unknown = [h for h in feat_names if h not in header]
    if unknown:
        raise DataError(f"{path}: feature column(s) {unknown} not found; columns are {header}")
    fi = [header.index(h) for h in feat_names]
    feats = []
    for n, r in enumerate(rows[1:], start=2):
        if len(r) != len(header):
            raise DataError(f"{path}: line {n} has {len(r)} fields, expected {len(header)}")
        try:
            feats.append([float(r[i]) for i in fi])
        except ValueError as e:
            raise DataError(f"{path}: line {n}: non-numeric feature ({e})") from e
    x = np.asarray(feats, dtype=np.float32)
    prep: dict[str, Any] = {"source": "csv", "label": opts.label, "features": feat_names}
    if opts.standardize:
        mean, std = x.mean(axis=0), x.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        x = (x - mean) / std
        prep["standardize"] = {"mean": mean.tolist(), "std": std.tolist()}
    classes: list[str] = []
    y = None
    if opts.label is not None:
        li = header.index(opts.label)
        raw = [r[li].strip() for r in rows[1:]]
        try:
            y = np.asarray([int(v) for v in raw], dtype=np.int64)  # integer labels (or counts)
        except ValueError:
            try:
                y = np.asarray([float(v) for v in raw], dtype=np.float32)  # a numeric target
            except ValueError:
                classes = sorted(set(raw))  # class names
                cmap = {c: i for i, c in enumerate(classes)}
                y = np.asarray([cmap[v] for v in raw], dtype=np.int64)
    ds, yy = arrays_dataset({opts.name: x.astype(np.float32)}, y, str(path))
    return RawData(ds, yy, classes, prep)


class ImageFolderDataset:
    """Images read from disk when asked for: one class per sub-folder, declared preprocessing."""

    def __init__(self, files: list[Path], labels: np.ndarray, opts: FolderOptions):
        self.files, self.labels, self.opts = files, labels, opts

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[dict[str, np.ndarray], Any]:
        return {self.opts.name: load_image(self.files[i], self.opts)}, self.labels[i]


def load_image(path: Path, opts: FolderOptions) -> np.ndarray:
    """Read one image and apply the declared preprocessing: (C, H, W) float32."""
    from PIL import Image, UnidentifiedImageError

    mode = "L" if opts.channels == 1 else "RGB"
    try:
        with Image.open(path) as f:
            im: Image.Image = f.convert(mode)
            w, h = im.size
            scale = opts.size / min(w, h)
            if opts.crop is None:
                im = im.resize((opts.size, opts.size), Image.Resampling.BILINEAR)
            else:
                im = im.resize((max(opts.crop, round(w * scale)), max(opts.crop, round(h * scale))), Image.Resampling.BILINEAR)
                w2, h2 = im.size
                left, top = (w2 - opts.crop) // 2, (h2 - opts.crop) // 2
                im = im.crop((left, top, left + opts.crop, top + opts.crop))
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise InputFileError(f"{path}: not a readable image ({e})") from e
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if opts.channels == 3 and opts.channel_order == "BGR":
        arr = arr[::-1]
    if opts.mean is not None:
        arr = arr - np.asarray(opts.mean, dtype=np.float32)[:, None, None]
    if opts.std is not None:
        arr = arr / np.asarray(opts.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_image_folder(spec: DataSpec) -> RawData:
    opts = FolderOptions.parse(spec.options, where=f"{spec.source} options")
    root = Path(spec.source)
    if not root.is_dir():
        raise InputFileError(f"{root}: not a directory; expected an image folder with one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class sub-folder(s); expected one sub-folder per class, at least 2")
    files: list[Path] = []
    labels: list[int] = []
    for ci, c in enumerate(classes):
        found = sorted(p for p in (root / c).iterdir() if p.is_file() and not p.name.startswith("."))
        files += found
        labels += [ci] * len(found)
    if not files:
        raise DataError(f"{root}: no images found in the class sub-folders")
    y = np.asarray(labels, dtype=np.int64)
    ds = ImageFolderDataset(files, y, opts)
    load_image(files[0], opts)  # a broken first file or option fails now, with its name
    side = opts.crop or opts.size
    prep = {
        "source": "image_folder",
        "scale": "pixel / 255",
        "resize": f"shorter side to {opts.size}, bilinear" if opts.crop else f"{opts.size}x{opts.size}, bilinear",
        "crop": f"center {opts.crop}x{opts.crop}" if opts.crop else None,
        "size": side,
        "channels": opts.channels,
        "channel_order": opts.channel_order if opts.channels == 3 else "grey",
        "mean": opts.mean,
        "std": opts.std,
        "layout": "NCHW",
    }
    return RawData(ds, y, classes, prep)


class FactoryDataset:
    """A user's Dataset whose items are checked and turned into ({name: array}, target)."""

    def __init__(self, ds: Any, where: str, names: list[str] | None = None, arity: int | None = None):
        self.ds, self.where, self.names, self.arity = ds, where, names, arity

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[dict[str, np.ndarray], Any]:
        item = self.ds[i]
        inputs, target = _item(item, f"{self.where}[{i}]", self.arity)
        if self.names is not None and sorted(inputs) != sorted(self.names):
            raise DataError(f"{self.where}[{i}]: inputs {sorted(inputs)} differ from the first item's {sorted(self.names)}")
        return inputs, target


def _array(v: Any, where: str) -> np.ndarray:
    import torch

    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    try:
        a = np.asarray(v)
    except Exception as e:
        raise DataError(f"{where}: cannot read a {type(v).__name__} as an array ({first_line(e)})") from e
    if a.dtype == object:
        raise DataError(f"{where}: holds a {type(v).__name__} that is not a numeric array")
    return a


def _item(item: Any, where: str, arity: int | None) -> tuple[dict[str, np.ndarray], Any]:
    """Items: {names..., 'label'?}, (inputs, target), (x1, x2, ..., target) or one tensor (no target)."""
    import torch

    if isinstance(item, dict):
        label_key = next((k for k in ("label", "labels", "target", "y") if k in item), None)
        inputs = {str(k): _array(v, f"{where}[{k!r}]") for k, v in item.items() if k != label_key}
        target = None if label_key is None else _array(item[label_key], f"{where}[{label_key!r}]")
        return inputs, target
    if isinstance(item, torch.Tensor | np.ndarray):
        return {"input": _array(item, where)}, None
    if isinstance(item, (tuple, list)):
        if arity is not None and len(item) != arity:
            raise DataError(f"{where}: item has {len(item)} elements but the first item had {arity}")
        if len(item) < 2:
            raise DataError(f"{where}: a tuple item needs (inputs..., target), got {len(item)} element(s)")
        *xs, target = item
        if len(xs) == 1 and isinstance(xs[0], dict):
            return {str(k): _array(v, f"{where}[0][{k!r}]") for k, v in xs[0].items()}, _array(target, f"{where}[-1]")
        names = ["input"] if len(xs) == 1 else [f"input_{j}" for j in range(len(xs))]
        return {n: _array(v, f"{where}[{j}]") for j, (n, v) in enumerate(zip(names, xs, strict=True))}, _array(
            target, f"{where}[-1]"
        )
    raise DataError(f"{where}: items must be dicts of tensors, tuples (inputs..., target) or tensors; got {type(item).__name__}")


def _factory_dataset(ds: Any, where: str) -> tuple[FactoryDataset, np.ndarray | None]:
    """Check every item's structure once (the first fully), collecting only the targets."""
    from torch.utils.data import Dataset

    if not isinstance(ds, Dataset) or not hasattr(ds, "__len__"):
        raise DataError(f"{where} is a {type(ds).__name__}, expected a map-style torch Dataset (with __len__)")
    n = len(ds)
    if n == 0:
        raise DataError(f"{where} is empty")
    first = ds[0]
    inputs, target = _item(first, f"{where}[0]", None)
    arity = len(first) if isinstance(first, (tuple, list)) else None
    fds = FactoryDataset(ds, where, list(inputs), arity)
    shapes = {k: (v.shape, v.dtype) for k, v in inputs.items()}
    targets = []
    for i in range(n):
        got, t = fds[i]
        for k, v in got.items():
            if (v.shape, v.dtype) != shapes[k]:
                raise DataError(
                    f"{where}[{i}]: input {k!r} has shape {v.shape} {v.dtype}, the first item's is {shapes[k][0]} {shapes[k][1]}"
                )
        if (t is None) != (target is None):
            raise DataError(f"{where}[{i}]: some items have a target and others not")
        if t is not None:
            targets.append(t)
    y = None if target is None else np.stack(targets)
    if y is not None and np.issubdtype(y.dtype, np.integer):
        y = y.astype(np.int64)
    return fds, y


def read_factory(spec: DataSpec) -> RawData:
    """``module:function`` returning a Dataset, a (train, val, test) tuple, or a dict of those splits."""
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
    except Exception as e:
        raise DataError(f"data factory {spec.source!r} raised {type(e).__name__}: {first_line(e)}") from e
    prep = {"source": "factory", "factory": spec.source}
    where = f"data factory {spec.source!r}:"
    if isinstance(out, dict) or (isinstance(out, (tuple, list)) and len(out) == 3):
        if isinstance(out, dict):
            parts = {k: out[k] for k in ("train", "val", "test") if k in out}
            if "train" not in parts:
                raise DataError(f"data factory {spec.source!r}: the dict must hold 'train' (and 'val', 'test')")
        else:
            parts = dict(zip(("train", "val", "test"), out, strict=True))
        checked = {k: _factory_dataset(d, f"{where} {k}") for k, d in parts.items()}
        if set(checked) == {"train", "val", "test"}:
            return RawData(None, None, [], prep, presplit={k: v[0] for k, v in checked.items()})
        ds, y = checked["train"]
        return RawData(ds, y, [], prep)
    if isinstance(out, (tuple, list)):
        raise DataError(f"data factory {spec.source!r}: expected (train, val, test), got a sequence of {len(out)}")
    ds, y = _factory_dataset(out, f"{where} dataset")
    return RawData(ds, y, [], prep)


def _require_file(path: Path, expected: str) -> None:
    if not path.exists():
        raise InputFileError(f"{path}: file not found; expected {expected}")
    if not path.is_file():
        raise InputFileError(f"{path}: not a file; expected {expected}")


BUILTIN = {"digits": read_digits, "font-digits": read_font_digits, "sensors": read_sensors, "tokens": read_tokens}


def read_source(spec: DataSpec) -> RawData:
    src = spec.source
    if src in BUILTIN:
        return BUILTIN[src](spec)
    p = Path(src)
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return read_npz(spec)
    if suffix == ".safetensors":
        return read_safetensors(spec)
    if suffix == ".csv":
        return read_csv(spec)
    if p.is_dir() or src.endswith("/"):
        return read_image_folder(spec)
    if ":" in src:
        return read_factory(spec)
    raise ConfigError(
        f"data {src!r}: expected {', '.join(BUILTIN)}, a .npz/.safetensors/.csv file, an image folder, or 'module:function'"
        + ("" if p.exists() else " (no such file or directory)")
    )
