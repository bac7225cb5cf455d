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
