"""Compression state carried on a ModelHandle so later steps keep earlier compression.

``handle.metadata["compression"]`` holds, by parameter name:

- ``masks``: bool tensors, True where a weight was pruned (it must stay exactly zero);
- ``palettes``: 1-D centroid tensors; the weight's values must stay on them.

:func:`constrain` re-applies both; :func:`finetune` calls it after every optimizer
step. Palettes are updated as the mean of their members before snapping, so the
centroids themselves learn (weight-sharing fine-tuning, Han et al. 2015).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from keiryo.config import KeiryoConfig
from keiryo.privacy.dp import DPConfig


class FinetuneConfig(KeiryoConfig):
    epochs: int = Field(3, ge=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    patience: int = Field(100, ge=1)
    dp: DPConfig | None = Field(None, description="train with DP-SGD (Opacus); the guarantee is recorded in the step's info")


def state_of(handle: Any) -> dict[str, dict[str, torch.Tensor]]:
    comp = handle.metadata.setdefault("compression", {})
    comp.setdefault("masks", {})
    comp.setdefault("palettes", {})
    return comp


def _params(module: nn.Module) -> dict[str, nn.Parameter]:
    return dict(module.named_parameters())


@torch.no_grad()
def constrain(handle: Any, update_centroids: bool = True) -> None:
    """Re-apply masks (zeros stay zero) and palettes (weights stay on centroids)."""
    comp = state_of(handle)
    params = _params(handle.module)
    for name, mask in list(comp["masks"].items()):
        p = params.get(name)
        if p is None:
            comp["masks"].pop(name)
            continue
        if p.shape != mask.shape:  # structured pruning changed the shape: keep the zeros that survived
            mask = p == 0
            comp["masks"][name] = mask
        p.masked_fill_(mask, 0.0)
    for name, centroids in list(comp["palettes"].items()):
        p = params.get(name)
        if p is None:
            comp["palettes"].pop(name)
            continue
        idx = nearest(p, centroids)
        if update_centroids:
            flat = p.reshape(-1)
            sums = torch.zeros_like(centroids).index_add_(0, idx.reshape(-1), flat)
            counts = torch.bincount(idx.reshape(-1), minlength=len(centroids)).to(centroids.dtype)
            centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
            comp["palettes"][name] = centroids
        p.copy_(centroids[idx])
        pmask = comp["masks"].get(name)
        if pmask is not None and pmask.shape == p.shape:
            p.masked_fill_(pmask, 0.0)


def nearest(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every element of ``w`` (same shape)."""
    flat = w.reshape(-1, 1)
    out = torch.empty(flat.shape[0], dtype=torch.long)
    for i in range(0, flat.shape[0], 1 << 18):  # bounded memory on large tensors
        out[i : i + (1 << 18)] = (flat[i : i + (1 << 18)] - centroids.reshape(1, -1)).abs().argmin(dim=1)
    return out.reshape(w.shape)


def finetune(
    handle: Any,
    ctx: Any,
    cfg: FinetuneConfig,
    *,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    description: str = "fine-tune",
    reference: dict[str, Any] | None = None,
) -> Any:
    """Train ``handle.module`` in place with the task's loss (or ``loss_fn``) and the compression
    constraints applied after every step. ``ctx`` is the pass context (data, task, seed, device)."""
    from keiryo.train import TrainConfig, train

    if cfg.epochs == 0:
        constrain(handle)
        return None
    data = ctx.require_data(description)
    tcfg = TrainConfig(
        epochs=cfg.epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        patience=cfg.patience,
        seed=ctx.seed,
        warmup_epochs=0,
        device=ctx.device,
        dp=cfg.dp,
    )
    res = train(
        handle,
        data,
        ctx.get_task(),
        tcfg,
        loss_fn=loss_fn,
        after_step=lambda: constrain(handle),
        progress=ctx.progress,
        description=description,
        reference=reference,
    )
    constrain(handle)  # restored best weights sit on their centroids, so this only re-checks
    if res.privacy is not None:
        from keiryo.passes import PRIVACY_STEP

        handle.metadata[PRIVACY_STEP] = res.privacy  # keiryo.apply moves it into the step's info
    return res


def prunable_layers(module: nn.Module, types: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)) -> dict[str, Any]:
    return {n: m for n, m in module.named_modules() if isinstance(m, types)}


def output_layer(module: nn.Module, width: int | None) -> str | None:
    """Name of the last Linear producing ``width`` outputs (the head: never pruned structurally), else the last Linear."""
    last = last_any = None
    for n, m in module.named_modules():
        if isinstance(m, nn.Linear):
            last_any = n
            if m.out_features == width:
                last = n
    return last or last_any
