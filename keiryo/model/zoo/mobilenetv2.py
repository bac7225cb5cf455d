"""MobileNetV2 (Sandler et al. 2018): inverted residuals, depthwise-separable convolutions.

Strides adapt to the input resolution: stride-2 steps are kept for the last
stages that still leave at least a 4x4 feature map, so the same definition
works from 8x8 digits to 224x224 images.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from keiryo.config import KeiryoConfig
from keiryo.model.zoo import register_zoo
from keiryo.model.zoo._common import conv_bn_act, downsample_budget, make_divisible

# (expansion t, channels c, repeats n, stride s) from the paper, Table 2.
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2Options(KeiryoConfig):
    width: float = Field(1.0, gt=0, le=4, description="width multiplier (alpha)")
    depth: float = Field(1.0, gt=0, le=2, description="multiplier on the repeats of each stage")
    last_channel: int = Field(1280, ge=8, description="channels of the last 1x1 conv (scaled up if width > 1)")
    dropout: float = Field(0.2, ge=0, lt=1)
    round_to: int = Field(8, ge=1, description="round channel counts to this multiple")


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(cin, hidden, 1))
        layers += [conv_bn_act(hidden, hidden, 3, stride, groups=hidden), conv_bn_act(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, opts: MobileNetV2Options):
        super().__init__()
        cin, h, w = input_shape
        d = opts.round_to
        # Stride positions: stem + every stage with s=2; keep the last ones that fit.
        budget = downsample_budget(h, w)
        stride_slots = 1 + sum(1 for *_, s in _SETTINGS if s == 2)
        keep_from = stride_slots - min(budget, stride_slots)
        slot = 0

        def next_stride(s: int) -> int:
            nonlocal slot
            if s != 2:
                return 1
            slot += 1
            return 2 if slot - 1 >= keep_from else 1

        stem = make_divisible(32 * opts.width, d)
        self.last_channel = make_divisible(opts.last_channel * max(1.0, opts.width), d)
        features: list[nn.Module] = [conv_bn_act(cin, stem, 3, next_stride(2))]
        c_prev = stem
        for t, c, n, s in _SETTINGS:
            c_out = make_divisible(c * opts.width, d)
            stage_stride = next_stride(s)
            for i in range(max(1, round(n * opts.depth))):
                features.append(InvertedResidual(c_prev, c_out, stage_stride if i == 0 else 1, t))
                c_prev = c_out
        features.append(conv_bn_act(c_prev, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(opts.dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_zoo("mobilenetv2", MobileNetV2Options, (3,), "MobileNetV2, inverted residuals + depthwise-separable convs")
def mobilenetv2(input_shape: tuple[int, ...], num_classes: int, opts: MobileNetV2Options) -> nn.Module:
    return MobileNetV2(input_shape, num_classes, opts)
