"""Multi-layer perceptron over the flattened input."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from keiryo.config import KeiryoConfig
from keiryo.model.zoo import register_zoo


class MLPOptions(KeiryoConfig):
    hidden: tuple[int, ...] = Field((256, 128), min_length=1, description="hidden layer widths")
    dropout: float = Field(0.1, ge=0, lt=1)


class MLP(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, opts: MLPOptions):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = math.prod(input_shape)
        for hdim in opts.hidden:
            layers += [nn.Linear(d, hdim), nn.ReLU(inplace=True), nn.Dropout(opts.dropout)]
            d = hdim
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_zoo("mlp", MLPOptions, (1, 2, 3), "multi-layer perceptron on the flattened input")
def mlp(input_shape: tuple[int, ...], num_classes: int, opts: MLPOptions) -> nn.Module:
    return MLP(input_shape, num_classes, opts)
