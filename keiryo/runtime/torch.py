"""PyTorch eager session over a model (the baseline keiryo compares against).

Opened on a :class:`~keiryo.model.ModelHandle` it takes the handle's named inputs and
returns its outputs in the handle's order; on a bare ``nn.Module`` it takes one input.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from keiryo.errors import RuntimeSessionError
from keiryo.runtime import register_runtime
from keiryo.runtime._base import SessionBase


class TorchSession(SessionBase):
    runtime = "torch"

    def __init__(
        self, module: Any, threads: int = 1, input_names: list[str] | None = None, output_names: list[str] | None = None
    ):
        import torch

        if not isinstance(module, torch.nn.Module):
            raise RuntimeSessionError(f"the torch runtime runs an nn.Module, got {type(module).__name__}")
        self.module = module.eval()
        self.threads = threads
        self.input_names = input_names or ["input"]
        self.output_names = output_names or []
        self._prev_threads = torch.get_num_threads()
        torch.set_num_threads(threads)

    def run(self, inputs: dict[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        import torch

        from keiryo.model.io import call_module, flatten_outputs

        feed = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self._feed(inputs).items()}
        with torch.inference_mode():
            outs, _ = flatten_outputs(call_module(self.module, feed, self.input_names), "torch model")
        return [o.float().numpy() if o.dtype == torch.bfloat16 else o.numpy() for o in outs]

    def close(self) -> None:
        import torch

        torch.set_num_threads(self._prev_threads)


@register_runtime("torch")
def open_torch(source: Any, threads: int) -> TorchSession:
    if hasattr(source, "module") and hasattr(source, "io"):  # a ModelHandle
        return TorchSession(source.module, threads, source.io.input_names, source.io.output_names)
    return TorchSession(source, threads)
