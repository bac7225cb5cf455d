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
    export: dict[str, Any] = Field(default_factory=dict, description="options of the target's exporter, e.g. precision")
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
    exporter = get_exporter(recipe.target)
    exporter.config.parse(recipe.export, where=f"recipe {recipe.name!r} export options ({recipe.target})")
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
            if exporter.format not in spec.formats:
                raise ConfigError(
                    f"{where}: {s.type} works on {'/'.join(spec.formats)} files, but the target {recipe.target} "
                    f"writes {exporter.format} files"
                )


def _q(type_: str, **params: Any) -> dict[str, Any]:
    return {"type": type_, "params": params}


BUILTIN_RECIPES: dict[str, dict[str, Any]] = {
    "fp32": {"description": "fp32 export, the reference on the target runtime", "steps": []},
    "int8": {
        "description": "int8 static PTQ: per-channel int8 weights, int8 activations calibrated (minmax)",
        "steps": [_q("quantize.int8_static")],
    },
    "int8-entropy": {
        "description": "int8 static PTQ with entropy calibration",
        "steps": [_q("quantize.int8_static", calibration="entropy")],
    },
    "int8-percentile": {
        "description": "int8 static PTQ with percentile calibration",
        "steps": [_q("quantize.int8_static", calibration="percentile")],
    },
    "int8-dynamic": {
        "description": "int8 weights, activations quantized at run time (Linear/attention-heavy models)",
        "steps": [_q("quantize.int8_dynamic")],
    },
    "fp16": {"description": "fp16 weights and compute", "steps": [_q("quantize.fp16")]},
    "int8-fallback": {
        "description": "int8 static PTQ; the most sensitive layers stay float until val drop <= 0.5 pt",
        "steps": [_q("quantize.int8_fallback", max_accuracy_drop=0.5)],
    },
    "int8-mse": {
        "description": "int8 static PTQ with least-error, clip-aware activation ranges",
        "steps": [_q("quantize.int8_static", calibration="mse")],
    },
    "int8-gptq": {
        "description": "int8 static PTQ: mse ranges, GPTQ weight rounding, bias correction on the int8 model's inputs",
        "steps": [_q("quantize.int8_static", calibration="mse", rounding="gptq", bias_correction="full")],
    },
    "int8-refit": {
        "description": "int8 static PTQ: int8-gptq, then each layer's weights solved for its int8 input, layer by layer, "
        "float logits; of the first 4 layers, those no slower in float stay float",
        "steps": [
            _q(
                "quantize.int8_static",
                calibration="mse",
                rounding="refit",
                bias_correction="full",
                granularity="measured",
                float_outputs=True,
                float_when_free=4,
            )
        ],
    },
    "int8-auto": {
        "description": "int8 escalated (PTQ: minmax, mse, bias correction, GPTQ, refit, 16-bit activations, float fallback; "
        "then QAT distilled from fp32) "
        "until val drop <= 0.5 pt",
        "steps": [_q("quantize.int8_auto")],  # the budget: the step's own, else --max-drop, else 0.5
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


# Built-in recipes are written for ONNX; a format-level step's equivalent on another target
# (None: there is none). Params are not carried over: each target's pass has its own options.
FORMAT_EQUIVALENTS: dict[str, dict[str, str | None]] = {
    "tflite": {
        "quantize.int8_static": "tflite.int8",
        "quantize.int8_dynamic": "tflite.int8_dynamic",
        "quantize.fp16": "tflite.fp16",
        "quantize.int8_fallback": None,
        "quantize.int8_auto": None,
    },
    "coreml": {
        "quantize.int8_static": "coreml.int8_weights",
        "quantize.int8_dynamic": "coreml.int8_weights",
        "quantize.fp16": None,  # Core ML fp16 is an export option: recipe export {precision: fp16}
        "quantize.int8_fallback": None,
        "quantize.int8_auto": None,
    },
}

# Built-ins that exist only for one target (their steps are that target's passes).
TARGET_RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "tflite": {
        "int8-gptq": {
            "description": "TFLite full-integer int8: mse ranges, GPTQ weight rounding, bias correction (tflite.int8's defaults)",
            "steps": [_q("tflite.int8", calibration="mse", rounding="gptq", bias_correction=True)],
        },
        "int8-refit": {
            "description": "TFLite full-integer int8: int8-gptq, then each layer solved for the input the int8 file gives it",
            "steps": [_q("tflite.int8", calibration="mse", rounding="refit", bias_correction=True)],
        },
        "int8-tensorwise": {
            "description": "TFLite full-integer int8 with one weight scale per tensor (smaller file than per-channel)",
            "steps": [_q("tflite.int8", granularity="tensorwise")],
        },
    },
    "coreml": {
        "fp16": {"description": "Core ML fp16 compute and weights", "export": {"precision": "fp16"}, "steps": []},
        "int8": {
            "description": "Core ML int8 weights, fp16 compute",
            "export": {"precision": "fp16"},
            "steps": [_q("coreml.int8_weights")],
        },
        "palettize4": {
            "description": "Core ML 4-bit palettes (the cluster pass's centroids when clustered), fp16 compute",
            "export": {"precision": "fp16"},
            "steps": [_q("coreml.palettize", nbits=4)],
        },
        "cluster16-palettize": {
            "description": "16-cluster weight sharing stored as exact 4-bit Core ML palettes",
            "export": {"precision": "fp16"},
            "steps": [_q("cluster", clusters=16), _q("coreml.palettize", nbits=4)],
        },
        "sparse80": {
            "description": "80% unstructured sparsity stored as Core ML sparse weights",
            "export": {"precision": "fp16"},
            "steps": [*BUILTIN_RECIPES["sparse80"]["steps"], _q("coreml.sparse")],
        },
    },
}


def retarget(steps: list[dict[str, Any]], target: str, where: str) -> list[dict[str, Any]]:
    """``steps`` written for ONNX, with each ONNX format-level step replaced by ``target``'s equivalent."""
    table = FORMAT_EQUIVALENTS.get(target)
    if table is None:
        return steps
    out = []
    for s in steps:
        if s["type"] in table:
            new = table[s["type"]]
            if new is None or s.get("params"):
                raise ConfigError(f"{where}: step {s['type']} has no {target} equivalent; use an onnx target or another recipe")
            out.append({"type": new, "params": {}})
        else:
            out.append(s)
    return out


def builtin_names(target: str = "onnx") -> list[str]:
    return list(dict.fromkeys([*BUILTIN_RECIPES, *TARGET_RECIPES.get(target, {})]))


def with_budget(recipe: Recipe, max_drop: float) -> tuple[Recipe, str | None]:
    """A recipe under an explicit fidelity budget (``--max-drop``): the built-in ``int8`` on ONNX becomes
    ``int8-auto`` at that budget (escalating until it is met), and ``quantize.int8_auto`` steps that name no
    ``max_accuracy_drop`` take it. Returns the recipe and a note saying what changed (None when nothing did)."""
    if recipe.name == "int8" and recipe.target == "onnx" and recipe.to_dict()["steps"] == load_recipe("int8").to_dict()["steps"]:
        auto = load_recipe("int8-auto")
        auto.steps[0].params["max_accuracy_drop"] = max_drop
        return auto, f"recipe int8 with a budget (--max-drop {max_drop}) runs as int8-auto"
    changed = False
    for s in recipe.steps:
        if s.type == "quantize.int8_auto" and "max_accuracy_drop" not in s.params:
            s.params["max_accuracy_drop"] = max_drop
            changed = True
    return recipe, f"recipe {recipe.name}: int8-auto budget {max_drop} from --max-drop" if changed else None


def load_recipe(ref: str | dict[str, Any], target: str | None = None) -> Recipe:
    """A built-in name (written for ONNX, translated to ``target``), a YAML/JSON file, or a dict."""
    tgt = target or "onnx"
    if isinstance(ref, dict):
        data = dict(ref)
    elif ref in TARGET_RECIPES.get(tgt, {}):
        data = {"name": ref, "target": tgt, **TARGET_RECIPES[tgt][ref]}
    elif ref in BUILTIN_RECIPES:
        data = {"name": ref, **BUILTIN_RECIPES[ref], "target": tgt}
        data["steps"] = retarget(data["steps"], tgt, f"recipe {ref!r} on target {tgt}")
    elif Path(ref).suffix.lower() in (".yaml", ".yml", ".json") or Path(ref).exists():
        data = load_structured_file(ref)
        if not isinstance(data, dict):
            raise ConfigError(f"{ref}: expected a mapping with 'steps' (and 'name', 'target'), got {type(data).__name__}")
        data.setdefault("name", Path(ref).stem)
    else:
        raise ConfigError(f"recipe {ref!r}: not a built-in ({', '.join(builtin_names(tgt))}) and no such .yaml/.json file")
    if target is not None:
        data.setdefault("target", target)
    return Recipe.parse(data, where=f"recipe {data.get('name', ref)!r}")
