"""``prune.unstructured``: magnitude pruning of individual weights, layer-wise or global.

Honest about what it buys: dense CPU kernels skip no zeros, so latency does not
improve (sparse kernels only pay off from about 80% sparsity). The gain is the
compressed (gzip) size, which the result reports. Masks are made permanent and
kept in the handle's compression state, so later fine-tuning keeps the zeros.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import prune as torch_prune

from keiryo.config import KeiryoConfig
from keiryo.errors import PassError
from keiryo.passes import PassContext, PassResult, register_pass
from keiryo.passes._state import FinetuneConfig, finetune, prunable_layers, state_of

NO_LATENCY_GAIN = (
    "unstructured sparsity gives no latency gain with dense CPU kernels (onnxruntime, XNNPACK); "
    "its benefit is the compressed size (gzip) and sparse formats"
)


class UnstructuredPruneConfig(KeiryoConfig):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="share of weights set to zero, in [0, 1)")
    scope: Literal["layer", "global"] = Field("layer", description="per-layer threshold or one global threshold")
    schedule: Literal["oneshot", "gradual"] = "oneshot"
    steps: int = Field(4, ge=1, description="pruning steps for schedule=gradual (cubic schedule, Zhu & Gupta 2017)")
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(epochs=1))
    exclude: list[str] = Field(default_factory=list, description="layer names left dense")


def _weights(handle: Any, cfg: UnstructuredPruneConfig) -> list[tuple[str, Any]]:
    layers = prunable_layers(handle.module)
    unknown = [n for n in cfg.exclude if n not in layers]
    if unknown:
        raise PassError(f"prune.unstructured: exclude names unknown layers {unknown}; prunable layers are {list(layers)[:10]}")
    return [(n, m) for n, m in layers.items() if n not in cfg.exclude]


def layer_sparsity(module: nn.Module) -> dict[str, float]:
    return {
        n: float((m.weight == 0).float().mean())
        for n, m in prunable_layers(module).items()
        if getattr(m, "weight", None) is not None
    }


@register_pass(
    "prune.unstructured",
    UnstructuredPruneConfig,
    stage="torch",
    summary="magnitude pruning of single weights (smaller gzip, no dense-kernel speed-up)",
)
def prune_unstructured(handle: Any, cfg: UnstructuredPruneConfig, ctx: PassContext) -> PassResult:
    handle = handle.clone()
    targets = _weights(handle, cfg)
    if not targets:
        raise PassError("prune.unstructured: the model has no Conv or Linear layer to prune")
    comp = state_of(handle)
    # weights already pruned by an earlier step stay pruned: the new target counts them
    steps = cfg.steps if cfg.schedule == "gradual" else 1
    history = []
    for k in range(1, steps + 1):
        target = cfg.sparsity * (1 - (1 - k / steps) ** 3)
        params = [(m, "weight") for _, m in targets]
        if cfg.scope == "global":
            torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=target)
        else:
            for m, _ in params:
                torch_prune.l1_unstructured(m, "weight", amount=target)
        for name, m in targets:  # permanent: fold weight_orig * mask into weight, remember the mask
            mask = m.weight_mask.bool().logical_not()
            torch_prune.remove(m, "weight")
            key = f"{name}.weight"
            comp["masks"][key] = mask | comp["masks"].get(key, torch.zeros_like(mask))
        if cfg.finetune.epochs:
            finetune(
                handle,
                ctx,
                cfg.finetune,
                description=f"prune.unstructured step {k}/{steps} -> {target:.0%}",
            )
        history.append({"step": k, "target_sparsity": round(target, 4)})
    per_layer = {n: v for n, v in layer_sparsity(handle.module).items() if n in dict(targets)}
    total = sum(m.weight.numel() for _, m in targets)
    zeros = sum(int((m.weight == 0).sum()) for _, m in targets)
    info = {
        "scope": cfg.scope,
        "schedule": cfg.schedule,
        "target_sparsity": cfg.sparsity,
        "sparsity": zeros / total,
        "layer_sparsity": per_layer,
        "excluded": list(cfg.exclude),
        "history": history,
        "note": NO_LATENCY_GAIN,
    }
    return PassResult(handle, info)
