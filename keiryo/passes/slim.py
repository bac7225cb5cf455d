"""``slim``: build a narrower / shallower / lower-resolution zoo student and distill the model into it.

MobileNet-style multipliers: ``width`` scales channels, ``depth`` the repeats, and
``resolution`` the spatial size the network computes at (the student resizes its input
internally, so it still takes the original input shape and drops in as a replacement).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from keiryo.config import KeiryoConfig
from keiryo.errors import PassError
from keiryo.passes import PassContext, PassResult, register_pass
from keiryo.passes.distill import DistillConfig, distill_into


class SlimConfig(KeiryoConfig):
    model: str | None = Field(None, description="zoo:NAME of the student (default: the input model's zoo architecture)")
    options: dict[str, Any] = Field(default_factory=dict, description="student options (override the input model's)")
    width: float | None = Field(0.5, gt=0, le=4, description="width multiplier (zoo models with a 'width' option)")
    resolution: float = Field(1.0, gt=0, le=1, description="compute at this share of the input's height and width")
    distill: DistillConfig = Field(default_factory=DistillConfig)


class ResizeInput(nn.Module):
    """Resizes image inputs to ``size`` before the wrapped network (the resolution multiplier)."""

    def __init__(self, net: nn.Module, size: tuple[int, int]):
        super().__init__()
        self.net = net
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(F.interpolate(x, size=self.size, mode="bilinear", align_corners=False))


@register_pass("slim", SlimConfig, stage="torch", summary="narrower/lower-resolution zoo student, distilled from the model")
def slim(handle: Any, cfg: SlimConfig, ctx: PassContext) -> PassResult:
    from keiryo.model import ModelHandle, ModelSpec
    from keiryo.model.zoo import ZOO, build

    source = cfg.model or handle.spec.source
    if not source.startswith("zoo:"):
        raise PassError(f"slim: the input model {handle.spec.source!r} is not a zoo model; set model: zoo:NAME for the student")
    name = source[4:]
    opts = dict(handle.spec.options if source == handle.spec.source else {})
    opts.update(cfg.options)
    if cfg.width is not None:
        if "width" not in ZOO.get(name).options.model_fields:
            raise PassError(f"slim: zoo:{name} has no width option; set width: null and give options instead")
        opts["width"] = opts.get("width", 1.0) * cfg.width if isinstance(opts.get("width", 1.0), float) else cfg.width
    shape = tuple(handle.input_shape)
    inner_shape = shape
    if cfg.resolution < 1.0:
        if len(shape) != 3:
            raise PassError(f"slim: resolution applies to image inputs (C, H, W), got input shape {shape}")
        inner_shape = (shape[0], max(2, round(shape[1] * cfg.resolution)), max(2, round(shape[2] * cfg.resolution)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        net = build(name, inner_shape, handle.head_width, opts)
    module = ResizeInput(net, inner_shape[1:]) if inner_shape != shape else net
    student = ModelHandle(module, handle.io, ModelSpec(source=f"zoo:{name}", options=opts))
    teacher = ctx.teacher or handle
    res = distill_into(student, teacher, ctx, cfg.distill, "slim distill")
    info = {
        "student": f"zoo:{name}",
        "options": opts,
        "resolution": list(inner_shape),
        "params": [handle.num_params(), student.num_params()],
    }
    if res is not None:
        info["best_val"] = res.best_val
    return PassResult(student, info)
