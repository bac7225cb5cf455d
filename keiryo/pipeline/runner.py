"""Run recipes: torch-level steps -> export (parity-checked) -> format-level steps -> measure.

``compress`` measures the torch baseline and every recipe as a candidate on the
target runtime, and writes the output folder atomically: it is built in a
temporary sibling and renamed into place only when ``results.json`` is complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from keiryo.benchmark import BenchConfig, measure_file, run_benchmark
from keiryo.config import KeiryoConfig
from keiryo.data import DataSplits
from keiryo.errors import ConfigError
from keiryo.evaluate import accuracy, fidelity, predict, size_of
from keiryo.export import Artifact, ParityConfig, check_parity, export, get_exporter
from keiryo.model import ModelHandle, save_weights
from keiryo.passes import PassContext
from keiryo.pipeline.cache import StepCache
from keiryo.pipeline.recipe import Recipe
from keiryo.runtime import open_session, unavailable_reason
from keiryo.search.constraints import Constraint, check_constraints, select_best


class RunOptions(KeiryoConfig):
    bench: BenchConfig = Field(default_factory=BenchConfig)
    parity: ParityConfig = Field(default_factory=ParityConfig)
    seed: int = 0
    progress: bool = True


@dataclass
class Baseline:
    """The fp32 torch model's predictions on the test split, which every candidate is compared to."""

    handle: ModelHandle
    pred: np.ndarray
    accuracy: float
    metrics: dict[str, Any] = field(default_factory=dict)


def measure_baseline(handle: ModelHandle, data: DataSplits, opts: RunOptions) -> Baseline:
    with open_session("torch", handle, opts.bench.threads) as s:
        logits = predict(s, data.test.x)
        bench = run_benchmark(s, data.test.x[:1].numpy(), opts.bench)
    acc = accuracy(logits, data.test.y)
    metrics = {
        "accuracy": acc,
        "fidelity": 1.0,
        "accuracy_drop": 0.0,
        "params": handle.num_params(),
        "macs": handle.macs(),
        **{k: v for k, v in bench.to_dict().items() if k != "peak_rss_mb"},
        "peak_rss_mb": None,
    }
    return Baseline(handle, logits.argmax(1), acc, metrics)


def _log(opts: RunOptions, msg: str) -> None:
    if opts.progress:
        from keiryo._console import stderr_console

        stderr_console().print(msg, highlight=False)


