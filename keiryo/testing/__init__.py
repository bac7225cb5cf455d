"""Tiny models and data for tests (ours and users'): a few thousand parameters, seconds to train."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TinyCNN(nn.Module):
    """Conv-BN-ReLU x2 + linear head: ~3k parameters, exports and quantizes like a real CNN."""

    def __init__(self, input_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10, width: int = 8):
        super().__init__()
        c = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def tiny_cnn(input_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10, width: int = 8) -> nn.Module:
    """Factory usable as ``--model keiryo.testing:tiny_cnn``."""
    return TinyCNN(tuple(input_shape), num_classes, width)


def not_a_module(input_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10) -> object:
    """A broken factory for tests: returns something that is not an nn.Module."""
    return {"not": "a module"}


def blobs(n: int = 300, features: int = 8, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separable Gaussian blobs as (x float32, y int64)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, size=(classes, features))
    y = rng.integers(0, classes, size=n)
    x = centers[y] + rng.normal(0, 1, size=(n, features))
    return x.astype(np.float32), y.astype(np.int64)


def blob_datasets(seed: int = 0) -> torch.utils.data.Dataset:
    """``module:function`` data source for tests: one TensorDataset."""
    x, y = blobs(seed=seed)
    return torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


@torch.no_grad()
def inject_activation_outliers(first: nn.Linear, second: nn.Linear, channels: int = 2, factor: float = 50.0) -> list[int]:
    """Make a few hidden channels between two Linear layers (ReLU between them) ``factor`` times larger.

    The function is unchanged (ReLU is positively homogeneous: the next layer divides
    by ``factor``), but the activation range is now dominated by a few outlier
    channels, as in transformer LLMs: per-tensor int8 activations lose the others.
    Returns the channel indices.
    """
    idx = torch.argsort(first.weight.abs().sum(dim=1), descending=True)[:channels].tolist()
    for c in idx:
        first.weight[c] *= factor
        first.bias[c] *= factor
        second.weight[:, c] /= factor
    return idx


def top1_accuracy(session: object, split: object) -> float:
    """Top-1 accuracy of a runtime session (or torch handle via open_session) on an in-memory split, for tests."""
    from keiryo.evaluate import predict

    outputs = predict(session, split)
    return float((outputs[0].argmax(1) == split.targets.numpy()).mean())  # type: ignore[attr-defined]
