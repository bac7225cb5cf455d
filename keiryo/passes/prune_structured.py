"""``prune.structured``: remove whole channels, filters, neurons (and attention heads / FFN width).

Built on Torch-Pruning's dependency graph (Fang et al., DepGraph, CVPR 2023): coupled
layers (a conv, its BatchNorm, the next conv's input, residual partners) are pruned
together, so the model is physically smaller and faster. The output layer is never
pruned; every Conv/Linear that keeps all its channels is reported with the reason.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import nn

from keiryo.config import KeiryoConfig
from keiryo.errors import PassError
from keiryo.passes import PassContext, PassResult, register_pass
from keiryo.passes._state import FinetuneConfig, constrain, finetune, output_layer, prunable_layers


class StructuredPruneConfig(KeiryoConfig):
    ratio: float = Field(0.5, ge=0.0, lt=1.0, description="share of channels removed from each prunable group")
    importance: Literal["l1", "l2", "taylor"] = "l1"
    scope: Literal["layer", "global"] = "layer"
    round_to: int | None = Field(8, ge=1, description="keep channel counts a multiple of this (None: no rounding)")
    prune_heads: bool = Field(False, description="transformer: remove whole attention heads instead of head width")
    exclude: list[str] = Field(default_factory=list, description="layer names kept whole")
    taylor_batches: int = Field(4, ge=1, description="batches of gradients for importance=taylor")
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(epochs=0))


def _tp() -> Any:
    import torch_pruning as tp  # a core dependency, imported only when pruning

    return tp


def _importance(tp: Any, cfg: StructuredPruneConfig) -> Any:
    if cfg.importance == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=1 if cfg.importance == "l1" else 2)


def _attention_modules(module: nn.Module) -> list[Any]:
    from keiryo.model.zoo.transformer import MultiHeadSelfAttention

    return [m for m in module.modules() if isinstance(m, MultiHeadSelfAttention)]


@register_pass(
    "prune.structured",
    StructuredPruneConfig,
    stage="torch",
    summary="remove channels/filters/neurons/heads (Torch-Pruning dependency graph): smaller and faster",
)
def prune_structured(handle: Any, cfg: StructuredPruneConfig, ctx: PassContext) -> PassResult:
    tp = _tp()
    handle = handle.clone()
    model = handle.module.eval()
    layers = prunable_layers(model)
    unknown = [n for n in cfg.exclude if n not in layers]
    if unknown:
        raise PassError(f"prune.structured: exclude names unknown layers {unknown}")
    out_name = output_layer(model, handle.head_width)
    ignored_names = set(cfg.exclude) | ({out_name} if out_name else set())
    ignored = [layers[n] for n in ignored_names if n in layers]
    attn = _attention_modules(model)
    num_heads = {}
    for a in attn:
        for lin in (a.q, a.k, a.v):
            num_heads[lin] = a.num_heads
    before = {n: (m.out_channels if hasattr(m, "out_channels") else m.out_features) for n, m in layers.items()}
    from keiryo.model.io import call_args

    args, kwargs = call_args(model, handle.example_inputs(2), handle.input_names)
    example: Any = kwargs or (args[0] if len(args) == 1 else args)
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=_importance(tp, cfg),
            pruning_ratio=cfg.ratio,
            global_pruning=cfg.scope == "global",
            ignored_layers=ignored,
            round_to=cfg.round_to,
            num_heads=num_heads,
            prune_num_heads=cfg.prune_heads,
            prune_head_dims=not cfg.prune_heads,
            head_pruning_ratio=cfg.ratio if cfg.prune_heads else 0.0,
        )
    except Exception as e:  # Torch-Pruning could not trace the model
        raise PassError(f"prune.structured: Torch-Pruning cannot build the dependency graph: {type(e).__name__}: {e}") from e
    if cfg.importance == "taylor":
        if ctx.data is None:
            raise PassError("prune.structured with importance=taylor needs data for gradients; pass --data")
        from keiryo.model.io import flatten_outputs

        task = ctx.get_task()
        if not task.needs_targets:
            raise PassError(f"prune.structured: importance=taylor needs labels; task {task.name} has none (use l1 or l2)")
        model.zero_grad()
        for i, (x, y) in enumerate(ctx.data.calib.batches(64)):
            if i >= cfg.taylor_batches:
                break
            task.loss(flatten_outputs(handle(x))[0], task.targets(y)).backward()
    try:
        pruner.step()
    except Exception as e:
        raise PassError(f"prune.structured: pruning failed: {type(e).__name__}: {e}") from e
    model.zero_grad(set_to_none=True)
    for a in attn:  # keep the attention's head bookkeeping in line with the pruned projections
        a.num_heads = pruner.num_heads.get(a.q, a.num_heads)
        a.head_dim = a.q.out_features // a.num_heads
    after_layers = prunable_layers(model)
    after = {n: (m.out_channels if hasattr(m, "out_channels") else m.out_features) for n, m in after_layers.items()}
    not_pruned = {}
    for n, c in after.items():
        if c == before.get(n):
            if n == out_name:
                not_pruned[n] = "output layer (class count is fixed)"
            elif n in cfg.exclude:
                not_pruned[n] = "excluded by configuration"
            elif isinstance(layers[n], nn.Conv2d) and layers[n].groups > 1:
                not_pruned[n] = "depthwise/grouped conv: follows its input channels, has no filters of its own to drop"
            else:
                not_pruned[n] = "kept: its dependency group was too small to prune after rounding"
    handle.module = model
    from keiryo.model.io import infer_outputs

    outs = infer_outputs(model, handle.io, "output", "prune.structured result")
    if [o.shape for o in outs] != [o.shape for o in handle.io.outputs]:
        raise PassError(f"prune.structured changed the model's output shapes: {[o.shape for o in outs]}")
    constrain(handle)
    if cfg.finetune.epochs:
        finetune(handle, ctx, cfg.finetune, description="prune.structured fine-tune")
    info = {
        "ratio": cfg.ratio,
        "importance": cfg.importance,
        "round_to": cfg.round_to,
        "channels": {n: [before[n], after[n]] for n in after if after[n] != before.get(n)},
        "not_pruned": not_pruned,
        "heads": {f"attn{i}": a.num_heads for i, a in enumerate(attn)} if attn else {},
    }
    return PassResult(handle, info)
