"""``cluster``: weight sharing by per-layer k-means (Han et al. 2015, "Deep Compression").

Each Conv/Linear weight tensor gets ``clusters`` shared values (16 = 4-bit indices);
fine-tuning keeps every weight on its centroid while the centroids learn. The
centroids stay in the handle's compression state (``palettes``) so formats that
store palettes (Core ML palettization) can use them directly.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.errors import PassError
from keiryo.passes import PassContext, PassResult, register_pass
from keiryo.passes._state import FinetuneConfig, constrain, finetune, nearest, prunable_layers, state_of


class ClusterConfig(KeiryoConfig):
    clusters: int = Field(16, ge=2, le=65536, description="shared values per layer (16 = 4-bit indices)")
    init: Literal["linear", "kmeans++"] = Field("linear", description="centroid initialisation (linear: Han et al.)")
    iterations: int = Field(30, ge=1, description="Lloyd iterations")
    min_params: int = Field(64, ge=1, description="layers with fewer weights stay as they are (reported)")
    exclude: list[str] = Field(default_factory=list)
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(epochs=2, lr=5e-4))


def kmeans_1d(w: torch.Tensor, k: int, init: str, iterations: int, seed: int) -> torch.Tensor:
    """Centroids of a 1-D k-means on the values of ``w`` (exact zeros from pruning get their own centroid)."""
    flat = w.detach().reshape(-1).float()
    nz = flat[flat != 0]
    keep_zero = bool((flat == 0).any())
    k_free = k - 1 if keep_zero else k
    if nz.numel() == 0 or k_free < 1:
        return torch.zeros(1)
    if init == "linear":
        c = torch.linspace(float(nz.min()), float(nz.max()), k_free)
    else:
        g = torch.Generator().manual_seed(seed)
        c = nz[torch.randint(len(nz), (1,), generator=g)]
        while len(c) < k_free:
            d = (nz.reshape(-1, 1) - c.reshape(1, -1)).abs().min(dim=1).values ** 2
            c = torch.cat([c, nz[torch.multinomial(d / d.sum(), 1, generator=g)]]) if d.sum() > 0 else c
            if d.sum() == 0:
                break
    for _ in range(iterations):
        idx = nearest(nz, c)
        sums = torch.zeros_like(c).index_add_(0, idx, nz)
        counts = torch.bincount(idx, minlength=len(c)).float()
        new = torch.where(counts > 0, sums / counts.clamp_min(1), c)
        if torch.allclose(new, c):
            break
        c = new
    return torch.cat([torch.zeros(1), c]) if keep_zero else c


@register_pass("cluster", ClusterConfig, stage="torch", summary="weight sharing: per-layer k-means with centroid fine-tuning")
def cluster(handle: Any, cfg: ClusterConfig, ctx: PassContext) -> PassResult:
    handle = handle.clone()
    comp = state_of(handle)
    layers = prunable_layers(handle.module)
    unknown = [n for n in cfg.exclude if n not in layers]
    if unknown:
        raise PassError(f"cluster: exclude names unknown layers {unknown}")
    skipped, clustered = {}, {}
    for name, m in layers.items():
        if name in cfg.exclude:
            skipped[name] = "excluded by configuration"
            continue
        if m.weight.numel() < cfg.min_params:
            skipped[name] = f"{m.weight.numel()} weights < min_params {cfg.min_params}"
            continue
        centroids = kmeans_1d(m.weight, cfg.clusters, cfg.init, cfg.iterations, ctx.seed)
        comp["palettes"][f"{name}.weight"] = centroids
        clustered[name] = {"weights": m.weight.numel(), "clusters": len(centroids)}
    if not clustered:
        raise PassError(f"cluster: no layer has at least min_params={cfg.min_params} weights to cluster")
    constrain(handle)
    if cfg.finetune.epochs:
        finetune(handle, ctx, cfg.finetune, description="cluster fine-tune")
    bits = math.ceil(math.log2(cfg.clusters))
    n_weights = sum(v["weights"] for v in clustered.values())
    palette_bytes = sum(v["clusters"] * 2 for v in clustered.values())  # fp16 palette entries
    other = sum(p.numel() for p in handle.module.parameters()) - n_weights
    info = {
        "clusters": cfg.clusters,
        "index_bits": bits,
        "layers": clustered,
        "skipped": skipped,
        # what a palette format (Core ML palettization) stores: indices + fp16 palettes + the rest in fp16
        "palettized_bytes_estimate": n_weights * bits // 8 + palette_bytes + other * 2,
        "unique_values_per_layer": {
            n: int(torch.unique(dict(handle.module.named_parameters())[f"{n}.weight"]).numel()) for n in clustered
        },
    }
    return PassResult(handle, info)
