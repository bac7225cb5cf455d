"""Base configuration: pydantic v2 models that reject unknown fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from keiryo.errors import ConfigError, InputFileError, first_line

C = TypeVar("C", bound="KeiryoConfig")


def format_validation_error(err: ValidationError, where: str) -> str:
    """Turn a pydantic error into one line naming the field and what was expected."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
        else:
            parts.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return f"{where}: " + "; ".join(parts)


class KeiryoConfig(BaseModel):
    """Every keiryo config: strict fields, JSON/YAML round-trip, versioned by its schema."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @classmethod
    def parse(cls: type[C], data: dict[str, Any] | None, where: str | None = None) -> C:
        """Validate ``data``; on failure raise a one-line :class:`ConfigError`."""
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, where or cls.__name__)) from e

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.parse(json.loads(text))


def load_structured_file(path: str | Path) -> Any:
    """Read a YAML or JSON file with clear errors."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{p}: file not found; expected a YAML or JSON file")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise InputFileError(f"{p}: cannot read file ({e.strerror})") from e
    try:
        if p.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        msg = first_line(e)
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({msg})") from e
