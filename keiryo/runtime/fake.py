"""A deterministic fake session for tests of the layers above runtimes.

``FakeSession(fn)`` wraps a numpy function; opened by name it is the identity
on a flattened input, which is enough to test evaluation and benchmarking code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from keiryo.runtime import register_runtime
from keiryo.runtime._base import SessionBase


class FakeSession(SessionBase):
    runtime = "fake"

    def __init__(
        self, fn: Callable[[np.ndarray], np.ndarray] | None = None, threads: int = 1, input_names: list[str] | None = None
    ):
        self.fn = fn or (lambda x: x.reshape(x.shape[0], -1))
        self.threads = threads
        self.input_names = list(input_names or ["input"])
        self.output_names = ["output"]
        self.calls = 0

    def run(self, inputs: dict[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        self.calls += 1
        return [np.asarray(self.fn(self._feed(inputs)[self.input_names[0]]))]


@register_runtime("fake")
def open_fake(source: Any, threads: int) -> FakeSession:
    return FakeSession(source if callable(source) else None, threads)
