"""Ask/tell search strategy over recipes, driven by Optuna (multi-objective NSGA-II, or TPE).

``suggest() -> Candidate`` and ``report(candidate, metrics | error)``. Objectives:
minimize p95 latency and file size, and the task's primary metric in its direction (maximize
accuracy, minimize MAE, maximize cosine). Constraints (the budget) are
given to the sampler as feasibility, so infeasible trials steer the search away.
Trials live in Optuna's storage on disk: a resumed search skips completed trials.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from keiryo.budget import Constraint, violation
from keiryo.errors import BackendUnavailableError
from keiryo.pipeline.recipe import Recipe
from keiryo.search.space import TEMPLATES, first_trials


def objectives(task: Any = None) -> tuple[tuple[str, str], ...]:
    """(metric, direction) pairs; the last is the task's primary metric (accuracy when no task is given)."""
    last = ("accuracy", "maximize") if task is None else (task.primary, "maximize" if task.higher_is_better else "minimize")
    return (("latency_p95_ms", "minimize"), ("size_bytes", "minimize"), last)


@dataclass
class Candidate:
    number: int
    recipe: Recipe
    params: dict[str, Any]
    trial: Any  # optuna.trial.Trial


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as e:
        raise BackendUnavailableError("optuna", "search") from e
    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


class OptunaStrategy:
    def __init__(
        self,
        storage_path: Path,
        templates: list[str],
        constraints: list[Constraint],
        target: str,
        sampler: Literal["nsga2", "tpe"] = "nsga2",
        seed: int = 0,
        resume: bool = False,
        recorded: Callable[[int], dict[str, Any] | None] | None = None,
        task: Any = None,
    ):
        optuna = _optuna()
        self.optuna = optuna
        self.templates = templates
        self.constraints = constraints
        self.target = target
        self.objectives = objectives(task)

        def constraints_func(trial: Any) -> list[float]:
            return list(trial.user_attrs.get("violations", [1.0] * max(1, len(constraints))))

        if sampler == "nsga2":
            s = optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints_func, population_size=8)
        else:
            s = optuna.samplers.TPESampler(seed=seed, constraints_func=constraints_func, multivariate=True)
        storage = f"sqlite:///{storage_path}"
        exists = storage_path.exists()
        self.study = optuna.create_study(
            study_name="keiryo",
            storage=storage,
            sampler=s,
            directions=[d for _, d in self.objectives],
            load_if_exists=resume,
        )
        self.study.set_metric_names([m for m, _ in self.objectives])
        if not exists or not resume:
            for params in first_trials(templates):
                self.study.enqueue_trial(params, skip_if_exists=True)
        else:
            self._reconcile_interrupted(recorded or (lambda _n: None))

    def _reconcile_interrupted(self, recorded: Callable[[int], dict[str, Any] | None]) -> None:
        """Trials left RUNNING by a killed process: if their result was stored, report it (never recompute);
        otherwise fail them and enqueue the same parameters again."""
        TrialState = self.optuna.trial.TrialState
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            rec = recorded(t.number)
            trial = self.optuna.trial.Trial(self.study, t._trial_id)
            if rec is not None:
                recipe = Recipe(**rec["recipe"])
                self.report(
                    Candidate(t.number, recipe, dict(t.params), trial),
                    rec.get("metrics") if rec.get("status") == "ok" else None,
                    rec.get("error"),
                )
            else:
                self.study.tell(trial, state=TrialState.FAIL)
                self.study.enqueue_trial(t.params, skip_if_exists=False)

    def completed(self) -> list[Any]:
        TrialState = self.optuna.trial.TrialState
        return self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def suggest(self) -> Candidate:
        trial = self.study.ask()
        template = TEMPLATES[trial.suggest_categorical("template", self.templates)]
        recipe = template.recipe(trial, self.target)
        return Candidate(trial.number, recipe, dict(trial.params), trial)

    def report(self, cand: Candidate, metrics: dict[str, Any] | None, error: str | None = None) -> None:
        if metrics is None:
            cand.trial.set_user_attr("error", error or "unknown error")
            self.study.tell(cand.trial, state=self.optuna.trial.TrialState.FAIL)
            return
        values = [float(metrics[m]) if metrics.get(m) is not None else math.nan for m, _ in self.objectives]
        if not all(math.isfinite(v) for v in values):
            self.report(cand, None, f"non-finite objective values {values}")
            return
        cand.trial.set_user_attr("violations", [violation(c, metrics) for c in self.constraints] or [0.0])
        cand.trial.set_user_attr("recipe", cand.recipe.to_dict())
        self.study.tell(cand.trial, values)
