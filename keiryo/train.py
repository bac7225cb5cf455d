"""Supervised training with the task's loss: AdamW, cosine schedule with warm-up, early stopping on
the task's primary metric on the validation split; train batches stream from the data's DataLoader.

``--device auto|cpu|cuda|mps``: ``auto`` takes CUDA, then MPS, then the CPU. On CUDA the
forward pass runs under autocast (bf16 where the GPU supports it, else fp16 with a gradient
scaler); on the CPU training stays fp32.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from keiryo._console import progress_bar
from keiryo.config import KeiryoConfig
from keiryo.errors import ConfigError, DataError
from keiryo.model.io import Batch, call_module, flatten_outputs
from keiryo.privacy.dp import DPConfig

Device = Literal["auto", "cpu", "cuda", "mps"]
LossFn = Callable[[list[torch.Tensor], "torch.Tensor | None", Batch], torch.Tensor]


class TrainConfig(KeiryoConfig):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    patience: int = Field(5, ge=1, description="stop after this many epochs without a better validation metric")
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: torch default)")
    device: Device = "cpu"
    amp: bool = Field(True, description="mixed precision where the device supports it (CUDA)")
    dp: DPConfig | None = Field(
        None, description="differentially private training (Opacus DP-SGD); runs every epoch and keeps the last"
    )


@dataclass(frozen=True)
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_val: float
    metric: str
    test_metrics: dict[str, Any]
    seconds: float
    history: list[dict[str, float]]
    device: str
    privacy: dict[str, Any] | None = None  # the DP guarantee of a DP-SGD run (keiryo.privacy.dp.DPRun.record)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: no Apple GPU (MPS) is available here")
    return torch.device(name)


@torch.no_grad()
def outputs_on(handle: Any, split: Any, batch_size: int = 64, device: torch.device | None = None) -> list[np.ndarray]:
    """The torch model's outputs on every row of a split (eval mode)."""
    return outputs_and_targets(handle, split, batch_size, device)[0]


