"""``optimize``: search recipes under a budget, measuring every candidate on the target runtime.

The output directory holds the search as it goes (``study.db``: Optuna's storage;
``trials/NNNN/``: each finished trial's file and record, written atomically before the
trial is reported). ``results.json``, ``report.html``, ``pareto.png`` and ``best/`` are
written at the end, so a folder without ``results.json`` is visibly unfinished, and
``--resume`` continues it without recomputing any completed trial.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from keiryo.budget import Constraint, check_constraints, select_best, violation
from keiryo.config import KeiryoConfig
from keiryo.errors import ConfigError, ConstraintNotMetError
from keiryo.privacy.dp import conversion_metadata
from keiryo.search.space import TEMPLATES, templates_for


class OptimizeConfig(KeiryoConfig):
    target: str = "onnx"
    constraints: list[Constraint] = Field(default_factory=list)
    templates: list[str] = Field(default_factory=list, description="search templates (default: all the target supports)")
    trials: int = Field(20, ge=1)
    timeout_s: float | None = Field(None, gt=0)
    stop_when_met: bool = False
    executor: Literal["local", "ray"] = "local"
    address: str | None = None
    workers: int | None = Field(None, ge=1)
    sampler: Literal["nsga2", "tpe"] = "nsga2"
    seed: int = 0
    remeasure_front: bool = True

    @model_validator(mode="after")
    def _check(self) -> OptimizeConfig:
        unknown = [t for t in self.templates if t not in TEMPLATES]
        if unknown:
            raise ValueError(f"unknown search templates {unknown}; expected some of {list(TEMPLATES)}")
        wrong = [t for t in self.templates if not TEMPLATES[t].available_for(self.target)]
        if wrong:
            raise ValueError(
                f"search templates {wrong} are not available for target {self.target}; use some of {templates_for(self.target)}"
            )
        check_contradictions(self.constraints)
        return self


def check_contradictions(constraints: list[Constraint]) -> None:
    """A lower bound above an upper bound on the same metric can never be met: say so before any work."""
    for a in constraints:
        for b in constraints:
            if a.metric == b.metric and a.op in ("<=", "<") and b.op in (">=", ">") and b.bound > a.bound:
                raise ValueError(f"contradictory budget: {b} and {a} cannot both hold")


def pareto_front(cands: list[dict[str, Any]], metric: str = "accuracy", higher_is_better: bool = True) -> list[str]:
    """Names of the candidates no other candidate beats on p95, size and the task's metric at once."""
    ok = [c for c in cands if c.get("status") == "ok" and c["metrics"].get(metric) is not None]
    sign = -1.0 if higher_is_better else 1.0

    def key(c: dict[str, Any]) -> tuple[float, float, float]:
        m = c["metrics"]
        return (m["latency_p95_ms"], m["size_bytes"], sign * m[metric])

    front = []
    for c in ok:
        kc = key(c)
        if not any(all(x <= y for x, y in zip(key(o), kc, strict=True)) and key(o) != kc for o in ok):
            front.append(c["name"])
    return front


def _write_atomic_dir(final: Path, files: dict[str, bytes]) -> None:
    from keiryo._atomic import atomic_dir

    with atomic_dir(final) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)


def _trial_files(out: Path) -> list[Path]:
    """The trial records, never those in a ``.NNNN.partial-*`` folder a killed run left behind."""
    return sorted(out.glob("trials/[0-9]*/candidate.json"))


def _load_trials(out: Path) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in _trial_files(out)]


