"""LiteRT (TensorFlow Lite) session over the ``ai-edge-litert`` interpreter with XNNPACK and explicit threads.

- The file's default signature gives the input and output names (keiryo exports ``input`` -> ``logits``).
- Full-integer models take and give int8/uint8 tensors: the session quantizes float inputs with the
  input tensor's scale and zero point and dequantizes the outputs, so callers always see float32.
- Edge exports have a fixed batch of 1 (that is what the device runs); a larger batch is run one row
  per invoke, which is what the device would do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from keiryo.errors import BackendUnavailableError, InputFileError, RuntimeSessionError, first_line
from keiryo.runtime import register_runtime
from keiryo.runtime._base import SessionBase


def load_interpreter(path: str | Path | bytes, threads: int = 1, *, delegate: bool = True, where: str = "") -> Any:
    """An allocated ``ai_edge_litert`` interpreter (XNNPACK delegate unless ``delegate=False``, ``threads`` threads).

    ``path`` may be the model's bytes already in memory (a verified package loads what it hashed)."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError as e:
        raise BackendUnavailableError("the LiteRT interpreter (ai-edge-litert)", "tflite") from e
    content = path if isinstance(path, bytes) else None
    p = Path(where or "<bytes>") if content is not None else Path(path)  # type: ignore[arg-type]
    if content is None and not p.is_file():
        raise InputFileError(f"{p}: TFLite file not found")
    try:
        from keiryo._quiet import silence_native_output

        resolver = OpResolverType.BUILTIN if delegate else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        with silence_native_output():  # "INFO: Created TensorFlow Lite XNNPACK delegate" on stderr
            source = {"model_content": content} if content is not None else {"model_path": str(p)}
            it = Interpreter(**source, num_threads=threads, experimental_op_resolver_type=resolver)
            it.allocate_tensors()
    except Exception as e:  # the interpreter raises ValueError/RuntimeError with C++ text
        msg = first_line(e)
        raise InputFileError(f"{p}: the LiteRT interpreter cannot load this model ({msg[:300]})") from e
    return it


def op_census(path: str | Path) -> dict[str, int]:
    """Builtin op name -> count in a .tflite file (read without the XNNPACK delegate, which merges ops)."""
    from collections import Counter

    it = load_interpreter(path, delegate=False)
    return dict(Counter(str(o["op_name"]) for o in it._get_ops_details()))


class _Tensor:
    def __init__(self, d: dict[str, Any]):
        self.index = d["index"]
        self.name = d["name"]
        self.dtype = np.dtype(d["dtype"])
        self.shape = tuple(int(s) for s in d["shape"])
        scale, zero = d["quantization"]
        self.scale, self.zero = float(scale), int(zero)

    @property
    def quantized(self) -> bool:
        return self.dtype.kind in "iu" and self.scale > 0


class LiteRTSession(SessionBase):
    runtime = "litert"

    def __init__(self, path: str | Path | bytes, threads: int = 1):
        self.path = Path("<bytes>") if isinstance(path, bytes) else Path(path)
        self.threads = threads
        self._it = load_interpreter(path, threads)
        sigs = self._it.get_signature_list()
        if len(sigs) == 1:
            key = next(iter(sigs))
            runner = self._it.get_signature_runner(key)
            by_name_in = runner.get_input_details()
            by_name_out = runner.get_output_details()
            self.input_names = list(sigs[key]["inputs"])
            self.output_names = list(sigs[key]["outputs"])
            self._in = [_Tensor({**by_name_in[n], "name": n}) for n in self.input_names]
            self._out = [_Tensor({**by_name_out[n], "name": n}) for n in self.output_names]
            del runner  # it holds views into the interpreter's buffers
        else:
            self._in = [_Tensor(d) for d in self._it.get_input_details()]
            self._out = [_Tensor(d) for d in self._it.get_output_details()]
            self.input_names = [t.name for t in self._in]
            self.output_names = [t.name for t in self._out]

    @property
    def input_dtypes(self) -> list[str]:
        return [t.dtype.name for t in self._in]

    @property
    def batch(self) -> int:
        """The batch the file was exported at (-1: any)."""
        return self._in[0].shape[0]

    def _set(self, t: _Tensor, x: np.ndarray) -> None:
        if t.quantized:
            info = np.iinfo(t.dtype)
            x = np.clip(np.round(x / t.scale) + t.zero, info.min, info.max).astype(t.dtype)
        else:
            x = x.astype(t.dtype, copy=False)
        self._it.set_tensor(t.index, np.ascontiguousarray(x))

    def _get(self, t: _Tensor) -> np.ndarray:
        y = self._it.get_tensor(t.index)
        if t.quantized:
            return (y.astype(np.float32) - t.zero) * np.float32(t.scale)
        return np.array(y, dtype=np.float32 if y.dtype.kind == "f" else y.dtype)

    def run(self, inputs: dict[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        feed = self._feed(inputs)
        arrays = [np.asarray(feed[t.name]) for t in self._in]
        for t, a in zip(self._in, arrays, strict=True):
            if a.shape[1:] != t.shape[1:]:
                raise RuntimeSessionError(f"{self.path}: input {t.name} has shape {a.shape}, the model expects {t.shape}")
        n = arrays[0].shape[0]
        fixed = self.batch
        rows = range(0, n, fixed) if fixed > 0 else range(0, 1)
        outs: list[list[np.ndarray]] = [[] for _ in self._out]
        try:
            for r in rows:
                for t, a in zip(self._in, arrays, strict=True):
                    self._set(t, a[r : r + fixed] if fixed > 0 else a)
                self._it.invoke()
                for i, t in enumerate(self._out):
                    outs[i].append(self._get(t))
        except Exception as e:
            raise RuntimeSessionError(f"{self.path}: LiteRT invoke failed: {first_line(e, 300)}") from e
        return [np.concatenate(o) for o in outs]


@register_runtime("litert")
def open_litert(source: str | Path, threads: int) -> LiteRTSession:
    return LiteRTSession(source, threads)
