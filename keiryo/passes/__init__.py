"""Compression passes: a config class + a registered function.

``@register_pass("quantize.int8_static", Int8StaticConfig, stage="onnx")`` on
``def apply(model, cfg, ctx) -> PassResult``. Torch-stage passes take and return a
:class:`~keiryo.model.ModelHandle`; format-stage passes take and return an
:class:`~keiryo.export.Artifact` of their format. Users call one verb:
``keiryo.apply(model, cfg)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from keiryo._registry import Registry
from keiryo.config import KeiryoConfig
from keiryo.errors import ConfigError, PassError

__all__ = ["PASSES", "PassContext", "PassResult", "PassSpec", "apply", "get_pass", "register_pass"]

Stage = Literal["torch", "onnx", "tflite", "coreml"]
PRIVACY_STEP = "privacy_step"  # ModelHandle.metadata key: the DP record of the training a pass just ran


@dataclass
class PassContext:
    """What a pass may use besides the model: data, a work folder, seed and threads."""

    data: Any = None  # keiryo.data.DataSplits
    workdir: Path = field(default_factory=lambda: Path.cwd())
    seed: int = 0
    threads: int = 1
    progress: bool = False
    step_index: int = 0
    teacher: Any = None  # the recipe's input model (ModelHandle): the teacher for distillation
    source: Any = None  # format-level passes: the torch model (ModelHandle) their file was exported from, when known
    task: Any = None  # keiryo.tasks.Task: the losses training passes use, the metric fallback budgets
    device: str = "cpu"  # where training passes run (auto | cpu | cuda | mps)

    def require_data(self, what: str) -> Any:
        if self.data is None:
            from keiryo.errors import DataError

            raise DataError(f"{what} needs data; pass --data")
        return self.data

    def get_task(self) -> Any:
        if self.task is None:
            from keiryo.tasks import get_task, infer_task

            self.task = get_task(infer_task(self.require_data("a training pass")))
        return self.task

    def out_path(self, tag: str, suffix: str) -> Path:
        """Where a format-level pass writes its file: the work folder, numbered by step."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self.workdir / f"{self.step_index:02d}-{tag}{suffix}"


@dataclass
class PassResult:
    model: Any  # ModelHandle (torch stage) or Artifact (format stage)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassSpec:
    name: str
    config: type[KeiryoConfig]
    fn: Callable[[Any, Any, PassContext], PassResult]
    stage: Stage
    formats: tuple[str, ...]
    summary: str


PASSES: Registry[PassSpec] = Registry("pass")
_BY_CONFIG: dict[type, str] = {}


def register_pass(
    name: str, config: type[KeiryoConfig], *, stage: Stage, summary: str, formats: tuple[str, ...] = ()
) -> Callable[[Callable[..., PassResult]], Callable[..., PassResult]]:
    def deco(fn: Callable[..., PassResult]) -> Callable[..., PassResult]:
        if config in _BY_CONFIG:
            raise ValueError(f"config {config.__name__} already belongs to pass {_BY_CONFIG[config]!r}")
        PASSES.add(name, PassSpec(name, config, fn, stage, formats or ((stage,) if stage != "torch" else ()), summary))
        _BY_CONFIG[config] = name
        return fn

    return deco


def _load_builtin() -> None:
    from keiryo.passes import (  # noqa: F401
        cluster,
        distill,
        lowrank,
        prune_structured,
        prune_unstructured,
        qat,
        quantize_auto,
        quantize_coreml,
        quantize_fallback,
        quantize_ort,
        quantize_tflite,
        slim,
    )


def get_pass(name: str) -> PassSpec:
    _load_builtin()
    return PASSES.get(name)


def all_passes() -> list[PassSpec]:
    _load_builtin()
    return [PASSES.get(n) for n in PASSES.names()]


def apply(model: Any, cfg: KeiryoConfig, ctx: PassContext | None = None) -> PassResult:
    """Apply the pass that ``cfg`` configures to ``model``."""
    _load_builtin()
    name = _BY_CONFIG.get(type(cfg))
    if name is None:
        raise ConfigError(f"{type(cfg).__name__} is not the config of any registered pass")
    spec = PASSES.get(name)
    ctx = ctx or PassContext()
    _check_stage(spec, model)
    res = spec.fn(model, cfg, ctx)
    privacy = getattr(res.model, "metadata", {}).pop(PRIVACY_STEP, None)  # set by a DP-SGD fine-tune (passes._state)
    if privacy:
        res.info.setdefault("privacy", privacy)
    return res


def _check_stage(spec: PassSpec, model: Any) -> None:
    from keiryo.export import Artifact
    from keiryo.model import ModelHandle

    if spec.stage == "torch" and not isinstance(model, ModelHandle):
        raise PassError(f"pass {spec.name} works on a torch model, got {type(model).__name__}")
    if spec.stage != "torch":
        if not isinstance(model, Artifact):
            raise PassError(f"pass {spec.name} works on an exported {'/'.join(spec.formats)} file; export first")
        if model.format not in spec.formats:
            raise PassError(f"pass {spec.name} works on {'/'.join(spec.formats)} files, got a {model.format} file")
