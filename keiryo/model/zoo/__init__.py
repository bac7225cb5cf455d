"""keiryo's own reference architectures, built for a given input shape and class count.

Each entry is registered under a stable name with a pydantic options class, so
``zoo:resnet:depth=20,width=16`` is validated (unknown options are errors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from keiryo._registry import Registry
from keiryo.config import KeiryoConfig

__all__ = ["ZooEntry", "ZOO", "build", "register_zoo"]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    options: type[KeiryoConfig]
    builder: Callable[[tuple[int, ...], int | None, Any], nn.Module]
    input_ranks: tuple[int, ...]  # accepted len(input_shape) without the batch dim
    summary: str
    needs_outputs: bool = True  # False: builds without an output count (an embedding encoder, a 1-value regressor)


ZOO: Registry[ZooEntry] = Registry("zoo model")


def register_zoo(
    name: str, options: type[KeiryoConfig], input_ranks: tuple[int, ...], summary: str, *, needs_outputs: bool = True
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ZOO.add(name, ZooEntry(name, options, fn, input_ranks, summary, needs_outputs))
        return fn

    return deco


def build(name: str, input_shape: tuple[int, ...], num_classes: int | None, options: dict[str, Any] | None = None) -> nn.Module:
    """Build zoo model ``name`` for ``input_shape`` (no batch dim) and ``num_classes`` outputs.

    ``num_classes`` is the class count of a classifier, the value count of a regressor, or None
    for models that need none (an embedding encoder).
    """
    from keiryo.errors import ConfigError

    entry = ZOO.get(name)
    opts = entry.options.parse(options, where=f"zoo:{name} options")
    if len(input_shape) not in entry.input_ranks:
        raise ConfigError(
            f"zoo:{name} takes inputs of rank {' or '.join(map(str, entry.input_ranks))} "
            f"(without batch), got shape {tuple(input_shape)}"
        )
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"zoo:{name}: the number of outputs must be >= 1, got {num_classes}")
    if num_classes is None and entry.needs_outputs:
        raise ConfigError(f"zoo:{name} needs the number of outputs: the data has no labels to count them from")
    try:
        return entry.builder(tuple(input_shape), num_classes, opts)
    except ValueError as e:
        raise ConfigError(f"zoo:{name}: {e}") from e


# Import the architectures so they register themselves.
from keiryo.model.zoo import conv1d, mlp, mobilenetv2, resnet, sensor, text_encoder, transformer  # noqa: E402,F401
