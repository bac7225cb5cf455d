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
from keiryo.model.io import Batch, IOSpec, call_module


class ModelSpec(KeiryoConfig):
    """How to rebuild the model: recorded in results.json and package manifests."""

    source: str = Field(description="zoo:NAME, path/to/file.py:factory or package.module:factory")
    options: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None


@dataclass
class ModelHandle:
    """A module with its I/O description (named inputs and outputs) and how to rebuild it."""

    module: nn.Module
    io: IOSpec
    spec: ModelSpec
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return self.io.input_names

    @property
    def output_names(self) -> list[str]:
        return self.io.output_names

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the first input (what zoo architectures are built for)."""
        return self.io.inputs[0].sample_shape

    @property
    def head_width(self) -> int | None:
        """Last dimension of the first output (the class count of a classifier), if fixed."""
        last = self.io.outputs[0].shape[-1] if self.io.outputs and len(self.io.outputs[0].shape) > 1 else None
        return last if isinstance(last, int) else None

    def example_inputs(self, batch: int = 1) -> Batch:
        return self.io.example_inputs(batch)

    def __call__(self, inputs: Batch) -> Any:
        """Call the module with named inputs (positionally or by keyword, see keiryo.model.io)."""
        return call_module(self.module, inputs, self.io.input_names)

    def clone(self) -> ModelHandle:
        """A deep copy whose module can be changed without touching this one."""
        return replace(self, module=copy.deepcopy(self.module), metadata=copy.deepcopy(self.metadata))

    def content_hash(self) -> str:
        """sha256 over the architecture and every parameter and buffer."""
        h = hashlib.sha256()
        h.update(repr(self.module).encode())
        h.update(self.io.model_dump_json().encode())
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
                self(self.example_inputs(1))
        finally:
            self.module.train(was_training)
        return int(fc.get_total_flops() // 2)
