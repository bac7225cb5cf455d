"""Runtime sessions: one ``Session`` protocol over every runtime keiryo measures on.

A session runs the *shipped* file (or, for ``torch``, the module) with an explicit
intra-op thread count. Runtimes register a factory ``open(source, threads) -> Session``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from keiryo._registry import Registry

__all__ = ["RUNTIMES", "Session", "SessionFactory", "open_session", "register_runtime", "unavailable_reason"]


@runtime_checkable
class Session(Protocol):
    """Runs a model on numpy inputs. Use it as a context manager."""

    runtime: str
    threads: int
    input_names: list[str]
    output_names: list[str]

    def run(self, inputs: dict[str, np.ndarray] | np.ndarray) -> list[np.ndarray]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Session: ...

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None: ...


SessionFactory = Callable[[Any, int], Session]
RUNTIMES: Registry[SessionFactory] = Registry("runtime")


_UNAVAILABLE: dict[str, str | Callable[[], str | None]] = {}


def register_runtime(
    name: str, *, unavailable: str | Callable[[], str | None] | None = None
) -> Callable[[SessionFactory], SessionFactory]:
    """Register a session factory; ``unavailable`` says why the runtime cannot run models on this machine
    (or is a check that says so when asked: a browser that may be installed later)."""
    if unavailable:
        _UNAVAILABLE[name] = unavailable
    return RUNTIMES.register(name)


def unavailable_reason(runtime: str) -> str | None:
    """Why ``runtime`` cannot run models here (Core ML off Apple platforms, no Chromium), or None when it can."""
    _load_builtin()
    why = _UNAVAILABLE.get(runtime)
    return why() if callable(why) else why


def open_session(runtime: str, source: str | Path | Any, threads: int = 1) -> Session:
    """Open ``source`` (a model file, or a module for ``torch``) on ``runtime`` with ``threads``."""
    _load_builtin()
    return RUNTIMES.get(runtime)(source, threads)


def _load_builtin() -> None:
    # Importing registers; the heavy backends themselves are imported inside the factories.
    from keiryo.runtime import coreml, fake, litert, onnxruntime, torch, web  # noqa: F401
