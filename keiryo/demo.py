"""``keiryo demo``: the whole core loop on the embedded default (digits, zoo MobileNetV2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from keiryo.benchmark import BenchConfig
from keiryo.data import DataSpec, load_data
from keiryo.model import ModelSpec, load_model
from keiryo.pipeline import RunOptions, compress, load_recipe
from keiryo.search import Constraint
from keiryo.tasks import get_task
from keiryo.train import TrainConfig, train

DEMO_DATA = DataSpec(source="digits", options={"size": 16, "channels": 1})
DEMO_MODEL = ModelSpec(source="zoo:mobilenetv2", options={"width": 1.0})
DEMO_RECIPES = ("fp32", "int8", "fp16")


def demo_model(
    weights: str | Path | None = None, *, epochs: int = 12, seed: int = 0, progress: bool = True
) -> tuple[Any, Any, Any]:
    """(data, handle, training result or None): the demo model, loaded from ``weights`` or trained now."""
    data = load_data(DEMO_DATA.model_copy(update={"seed": seed}))
    spec = DEMO_MODEL.model_copy(update={"weights": str(weights) if weights else None})
    handle = load_model(spec, data, seed=seed, output_name="logits")
    res = None
    if weights is None:
        cfg = TrainConfig(epochs=epochs, seed=seed, lr=3e-3, patience=5)
        task = get_task("classification").bind(handle.output_names)
        res = train(handle, data, task, cfg, progress=progress, description="train mobilenetv2 on digits")
    return data, handle, res


def run_demo(
    out: str | Path,
    *,
    epochs: int = 12,
    threads: int = 1,
    overwrite: bool = True,
    seed: int = 0,
    progress: bool = True,
    recipes: tuple[str, ...] = DEMO_RECIPES,
) -> dict[str, Any]:
    """Train, then compress with the default recipes; returns the results dict written to ``out``."""
    data, handle, res = demo_model(epochs=epochs, seed=seed, progress=progress)
    assert res is not None
    opts = RunOptions(bench=BenchConfig(threads=threads), seed=seed, progress=progress)
    return compress(
        handle,
        data,
        [load_recipe(r) for r in recipes],
        out,
        constraints=[Constraint(metric="accuracy_drop", op="<=", bound=1.0)],
        opts=opts,
        overwrite=overwrite,
        extra={
            "training": {
                "epochs_run": res.epochs_run,
                "best_epoch": res.best_epoch,
                "best_val_accuracy": res.best_val,
                "seconds": round(res.seconds, 1),
            }
        },
    )
