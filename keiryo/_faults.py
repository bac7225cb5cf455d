"""Named fault points, so that tests can kill a process exactly where a crash would hurt most.

``KEIRYO_FAULT=NAME`` makes the process SIGKILL itself when it reaches ``fault_point("NAME")``;
``KEIRYO_FAULT=NAME:powerloss`` first discards every write not yet made durable (see
:mod:`keiryo._atomic`: files written but not fsynced are cut back to their last synced length),
which is what a power cut does to a page cache. ``NAME@N`` fires on the N-th time the point is
reached in the process (the first by default). Unset (always, outside tests), a fault point
costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["fault_point"]

_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("KEIRYO_FAULT")
    if not spec:
        return
    want, _, mode = spec.partition(":")
    want, _, nth = want.partition("@")
    if want != name:
        return
    _HITS[name] = _HITS.get(name, 0) + 1
    if _HITS[name] < int(nth or 1):
        return
    if mode == "powerloss":
        from keiryo._atomic import discard_unsynced

        discard_unsynced()
    os.kill(os.getpid(), signal.SIGKILL)
