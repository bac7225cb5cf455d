"""``distill``: knowledge distillation from the recipe's input model (the teacher) into the current model.

Loss (Hinton et al. 2015): ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``,
optionally plus ``feature_weight * MSE`` between the penultimate features (a learned
linear map bridges different widths). ``unlabeled: true`` uses teacher targets only.
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


def kd_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, alpha: float, temp: float, unlabeled: bool) -> torch.Tensor:
    soft = F.kl_div(F.log_softmax(s / temp, dim=1), F.log_softmax(t / temp, dim=1), log_target=True, reduction="batchmean")
    if unlabeled:
        return soft * temp * temp
    return alpha * temp * temp * soft + (1 - alpha) * F.cross_entropy(s, y)


class _Penultimate:
    """Captures the input of a model's output layer (its penultimate features) during forward."""

    def __init__(self, module: nn.Module, num_classes: int):
        name = output_layer(module, num_classes)
        if name is None:
            raise PassError("distill: feature distillation needs a final Linear layer producing the class logits")
        self.layer = dict(module.named_modules())[name]
        self.value: torch.Tensor | None = None
        self.hook = self.layer.register_forward_hook(self._capture)

    def _capture(self, _m: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        self.value = inp[0]

    def remove(self) -> None:
        self.hook.remove()


def distill_into(student: Any, teacher: Any, data: Any, cfg: DistillConfig, seed: int, progress: bool, what: str) -> Any:
    """Train ``student`` (a ModelHandle, in place) to match ``teacher``."""
    t_mod = teacher.module.eval()
    x0 = student.example_input(2)
    with torch.no_grad():
        s_out, t_out = student.module.eval()(x0), t_mod(x0)
    if s_out.shape != t_out.shape:
        raise PassError(f"{what}: teacher outputs {tuple(t_out.shape)} but the student outputs {tuple(s_out.shape)}")
    hooks = bridge = None
    if cfg.feature_weight > 0:
        hooks = (_Penultimate(student.module, student.num_classes), _Penultimate(t_mod, teacher.num_classes))
        with torch.no_grad():
            student.module(x0), t_mod(x0)
        assert hooks[0].value is not None and hooks[1].value is not None
        bridge = nn.Linear(hooks[0].value.shape[1], hooks[1].value.shape[1], bias=False)
        student.module.add_module("_kd_bridge", bridge)  # trained with the student, removed afterwards

    def loss(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = t_mod(x)
        total = kd_loss(logits, t_logits, y, cfg.alpha, cfg.temperature, cfg.unlabeled)
        if hooks is not None and bridge is not None:
            assert hooks[0].value is not None and hooks[1].value is not None  # set by the forward just run
            total = total + cfg.feature_weight * F.mse_loss(bridge(hooks[0].value), hooks[1].value)
        return total

    try:
        return finetune(student, data, cfg.train, loss_fn=loss, seed=seed, progress=progress, description=what)
    finally:
        if hooks is not None:
            for h in hooks:
                h.remove()
            del student.module._kd_bridge


@register_pass("distill", DistillConfig, stage="torch", summary="knowledge distillation from the original model (KL + CE)")
def distill(handle: Any, cfg: DistillConfig, ctx: PassContext) -> PassResult:
    if ctx.teacher is None:
        raise PassError("distill: no teacher; it distills from the recipe's input model, run it inside a recipe")
    if ctx.data is None:
        raise PassError("distill needs training data; pass --data")
    student = handle.clone()
    res = distill_into(student, ctx.teacher, ctx.data, cfg, ctx.seed, ctx.progress, "distill")
    info: dict[str, Any] = {
        "alpha": cfg.alpha,
        "temperature": cfg.temperature,
        "feature_weight": cfg.feature_weight,
        "unlabeled": cfg.unlabeled,
    }
    if res is not None:
        info.update(epochs=res.epochs_run, best_val_accuracy=res.best_val_accuracy)
    return PassResult(student, info)