def optimize(
    handle: Any,
    data: Any,
    out_dir: str | Path,
    cfg: OptimizeConfig,
    opts: Any = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    require_met: bool = False,
    progress: bool = True,
    task: Any = None,
) -> dict[str, Any]:
    from keiryo.benchmark import measure_file
    from keiryo.measure import bench_sample, measure_baseline
    from keiryo.model import save_weights
    from keiryo.pipeline.recipe import load_recipe
    from keiryo.pipeline.runner import RunOptions, _log, check_runnable, record_measured, resolve_task, run_recipe
    from keiryo.report.html import write_report
    from keiryo.report.results import build_results, write_results
    from keiryo.search.executors import Job, LocalExecutor, RayExecutor
    from keiryo.search.strategy import OptunaStrategy

    opts = opts or RunOptions(progress=progress)
    task = resolve_task(task, data, handle)
    check_runnable(cfg.target)
    if not cfg.templates:
        cfg = cfg.model_copy(update={"templates": templates_for(cfg.target)})
    out = Path(out_dir)
    state = out / "search.json"
    if resume:
        if not state.is_file():
            raise ConfigError(f"{out}: nothing to resume (no search.json); start a search without --resume")
        saved = json.loads(state.read_text())
        if saved["model_hash"] != handle.content_hash():
            raise ConfigError(f"{out}: the search was started with another model (content hash differs); use another --out")
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out}: output directory exists and is not empty; pass --resume, --overwrite or another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache").mkdir(exist_ok=True)
    weights = out / "baseline.safetensors"
    if not resume:
        save_weights(handle.module, weights, {"source": handle.spec.source, **conversion_metadata(handle)})
        state.write_text(json.dumps({"model_hash": handle.content_hash(), "config": cfg.model_dump(mode="json")}, indent=2))
    t_start = time.monotonic()
    _log(opts, f"measuring baseline (torch, {opts.bench.threads} thread(s))")
    baseline = measure_baseline(handle, data, task, opts.bench)
    lock = str(out / ".bench.lock")
    ref_file = out / "reference" / "candidate.json"
    if ref_file.is_file():
        reference = json.loads(ref_file.read_text())
    else:
        _log(opts, "measuring the fp32 reference on the target runtime")
        with tempfile.TemporaryDirectory() as td:
            ref = run_recipe(
                load_recipe("fp32", target=cfg.target), handle, data, Path(td), baseline, opts, bench_lock=lock, task=task
            )
            if not ref.ok or ref.artifact_path is None:
                raise ConfigError(f"the fp32 reference failed at {ref.failed_step}: {ref.error}")
            path = ref.artifact_path
            reference = ref.record()
            reference["artifact"] = f"reference/model{path.suffix}"
            record_measured(out / "cache" / "measured", reference["sha256"], reference["name"], reference["metrics"])
            _write_atomic_dir(
                out / "reference",
                {f"model{path.suffix}": path.read_bytes(), "candidate.json": json.dumps(reference, indent=2).encode()},
            )

    def recorded(number: int) -> dict[str, Any] | None:
        f = out / "trials" / f"{number:04d}" / "candidate.json"
        return json.loads(f.read_text()) if f.is_file() else None

    strategy = OptunaStrategy(
        out / "study.db", cfg.templates, cfg.constraints, cfg.target, cfg.sampler, cfg.seed, resume, recorded, task
    )
    if resume:
        from keiryo._atomic import remove_stale

        remove_stale(out / "trials")  # half-written trial folders of the killed run
    records = _load_trials(out)
    done_before = sum(1 for r in records if not r.get("duplicate_of"))  # interrupted trials without a record do not count
    duplicates = len(records) - done_before
    if resume:
        _log(opts, f"resuming: {done_before} finished trial(s) kept ({len(strategy.completed())} completed)")
    model_spec = handle.spec.model_copy(update={"weights": str(weights)}).model_dump(mode="json")
    base_job = {
        "model_spec": model_spec,
        "data_spec": data.spec.model_dump(mode="json"),
        "options": opts.model_dump(mode="json"),
        "task": {"ref": task.ref, "options": task.options},
        "baseline_metrics": baseline.metrics,
        "cache_dir": str(out / "cache"),
        "bench_lock": lock,
        "extra": {"calibration": data.calib_source} if data.calib_source else {},  # --calib-data, redone on other nodes
    }
    executor: Any = LocalExecutor(handle, data, baseline) if cfg.executor == "local" else RayExecutor(cfg.address, cfg.workers)
    pending: dict[int, Any] = {}
    finished = done_before
    submitted = done_before
    met = False
    bar = None
    if progress:
        from keiryo._console import progress_bar

        bar = progress_bar("trials")
        bar.add_task("search", total=cfg.trials, completed=finished, status="")

    def timed_out() -> bool:
        return cfg.timeout_s is not None and time.monotonic() - t_start > cfg.timeout_s

    try:
        while finished < cfg.trials:
            while (
                len(pending) < executor.slots
                and submitted < cfg.trials + duplicates
                and not (met and cfg.stop_when_met)
                and not timed_out()
            ):
                cand = strategy.suggest()
                pending[cand.number] = cand
                submitted += 1
                if bar:
                    bar.update(0, status=f"trial {cand.number}: {cand.recipe.name.split('-', 1)[1]}")
                executor.submit(Job(cand.number, cand.recipe.to_dict(), **base_job))
            if not pending:
                break
            job, res = executor.next_done()
            cand = pending.pop(job.number)
            res["trial"] = job.number
            res["params"] = cand.params
            if res.get("status") == "ok" and res.get("duplicate_of"):
                # the same file as an earlier trial: told to the sampler, not counted, the trial is spent elsewhere
                res.pop("artifact_bytes", None), res.pop("artifact_suffix", None)
                _write_atomic_dir(out / "trials" / f"{job.number:04d}", {"candidate.json": json.dumps(res, indent=2).encode()})
                strategy.report(cand, res["metrics"])
                duplicates += 1
                _log(opts, f"trial {job.number}: the same file as {res['duplicate_of']}; not counted")
                if duplicates > cfg.trials:  # the space holds fewer distinct files than trials asked for
                    _log(opts, "most sampled recipes give files already measured: stopping", "yellow")
                    break
                continue
            if res.get("status") == "ok":
                blob, suffix = res.pop("artifact_bytes"), res.pop("artifact_suffix")
                res["artifact"] = f"trials/{job.number:04d}/model{suffix}"
                res["constraints_violated"] = check_constraints(cfg.constraints, res["metrics"])
                _write_atomic_dir(
                    out / "trials" / f"{job.number:04d}",
                    {f"model{suffix}": blob, "candidate.json": json.dumps(res, indent=2).encode()},
                )
                record_measured(out / "cache" / "measured", res["sha256"], res["name"], res["metrics"])  # after its record
                strategy.report(cand, res["metrics"])
                met = met or not res["constraints_violated"]
            else:
                _write_atomic_dir(out / "trials" / f"{job.number:04d}", {"candidate.json": json.dumps(res, indent=2).encode()})
                strategy.report(cand, None, res.get("error"))
                _log(opts, f"trial {job.number} failed: {res.get('error')}")
            finished += 1
            if bar:
                bar.update(0, advance=1, status=_status(res, task.primary))
            if (met and cfg.stop_when_met) or timed_out():
                if not pending:
                    break
    finally:
        if bar:
            bar.stop()
        executor.close()
    trials = _load_trials(out)
    dupes = [{"trial": c.get("trial"), "of": c["duplicate_of"]} for c in trials if c.get("duplicate_of")]
    cands = [reference] + [c for c in trials if not c.get("duplicate_of")]
    for c in cands:
        if c.get("status") == "ok":
            c["constraints_violated"] = check_constraints(cfg.constraints, c["metrics"])
    front = pareto_front(cands, task.primary, task.higher_is_better)
    if cfg.remeasure_front and front:
        _log(opts, f"re-measuring the Pareto front ({len(front)} candidates) one after another on this machine")
        sample = bench_sample(data)
        for c in cands:
            if c["name"] in front:
                r = measure_file(out / c["artifact"], c["runtime"], sample, opts.bench, lock=lock)
                c["metrics"]["search_latency_p95_ms"] = c["metrics"]["latency_p95_ms"]
                c["metrics"].update({k: v for k, v in r.to_dict().items() if k.startswith("latency") or k == "throughput_per_s"})
                c["constraints_violated"] = check_constraints(cfg.constraints, c["metrics"])
        front = pareto_front(cands, task.primary, task.higher_is_better)
    best = select_best(cands, cfg.constraints)
    closest = []
    if best is None:
        ok = [c for c in cands if c.get("status") == "ok"]
        ok.sort(key=lambda c: sum(max(0.0, violation(k, c["metrics"])) for k in cfg.constraints))
        closest = [{"name": c["name"], "violated": c["constraints_violated"]} for c in ok[:3]]
    search_info = {
        "config": cfg.model_dump(mode="json"),
        "trials_finished": finished,
        "trials_failed": sum(1 for c in cands if c.get("status") == "failed"),
        "duplicates": dupes,
        "resumed_with": done_before,
        "seconds": round(time.monotonic() - t_start, 1),
        "pareto_front": front,
        "closest": closest,
        "met": best is not None,
    }
    results = build_results(handle, data, task, baseline.metrics, cands, best, cfg.constraints, opts, {"search": search_info})
    if best is not None:
        b = next(c for c in cands if c["name"] == best)
        src = out / b["artifact"]
        _write_atomic_dir(
            out / "best", {src.name: src.read_bytes(), "recipe.yaml": yaml.safe_dump(b["recipe"], sort_keys=False).encode()}
        )
        results["best_artifact"] = f"best/{src.name}"
    write_results(results, out / "results.json")
    write_report(results, out)
    if best is None:
        names = ", ".join(f"{c['name']} ({'; '.join(c['violated'])})" for c in closest)
        msg = f"no candidate meets the budget ({', '.join(map(str, cfg.constraints))}); closest: {names or 'none'}"
        if require_met:
            raise ConstraintNotMetError(msg)
        _log(opts, msg, "yellow")
    return results


def _status(res: dict[str, Any], metric: str) -> str:
    if res.get("status") != "ok":
        return f"trial {res['trial']} failed"
    m = res["metrics"]
    value = m.get(metric, float("nan"))
    return f"trial {res['trial']}: {metric} {value:.4g}, p95 {m['latency_p95_ms']:.3f} ms, {m['size_bytes'] / 1e6:.2f} MB"
