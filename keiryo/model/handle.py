"""ModelHandle: a torch module plus what keiryo needs to know about it."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from pydantic import Field
from torch import nn

from keiryo.config import KeiryoConfig


class ModelSpec(KeiryoConfig):
    """How to rebuild the model: recorded in results.json and package manifests."""

    source: str = Field(description="zoo:NAME, path/to/file.py:factory or package.module:factory")
    options: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None


@dataclass
class ModelHandle:
    module: nn.Module
    input_shape: tuple[int, ...]
    num_classes: int
    spec: ModelSpec
    metadata: dict[str, Any] = field(default_factory=dict)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros((batch, *self.input_shape), dtype=torch.float32)

    def clone(self) -> ModelHandle:
        """A deep copy whose module can be changed without touching this one."""
        return replace(self, module=copy.deepcopy(self.module), metadata=copy.deepcopy(self.metadata))

    def content_hash(self) -> str:
        """sha256 over the architecture and every parameter and buffer."""
        h = hashlib.sha256()
        h.update(repr(self.module).encode())
        h.update(repr(self.input_shape).encode())
        for name, t in self.module.state_dict().items():
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(repr(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def macs(self) -> int:
        """Multiply-accumulates of one forward pass at batch 1 (torch's FLOP counter / 2)."""
        from torch.utils.flop_counter import FlopCounterMode

        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                self.module(self.example_input(1))
        finally:
            self.module.train(was_training)
        return int(fc.get_total_flops() // 2)
