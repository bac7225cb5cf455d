"""``quantize.qat``: quantization-aware training, then the same int8 format the runtime executes.

During fine-tuning every Conv/Linear sees fake-quantized inputs and weights that
mirror what ``quantize.int8_static`` makes onnxruntime execute: per-tensor
asymmetric uint8 activations over their observed min/max range and per-channel
symmetric int8 weights (straight-through gradients). The wrappers are then
removed: the result is a plain float model whose weights and activation ranges
are robust to that quantization. Follow it with ``quantize.int8_static`` (the
recipe ``qat`` does), so what ships is the ordinary int8 ONNX file, measured.

With ``train.dp`` (DP-SGD), the layers are wrapped by :class:`PrivateFakeQuant` instead: input ranges fixed
from the calibration split before training, weights owned by the wrapper so Opacus gets exact per-sample
gradients (docs/privacy.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field
from torch import nn

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


def int8_grid_weight(w: torch.Tensor, w_max: int) -> torch.Tensor:
    """``w`` fake-quantized per output channel, symmetric over [-w_max, w_max] (straight-through gradient)."""
    scale = (w.detach().abs().reshape(w.shape[0], -1).amax(dim=1) / w_max).clamp(min=1e-8)
    return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(w.shape[0], dtype=torch.int32), 0, -w_max, w_max)


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
        wq = int8_grid_weight(self.inner.weight, self.w_max)
        # the layer's own forward with the int8-grid weight: subclasses (TensorFlow SAME padding) keep their padding
        return torch.func.functional_call(self.inner, {"weight": wq}, (xq,), strict=False)

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


class PrivateFakeQuant(nn.Module):
    """The fake-quant wrapper for DP-SGD (``train.dp``): the same int8 grid as :class:`FakeQuant`, two differences.

    * Input ranges are **fixed before training** from the calibration split (``--calib-data``: public or
      synthetic data keeps them inside the guarantee), not observed on private batches.
    * The layer's weight and bias are **owned by this module** and passed to the layer with
      ``torch.func.functional_call``, so Opacus sees one trainable module and computes its per-sample gradients
      exactly (functorch: vmap of this forward), straight-through the weight rounding. :meth:`release` gives the
      layer its parameters back.
    """

    inner: Any
    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, inner: Any, cfg: QatConfig, lo: float, hi: float):
        super().__init__()
        self.a_max = 2**cfg.activation_bits - 1
        self.w_max = 2 ** (cfg.weight_bits - 1) - 1
        self.lo, self.hi = min(lo, 0.0), max(hi, 0.0)
        self.a_scale = max((self.hi - self.lo) / self.a_max, 1e-8)
        self.a_zero = int(round(-self.lo / self.a_scale))
        self.weight = inner.weight
        self.bias = inner.bias
        del inner.weight, inner.bias
        inner.weight = inner.bias = None  # plain attributes: functional_call supplies the tensors
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = torch.fake_quantize_per_tensor_affine(x, self.a_scale, self.a_zero, 0, self.a_max)
        wq = int8_grid_weight(self.weight, self.w_max)
        params: dict[str, Any] = {"weight": wq, "bias": self.bias}
        return torch.func.functional_call(self.inner, params, (xq,))

    def range(self) -> tuple[float, float]:
        return (0 - self.a_zero) * self.a_scale, (self.a_max - self.a_zero) * self.a_scale

    def release(self) -> nn.Module:
        inner = self.inner
        del inner.weight, inner.bias
        inner.weight = self.weight
        inner.bias = self.bias  # None stays a plain attribute, as nn.Linear(bias=False) has it
        return inner


def observed_ranges(module: nn.Module, layers: dict[str, nn.Module], split: Any, batch_size: int = 64) -> dict[str, Any]:
    """Each layer's input min/max over ``split`` (eval mode, no gradients): the fixed ranges of DP QAT."""
    from keiryo.model.io import call_module

    found: dict[str, list[float]] = {n: [0.0, 0.0] for n in layers}

    def hook(name: str) -> Any:
        def record(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            found[name][0] = min(found[name][0], float(args[0].min()))
            found[name][1] = max(found[name][1], float(args[0].max()))

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            for x, _ in split.batches(batch_size, shuffle=False):
                call_module(module, x, list(x))
    finally:
        module.train(was)
        for h in handles:
            h.remove()
    return found


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


@register_pass("quantize.qat", QatConfig, stage="torch", summary="quantization-aware fine-tuning (then int8 static)")
def qat(handle: Any, cfg: QatConfig, ctx: PassContext) -> PassResult:
    data = ctx.require_data("quantize.qat")
    private = cfg.train.dp is not None
    handle = handle.clone()
    layers = prunable_layers(handle.module)
    if not layers:
        raise PassError("quantize.qat: the model has no Conv or Linear layer to quantize")
    comp = handle.metadata.get("compression", {})
    if private:  # ranges fixed from the calibration split; weights keep their names (PrivateFakeQuant.weight)
        start = observed_ranges(handle.module, layers, data.calib)
        for name, m in layers.items():
            _replace(handle.module, name, PrivateFakeQuant(m, cfg, *start[name]))
    else:
        for name, m in layers.items():
            _replace(handle.module, name, FakeQuant(m, cfg))
        # the state's parameter names (masks, palettes) gain ".inner": layers stay wrapped (ClampInput) afterwards
        for kind in ("masks", "palettes"):
            for pname in list(comp.get(kind, {})):
                layer, _, leaf = pname.rpartition(".")
                if layer in layers:
                    comp[kind][f"{layer}.inner.{leaf}"] = comp[kind].pop(pname)
    learned = cfg.learn_ranges and not private
    try:
        res = finetune(handle, ctx, cfg.train, description="quantize.qat")
    finally:
        ranges = {}
        for name in layers:
            fq = handle.module.get_submodule(name)
            ranges[name] = fq.range()
            inner = fq.release() if private else fq.inner
            _replace(handle.module, name, ClampInput(inner, *ranges[name]) if learned else inner)
        if not learned and not private:
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
    if private:
        calib = data.summary()["calibration"]
        info["activation_ranges_from"] = calib
        if calib.get("train_split", True):
            info["privacy_note"] = (
                "activation ranges were fixed from the private train split (calibration), which the DP guarantee does "
                "not cover; --calib-data synthetic or a public data source is covered"
            )
    return PassResult(handle, info)


MIN_DISTILL_SAMPLES = 32  # below this a QAT rung learns the inputs it is measured against, not the int8 grid


class QatDistillConfig(KeiryoConfig):
    """The ``qat`` rung of ``quantize.int8_auto``: fake-quant fine-tuning distilled from the fp32 model on unlabeled inputs."""

    epochs: int = Field(4, ge=1, description="passes over the unlabeled inputs (the calibration split)")
    max_steps: int = Field(0, ge=0, description="stop after this many optimizer steps (0: no cap besides epochs)")
    max_seconds: float = Field(480.0, gt=0, description="stop training after this long: the ladder's time cap")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0, description="SGD step size of the weights (pretrained: keep it small)")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD momentum")
    range_lr: float = Field(1e-5, gt=0, description="Adam step size of the learned activation ranges (scale, zero point)")
    temperature: float = Field(1.0, gt=0.0, description="of the task's distillation loss (KL for classification)")
    observe_steps: int = Field(4, ge=1, description="batches that set the initial activation ranges (min/max)")
    learn_ranges: bool = Field(
        True, description="learn activation ranges (LSQ); the int8 file takes them as its Conv/Linear input ranges"
    )


