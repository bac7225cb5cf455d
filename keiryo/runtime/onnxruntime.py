"""onnxruntime CPU session with explicit intra-op threads and sequential execution."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from keiryo.errors import InputFileError, RuntimeSessionError, first_line
from keiryo.runtime import register_runtime
from keiryo.runtime._base import SessionBase


class OrtSession(SessionBase):
    runtime = "onnxruntime"

    def __init__(self, path: str | Path | bytes, threads: int = 1):
        import onnxruntime as ort  # a core dependency, imported only when a session opens

        # bytes: the model already in memory (a verified package loads exactly what it hashed)
        p = Path("<bytes>") if isinstance(path, bytes) else Path(path)
        if not isinstance(path, bytes) and not p.is_file():
            raise InputFileError(f"{p}: ONNX file not found")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        try:
            self._sess = ort.InferenceSession(path if isinstance(path, bytes) else str(p), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            msg = first_line(e)
            raise InputFileError(f"{p}: onnxruntime cannot load this model ({msg[:300]})") from e
        self.threads = threads
        self.path = p
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        feed = self._feed(inputs)
        try:
            return list(self._sess.run(None, feed))
        except Exception as e:
            raise RuntimeSessionError(f"{self.path}: onnxruntime run failed: {first_line(e, 300)}") from e


@register_runtime("onnxruntime")
def open_onnxruntime(source: str | Path | bytes, threads: int) -> OrtSession:
    return OrtSession(source, threads)
