"""Exporters: torch model -> deployment file, each checked against the torch model.

An exporter is registered by target name and called as
``export(handle, out_path, cfg) -> Artifact``; :func:`check_parity` compares the
exported file, run on its own runtime, with the torch module on real samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keiryo._registry import Registry
from keiryo.config import KeiryoConfig
from keiryo.export.parity import ParityConfig, ParityReport, check_parity

__all__ = ["EXPORTERS", "Artifact", "Exporter", "ParityConfig", "ParityReport", "check_parity", "export", "register_exporter"]


@dataclass
class Artifact:
    """A model file in a deployment format and the runtime that executes it."""

    path: Path
    format: str
    runtime: str
    input_names: list[str]
    output_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


@dataclass(frozen=True)
class Exporter:
    name: str
    format: str
    runtime: str
    suffix: str
    config: type[KeiryoConfig]
    fn: Callable[..., Artifact]


EXPORTERS: Registry[Exporter] = Registry("export target")


def register_exporter(
    name: str, *, runtime: str, suffix: str, config: type[KeiryoConfig], format: str | None = None
) -> Callable[[Callable[..., Artifact]], Callable[..., Artifact]]:
    """``format``: the file format the target writes (default: the target's name; the ``web`` target writes
    ``onnx`` files, so every ONNX format-level pass applies to it)."""

    def deco(fn: Callable[..., Artifact]) -> Callable[..., Artifact]:
        EXPORTERS.add(name, Exporter(name, format or name, runtime, suffix, config, fn))
        return fn

    return deco


def get_exporter(name: str) -> Exporter:
    from keiryo.export import coreml, onnx, tflite  # noqa: F401  (registers; backends are imported when used)

    return EXPORTERS.get(name)


def export(handle: Any, target: str, out_path: str | Path, cfg: Any = None) -> Artifact:
    """Export ``handle`` to ``target`` at ``out_path`` (written atomically)."""
    exp = get_exporter(target)
    cfg = cfg if isinstance(cfg, exp.config) else exp.config.parse(cfg or {}, where=f"export {target} options")
    art = exp.fn(handle, Path(out_path), cfg)
    art.runtime = exp.runtime  # one writer may serve several targets (onnx and web)
    return art
