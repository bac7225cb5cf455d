"""Resolve ``path/to/file.py:attr`` and ``package.module:attr`` references to callables."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keiryo.errors import ConfigError, InputFileError


def resolve_callable(ref: str, what: str) -> Callable[..., Any]:
    """Import ``ref`` ('file.py:name' or 'pkg.mod:name') and return the callable it names."""
    if ":" not in ref:
        raise ConfigError(f"{what} {ref!r}: expected 'path/to/file.py:function' or 'package.module:function'")
    mod_ref, _, attr = ref.rpartition(":")
    if not attr or not mod_ref:
        raise ConfigError(f"{what} {ref!r}: expected 'path/to/file.py:function' or 'package.module:function'")
    if mod_ref.endswith(".py") or "/" in mod_ref or "\\" in mod_ref:
        path = Path(mod_ref)
        if not path.is_file():
            raise InputFileError(f"{what} {ref!r}: file {path} not found")
        mod_name = f"_keiryo_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise InputFileError(f"{what} {ref!r}: cannot import {path} as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # user code: report whatever it raised, in one line
            sys.modules.pop(mod_name, None)
            raise ConfigError(f"{what} {ref!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(mod_ref)
        except ModuleNotFoundError as e:
            raise ConfigError(f"{what} {ref!r}: module {mod_ref!r} not found ({e})") from e
        except Exception as e:
            raise ConfigError(f"{what} {ref!r}: importing {mod_ref} failed: {type(e).__name__}: {e}") from e
    obj = getattr(module, attr, None)
    if obj is None:
        raise ConfigError(f"{what} {ref!r}: {mod_ref} has no attribute {attr!r}")
    if not callable(obj):
        raise ConfigError(f"{what} {ref!r}: {attr!r} is not callable")
    return obj