def distill_qat(
    student: Any,
    teacher: Any,
    x: dict[str, Any],
    cfg: QatDistillConfig,
    task: Any,
    seed: int = 0,
    what: str = "qat",
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, tuple[float, float]]]:
    """Fake-quant fine-tuning of ``student`` (a ModelHandle, changed in place) to match ``teacher``'s outputs on the
    unlabeled inputs ``x`` (named arrays): no label is read. Batch norm keeps its running statistics (they fold into
    the exported convolutions). Returns the record and each Conv/Linear's input range on the int8 grid (learned when
    ``learn_ranges``), by layer name; the layers are unwrapped again, so the model exports as it was."""
    import copy
    import time

    import numpy as np

    from keiryo.errors import DataError
    from keiryo.model.io import call_module, flatten_outputs

    n = len(next(iter(x.values())))
    if n < MIN_DISTILL_SAMPLES:
        raise DataError(f"{what}: QAT distillation needs at least {MIN_DISTILL_SAMPLES} calibration samples, got {n}")

    def fmt(t: torch.Tensor) -> torch.Tensor:  # depthwise convolutions train ~2x faster channels-last on CPU
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t

    xs = {k: fmt(torch.from_numpy(np.ascontiguousarray(v))) for k, v in x.items()}
    t_mod = copy.deepcopy(teacher.module).eval().to(memory_format=torch.channels_last)
    parts: list[list[torch.Tensor]] = []
    with torch.no_grad():  # the teacher's outputs, once: the loss's only targets
        for i in range(0, n, cfg.batch_size):
            batch = {k: v[i : i + cfg.batch_size] for k, v in xs.items()}
            parts.append(flatten_outputs(call_module(t_mod, batch, teacher.io.input_names))[0])
    del t_mod
    teacher_out = [torch.cat(p) for p in zip(*parts, strict=True)]
    qcfg = QatConfig(observe_steps=cfg.observe_steps, learn_ranges=cfg.learn_ranges)
    layers = prunable_layers(student.module)
    if not layers:
        raise PassError(f"{what}: the model has no Conv or Linear layer to quantize")
    for name, m in layers.items():
        _replace(student.module, name, FakeQuant(m, qcfg))
    fqs = [student.module.get_submodule(name) for name in layers]
    student.module.eval().to(memory_format=torch.channels_last)  # batch norm and dropout as exported
    for fq in fqs:
        fq.train()  # only the fake-quant observers see training mode
    # Plain SGD: a weight moves with its own gradient. Adam moves every weight by about its step size, noise-driven
    # ones too, and each move across a rounding boundary is a new rounding error: on EfficientNet-Lite0 Adam at
    # 2e-5..1e-4 (and SGD on gradients normalized per layer) raised the distillation loss 1.2-25x within 16 steps.
    ranges = [p for fq in fqs for p in (fq.scale, fq.zero_point)]
    taken = {id(p) for p in ranges}
    sgd = torch.optim.SGD([p for p in student.module.parameters() if id(p) not in taken], lr=cfg.lr, momentum=cfg.momentum)
    opt = torch.optim.Adam(ranges, lr=cfg.range_lr)
    gen = torch.Generator().manual_seed(seed)
    t0, steps, losses, stopped = time.perf_counter(), 0, [], "epochs"
    try:
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            for i in range(0, n - cfg.batch_size // 2, cfg.batch_size):  # a short last batch only when at least half
                idx = order[i : i + cfg.batch_size]
                s_out = flatten_outputs(student({k: v[idx] for k, v in xs.items()}))[0]
                loss = task.distill_loss(s_out, [t[idx] for t in teacher_out], None, 1.0, cfg.temperature)
                opt.zero_grad(set_to_none=True)
                sgd.zero_grad(set_to_none=True)
                loss.backward()
                sgd.step()
                opt.step()
                steps += 1
                losses.append(float(loss.detach()))
                if cfg.max_steps and steps >= cfg.max_steps:
                    stopped = "max_steps"
                elif time.perf_counter() - t0 > cfg.max_seconds:
                    stopped = "max_seconds"
                if stopped != "epochs":
                    break
            if log is not None:
                done = time.perf_counter() - t0
                log(f"{what}: epoch {epoch + 1}, {steps} steps, loss {np.mean(losses[-8:]):.4g}, {done:.0f} s")
            if stopped != "epochs":
                break
    finally:
        found = {}
        for name in layers:
            fq = student.module.get_submodule(name)
            found[name] = fq.range()
            _replace(student.module, name, fq.inner)
        student.module.eval().to(memory_format=torch.contiguous_format)
    k = max(1, len(losses) // 10)
    info = {
        "samples": n,
        "lr": cfg.lr,
        "steps": steps,
        "stopped_by": stopped,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "loss_first": round(float(np.mean(losses[:k])), 5) if losses else None,
        "loss_last": round(float(np.mean(losses[-k:])), 5) if losses else None,
        "layers": len(layers),
    }
    return info, found
