"""Silence third-party chatter (per-node logs, prints, warnings) around calls that produce it."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Raise the root logger (and ``loggers``) to ERROR, swallow stdout and warnings; restore afterwards."""
    targets = [logging.getLogger(), *(logging.getLogger(n) for n in loggers)]
    levels = [t.level for t in targets]
    for t in targets:
        t.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for t, level in zip(targets, levels, strict=True):
            t.setLevel(level)


@contextlib.contextmanager
def silence_native_output() -> Iterator[None]:
    """Send file descriptors 1 and 2 to /dev/null (C++ converters log there, past Python's streams).

    Also turns off litert-torch's own progress printing. Python exceptions are unaffected.
    """
    import os
    import sys

    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
