"""Crash trials: run a function in a forked child that kills itself at a named fault point."""

from __future__ import annotations

import os
from collections.abc import Callable


def run_killed(fault: str, fn: Callable[[], object]) -> int | None:
    """Run ``fn`` in a forked child with ``KEIRYO_FAULT=fault`` (``NAME`` or ``NAME:powerloss``, see
    :mod:`keiryo._faults`). Returns the signal that ended the child (SIGKILL when the point was
    reached), or None if it ran to the end without reaching it (exit status 0) or failed (3)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.environ["KEIRYO_FAULT"] = fault
            fn()
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
