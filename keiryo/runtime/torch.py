"""PyTorch eager session over an ``nn.Module`` (the baseline keiryo compares against)."""

from __future__ import annotations

from typing import Any

import numpy as np

from keiryo.errors import RuntimeSessionError
from keiryo.runtime import register_runtime
from keiryo.runtime._base import SessionBase


class TorchSession(SessionBase):
    runtime = "torch"

    def __init__(self, module: Any, threads: int = 1):
        import torch

        if not isinstance(module, torch.nn.Module):
            raise RuntimeSessionError(f"the torch runtime runs an nn.Module, got {type(module).__name__}")
        self.module = module.eval()
        self.threads = threads
        self.input_names = ["input"]
        self.output_names = ["logits"]
        self._prev_threads = torch.get_num_threads()
        torch.set_num_threads(threads)

    def run(self, inputs: dict[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        import torch

        x = self._feed(inputs)["input"]
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(x)))
        return [out.numpy()]

    def close(self) -> None:
        import torch

        torch.set_num_threads(self._prev_threads)


@register_runtime("torch")
def open_torch(source: Any, threads: int) -> TorchSession:
    if hasattr(source, "module") and hasattr(source, "input_shape"):
        source = source.module  # a ModelHandle
    return TorchSession(source, threads)
