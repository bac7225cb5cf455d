"""``quantize.qat``: quantization-aware training, then the same int8 format the runtime executes.

During fine-tuning every Conv/Linear sees fake-quantized inputs and weights that
mirror what ``quantize.int8_static`` makes onnxruntime execute: per-tensor
asymmetric uint8 activations over their observed min/max range and per-channel
symmetric int8 weights (straight-through gradients). The wrappers are then
removed: the result is a plain float model whose weights and activation ranges
are robust to that quantization. Follow it with ``quantize.int8_static`` (the
recipe ``qat`` does), so what ships is the ordinary int8 ONNX file, measured.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from keiryo.config import KeiryoConfig
from keiryo.errors import PassError
from keiryo.passes import PassContext, PassResult, register_pass
from keiryo.passes._state import FinetuneConfig, finetune, prunable_layers


class QatConfig(KeiryoConfig):
    train: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(epochs=5, lr=5e-4))
    weight_bits: int = Field(8, ge=2, le=8)
    activation_bits: int = Field(8, ge=2, le=8)
    observe_steps: int = Field(20, ge=1, description="batches that set the initial activation ranges (min/max)")
    learn_ranges: bool = Field(True, description="learn activation ranges (LSQ); they become Clip ops in the export")


class FakeQuant(nn.Module):
    """Wraps a Conv/Linear: fake-quantizes its input (per tensor) and weight (per output channel).

    The input range starts as the min/max of the first ``observe_steps`` batches (what
    onnxruntime's MinMax calibration computes), then is learned (LSQ, Esser et al. 2020)
    when ``learn_ranges``: clipping rare outliers buys resolution for everything else.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    steps: torch.Tensor
    inner: Any

    def __init__(self, inner: nn.Module, cfg: QatConfig):
        super().__init__()
        self.inner = inner
        self.a_max = 2**cfg.activation_bits - 1
        self.w_max = 2 ** (cfg.weight_bits - 1) - 1
        self.observe_steps = cfg.observe_steps
        self.learn = cfg.learn_ranges
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("steps", torch.tensor(0))
        self.scale = nn.Parameter(torch.tensor([1.0]), requires_grad=False)
        self.zero_point = nn.Parameter(torch.tensor([0.0]), requires_grad=False)

    def _set_qparams(self) -> None:
        scale = ((self.hi - self.lo) / self.a_max).clamp(min=1e-8)
        self.scale.data.fill_(float(scale))
        self.zero_point.data.fill_(float(torch.round(-self.lo / scale).clamp(0, self.a_max)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        observing = int(self.steps) < self.observe_steps
        if self.training and observing:
            with torch.no_grad():
                self.lo.copy_(torch.minimum(self.lo, x.min().clamp(max=0)))
                self.hi.copy_(torch.maximum(self.hi, x.max().clamp(min=0)))
                self.steps += 1
                self._set_qparams()
                if int(self.steps) == self.observe_steps and self.learn:
                    self.scale.requires_grad_(True)
                    self.zero_point.requires_grad_(True)
        grad_factor = 1.0 / math.sqrt(x[0].numel() * self.a_max)
        xq = torch._fake_quantize_learnable_per_tensor_affine(x, self.scale, self.zero_point, 0, self.a_max, grad_factor)
        w = self.inner.weight
        w_scale = (w.detach().abs().reshape(w.shape[0], -1).amax(dim=1) / self.w_max).clamp(min=1e-8)
        wq = torch.fake_quantize_per_channel_affine(
            w, w_scale, torch.zeros(w.shape[0], dtype=torch.int32), 0, -self.w_max, self.w_max
        )
        m = self.inner
        if isinstance(m, nn.Linear):
            return F.linear(xq, wq, m.bias)
        if isinstance(m, nn.Conv1d):
            return F.conv1d(xq, wq, m.bias, m.stride, m.padding, m.dilation, m.groups)
        return F.conv2d(xq, wq, m.bias, m.stride, m.padding, m.dilation, m.groups)

    def range(self) -> tuple[float, float]:
        s, z = float(self.scale), float(torch.round(self.zero_point).clamp(0, self.a_max))
        return (0 - z) * s, (self.a_max - z) * s


class ClampInput(nn.Module):
    """The learned activation range, kept in the model: exports as an ONNX Clip that calibration then sees."""

    inner: Any

    def __init__(self, inner: nn.Module, lo: float, hi: float):
        super().__init__()
        self.inner = inner
        self.lo, self.hi = lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.clamp(self.lo, self.hi))


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


@register_pass("quantize.qat", QatConfig, stage="torch", summary="quantization-aware fine-tuning (then int8 static)")
def qat(handle: Any, cfg: QatConfig, ctx: PassContext) -> PassResult:
    ctx.require_data("quantize.qat")
    if cfg.train.dp is not None:
        raise PassError(  # tried: Opacus stops with "Per sample gradient is not initialized" (see docs/privacy.md)
            "quantize.qat: train.dp is not supported: its fake-quantized layers use their weights functionally, where "
            "Opacus computes no per-sample gradients, and it sets activation ranges from the min/max of private batches, "
            "which DP-SGD does not cover; train with DP first (a fine-tune or distill step with train.dp), then "
            "quantize.int8_static calibrated on public or synthetic data (--calib-data)"
        )
    handle = handle.clone()
    layers = prunable_layers(handle.module)
    if not layers:
        raise PassError("quantize.qat: the model has no Conv or Linear layer to quantize")
    for name, m in layers.items():
        _replace(handle.module, name, FakeQuant(m, cfg))
    # the state's parameter names (masks, palettes) gain ".inner": layers stay wrapped (ClampInput) afterwards
    comp = handle.metadata.get("compression", {})
    for kind in ("masks", "palettes"):
        for pname in list(comp.get(kind, {})):
            layer, _, leaf = pname.rpartition(".")
            if layer in layers:
                comp[kind][f"{layer}.inner.{leaf}"] = comp[kind].pop(pname)
    try:
        res = finetune(handle, ctx, cfg.train, description="quantize.qat")
    finally:
        ranges = {}
        for name in layers:
            fq = handle.module.get_submodule(name)
            ranges[name] = fq.range()
            _replace(handle.module, name, ClampInput(fq.inner, *ranges[name]) if cfg.learn_ranges else fq.inner)
        if not cfg.learn_ranges:
            for kind in ("masks", "palettes"):
                for pname in list(comp.get(kind, {})):
                    comp[kind][pname.replace(".inner.", ".")] = comp[kind].pop(pname)
    info: dict[str, Any] = {
        "weight_bits": cfg.weight_bits,
        "activation_bits": cfg.activation_bits,
        "layers": len(layers),
        "activation_ranges": {n: [round(a, 4), round(b, 4)] for n, (a, b) in ranges.items()},
    }
    if res is not None:
        info.update(epochs=res.epochs_run, best_val=res.best_val, metric=res.metric)
    return PassResult(handle, info)
