"""Supervised training: AdamW, cosine schedule with warm-up, early stopping on val accuracy."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from keiryo._console import progress_bar
from keiryo.config import KeiryoConfig
from keiryo.data import DataSplits, Split
from keiryo.errors import DataError


class TrainConfig(KeiryoConfig):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    patience: int = Field(5, ge=1, description="stop after this many epochs without a better val accuracy")
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: torch default)")


@dataclass(frozen=True)
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_val_accuracy: float
    test_accuracy: float
    seconds: float
    history: list[dict[str, float]]


@torch.no_grad()
def accuracy(module: nn.Module, split: Split, batch_size: int = 256) -> float:
    was = module.training
    module.eval()
    correct = 0
    for x, y in split.batches(batch_size):
        correct += int((module(x).argmax(1) == y).sum())
    module.train(was)
    return correct / max(1, len(split))


def train(
    module: nn.Module,
    data: DataSplits,
    cfg: TrainConfig | None = None,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    progress: bool = True,
    description: str = "train",
) -> TrainResult:
    """Train ``module`` in place on ``data.train``; the best val-accuracy weights are kept.

    ``loss_fn(logits, targets, inputs)`` replaces cross-entropy (distillation uses it);
    ``after_step()`` runs after every optimizer step (compression constraints re-apply
    there: pruned zeros stay zero, clustered weights stay on their centroids).
    Reproducible for a given seed and thread count.
    """
    cfg = cfg or TrainConfig()
    if len(data.train) == 0:
        raise DataError("training split is empty")
    prev_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ce = loss_fn or (lambda logits, y, _x: F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing))
    best_acc, best_epoch, best_state = -1.0, 0, copy.deepcopy(module.state_dict())
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = progress_bar("epochs") if progress else None
    try:
        task = bar.add_task(description, total=cfg.epochs, status="") if bar else None
        epoch = 0
        for epoch in range(1, cfg.epochs + 1):
            module.train()
            perm = torch.randperm(len(data.train), generator=gen)
            total_loss = 0.0
            for i in range(0, len(perm), cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                if len(idx) < 2 and i > 0:
                    continue  # a batch of one breaks BatchNorm
                x, y = data.train.x[idx], data.train.y[idx]
                loss = ce(module(x), y, x)
                if not torch.isfinite(loss):
                    raise DataError(f"training diverged at epoch {epoch}: loss is {loss.item()}; lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if after_step is not None:
                    with torch.no_grad():
                        after_step()
                sched.step()
                total_loss += loss.item() * len(idx)
            val_acc = accuracy(module, data.val)
            history.append({"epoch": epoch, "loss": total_loss / len(data.train), "val_accuracy": val_acc})
            if val_acc > best_acc:
                best_acc, best_epoch, best_state = val_acc, epoch, copy.deepcopy(module.state_dict())
            if bar and task is not None:
                bar.update(task, advance=1, status=f"loss {history[-1]['loss']:.3f} val {val_acc:.2%}")
            if epoch - best_epoch >= cfg.patience:
                break
    finally:
        if bar:
            bar.stop()
        torch.set_num_threads(prev_threads)
    module.load_state_dict(best_state)
    module.eval()
    return TrainResult(epoch, best_epoch, best_acc, accuracy(module, data.test), time.perf_counter() - t0, history)
