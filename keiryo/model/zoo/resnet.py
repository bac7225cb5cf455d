"""CIFAR-style ResNet (He et al. 2016, section 4.2): depth = 6n + 2, three stages."""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from keiryo.config import KeiryoConfig
from keiryo.model.zoo import register_zoo
from keiryo.model.zoo._common import downsample_budget


class ResNetOptions(KeiryoConfig):
    depth: int = Field(20, ge=8, description="6n+2: 8, 14, 20, 32, 44, 56, ...")
    width: int = Field(16, ge=4, description="channels of the first stage (doubled per stage)")

    @field_validator("depth")
    @classmethod
    def _six_n_plus_two(cls, v: int) -> int:
        if (v - 2) % 6:
            raise ValueError(f"depth must be 6n+2 (8, 14, 20, 32, ...), got {v}")
        return v


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, opts: ResNetOptions):
        super().__init__()
        cin, h, w = input_shape
        n = (opts.depth - 2) // 6
        budget = downsample_budget(h, w)
        c = opts.width
        self.stem = nn.Sequential(nn.Conv2d(cin, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        c_prev = c
        for i, c_out in enumerate((c, 2 * c, 4 * c)):
            stride = 2 if i > 0 and i <= budget else 1
            blocks = [BasicBlock(c_prev if j == 0 else c_out, c_out, stride if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            c_prev = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


@register_zoo("resnet", ResNetOptions, (3,), "small CIFAR-style ResNet, depth 6n+2")
def resnet(input_shape: tuple[int, ...], num_classes: int, opts: ResNetOptions) -> nn.Module:
    return ResNet(input_shape, num_classes, opts)
