"""A served model: one verified package from the registry, one session, one batcher."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keiryo.packages.package import check_golden, read_manifest
from keiryo.packages.signing import verify_dir
from keiryo.packages.store import PackageStore
from keiryo.runtime import open_session
from keiryo.serve.batching import Batcher


@dataclass
class ServedModel:
    ref: str  # what the operator asked for: NAME or NAME@ALIAS
    name: str
    version: str
    path: Path
    manifest: dict[str, Any]
    session: Any
    batcher: Batcher
    loaded_at: float = field(default_factory=time.time)

    @property
    def inputs(self) -> dict[str, dict[str, Any]]:
        return {t["name"]: t for t in self.manifest["inputs"]}

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": f"{self.manifest['runtime']}_{self.manifest['format']}",
            "inputs": self.manifest["inputs"],
            "outputs": self.manifest["outputs"],
            "parameters": {"labels": self.manifest.get("labels"), "ref": self.ref},
        }

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(feed)
        return {o["name"]: np.asarray(v) for o, v in zip(self.manifest["outputs"], outs, strict=True)}


def load_served(
    store: PackageStore, ref: str, public_key: str | Path, *, threads: int, batching: dict[str, Any], metrics: Any = None
) -> ServedModel:
    """Resolve ``ref``, verify the package (every file against the signature), open its session and
    check that its golden vectors reproduce. Raises (and loads nothing) if any step fails."""
    name, version = store.resolve(ref)
    path = store.path(f"{name}@{version}")
    verify_dir(path, public_key)
    manifest = read_manifest(path)
    session = open_session(manifest["runtime"], path / manifest["model_file"], threads)
    try:
        if "golden" in manifest:
            check_golden(
                path / manifest["model_file"], manifest["runtime"], manifest["golden"], session=session, inputs=manifest["inputs"]
            )
    except BaseException:
        session.close()
        raise
    served: ServedModel

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return served.run(feed)

    hooks = metrics.batch_hooks(name) if metrics is not None else {}
    batcher = Batcher(run, **batching, **hooks)
    served = ServedModel(ref, name, version, path, manifest, session, batcher)
    return served
