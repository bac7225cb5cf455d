"""The server's Prometheus metrics, one registry shared by every transport (REST and gRPC)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

events_log = logging.getLogger("keiryo.serve")

_INFER = ("infer", "grpc_infer")  # the endpoints whose latency is observed (REST and gRPC ModelInfer)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("keiryo_requests", "HTTP and gRPC requests", ["model", "endpoint", "status"], registry=r)
        self.latency = Histogram(
            "keiryo_request_latency_seconds",
            "request latency",
            ["model"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.queue = Histogram(
            "keiryo_queue_time_seconds",
            "time a request waited for its batch",
            ["model"],
            buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1),
            registry=r,
        )
        self.batch = Histogram(
            "keiryo_batch_size", "rows per session run", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.in_flight = Gauge("keiryo_in_flight_requests", "requests being served", registry=r)
        self.loads = Counter("keiryo_model_load_events", "model loads", ["model", "version", "result"], registry=r)
        self.drift_psi = Gauge(
            "keiryo_drift_psi",
            "population stability index of the predicted classes over the recent window vs the package's reference",
            ["model"],
            registry=r,
        )
        self.drift_input_shift = Gauge(
            "keiryo_drift_input_shift",
            "max over channels of |window mean - reference mean| / reference std",
            ["model", "input"],
            registry=r,
        )
        self._children: dict[Any, Any] = {}

    def request(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        """Count a request (and time an inference); label children are cached, this runs on every request.
        ``model`` must be a configured name, ``"unknown"`` or empty: never a name taken from a request."""
        key = (model, endpoint, status)
        counter = self._children.get(key)
        if counter is None:
            counter = self._children[key] = self.requests.labels(model, endpoint, str(status))
        counter.inc()
        if endpoint in _INFER and model:
            hist = self._children.get(model)
            if hist is None:
                hist = self._children[model] = self.latency.labels(model)
            hist.observe(seconds)

    def batch_hooks(self, model: str) -> dict[str, Callable[..., None]]:
        return {"on_queue_time": self.queue.labels(model).observe, "on_batch": self.batch.labels(model).observe}

    def drift_hook(self, model: str, version: str, threshold: float) -> Callable[[Any], None]:
        """What a model's :class:`~keiryo.drift.DriftMonitor` calls with each reading: set the gauges, and log one
        JSON line ``{"event": "drift", ...}`` when the PSI goes over ``threshold`` (again only after it came back
        under). Labels come from the configured name and the signed manifest's input names, never from a request."""
        from keiryo.drift import crossed

        last: list[float | None] = [None]

        def on_reading(r: Any) -> None:
            if r.psi is not None:
                self.drift_psi.labels(model).set(r.psi)
            for name, shift in r.input_shift.items():
                self.drift_input_shift.labels(model, name).set(shift)
            if crossed(last[0], r.psi, threshold):
                line = {"event": "drift", "model": model, "version": version, "psi": r.psi, "threshold": threshold}
                events_log.warning(json.dumps({**line, "window_rows": r.rows, "input_shift": r.input_shift}))
            last[0] = r.psi

        return on_reading