@torch.no_grad()
def outputs_and_targets(
    handle: Any, split: Any, batch_size: int = 64, device: torch.device | None = None
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The torch model's outputs and the split's targets in one pass (a streamed split is read once)."""
    module = handle.module
    was = module.training
    module.eval()
    parts: list[list[np.ndarray]] = []
    ys: list[np.ndarray] = []
    for x, y in split.batches(batch_size):
        if y is not None:
            ys.append(y.numpy())
        if device is not None:
            x = {k: v.to(device) for k, v in x.items()}
        got, _ = flatten_outputs(call_module(module, x, handle.input_names))
        parts.append([o.float().cpu().numpy() if o.dtype in (torch.float16, torch.bfloat16) else o.cpu().numpy() for o in got])
    module.train(was)
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))], (np.concatenate(ys) if ys else None)


def evaluate_torch(handle: Any, split: Any, task: Any, reference: list[np.ndarray] | None = None) -> dict[str, Any]:
    """The task's metrics of the torch model on ``split`` (fidelity against ``reference``, or itself)."""
    outs, y = outputs_and_targets(handle, split)
    return task.metrics(outs, y, reference if reference is not None else outs)


def train(
    handle: Any,
    data: Any,
    task: Any,
    cfg: TrainConfig | None = None,
    *,
    loss_fn: LossFn | None = None,
    after_step: Callable[[], None] | None = None,
    progress: bool = True,
    description: str = "train",
    reference: dict[str, list[np.ndarray]] | None = None,
) -> TrainResult:
    """Train ``handle.module`` in place on ``data.train``; the best validation weights are kept.

    ``loss_fn(outputs, targets, inputs)`` replaces the task's loss (distillation uses it);
    ``after_step()`` runs after every optimizer step (compression constraints re-apply there).
    ``reference`` holds the teacher's outputs on ``val``/``test`` for tasks scored only by
    fidelity (embeddings). Reproducible for a given seed, thread count and device.
    """
    cfg = cfg or TrainConfig()
    if len(data.train) == 0:
        raise DataError("training split is empty")
    if loss_fn is None and not task.needs_targets:
        raise ConfigError(f"task {task.name} has no labels to train on; use a distill step (it learns from the original model)")
    conversion: list[dict[str, Any]] = []
    if cfg.dp is not None:  # layers DP-SGD cannot train (BatchNorm) are replaced before the optimizer sees them
        from keiryo.privacy.dp import make_dp_ready

        conversion = make_dp_ready(handle, cfg.dp.small_groups)
    module = handle.module
    device = resolve_device(cfg.device)
    prev_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = max(1, math.ceil(len(data.train) / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    module.to(device)
    # convolutions train in channels-last layout (the demo's MobileNetV2 on 2 CPU cores: 1.3x faster); Opacus's
    # per-sample gradient hooks are left the layout they were written for
    channels_last = cfg.dp is None and any(isinstance(m, torch.nn.Conv2d) for m in module.modules())
    if channels_last:
        module.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dp_run = None
    if cfg.dp is not None:
        from keiryo.privacy.dp import make_private

        own = loss_fn is None  # ghost clipping needs the loss sample by sample: only the task's own has that form
        dp_run = make_private(
            module, opt, data.train, cfg.batch_size, cfg.epochs, cfg.dp, cfg.seed, conversion,
            task.loss if own else None, task.sample_losses if own else None,
        )  # fmt: skip
        opt = dp_run.optimizer
    amp_dtype = None
    if cfg.amp and device.type == "cuda" and dp_run is None:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    names = handle.input_names

    def val_metrics() -> dict[str, Any]:
        outs, y = outputs_and_targets(handle, data.val, device=device)
        ref = reference["val"] if reference else outs
        return task.metrics(outs, y, ref)

    best_score, best_epoch, best_state = -math.inf, 0, copy.deepcopy(module.state_dict())
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = progress_bar("epochs") if progress else None
    epoch = 0
    try:
        bar_task = bar.add_task(description, total=cfg.epochs, status="") if bar else None
        for epoch in range(1, cfg.epochs + 1):
            module.train()
            total_loss, seen = 0.0, 0
            batches = dp_run.loader if dp_run is not None else data.train.batches(cfg.batch_size, shuffle=True, generator=gen)
            for x, y in batches:
                n = len(next(iter(x.values())))
                if n < 2 and seen > 0 and dp_run is None:
                    continue  # a batch of one breaks BatchNorm (DP: every sampled batch is a step the accountant counts)
                x = {k: v.to(device) for k, v in x.items()}
                if channels_last:
                    x = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in x.items()}
                yt = task.targets(y).to(device) if y is not None and task.needs_targets else None
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outs, _ = flatten_outputs(call_module(module, x, names))
                    if dp_run is not None and dp_run.criterion is not None:  # ghost clipping: the loss per sample
                        if n == 0:
                            raise DataError(
                                f"epoch {epoch}: an empty Poisson batch, which dp grad_sample_mode ghost cannot step on "
                                "(it needs 1+ samples); use grad_sample_mode hooks"
                            )
                        loss = dp_run.criterion(outs, yt)  # its backward() runs Opacus's two passes
                    else:
                        loss = loss_fn(outs, yt, x) if loss_fn is not None else task.loss(outs, yt)
                if n == 0:  # an empty Poisson batch: a noise-only DP step (Opacus clips zero samples)
                    loss = sum((o.sum() for o in outs), torch.zeros((), device=device))
                if not torch.isfinite(loss.detach()):
                    raise DataError(f"training diverged at epoch {epoch}: loss is {loss.item()}; lower the learning rate")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if after_step is not None:
                    with torch.no_grad():
                        after_step()
                sched.step()
                total_loss += loss.item() * n
                seen += n
            vm = val_metrics()
            score = task.selection_score(vm)
            history.append({"epoch": epoch, "loss": total_loss / max(1, seen), f"val_{task.primary}": float(vm[task.primary])})
            if score > best_score:
                best_score, best_epoch, best_state = score, epoch, copy.deepcopy(module.state_dict())
            if bar and bar_task is not None:
                bar.update(
                    bar_task, advance=1, status=f"loss {history[-1]['loss']:.3f} val {task.primary} {vm.get(task.primary):.4g}"
                )
            if dp_run is not None:  # the budget is spent over all epochs; choosing on val data is not covered
                best_epoch, best_state = epoch, copy.deepcopy(module.state_dict())
            elif epoch - best_epoch >= cfg.patience:
                break
    finally:
        if dp_run is not None:
            dp_run.close()
        if bar:
            bar.stop()
        torch.set_num_threads(prev_threads)
        module.to("cpu")
        if channels_last:  # handed back as it came: saved weights and exporters expect contiguous tensors
            module.to(memory_format=torch.contiguous_format)
    module.load_state_dict(best_state)
    module.eval()
    test = evaluate_torch(handle, data.test, task, reference["test"] if reference else None)
    best_val = best_score if task.higher_is_better else -best_score
    if dp_run is not None:
        best_val = history[-1][f"val_{task.primary}"]
    privacy = dp_run.record() if dp_run is not None else None
    return TrainResult(epoch, best_epoch, best_val, task.primary, test, time.perf_counter() - t0, history, str(device), privacy)
