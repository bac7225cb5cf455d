"""Where trials run: in this process (default) or as Ray tasks on an existing Ray cluster.

A trial is a plain-data :class:`Job`; :func:`evaluate_job` rebuilds the model and data
from their specs (weights from the search's ``baseline.safetensors``), runs the recipe
and returns the candidate record with the artifact's bytes, so it works on any node.

Latency is only comparable if measurements do not overlap: every measurement takes a
machine-wide file lock (``bench_lock``), so parallel trials on one machine keep training
and quantizing side by side but time one at a time. Across nodes, :func:`optimize`
re-measures the final Pareto front on the driver, one candidate after another.
"""

from __future__ import annotations

import tempfile
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keiryo.errors import BackendUnavailableError, KeiryoError


@dataclass
class Job:
    number: int
    recipe: dict[str, Any]
    model_spec: dict[str, Any]
    data_spec: dict[str, Any]
    options: dict[str, Any]  # RunOptions as JSON
    task: dict[str, Any]  # {"ref": name or module:Class, "options": {...}}
    baseline_metrics: dict[str, Any]
    cache_dir: str | None = None
    bench_lock: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def run_job(job: Job, handle: Any = None, data: Any = None, baseline: Any = None) -> dict[str, Any]:
    """Evaluate one trial; never raises: a failure comes back as ``{"status": "failed", "error": ...}``.

    On another node the model, data and the baseline's reference outputs are rebuilt from
    the job's specs (deterministic), so only plain data travels.
    """
    try:
        from keiryo.data import DataSpec, load_data
        from keiryo.measure import Baseline
        from keiryo.model import ModelSpec, load_model
        from keiryo.pipeline.cache import StepCache
        from keiryo.pipeline.recipe import Recipe
        from keiryo.pipeline.runner import RunOptions, run_recipe
        from keiryo.tasks import get_task

        task = get_task(job.task["ref"], **job.task.get("options", {}))
        if data is None:
            data = load_data(DataSpec(**job.data_spec))
            cal = job.extra.get("calibration")
            if cal:  # optimize --calib-data: the same calibration set as on the driver
                from keiryo.data.splits import with_calibration

                data = with_calibration(data, cal["source"], cal["rows"], cal["seed"])
        if handle is None:
            handle = load_model(ModelSpec(**job.model_spec), data, output_name=task.default_output)
        task.bind(handle.output_names)
        opts = RunOptions(**job.options)
        if baseline is None:
            from keiryo.train import outputs_on

            baseline = Baseline(handle, outputs_on(handle, data.test), job.baseline_metrics)
        recipe = Recipe(**job.recipe)
        cache = StepCache(job.cache_dir) if job.cache_dir else None
        with tempfile.TemporaryDirectory(prefix="keiryo-trial-") as td:
            measured = Path(job.cache_dir) / "measured" if job.cache_dir else None
            cand = run_recipe(
                recipe,
                handle,
                data,
                Path(td),
                baseline,
                opts,
                cache=cache,
                bench_lock=job.bench_lock,
                task=task,
                measured=measured,
            )
            rec = cand.record()
            if cand.ok and cand.artifact_path is not None:
                rec["artifact_bytes"] = cand.artifact_path.read_bytes()
                rec["artifact_suffix"] = cand.artifact_path.suffix
        return rec
    except KeiryoError as e:
        return {"name": job.recipe.get("name"), "recipe": job.recipe, "status": "failed", "error": str(e)}
    except Exception as e:  # a crashing trial is recorded, the search goes on
        last = traceback.format_exc().strip().splitlines()[-1]
        return {
            "name": job.recipe.get("name"),
            "recipe": job.recipe,
            "status": "failed",
            "error": f"{type(e).__name__}: {e} ({last[:200]})",
        }


class LocalExecutor:
    """Runs trials one at a time in this process (the model and data are already in memory)."""

    def __init__(self, handle: Any, data: Any, baseline: Any = None):
        self.handle, self.data, self.baseline = handle, data, baseline
        self._done: deque[tuple[Job, dict[str, Any]]] = deque()

    @property
    def slots(self) -> int:
        return 1

    def submit(self, job: Job) -> None:
        self._done.append((job, run_job(job, self.handle, self.data, self.baseline)))

    def next_done(self) -> tuple[Job, dict[str, Any]]:
        return self._done.popleft()

    def pending(self) -> int:
        return len(self._done)

    def close(self) -> None:
        pass


class RayExecutor:
    """Runs trials as Ray tasks (one CPU each) on an existing cluster, or a local Ray instance."""

    def __init__(self, address: str | None, slots: int | None = None):
        try:
            import ray
        except ImportError as e:
            raise BackendUnavailableError("ray", "distributed") from e
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self._slots = max(1, min(slots or cpus, cpus))
        self._remote = ray.remote(num_cpus=1, max_retries=0)(run_job)
        self._inflight: dict[Any, Job] = {}

    @property
    def slots(self) -> int:
        return self._slots

    def submit(self, job: Job) -> None:
        self._inflight[self._remote.remote(job)] = job

    def next_done(self) -> tuple[Job, dict[str, Any]]:
        ready, _ = self.ray.wait(list(self._inflight), num_returns=1)
        job = self._inflight.pop(ready[0])
        try:
            return job, self.ray.get(ready[0])
        except Exception as e:  # the worker died
            return job, {
                "name": job.recipe.get("name"),
                "recipe": job.recipe,
                "status": "failed",
                "error": f"ray task failed: {e}",
            }

    def pending(self) -> int:
        return len(self._inflight)

    def close(self) -> None:
        pass
