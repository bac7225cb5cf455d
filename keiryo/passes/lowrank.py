"""``factorize.lowrank``: truncated SVD of Linear and Conv layers.

Linear (out x in) -> Linear(in, r, no bias) + Linear(r, out); Conv (out, in, kh, kw)
-> Conv(in, r, kh x kw, same stride/padding, no bias) + Conv(r, out, 1x1). The rank
is a ratio of the full rank or the smallest that keeps ``energy`` of the squared
singular values. A layer is only replaced when it gets cheaper; others are reported.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from keiryo.config import KeiryoConfig
from keiryo.errors import PassError
from keiryo.passes import PassContext, PassResult, register_pass
from keiryo.passes._state import FinetuneConfig, finetune, output_layer, prunable_layers


class LowRankConfig(KeiryoConfig):
    rank_ratio: float | None = Field(0.25, gt=0.0, le=1.0, description="rank = ratio x full rank")
    energy: float | None = Field(None, gt=0.0, le=1.0, description="keep this share of squared singular values instead")
    rank: int | None = Field(None, ge=1, description="an explicit rank for every layer (must reduce each layer)")
    layers: list[str] | None = Field(None, description="only these layers (default: all Conv/Linear but the output layer)")
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(epochs=3))

    @model_validator(mode="after")
    def _one_rule(self) -> LowRankConfig:
        if self.energy is not None or self.rank is not None:
            object.__setattr__(self, "rank_ratio", None)
        if sum(v is not None for v in (self.rank_ratio, self.energy, self.rank)) != 1:
            raise ValueError("give exactly one of rank_ratio, energy, rank")
        return self


def _flat_weight(m: Any) -> torch.Tensor:
    return m.weight.detach().reshape(m.weight.shape[0], -1)


def _choose_rank(s: torch.Tensor, cfg: LowRankConfig) -> int:
    if cfg.rank is not None:
        return cfg.rank
    if cfg.energy is not None:
        e = torch.cumsum(s**2, 0) / (s**2).sum()
        return int((e < cfg.energy).sum()) + 1
    assert cfg.rank_ratio is not None
    return max(1, round(cfg.rank_ratio * len(s)))


def _factor(m: Any, r: int) -> nn.Sequential:
    w = _flat_weight(m)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    a = torch.diag(s[:r].sqrt()) @ vh[:r]  # r x in*k
    b = u[:, :r] @ torch.diag(s[:r].sqrt())  # out x r
    bias = m.bias.detach().clone() if m.bias is not None else None
    first: Any
    second: Any
    if isinstance(m, nn.Linear):
        first, second = nn.Linear(m.in_features, r, bias=False), nn.Linear(r, m.out_features, bias=bias is not None)
        first.weight.data.copy_(a)
        second.weight.data.copy_(b)
    else:
        conv = type(m)
        first = conv(m.in_channels, r, m.kernel_size, m.stride, m.padding, m.dilation, bias=False)
        second = conv(r, m.out_channels, 1, bias=bias is not None)
        first.weight.data.copy_(a.reshape(first.weight.shape))
        second.weight.data.copy_(b.reshape(second.weight.shape))
    if bias is not None:
        second.bias.data.copy_(bias)
    return nn.Sequential(first, second)


def _set(module: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, new)


@register_pass("factorize.lowrank", LowRankConfig, stage="torch", summary="truncated SVD of Linear/Conv layers")
def lowrank(handle: Any, cfg: LowRankConfig, ctx: PassContext) -> PassResult:
    handle = handle.clone()
    layers = prunable_layers(handle.module)
    out_name = output_layer(handle.module, handle.head_width)
    names = cfg.layers if cfg.layers is not None else [n for n in layers if n != out_name]
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise PassError(f"factorize.lowrank: unknown layers {unknown}; Conv/Linear layers are {list(layers)[:10]}")
    replaced, skipped = {}, {}
    for name in names:
        m = layers[name]
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups != 1:
            if cfg.layers is not None:
                raise PassError(
                    f"factorize.lowrank: {name} is a grouped/depthwise conv (groups={m.groups}): no dense matrix to factorize"
                )
            skipped[name] = "grouped/depthwise conv: no dense matrix to factorize"
            continue
        w = _flat_weight(m)
        out_f, in_f = w.shape
        s = torch.linalg.svdvals(w)
        r = min(_choose_rank(s, cfg), len(s))
        cost_before, cost_after = out_f * in_f, r * (in_f + out_f)
        if cost_after >= cost_before:
            why = f"rank {r} does not reduce {name} ({out_f}x{in_f}: {cost_after} >= {cost_before} weights)"
            if cfg.rank is not None or cfg.layers is not None:
                raise PassError(f"factorize.lowrank: {why}; choose a rank below {cost_before // (in_f + out_f)}")
            skipped[name] = why
            continue
        kept = float((s[:r] ** 2).sum() / (s**2).sum())
        _set(handle.module, name, _factor(m, r))
        replaced[name] = {"rank": r, "full_rank": len(s), "energy_kept": round(kept, 4), "weights": [cost_before, cost_after]}
    if not replaced:
        raise PassError(f"factorize.lowrank: no layer gets cheaper at this rank; skipped: {skipped}")
    if cfg.finetune.epochs:
        finetune(handle, ctx, cfg.finetune, description="lowrank fine-tune")
    return PassResult(handle, {"replaced": replaced, "skipped": skipped})
