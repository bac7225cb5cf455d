"""Run recipes: torch-level steps -> export (parity-checked per output) -> format-level steps -> measure.

:func:`run_steps` is the one step loop (used by ``compress``, ``optimize`` and
``export --variant``). :func:`run_recipe` runs it and measures the result on its
runtime (:mod:`keiryo.measure`), returning a typed :class:`Candidate`. ``compress``
measures the torch baseline and every recipe; a recipe that fails (a calibrator crash,
an export error, NaN outputs) is recorded with its reason and step, the others are kept,
and the output folder is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import Field

from keiryo.benchmark import BenchConfig
from keiryo.budget import Constraint, check_constraints, select_best
from keiryo.config import KeiryoConfig
from keiryo.data import DataSplits
from keiryo.errors import ConfigError, KeiryoError, first_line
from keiryo.evaluate import size_of
from keiryo.export import Artifact, ParityConfig, check_parity, export, get_exporter
from keiryo.measure import Baseline, measure_artifact, measure_baseline, torch_metrics
from keiryo.model import ModelHandle, save_weights
from keiryo.passes import PassContext, apply
from keiryo.pipeline.cache import StepCache
from keiryo.pipeline.candidate import Candidate
from keiryo.pipeline.recipe import Recipe
from keiryo.privacy.dp import conversion_metadata
from keiryo.runtime import open_session, unavailable_reason

__all__ = ["Baseline", "RunOptions", "StepsOutput", "compress", "export_variant", "run_recipe", "run_steps"]


class RunOptions(KeiryoConfig):
    bench: BenchConfig = Field(default_factory=BenchConfig)
    parity: ParityConfig = Field(default_factory=ParityConfig)
    seed: int = 0
    progress: bool = True
    device: str = Field("cpu", pattern="^(auto|cpu|cuda|mps)$", description="where training passes run")


def _log(opts: RunOptions, msg: str, style: str | None = None) -> None:
    """A progress line on stderr; printed verbatim (names like [int8] and file paths are not markup)."""
    if opts.progress:
        from keiryo._console import stderr_console

        stderr_console().print(msg, style=style, highlight=False, markup=False)


def resolve_task(task: Any, data: DataSplits, handle: ModelHandle | None = None) -> Any:
    """A bound Task object from a name, ``module:Class``, a Task, or None (inferred from the data)."""
    from keiryo.tasks import get_task, infer_task

    t = get_task(task if task is not None else infer_task(data))
    if handle is not None:
        t.bind(handle.output_names)
    return t


@dataclass
class StepsOutput:
    model: ModelHandle | None  # the torch model after the torch-level steps (None when the step cache gave the file)
    artifact: Artifact
    parity: dict[str, Any]
    effects: list[dict[str, Any]] = field(default_factory=list)
    params: int = 0
    macs: int = 0


class StepFailure(KeiryoError):
    """A step of a recipe failed; ``step`` names it (the original error is chained)."""

    def __init__(self, message: str, step: str):
        super().__init__(message)
        self.step = step


def _context(handle: ModelHandle, data: DataSplits, task: Any, workdir: Path, opts: RunOptions) -> PassContext:
    return PassContext(
        data=data,
        workdir=workdir,
        seed=opts.seed,
        threads=opts.bench.threads,
        progress=opts.progress,
        teacher=handle,
        task=task,
        device=opts.device,
    )


def run_steps(
    recipe: Recipe,
    handle: ModelHandle,
    data: DataSplits,
    ctx: PassContext,
    opts: RunOptions,
    *,
    memo: dict[str, tuple[ModelHandle, dict[str, Any]]] | None = None,
    cache: StepCache | None = None,
    baseline: Baseline | None = None,
) -> StepsOutput:
    """Torch-level steps, the export with its parity check, then format-level steps.

    ``memo`` (shared across recipes of one run) holds torch-stage results by a hash of the
    input model and the steps so far; ``cache`` (on disk, across runs and processes) holds
    the exported file after all torch-stage steps (or none: the export of the input). Either way a recipe sharing a prefix
    (the same pruning and distillation) does not compute it again. A failing step raises
    :class:`StepFailure` naming it.
    """
    steps_cfg = recipe.step_configs()
    n_torch = sum(spec.stage == "torch" for spec, _ in steps_cfg)  # validated: torch-level steps come first
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    exporter = get_exporter(recipe.target)
    out = ctx.workdir / f"export{exporter.suffix}"
    key = None
    if cache is not None:  # with no torch-level steps too: the trials of a PTQ search export the model once
        steps = [s.model_dump(mode="json") for s in recipe.steps[:n_torch]]
        target = recipe.target + (f":{sorted(recipe.export.items())}" if recipe.export else "")
        key = StepCache.key(handle.content_hash(), data.fingerprint(), steps, target, opts.seed)
    hit = cache.get(key) if cache is not None and key is not None else None
    model = handle
    if hit is not None:
        what = f"torch-level steps and {recipe.target} export" if n_torch else f"{recipe.target} export"
        _log(opts, f"  [{recipe.name}] {what} found in the step cache: reused")
        shutil.copy2(hit[0], out)
        meta = hit[1]
        artifact = Artifact(out, exporter.format, exporter.runtime, meta["input_names"], meta["output_names"], meta["info"])
        reused = [{**e, "cached": True} for e in meta["effects"]]
        # the model the file was exported from: the input itself when no torch-level step ran, else not at hand
        res = StepsOutput(None if n_torch else handle, artifact, meta["parity"], reused, meta["params"], meta["macs"])
    else:
        effects: list[dict[str, Any]] = []
        prefix_key = handle.content_hash()
        for i, (spec, cfg) in enumerate(steps_cfg[:n_torch], start=1):
            ctx.step_index = i
            if memo is not None:
                prefix_key = hashlib.sha256(f"{prefix_key}|{spec.name}|{cfg.to_json()}|{opts.seed}".encode()).hexdigest()
                if prefix_key in memo:
                    cached, effect = memo[prefix_key]
                    model = cached.clone()
                    effects.append({**effect, "cached": True})
                    _log(opts, f"  [{recipe.name}] step {i}: {spec.name} (same as an earlier recipe: reused)")
                    continue
            _log(opts, f"  [{recipe.name}] step {i}/{len(steps_cfg)}: {spec.name}")
            result = _step(spec.name, lambda model=model, cfg=cfg: apply(model, cfg, ctx))
            model = result.model
            effects.append(
                {"type": spec.name, "stage": "torch", **torch_metrics(model, data, ctx.task, baseline), "info": result.info}
            )
            if memo is not None:
                memo[prefix_key] = (model.clone(), effects[-1])
        # recipes whose torch-level steps are the same (none, for int8 / fp16 / fp32 side by side) export once
        export_key = f"{prefix_key}|export.{recipe.target}|{sorted((recipe.export or {}).items())}"
        done = memo.get(export_key) if memo is not None else None
        if done is not None and Path(done[1]["path"]).exists():
            _log(opts, f"  [{recipe.name}] {recipe.target} export: the same as an earlier recipe's, reused")
            _copy(Path(done[1]["path"]), out)
            artifact = replace(done[1]["artifact"], path=out)
            parity = done[1]["parity"]
            effects.append({**done[1]["effect"], "cached": True})
        else:
            what = f"{recipe.name}: {recipe.target} export"
            artifact = _step(f"export.{recipe.target}", lambda: export(model, recipe.target, out, recipe.export))
            parity = _step(f"export.{recipe.target}", lambda: export_parity(model, artifact, data, opts, what))
            effects.append(
                {"type": f"export.{recipe.target}", "stage": "export", **size_of(artifact.path).to_dict(), "parity": parity}
            )
            if memo is not None:  # a copy: a recipe without format-level steps hands its export on as the candidate
                kept = _copy(out, ctx.workdir / f"export-shared{exporter.suffix}")
                memo[export_key] = (model, {"path": str(kept), "artifact": artifact, "parity": parity, "effect": effects[-1]})
        res = StepsOutput(model, artifact, parity, effects, model.num_params(), model.macs())
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
                    "params": res.params,
                    "macs": res.macs,
                },
            )
    ctx.source = res.model  # what format-level steps were exported from (int8-auto's QAT rung trains it)
    for i, (spec, cfg) in enumerate(steps_cfg[n_torch:], start=n_torch + 1):
        _log(opts, f"  [{recipe.name}] step {i}/{len(steps_cfg)}: {spec.name}")
        ctx.step_index = i
        art = res.artifact
        result = _step(spec.name, lambda art=art, cfg=cfg: apply(art, cfg, ctx))
        res.artifact = result.model
        res.effects.append({"type": spec.name, "stage": spec.stage, **size_of(res.artifact.path).to_dict(), "info": result.info})
    return res


def _copy(src: Path, dst: Path) -> Path:
    """``src`` copied to ``dst``: a file, or a directory (a Core ML package)."""
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)
    return dst


def _step(name: str, fn: Any) -> Any:
    try:
        return fn()
    except StepFailure:
        raise
    except KeiryoError as e:
        raise StepFailure(str(e), name) from e
    except Exception as e:  # a backend's crash inside one step (a calibrator, a converter) fails that recipe only
        raise StepFailure(f"{name}: {type(e).__name__}: {first_line(e, 300)}", name) from e


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
    task: Any = None,
    measured: Path | None = None,
) -> Candidate:
    """Apply ``recipe`` to a copy of ``handle`` and measure the result; never raises for a failing recipe.

    The returned :class:`Candidate` is ``ok`` (its ``artifact_path`` inside ``workdir``) or
    ``failed`` with the error and the step that failed. ``measured``: a folder of ``SHA256.json``
    records of files already measured in this search; a byte-identical file is not measured
    again (its record is reused, with ``duplicate_of`` naming the original).
    """
    opts = opts or RunOptions()
    task = task or resolve_task(None, data, handle)
    t0 = time.perf_counter()
    ctx = _context(handle, data, task, workdir, opts)
    try:
        res = run_steps(recipe, handle, data, ctx, opts, memo=memo, cache=cache, baseline=baseline)
        art = res.artifact
        sha = file_sha256(art.path)
        earlier = read_measured(measured, sha)
        if earlier is None:
            metrics = _step(
                "measure", lambda: measure_artifact(art.path, art.runtime, data, task, baseline, opts.bench, bench_lock)
            )
    except StepFailure as e:
        return Candidate.failed(recipe.name, recipe.to_dict(), str(e), e.step, time.perf_counter() - t0)
    if earlier is not None:
        _log(opts, f"  [{recipe.name}] the same file as {earlier['name']}: not measured again")
        metrics = dict(earlier["metrics"])
    metrics.update(params=res.params, macs=res.macs, export_parity=res.parity)
    cand = Candidate.succeeded(
        recipe.name,
        recipe.to_dict(),
        format=art.format,
        runtime=art.runtime,
        artifact_path=art.path,
        metrics=metrics,
        steps=res.effects,
        seconds=time.perf_counter() - t0,
    )
    cand.sha256 = sha
    cand.duplicate_of = earlier["name"] if earlier is not None else None
    return cand


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of a directory's files (a Core ML package) in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        h.update(str(f.relative_to(path) if path.is_dir() else "").encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_measured(folder: Path | None, sha: str) -> dict[str, Any] | None:
    if folder is None:
        return None
    f = folder / f"{sha}.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else None
    except (OSError, ValueError):
        return None  # a torn record: measure again


def record_measured(folder: Path, sha: str, name: str, metrics: dict[str, Any]) -> None:
    from keiryo._atomic import write_atomic

    write_atomic(folder / f"{sha}.json", json.dumps({"name": name, "metrics": metrics}))


def export_parity(model: ModelHandle, artifact: Artifact, data: DataSplits, opts: RunOptions, what: str) -> dict[str, Any]:
    """Parity of a fresh export with its torch model, on the export's runtime; a partial file is removed on failure."""
    reason = unavailable_reason(artifact.runtime)
    if reason:
        return {"skipped": reason, "structure": artifact.info.get("validated")}
    try:
        with open_session(artifact.runtime, artifact.path, opts.bench.threads) as s:
            return check_parity(model, s, data.test, opts.parity, what).to_dict()
    except BaseException:
        _remove(artifact.path)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def export_variant(
    recipe: Recipe, handle: ModelHandle, data: DataSplits, out: str | Path, opts: RunOptions | None = None, task: Any = None
) -> dict[str, Any]:
    """Run ``recipe`` (torch steps, export with parity, format steps) and write the final file to ``out`` atomically.

    Returns ``{artifact, parity, steps, metrics, torch_metrics}``: the task's metrics of the final file
    on its runtime (fidelity against the torch model after the torch steps), when the runtime runs here.
    """
    opts = opts or RunOptions()
    task = task or resolve_task(None, data, handle)
    out = Path(out)
    exporter = get_exporter(recipe.target)
    if out.suffix != exporter.suffix:
        raise ConfigError(f"--out {out}: a {recipe.target} export is written to a {exporter.suffix} path")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as td:
        ctx = _context(handle, data, task, Path(td), opts)
        try:
            res = run_steps(recipe, handle, data, ctx, opts)
        except StepFailure as e:
            raise e.__cause__ if isinstance(e.__cause__, KeiryoError) else e  # noqa: B904
        artifact, model = res.artifact, res.model
        assert model is not None  # no step cache here
        report: dict[str, Any] = {"parity": res.parity, "steps": res.effects, "info": artifact.info}
        reason = unavailable_reason(artifact.runtime)
        if reason:
            report["metrics"] = report["torch_metrics"] = None
            report["not_measured"] = reason
        else:
            from keiryo.evaluate import predict
            from keiryo.measure import task_metrics
            from keiryo.train import evaluate_torch, outputs_on

            ref = outputs_on(model, data.test)
            with open_session(artifact.runtime, artifact.path, opts.bench.threads) as s:
                outs = predict(s, data.test)
            report["metrics"] = task_metrics(task, outs, data, ref, artifact.path.name)
            report["torch_metrics"] = evaluate_torch(model, data.test, task)
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
    task: Any = None,
) -> dict[str, Any]:
    """Measure the baseline and every recipe; write ``out_dir`` (results.json, artifacts) atomically.

    A recipe that fails is recorded (``status: failed``, ``error``, ``failed_step``); the others
    are kept. ``results["failed"]`` counts the failures.
    """
    from keiryo._atomic import atomic_dir
    from keiryo.report.results import build_results, write_results

    opts = opts or RunOptions()
    task = resolve_task(task, data, handle)
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
    with atomic_dir(out) as tmp:
        _log(opts, f"measuring baseline (torch, {opts.bench.threads} thread(s)); task {task.name}")
        baseline = measure_baseline(handle, data, task, opts.bench)
        save_weights(handle.module, tmp / "baseline.safetensors", {"source": handle.spec.source, **conversion_metadata(handle)})
        candidates: list[Candidate] = []
        memo: dict[str, tuple[ModelHandle, dict[str, Any]]] = {}
        for r in recipes:
            _log(opts, f"candidate {r.name}: target {r.target}, {len(r.steps)} step(s)")
            cand = run_recipe(r, handle, data, tmp / "work" / r.name, baseline, opts, memo, task=task)
            if cand.ok:
                assert cand.artifact_path is not None
                final = tmp / "candidates" / r.name / f"model{cand.artifact_path.suffix}"
                final.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(cand.artifact_path), final)
                cand.artifact = str(final.relative_to(tmp))
                cand.constraints_violated = check_constraints(constraints, cand.metrics)
            else:
                _log(opts, f"  candidate {r.name} failed at {cand.failed_step}: {cand.error}", "yellow")
            candidates.append(cand)
        shutil.rmtree(tmp / "work", ignore_errors=True)
        records = [c.record() for c in candidates]
        best = select_best(records, constraints)
        results = build_results(handle, data, task, baseline.metrics, records, best, constraints, opts, extra or {})
        write_results(results, tmp / "results.json")
    return results
