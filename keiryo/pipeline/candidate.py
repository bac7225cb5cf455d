"""The typed candidate record: what ``results.json`` holds for each recipe (docs/results.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Candidate(BaseModel):
    """One recipe's outcome. ``ok`` records carry the artifact and metrics; ``failed`` ones the reason and the step."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str
    recipe: dict[str, Any]
    status: Literal["ok", "failed"]
    format: str | None = None
    runtime: str | None = None
    artifact: str | None = Field(None, description="path of the file relative to results.json")
    metrics: dict[str, Any] = Field(default_factory=dict)
    steps: list[dict[str, Any]] = Field(default_factory=list)
    error: str | None = None
    failed_step: str | None = None
    seconds: float | None = None
    constraints_violated: list[str] = Field(default_factory=list)
    trial: int | None = None
    params: dict[str, Any] | None = None
    sha256: str | None = Field(None, description="of the final file: equal files are the same candidate")
    duplicate_of: str | None = Field(None, description="an earlier candidate whose file is byte-identical (not measured again)")
    artifact_path: Path | None = Field(None, exclude=True, description="the file while the run is in progress")

    @classmethod
    def succeeded(
        cls,
        name: str,
        recipe: dict[str, Any],
        *,
        format: str,
        runtime: str,
        artifact_path: Path,
        metrics: dict[str, Any],
        steps: list[dict[str, Any]],
        seconds: float,
    ) -> Candidate:
        return cls(
            name=name,
            recipe=recipe,
            status="ok",
            format=format,
            runtime=runtime,
            artifact_path=artifact_path,
            metrics=metrics,
            steps=steps,
            seconds=round(seconds, 2),
        )

    @classmethod
    def failed(
        cls, name: str, recipe: dict[str, Any], error: str, step: str | None = None, seconds: float | None = None
    ) -> Candidate:
        return cls(
            name=name,
            recipe=recipe,
            status="failed",
            error=error,
            failed_step=step,
            seconds=None if seconds is None else round(seconds, 2),
        )

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def record(self) -> dict[str, Any]:
        """The JSON form written into results.json and trial records."""
        return self.model_dump(mode="json", exclude_none=True)
