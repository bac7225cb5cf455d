"""Shared plumbing for sessions: context-manager methods and input normalisation."""

from __future__ import annotations

from types import TracebackType

import numpy as np

from keiryo.errors import RuntimeSessionError


class SessionBase:
    runtime = "base"
    threads = 1
    input_names: list[str]
    output_names: list[str]

    def _feed(self, inputs: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        if isinstance(inputs, np.ndarray):
            if len(self.input_names) != 1:
                raise RuntimeSessionError(f"model has inputs {self.input_names}; pass a dict, not one array")
            return {self.input_names[0]: inputs}
        unknown = set(inputs) - set(self.input_names)
        missing = set(self.input_names) - set(inputs)
        if unknown or missing:
            raise RuntimeSessionError(f"input names {sorted(inputs)} do not match the model's {self.input_names}")
        return inputs

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
