"""Recipe schema: ``{name, target, steps: [{type, version, params}]}`` validated against the pass registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from keiryo.config import KeiryoConfig, load_structured_file
from keiryo.errors import ConfigError


class Step(KeiryoConfig):
    type: str = Field(description="a registered pass name, e.g. quantize.int8_static")
    version: int = Field(1, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)


class Recipe(KeiryoConfig):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    target: str = "onnx"
    description: str = ""
    steps: list[Step] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_steps(self) -> Recipe:
        validate_recipe(self)
        return self

    def step_configs(self) -> list[tuple[Any, KeiryoConfig]]:
        """(PassSpec, parsed config) for every step."""
        from keiryo.passes import get_pass

        out = []
        for i, s in enumerate(self.steps):
            spec = get_pass(s.type)
            out.append((spec, spec.config.parse(s.params, where=f"recipe {self.name!r} step {i + 1} ({s.type}) params")))
        return out

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def validate_recipe(recipe: Recipe) -> None:
    from keiryo.export import get_exporter
    from keiryo.passes import PASSES, _load_builtin

    _load_builtin()
    get_exporter(recipe.target)
    seen_format = False
    for i, s in enumerate(recipe.steps):
        where = f"recipe {recipe.name!r} step {i + 1}"
        if s.type not in PASSES:
            raise ConfigError(f"{where}: unknown step type {s.type!r}; expected one of: {', '.join(PASSES.names())}")
        spec = PASSES.get(s.type)
        spec.config.parse(s.params, where=f"{where} ({s.type}) params")
        if spec.stage == "torch":
            if seen_format:
                raise ConfigError(f"{where}: torch-level step {s.type} comes after a format-level step; put it first")
        else:
            seen_format = True
            if recipe.target not in spec.formats:
                raise ConfigError(f"{where}: {s.type} works on {'/'.join(spec.formats)} files, but the target is {recipe.target}")


def _q(type_: str, **params: Any) -> dict[str, Any]:
    return {"type": type_, "params": params}


BUILTIN_RECIPES: dict[str, dict[str, Any]] = {
    "fp32": {"description": "fp32 export, the reference on the target runtime", "steps": []},
    "int8": {
        "description": "int8 static PTQ, QDQ, per-channel weights, minmax calibration",
        "steps": [_q("quantize.int8_static", calibration="minmax")],
    },
    "int8-entropy": {
        "description": "int8 static PTQ with entropy calibration",
        "steps": [_q("quantize.int8_static", calibration="entropy")],
    },
    "int8-percentile": {
        "description": "int8 static PTQ with percentile calibration",
        "steps": [_q("quantize.int8_static", calibration="percentile")],
    },
    "int8-dynamic": {"description": "int8 dynamic PTQ (Linear/attention-heavy models)", "steps": [_q("quantize.int8_dynamic")]},
    "fp16": {"description": "fp16 weights and compute", "steps": [_q("quantize.fp16")]},
    "int8-fallback": {
        "description": "int8 static PTQ; the most sensitive layers stay float until val drop <= 0.5 pt",
        "steps": [_q("quantize.int8_fallback", max_accuracy_drop=0.5)],
    },
    "qat": {
        "description": "quantization-aware fine-tuning, then int8 static",
        "steps": [_q("quantize.qat"), _q("quantize.int8_static")],
    },
    "prune-distill-int8": {
        "description": "structured pruning (30% channels), distillation, int8 static",
        "steps": [_q("prune.structured", ratio=0.3), _q("distill"), _q("quantize.int8_static")],
    },
    "cluster16": {
        "description": "16-cluster weight sharing (4-bit palettes), fp32 export",
        "steps": [_q("cluster", clusters=16)],
    },
    "sparse80": {
        "description": "80% unstructured sparsity, gradual with fine-tuning (gzip gain, not speed)",
        "steps": [_q("prune.unstructured", sparsity=0.8, schedule="gradual", steps=5, finetune={"epochs": 4, "lr": 2e-3})],
    },
    "lowrank": {
        "description": "SVD factorization (rank 25%) with fine-tuning",
        "steps": [_q("factorize.lowrank", rank_ratio=0.25)],
    },
}


def load_recipe(ref: str | dict[str, Any], target: str | None = None) -> Recipe:
    """A built-in name, a YAML/JSON file, or a dict."""
    if isinstance(ref, dict):
        data = dict(ref)
    elif ref in BUILTIN_RECIPES:
        data = {"name": ref, **BUILTIN_RECIPES[ref]}
    elif Path(ref).suffix.lower() in (".yaml", ".yml", ".json") or Path(ref).exists():
        data = load_structured_file(ref)
        if not isinstance(data, dict):
            raise ConfigError(f"{ref}: expected a mapping with 'steps' (and 'name', 'target'), got {type(data).__name__}")
        data.setdefault("name", Path(ref).stem)
    else:
        raise ConfigError(f"recipe {ref!r}: not a built-in ({', '.join(BUILTIN_RECIPES)}) and no such .yaml/.json file")
    if target is not None:
        data.setdefault("target", target)
    return Recipe.parse(data, where=f"recipe {data.get('name', ref)!r}")
