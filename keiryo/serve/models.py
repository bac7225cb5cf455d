"""A served model: one package verified against the registry's signed metadata and its signature, one session, one batcher."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keiryo.drift import DriftMonitor
from keiryo.packages.remote import TrustedRegistry
from keiryo.packages.verified import load_verified
from keiryo.serve.batching import Batcher

events_log = logging.getLogger("keiryo.serve")


@dataclass
class ServedModel:
    ref: str  # what the operator asked for: NAME or NAME@ALIAS
    name: str
    version: str
    manifest: dict[str, Any]
    session: Any
    batcher: Batcher
    loaded_at: float = field(default_factory=time.time)
    drift: DriftMonitor | None = None  # running summaries vs the manifest's drift reference (keiryo.drift)
    # a fast-path run's summaries are updated on the loop after its answer, maybe while a batch runs in the session thread
    _drift_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def inputs(self) -> dict[str, dict[str, Any]]:
        return {t["name"]: t for t in self.manifest["inputs"]}

    def metadata(self) -> dict[str, Any]:
        """The OIP model metadata; ``parameters`` carries the labels, the ref served and, for a model trained with
        DP, the signed manifest's ``privacy`` record (what the model promises, for whoever deploys it)."""
        params: dict[str, Any] = {"labels": self.manifest.get("labels"), "ref": self.ref}
        if self.manifest.get("privacy"):
            params["privacy"] = self.manifest["privacy"]
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": f"{self.manifest['runtime']}_{self.manifest['format']}",
            "inputs": self.manifest["inputs"],
            "outputs": self.manifest["outputs"],
            "parameters": params,
        }

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(feed)
        out = {o["name"]: np.asarray(v) for o, v in zip(self.manifest["outputs"], outs, strict=True)}
        if self.drift is not None:  # once per batch
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # in the session's thread: off the event loop already
                self._observe(feed, out)
            else:  # the batcher's fast path runs on the loop: observed after this request's answer is written
                loop.call_soon(self._observe, feed, out)
        return out

    def _observe(self, feed: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
        try:
            with self._drift_lock:
                if self.drift is None:
                    return
                self.drift.observe(feed, out)
        except Exception as e:  # monitoring never fails a request: turned off, said once
            self.drift = None
            events_log.error(json.dumps({"event": "drift_monitor_failed", "model": self.name, "error": repr(e)}))


def load_served(
    registry: TrustedRegistry,
    ref: str,
    public_key: str | Path,
    *,
    threads: int,
    batching: dict[str, Any],
    metrics: Any = None,
    decryption_key: str | Path | None = None,
    drift_window_rows: int = 1000,
    drift_psi_threshold: float = 0.2,
) -> ServedModel:
    """Resolve ``ref`` in the registry's signed metadata, read every file of the package once (each
    capped at its signed length and checked against its signed hash), verify the signature over
    those bytes and that the manifest names this name and version, open the session from the same
    bytes (an encrypted model decrypted in memory) and check that its golden vectors reproduce.
    Raises (and loads nothing) if any step fails."""
    name, version = registry.resolve(ref)
    files, trusted = registry.fetch_package(name, version)
    pkg, session = load_verified(
        None, public_key, files=files, name=name, version=version, trusted=trusted, threads=threads, decryption_key=decryption_key
    )
    served: ServedModel

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return served.run(feed)

    hooks = metrics.batch_hooks(name) if metrics is not None else {}
    batcher = Batcher(run, **batching, **hooks)
    served = ServedModel(ref, name, version, pkg.manifest, session, batcher)
    if metrics is not None:
        on_reading = metrics.drift_hook(name, version, drift_psi_threshold)
        served.drift = DriftMonitor.from_manifest(pkg.manifest, window_rows=drift_window_rows, on_reading=on_reading)
    return served
