"""Sensor-series regressor: dilated residual 1-D convolutions (a small TCN) over (channels, length).

Returns one value per sample, shape (batch,), or (batch, outputs) with ``outputs`` > 1:
forecasting the next reading, a heart rate from a PPG window, a sales figure.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from keiryo.config import KeiryoConfig
from keiryo.model.zoo import register_zoo


class SensorOptions(KeiryoConfig):
    width: int = Field(32, ge=4)
    blocks: int = Field(4, ge=1, le=12, description="residual blocks; dilation doubles with each")
    kernel_size: int = Field(3, ge=2)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, k: int, dilation: int):
        super().__init__()
        pad = (k - 1) * dilation // 2
        self.conv1 = nn.Conv1d(width, width, k, padding=pad, dilation=dilation)
        self.conv2 = nn.Conv1d(width, width, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.conv2(self.act(self.conv1(x))))


class SensorRegressor(nn.Module):
    def __init__(self, channels: int, outputs: int, opts: SensorOptions):
        super().__init__()
        self.stem = nn.Conv1d(channels, opts.width, 1)
        self.blocks = nn.Sequential(*[ResidualBlock(opts.width, opts.kernel_size, 2**i) for i in range(opts.blocks)])
        self.head = nn.Linear(2 * opts.width, outputs)
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(torch.relu(self.stem(x)))
        feats = torch.cat([h.mean(-1), h[..., -1]], dim=1)  # the whole window and its latest step
        y = self.head(feats)
        return y.squeeze(1) if self.outputs == 1 else y


@register_zoo(
    "sensor", SensorOptions, (2,), "TCN regressor for sensor series (channels, length) -> value(s)", needs_outputs=False
)
def sensor(input_shape: tuple[int, ...], num_classes: int | None, opts: SensorOptions) -> nn.Module:
    return SensorRegressor(input_shape[0], num_classes or 1, opts)