def run_recipe(
    recipe: Recipe,
    handle: ModelHandle,
    data: DataSplits,
    workdir: Path,
    baseline: Baseline,
    opts: RunOptions | None = None,
    memo: dict[str, tuple[ModelHandle, dict[str, Any]]] | None = None,
    cache: StepCache | None = None,
    bench_lock: str | Path | None = None,
) -> dict[str, Any]:
    """Apply ``recipe`` to a copy of ``handle``; return the candidate's record (artifact inside ``workdir``).

    ``memo`` (shared across recipes of one run) holds torch-stage results by a hash of the
    input model and the steps so far; ``cache`` (on disk, across runs and processes) holds
    the exported file after all torch-stage steps. Either way a recipe sharing a prefix
    (the same pruning and distillation) does not compute it again.
    """
    opts = opts or RunOptions()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ctx = PassContext(
        data=data, workdir=workdir, seed=opts.seed, threads=opts.bench.threads, progress=opts.progress, teacher=handle
    )
    steps_cfg = recipe.step_configs()
    n_torch = sum(spec.stage == "torch" for spec, _ in steps_cfg)  # validated: torch-level steps come first
    artifact, parity, effects, params, macs = _torch_stage(recipe, steps_cfg[:n_torch], handle, data, ctx, opts, memo, cache)
    from keiryo.passes import apply

    for i, (spec, cfg) in enumerate(steps_cfg[n_torch:], start=n_torch + 1):
        _log(opts, f"  [{recipe.name}] step {i}/{len(steps_cfg)}: {spec.name}")
        ctx.step_index = i
        res = apply(artifact, cfg, ctx)
        artifact = res.model
        effects.append({"type": spec.name, "stage": spec.stage, **size_of(artifact.path).to_dict(), "info": res.info})
    with open_session(artifact.runtime, artifact.path, opts.bench.threads) as s:
        logits = predict(s, data.test.x)
    acc = accuracy(logits, data.test.y)
    bench = measure_file(artifact.path, artifact.runtime, data.test.x[:1].numpy(), opts.bench, lock=bench_lock)
    metrics = {
        "accuracy": acc,
        "accuracy_drop": round((baseline.accuracy - acc) * 100, 4),
        "fidelity": fidelity(logits, baseline.pred),
        **size_of(artifact.path).to_dict(),
        "params": params,
        "macs": macs,
        **bench.to_dict(),
        "export_parity": parity,
    }
    metrics["size_mb"] = metrics["size_bytes"] / 1e6
    return {
        "name": recipe.name,
        "recipe": recipe.to_dict(),
        "format": artifact.format,
        "runtime": artifact.runtime,
        "artifact_path": artifact.path,
        "metrics": metrics,
        "steps": effects,
        "status": "ok",
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _torch_stage(
    recipe: Recipe,
    torch_steps: list[tuple[Any, Any]],
    handle: ModelHandle,
    data: DataSplits,
    ctx: PassContext,
    opts: RunOptions,
    memo: dict[str, tuple[ModelHandle, dict[str, Any]]] | None,
    cache: StepCache | None,
) -> tuple[Artifact, dict[str, Any], list[dict[str, Any]], int, int]:
    """Torch-level steps then the export with its parity check: (artifact, parity, effects, params, MACs)."""
    from keiryo.passes import apply

    exporter = get_exporter(recipe.target)
    out = ctx.workdir / f"export{exporter.suffix}"
    key = None
    if cache is not None and torch_steps:
        steps = [s.model_dump(mode="json") for s in recipe.steps[: len(torch_steps)]]
        target = recipe.target + (f":{sorted(recipe.export.items())}" if recipe.export else "")
        key = StepCache.key(handle.content_hash(), data.fingerprint(), steps, target, opts.seed)
        hit = cache.get(key)
        if hit is not None:
            _log(opts, f"  [{recipe.name}] torch-level steps found in the step cache: reused")
            shutil.copy2(hit[0], out)
            meta = hit[1]
            art = Artifact(out, exporter.format, exporter.runtime, meta["input_names"], meta["output_names"], meta["info"])
            return art, meta["parity"], [{**e, "cached": True} for e in meta["effects"]], meta["params"], meta["macs"]
    model = handle
    effects: list[dict[str, Any]] = []
    prefix_key = handle.content_hash()
    for i, (spec, cfg) in enumerate(torch_steps, start=1):
        ctx.step_index = i
        if memo is not None:
            prefix_key = hashlib.sha256(f"{prefix_key}|{spec.name}|{cfg.to_json()}|{opts.seed}".encode()).hexdigest()
            if prefix_key in memo:
                cached, effect = memo[prefix_key]
                model = cached.clone()
                effects.append({**effect, "cached": True})
                _log(opts, f"  [{recipe.name}] step {i}: {spec.name} (same as an earlier recipe: reused)")
                continue
        _log(opts, f"  [{recipe.name}] step {i}: {spec.name}")
        res = apply(model, cfg, ctx)
        model = res.model
        effects.append({"type": spec.name, "stage": "torch", **torch_step_effect(model, data), "info": res.info})
        if memo is not None:
            memo[prefix_key] = (model.clone(), effects[-1])
    artifact = export(model, recipe.target, out, recipe.export)
    parity = export_parity(model, artifact, data, opts, f"{recipe.name}: {recipe.target} export")
    effects.append({"type": f"export.{recipe.target}", "stage": "export", **size_of(artifact.path).to_dict(), "parity": parity})
    params, macs = model.num_params(), model.macs()
    if key is not None and cache is not None:
        cache.put(
            key,
            artifact.path,
            {
                "input_names": artifact.input_names,
                "output_names": artifact.output_names,
                "info": artifact.info,
                "parity": parity,
                "effects": effects,
                "params": params,
                "macs": macs,
            },
        )
    return artifact, parity, effects, params, macs


def export_parity(model: ModelHandle, artifact: Artifact, data: DataSplits, opts: RunOptions, what: str) -> dict[str, Any]:
    """Parity of a fresh export with its torch model, on the export's runtime; a partial file is removed on failure."""
    reason = unavailable_reason(artifact.runtime)
    if reason:
        return {"skipped": reason, "structure": artifact.info.get("validated")}
    try:
        with open_session(artifact.runtime, artifact.path, opts.bench.threads) as s:
            return check_parity(model.module, s, data.test.x, opts.parity, what).to_dict()
    except BaseException:
        _remove(artifact.path)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def export_variant(
    recipe: Recipe, handle: ModelHandle, data: DataSplits, out: str | Path, opts: RunOptions | None = None
) -> dict[str, Any]:
    """Run ``recipe`` (torch steps, export with parity, format steps) and write the final file to ``out`` atomically.

    Returns ``{artifact, parity, steps, accuracy, agreement}``; ``accuracy`` (test split) and
    ``agreement`` (top-1 agreement with the torch model) are measured on the runtime when it runs here.
    """
    opts = opts or RunOptions()
    out = Path(out)
    exporter = get_exporter(recipe.target)
    if out.suffix != exporter.suffix:
        raise ConfigError(f"--out {out}: a {recipe.target} export is written to a {exporter.suffix} path")
    from keiryo.passes import apply

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as td:
        ctx = PassContext(
            data=data, workdir=Path(td), seed=opts.seed, threads=opts.bench.threads, progress=opts.progress, teacher=handle
        )
        steps_cfg = recipe.step_configs()
        n_torch = sum(spec.stage == "torch" for spec, _ in steps_cfg)
        model = handle
        for i, (spec, cfg) in enumerate(steps_cfg[:n_torch], start=1):
            ctx.step_index = i
            _log(opts, f"  step {i}: {spec.name}")
            model = apply(model, cfg, ctx).model
        artifact = export(model, recipe.target, Path(td) / f"export{exporter.suffix}", recipe.export)
        parity = export_parity(model, artifact, data, opts, f"{recipe.target} export")
        steps = []
        for i, (spec, cfg) in enumerate(steps_cfg[n_torch:], start=n_torch + 1):
            ctx.step_index = i
            _log(opts, f"  step {i}: {spec.name}")
            res = apply(artifact, cfg, ctx)
            artifact = res.model
            steps.append({"type": spec.name, "info": res.info})
        report: dict[str, Any] = {"parity": parity, "steps": steps, "info": artifact.info}
        reason = unavailable_reason(artifact.runtime)
        if reason:
            report["accuracy"] = report["agreement"] = None
            report["not_measured"] = reason
        else:
            with open_session(artifact.runtime, artifact.path, opts.bench.threads) as s:
                logits = predict(s, data.test.x)
            from keiryo.train import accuracy as torch_accuracy

            report["accuracy"] = accuracy(logits, data.test.y)
            report["torch_accuracy"] = torch_accuracy(model.module, data.test)
            with open_session("torch", model, opts.bench.threads) as s:
                report["agreement"] = fidelity(logits, predict(s, data.test.x).argmax(1))
        if out.exists():
            _remove(out)
        os.replace(artifact.path, out)
    report["artifact"] = Artifact(
        out, artifact.format, artifact.runtime, artifact.input_names, artifact.output_names, artifact.info
    )
    return report


def check_runnable(target: str) -> None:
    """Candidates are measured on their runtime; refuse a target whose runtime cannot run here."""
    reason = unavailable_reason(get_exporter(target).runtime)
    if reason:
        raise ConfigError(
            f"target {target}: candidates cannot be measured on this machine ({reason}); "
            f"use `keiryo export --format {target} --variant ...`, or run this where the runtime works"
        )


def torch_step_effect(model: ModelHandle, data: DataSplits) -> dict[str, Any]:
    """params, MACs, weight-file size (raw and gzip) and test accuracy of a torch-stage result."""
    import gzip

    from safetensors.torch import save

    from keiryo.train import accuracy as torch_accuracy

    blob = save({k: v.detach().contiguous() for k, v in model.module.state_dict().items()})
    return {
        "params": model.num_params(),
        "macs": model.macs(),
        "size_bytes": len(blob),
        "size_gzip_bytes": len(gzip.compress(blob, 9)),
        "accuracy": torch_accuracy(model.module, data.test),
    }


def compress(
    handle: ModelHandle,
    data: DataSplits,
    recipes: Sequence[Recipe],
    out_dir: str | Path,
    *,
    constraints: Sequence[Constraint] = (),
    opts: RunOptions | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure the baseline and every recipe; write ``out_dir`` (results.json, artifacts) atomically."""
    from keiryo.report.results import build_results, write_results

    opts = opts or RunOptions()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out}: output directory exists and is not empty; pass --overwrite or choose another --out")
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise ConfigError(f"recipe names must be unique, got {names}")
    targets = list(dict.fromkeys(r.target for r in recipes))
    for t in targets:
        check_runnable(t)
    references = []
    for t in targets:
        # The reference every ratio is taken against: the fp32 export on the same runtime.
        name = "fp32" if len(targets) == 1 else f"fp32-{t}"
        if not any(r.name in ("fp32", f"fp32-{t}") and r.target == t for r in recipes):
            from keiryo.pipeline.recipe import load_recipe

            references.append(load_recipe("fp32", target=t).model_copy(update={"name": name}))
    recipes = [*references, *recipes]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _log(opts, f"measuring baseline (torch, {opts.bench.threads} thread(s))")
        baseline = measure_baseline(handle, data, opts)
        save_weights(handle.module, tmp / "baseline.safetensors", {"source": handle.spec.source})
        candidates = []
        memo: dict[str, tuple[ModelHandle, dict[str, Any]]] = {}
        for r in recipes:
            _log(opts, f"candidate {r.name}: target {r.target}, {len(r.steps)} step(s)")
            cand = run_recipe(r, handle, data, tmp / "work" / r.name, baseline, opts, memo)
            final = tmp / "candidates" / r.name / f"model{cand['artifact_path'].suffix}"
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(cand.pop("artifact_path")), final)
            cand["artifact"] = str(final.relative_to(tmp))
            candidates.append(cand)
        shutil.rmtree(tmp / "work", ignore_errors=True)
        for c in candidates:
            c["constraints_violated"] = check_constraints(constraints, c["metrics"])
        best = select_best(candidates, constraints)
        results = build_results(handle, data, baseline.metrics, candidates, best, constraints, opts, extra or {})
        write_results(results, tmp / "results.json")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return results
