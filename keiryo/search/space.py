"""The search space: recipe templates (cheap first) and their hyper-parameters.

A trial picks a template, then the template's parameters; the result is an ordinary
:class:`~keiryo.pipeline.Recipe`. Templates are ordered by cost: post-training
quantization needs seconds, pruning + distillation minutes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from keiryo.pipeline.recipe import Recipe, retarget


@dataclass(frozen=True)
class Template:
    name: str
    cost: int  # relative cost, for ordering the first trials
    build: Callable[[Any, str], list[dict[str, Any]]]  # (optuna-like trial, target) -> steps written for ONNX
    seeds: tuple[dict[str, Any], ...]  # parameter sets tried first, in this order
    formats: tuple[str, ...] = ("onnx", "tflite")  # the file formats its steps exist for (web writes onnx files)

    def available_for(self, target: str) -> bool:
        from keiryo.export import get_exporter

        return get_exporter(target).format in self.formats

    def recipe(self, trial: Any, target: str) -> Recipe:
        steps = retarget(self.build(trial, target), target, f"search template {self.name}")
        name = f"t{trial.number:04d}-{self.name}"
        return Recipe(name=name, target=target, description=f"search template {self.name}", steps=steps)  # type: ignore[arg-type]


def _s(type_: str, **params: Any) -> dict[str, Any]:
    return {"type": type_, "params": params}


def _ptq(t: Any, target: str) -> list[dict[str, Any]]:
    if target == "tflite":
        return [_s("tflite.int8", granularity=t.suggest_categorical("ptq.granularity", ["channelwise", "tensorwise"]))]
    return [
        _s(
            "quantize.int8_static",
            calibration=t.suggest_categorical("ptq.calibration", ["minmax", "entropy", "percentile"]),
            per_channel=t.suggest_categorical("ptq.per_channel", [True, False]),
        )
    ]


def _fallback(t: Any, target: str) -> list[dict[str, Any]]:
    return [_s("quantize.int8_fallback", max_accuracy_drop=t.suggest_float("fallback.max_drop", 0.1, 1.0, step=0.1))]


def _prune_distill(t: Any, target: str) -> list[dict[str, Any]]:
    ratio = t.suggest_float("prune.ratio", 0.2, 0.6, step=0.1)
    epochs = t.suggest_int("distill.epochs", 3, 12, step=3)
    return [_s("prune.structured", ratio=ratio), _s("distill", train={"epochs": epochs, "lr": 2e-3}), _s("quantize.int8_static")]


def _cluster(t: Any, target: str) -> list[dict[str, Any]]:
    return [_s("cluster", clusters=t.suggest_categorical("cluster.k", [8, 16, 32])), _s("quantize.int8_static")]


def _lowrank(t: Any, target: str) -> list[dict[str, Any]]:
    return [
        _s("factorize.lowrank", rank_ratio=t.suggest_float("lowrank.ratio", 0.25, 0.75, step=0.25)),
        _s("quantize.int8_static"),
    ]


def _slim(t: Any, target: str) -> list[dict[str, Any]]:
    width = t.suggest_float("slim.width", 0.25, 0.75, step=0.25)
    epochs = t.suggest_int("slim.epochs", 6, 15, step=3)
    return [_s("slim", width=width, distill={"train": {"epochs": epochs, "lr": 3e-3}}), _s("quantize.int8_static")]


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            "ptq",
            1,
            _ptq,
            (
                {"ptq.calibration": "minmax", "ptq.per_channel": True, "ptq.granularity": "channelwise"},
                {"ptq.calibration": "entropy", "ptq.per_channel": True, "ptq.granularity": "tensorwise"},
            ),
        ),
        Template("ptq_fallback", 2, _fallback, ({"fallback.max_drop": 0.5},), formats=("onnx",)),
        Template(
            "prune_distill",
            5,
            _prune_distill,
            ({"prune.ratio": 0.3, "distill.epochs": 6}, {"prune.ratio": 0.5, "distill.epochs": 9}),
        ),
        Template("cluster", 3, _cluster, ({"cluster.k": 16},)),
        Template("lowrank", 4, _lowrank, ({"lowrank.ratio": 0.5},)),
        Template("slim", 6, _slim, ({"slim.width": 0.5, "slim.epochs": 9},)),
    )
}


def templates_for(target: str) -> list[str]:
    """The templates whose steps exist for ``target``'s file format; an error when there are none."""
    from keiryo.errors import ConfigError

    names = [n for n, t in TEMPLATES.items() if t.available_for(target)]
    if not names:
        raise ConfigError(f"target {target}: no search template works on its files; use compress with recipes for it")
    return names


def first_trials(names: list[str]) -> list[dict[str, Any]]:
    """Parameter sets to enqueue first: every template's seeds, cheapest template first."""
    out = []
    for t in sorted((TEMPLATES[n] for n in names), key=lambda t: t.cost):
        for seed in t.seeds:
            out.append({"template": t.name, **seed})
    return out
