"""1-D convolutional classifier for sensor / time-series data shaped (channels, length)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from keiryo.config import KeiryoConfig
from keiryo.model.zoo import register_zoo


class Conv1dOptions(KeiryoConfig):
    channels: tuple[int, ...] = Field((32, 64, 128), min_length=1)
    kernel_size: int = Field(5, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)


class Conv1dNet(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, opts: Conv1dOptions):
        super().__init__()
        cin, length = input_shape
        layers: list[nn.Module] = []
        k = opts.kernel_size
        for i, c in enumerate(opts.channels):
            stride = 2 if i > 0 and length >= 8 else 1
            length = (length + stride - 1) // stride
            layers += [nn.Conv1d(cin, c, k, stride, k // 2, bias=False), nn.BatchNorm1d(c), nn.ReLU(inplace=True)]
            cin = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(opts.dropout), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


@register_zoo("conv1d", Conv1dOptions, (2,), "1-D CNN for sensor / time series (channels, length)")
def conv1d(input_shape: tuple[int, ...], num_classes: int, opts: Conv1dOptions) -> nn.Module:
    return Conv1dNet(input_shape, num_classes, opts)
