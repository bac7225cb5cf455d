"""Core ML session (``coremltools`` ``MLModel.predict``): macOS only.

Elsewhere opening a session is a clear error; keiryo validates Core ML packages structurally
there (:func:`keiryo.export.coreml.validate_mlpackage`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from keiryo.errors import InputFileError, RuntimeSessionError, first_line
from keiryo.runtime import register_runtime
from keiryo.runtime._base import SessionBase

CAN_PREDICT = sys.platform == "darwin"
NO_PREDICT_REASON = "Core ML runs models only on macOS/iOS; on this platform the package is validated structurally"


class CoremlSession(SessionBase):
    runtime = "coreml"

    def __init__(self, path: str | Path, threads: int = 1):
        from keiryo.export.coreml import coremltools

        p = Path(path)
        if not CAN_PREDICT:
            raise RuntimeSessionError(f"{p}: cannot run a Core ML model here: {NO_PREDICT_REASON}")
        ct = coremltools()
        if not p.exists():
            raise InputFileError(f"{p}: Core ML package not found")
        try:
            self._m = ct.models.MLModel(str(p), compute_units=ct.ComputeUnit.CPU_ONLY)
        except Exception as e:
            raise InputFileError(f"{p}: Core ML cannot load this package ({first_line(e, 300)})") from e
        spec = self._m.get_spec()
        self.path = p
        self.threads = threads  # Core ML chooses its own threads; recorded for the report
        self.input_names = [i.name for i in spec.description.input]
        self.output_names = [o.name for o in spec.description.output]

    def run(self, inputs: dict[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        feed = self._feed(inputs)
        n = next(iter(feed.values())).shape[0]
        outs: list[list[np.ndarray]] = [[] for _ in self.output_names]
        for r in range(n):  # the package is exported at batch 1
            res = self._m.predict({k: v[r : r + 1].astype(np.float32) for k, v in feed.items()})
            for i, name in enumerate(self.output_names):
                outs[i].append(np.asarray(res[name], dtype=np.float32))
        return [np.concatenate(o) for o in outs]


@register_runtime("coreml", unavailable=None if CAN_PREDICT else NO_PREDICT_REASON)
def open_coreml(source: str | Path, threads: int) -> CoremlSession:
    return CoremlSession(source, threads)
