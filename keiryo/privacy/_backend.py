"""Import an optional backend of the privacy layer, or say which extra installs it."""

from __future__ import annotations

import importlib
from typing import Any

from keiryo.errors import BackendUnavailableError


def require(module: str, what: str, extra: str) -> Any:
    """``import module``; a missing one is a :class:`BackendUnavailableError` naming ``keiryo[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailableError(what, extra) from e
