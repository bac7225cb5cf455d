"""``distill``: knowledge distillation from the recipe's input model (the teacher) into the current model.

The loss is the task's ``distill_loss``: for classification Hinton et al. 2015,
``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``; for regression MSE to the
teacher's outputs (plus the task loss); for embeddings cosine + MSE to the teacher's embeddings.
Optionally plus ``feature_weight * MSE`` between the penultimate features (a learned linear map bridges
different widths). ``unlabeled: true`` uses teacher targets only.
Compression constraints of the student (masks, palettes) are kept during training.
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
from keiryo.passes._state import FinetuneConfig, finetune, output_layer


class DistillConfig(KeiryoConfig):
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="weight of the soft-target term")
    temperature: float = Field(4.0, gt=0.0)
    feature_weight: float = Field(0.0, ge=0.0, description="weight of penultimate-feature MSE (0: off)")
    unlabeled: bool = Field(False, description="ignore labels: learn from the teacher's outputs only")
    train: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(epochs=10, lr=2e-3, patience=100))


class _Penultimate:
    """Captures the input of a model's output layer (its penultimate features) during forward."""

    def __init__(self, module: nn.Module, width: int | None):
        name = output_layer(module, width)
        if name is None:
            raise PassError("distill: feature distillation needs a final Linear layer (the head)")
        self.layer = dict(module.named_modules())[name]
        self.value: torch.Tensor | None = None
        self.hook = self.layer.register_forward_hook(self._capture)

    def _capture(self, _m: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        self.value = inp[0]

    def remove(self) -> None:
        self.hook.remove()


def distill_into(student: Any, teacher: Any, ctx: PassContext, cfg: DistillConfig, what: str) -> Any:
    """Train ``student`` (a ModelHandle, in place) to match ``teacher`` with the task's distillation loss."""
    from keiryo.model.io import flatten_outputs
    from keiryo.train import outputs_on

    data = ctx.require_data(what)
    task = ctx.get_task()
    t_mod = teacher.module.eval()
    x0 = student.example_inputs(2)
    with torch.no_grad():
        s_out, t_out = flatten_outputs(student(x0))[0], flatten_outputs(teacher(x0))[0]
    if [tuple(o.shape) for o in s_out] != [tuple(o.shape) for o in t_out]:
        raise PassError(
            f"{what}: teacher outputs {[tuple(o.shape) for o in t_out]} but the student outputs {[tuple(o.shape) for o in s_out]}"
        )
    hooks = bridge = None
    if cfg.feature_weight > 0:
        hooks = (_Penultimate(student.module, student.head_width), _Penultimate(t_mod, teacher.head_width))
        with torch.no_grad():
            student(x0), teacher(x0)
        assert hooks[0].value is not None and hooks[1].value is not None
        bridge = nn.Linear(hooks[0].value.shape[-1], hooks[1].value.shape[-1], bias=False)
        student.module.add_module("_kd_bridge", bridge)  # trained with the student, removed afterwards
    reference = None
    if not task.needs_targets:  # fidelity-only tasks select the best epoch against the teacher
        reference = {"val": outputs_on(teacher, data.val), "test": outputs_on(teacher, data.test)}

    def loss(outs: list[torch.Tensor], y: torch.Tensor | None, x: dict[str, torch.Tensor]) -> torch.Tensor:
        dev = outs[0].device
        if next(t_mod.parameters(), torch.empty(0)).device != dev:
            t_mod.to(dev)
        with torch.no_grad():
            t_outs = flatten_outputs(teacher(x))[0]
        total = task.distill_loss(outs, t_outs, None if cfg.unlabeled else y, cfg.alpha, cfg.temperature)
        if hooks is not None and bridge is not None:
            assert hooks[0].value is not None and hooks[1].value is not None  # set by the forwards just run
            total = total + cfg.feature_weight * F.mse_loss(bridge(hooks[0].value), hooks[1].value)
        return total

    try:
        return finetune(student, ctx, cfg.train, loss_fn=loss, description=what, reference=reference)
    finally:
        t_mod.to("cpu")
        if hooks is not None:
            for h in hooks:
                h.remove()
            del student.module._kd_bridge


@register_pass("distill", DistillConfig, stage="torch", summary="knowledge distillation from the original model (KL + CE)")
def distill(handle: Any, cfg: DistillConfig, ctx: PassContext) -> PassResult:
    if ctx.teacher is None:
        raise PassError("distill: no teacher; it distills from the recipe's input model, run it inside a recipe")
    student = handle.clone()
    res = distill_into(student, ctx.teacher, ctx, cfg, "distill")
    info: dict[str, Any] = {
        "alpha": cfg.alpha,
        "temperature": cfg.temperature,
        "feature_weight": cfg.feature_weight,
        "unlabeled": cfg.unlabeled,
    }
    if res is not None:
        info.update(epochs=res.epochs_run, best_val=res.best_val, metric=res.metric)
    return PassResult(student, info)
