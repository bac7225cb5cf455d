"""The server's Prometheus metrics, one registry shared by every transport (REST and gRPC)."""

from __future__ import annotations

import json
import logging
from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import Any

from prometheus_client.registry import Collector

events_log = logging.getLogger("keiryo.serve")

_INFER = ("infer", "grpc_infer")  # the endpoints whose latency is observed (REST and gRPC ModelInfer)


class LoopHistogram:
    """A Prometheus histogram's buckets and sum as plain numbers (see :class:`RequestMetrics`)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value: Prometheus's "le"
        self.sum += value


class RequestMetrics(Collector):
    """The per-request metrics (request counts, latency, queue time, batch sizes, requests in flight) as plain
    numbers, turned into Prometheus samples when scraped.

    They change on every request, always on the event loop's thread (the REST front, the gRPC servicer, the
    batcher): prometheus_client's children take a lock per update, 3.6 µs of a small request's ~60 µs of Python,
    where these updates cost well under one. A scrape may run on another thread: a histogram's count is the sum
    of the buckets it reads, so the two always agree."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency: dict[str, LoopHistogram] = {}
        self.queue: dict[str, LoopHistogram] = {}
        self.batch: dict[str, LoopHistogram] = {}
        self.in_flight = 0

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        c = CounterMetricFamily("keiryo_requests", "HTTP and gRPC requests", labels=["model", "endpoint", "status"])
        for labels, n in list(self.requests.items()):
            c.add_metric(list(labels), n)
        yield c
        for name, doc, hists, bounds in (
            ("keiryo_request_latency_seconds", "request latency", self.latency, LATENCY_BUCKETS),
            ("keiryo_queue_time_seconds", "time a request waited for its batch", self.queue, QUEUE_BUCKETS),
            ("keiryo_batch_size", "rows per session run", self.batch, BATCH_BUCKETS),
        ):
            h = HistogramMetricFamily(name, doc, labels=["model"])
            for model, hist in list(hists.items()):
                cumulative = list(accumulate(list(hist.counts)))
                buckets = [(floatToGoString(b), n) for b, n in zip(bounds, cumulative, strict=False)]
                h.add_metric([model], [*buckets, ("+Inf", cumulative[-1])], hist.sum)
            yield h
        yield GaugeMetricFamily("keiryo_in_flight_requests", "requests being served", value=self.in_flight)


LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's metrics registry: :class:`RequestMetrics` (updated on every request) and the events'
    prometheus_client metrics (model loads, drift gauges)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        r = self.registry
        self.per_request = RequestMetrics()
        r.register(self.per_request)
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

    def request(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        """Count a request (and time an inference); this runs on every request, on the loop's thread.
        ``model`` must be a configured name, ``"unknown"`` or empty: never a name taken from a request."""
        m = self.per_request
        key = (model, endpoint, str(status))
        m.requests[key] = m.requests.get(key, 0) + 1
        if endpoint in _INFER and model:
            hist = m.latency.get(model)
            if hist is None:
                hist = m.latency[model] = LoopHistogram(LATENCY_BUCKETS)
            hist.observe(seconds)

    def batch_hooks(self, model: str) -> dict[str, Callable[..., None]]:
        m = self.per_request
        queue = m.queue.setdefault(model, LoopHistogram(QUEUE_BUCKETS))
        batch = m.batch.setdefault(model, LoopHistogram(BATCH_BUCKETS))
        return {"on_queue_time": queue.observe, "on_batch": batch.observe}

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
