"""keiryo (軽量): make a trained PyTorch model lightweight for the machine it must run on.

The public API is small and stable; heavy backends (onnx, onnxruntime, litert,
coremltools, ray) are imported only when a function needs them.
"""

from __future__ import annotations

from importlib import metadata as _metadata
from typing import Any

from keiryo.errors import (
    BackendUnavailableError,
    ConfigError,
    ConstraintNotMetError,
    DataError,
    ExportError,
    InputFileError,
    IntegrityError,
    KeiryoError,
    ModelLoadError,
    PackageNotFoundError,
    ParityError,
    PassError,
    RuntimeSessionError,
    UnsupportedOpError,
)

try:
    __version__ = _metadata.version("keiryo")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+local"

__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "ConstraintNotMetError",
    "DataError",
    "ExportError",
    "InputFileError",
    "IntegrityError",
    "KeiryoError",
    "ModelLoadError",
    "PackageNotFoundError",
    "ParityError",
    "PassError",
    "RuntimeSessionError",
    "UnsupportedOpError",
    "__version__",
    "apply",
    "compress",
    "export",
    "get_task",
    "load_data",
    "load_model",
    "load_recipe",
    "open_session",
    "optimize",
    "package",
    "PackageStore",
    "train",
    "verify",
]

_LAZY = {
    "apply": ("keiryo.passes", "apply"),
    "compress": ("keiryo.pipeline", "compress"),
    "export": ("keiryo.export", "export"),
    "get_task": ("keiryo.tasks", "get_task"),
    "load_data": ("keiryo.data", "load_data"),
    "load_model": ("keiryo.model", "load_model"),
    "load_recipe": ("keiryo.pipeline", "load_recipe"),
    "open_session": ("keiryo.runtime", "open_session"),
    "optimize": ("keiryo.search.optimize", "optimize"),
    "train": ("keiryo.train", "train"),
    "package": ("keiryo.packages", "package"),
    "verify": ("keiryo.packages", "verify"),
    "PackageStore": ("keiryo.packages.store", "PackageStore"),
}


def __getattr__(name: str) -> Any:
    """Import public functions on first use so ``import keiryo`` stays lean."""
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'keiryo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
