"""The served models and their lifecycle (:class:`Server`): load at startup, hot reload when an
alias moves, unload, drain on shutdown; and the one inference path every transport calls
(:meth:`Server.run`: the model's batcher under the request deadline)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import numpy as np

from keiryo.errors import PackageNotFoundError
from keiryo.packages.remote import TrustedRegistry
from keiryo.serve.metrics import Metrics
from keiryo.serve.offload import OffLoopParser, json_part_size
from keiryo.serve.protocol import build_response, parse_request
from keiryo.serve.settings import ServeSettings

events_log = logging.getLogger("keiryo.serve")


class Server:
    """The served models and their lifecycle: load, hot reload on alias moves, unload, drain."""

    def __init__(self, registry: TrustedRegistry, settings: ServeSettings):
        self.registry = registry
        self.settings = settings
        self.metrics = Metrics()
        self.models: dict[str, Any] = {}  # name -> ServedModel
        self.refs = settings.served_refs()  # served name -> NAME[@ALIAS]
        self.ready = False
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self.grpc_bound: int | None = None  # the gRPC endpoint's port once it listens
        # big JSON bodies are parsed in a worker process (a 14 MB body took the loop for 0.34 s), this many bytes at once
        self.parser = OffLoopParser(max(settings.parse_bytes_in_flight, settings.body_limit_bytes))

    def _batching(self) -> dict[str, Any]:
        s = self.settings
        return {
            "max_batch_size": s.max_batch_size,
            "max_queue_delay_ms": s.max_queue_delay_ms,
            "max_queue": s.max_queue,
            "inline_below_ms": s.inline_below_ms,
        }

    def label(self, name: str) -> str:
        """The metric label for a model name from a request: configured names only (``unknown`` otherwise),
        or anyone could grow /metrics without bound."""
        return name if name in self.refs else "unknown"

    async def start(self) -> None:
        """Load every configured model (a package that fails verification raises: the server must not
        start), then mark ready and start the reload loop."""
        for name in self.refs:
            await self.load(name)
        self.ready = True
        if self.settings.poll_s:
            self._poller = asyncio.get_running_loop().create_task(self.poll())

    async def stop(self) -> None:
        self.ready = False
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        await self.drain()
        await self.parser.aclose()

    async def load(self, name: str, *, refresh: bool = False) -> Any:
        """Load (or reload) ``name`` from its configured ref (``refresh``: the registry's metadata first);
        the old version keeps serving if this fails."""
        from keiryo.serve.models import load_served

        if name not in self.refs:
            raise PackageNotFoundError(f"model {name!r} is not configured on this server; configured: {sorted(self.refs)}")
        ref = self.refs[name]
        async with self._lock:
            try:
                if refresh:
                    await asyncio.to_thread(self.registry.refresh)
                served = await asyncio.to_thread(
                    load_served,
                    self.registry,
                    ref,
                    self.settings.public_key,
                    threads=self.settings.threads,
                    decryption_key=self.settings.decryption_key,
                    batching=self._batching(),
                    metrics=self.metrics,
                    drift_window_rows=self.settings.drift_window_rows,
                    drift_psi_threshold=self.settings.drift_psi_threshold,
                )
            except Exception as e:
                self.metrics.loads.labels(name, "?", "refused").inc()
                events_log.error(json.dumps({"event": "load_refused", "model": name, "ref": ref, "error": str(e)}))
                raise
            served.batcher.start()
            old = self.models.get(name)
            self.models[name] = served  # new requests go to the new version from here on
            self.metrics.loads.labels(name, served.version, "loaded").inc()
            events_log.info(json.dumps({"event": "loaded", "model": name, "version": served.version, "ref": ref}))
        if old is not None:
            asyncio.get_running_loop().create_task(self._retire(old))  # in-flight requests finish on the old one
        return served

    async def _retire(self, served: Any) -> None:
        await served.batcher.drain(self.settings.request_timeout_s)
        served.session.close()

    async def unload(self, name: str) -> None:
        async with self._lock:
            served = self.models.pop(name, None)
        if served is None:
            raise PackageNotFoundError(f"model {name!r} is not loaded")
        await self._retire(served)
        events_log.info(json.dumps({"event": "unloaded", "model": name, "version": served.version}))

    def index(self) -> list[dict[str, Any]]:
        """The model repository's index: every configured model, its loaded version and state."""
        out = []
        for name, ref in sorted(self.refs.items()):
            m = self.models.get(name)
            out.append({"name": name, "version": m.version if m else "", "state": "READY" if m else "UNAVAILABLE", "ref": ref})
        return out

    async def poll(self) -> None:
        """Refresh the registry's signed metadata like a TUF client and reload a model when its alias
        points at another version. Refused metadata (expired, rolled back, badly signed) or a refused
        package leaves the last good model serving; every error is logged and the loop goes on."""
        assert self.settings.poll_s is not None
        refused: set[tuple[str, str]] = set()
        last_error = None
        while True:
            await asyncio.sleep(self.settings.poll_s)
            try:
                await asyncio.to_thread(self.registry.refresh)
                last_error = None
            except Exception as e:
                if str(e) != last_error:
                    events_log.error(json.dumps({"event": "metadata_refused", "error": str(e)}))
                    last_error = str(e)
                self.metrics.loads.labels("*", "?", "metadata_refused").inc()
                continue
            for name, ref in self.refs.items():
                cur = self.models.get(name)
                if cur is None:
                    continue
                try:
                    _, version = self.registry.resolve(ref)
                    if version != cur.version and (name, version) not in refused:
                        try:
                            await self.load(name)
                        except Exception:
                            refused.add((name, version))
                except Exception as e:  # never let one bad model or file end hot reload
                    events_log.error(json.dumps({"event": "reload_failed", "model": name, "error": str(e)}))

    async def drain(self) -> None:
        for served in list(self.models.values()):
            await self._retire(served)

    def get(self, name: str, version: str | None = None) -> Any:
        served = self.models.get(name)
        if served is None:
            raise PackageNotFoundError(f"unknown model {name!r}; serving: {sorted(self.models)}")
        if version is not None and version != served.version:
            raise PackageNotFoundError(f"model {name!r} has no loaded version {version!r}; serving version {served.version}")
        return served

    async def run(self, served: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The one inference path of every transport: the model's batcher, under the request deadline."""
        return await served.batcher.submit(inputs, self.settings.request_timeout_s)

    async def infer_rest(self, served: Any, body: bytes, header_length: str | None) -> tuple[bytes, dict[str, str], str]:
        """One OIP REST inference request (JSON or the binary extension): parse, :meth:`run`, build the
        response body; the front and the FastAPI route both call this."""
        n = len(body) if header_length is None else json_part_size(body, header_length)
        if n < self.settings.parse_offload_bytes:
            req = parse_request(body, header_length, served.inputs)  # small: on the loop, no hop
        else:
            req = await self.parser.parse(body, header_length, served.inputs, n)  # big: off the loop (offload.py)
        t0 = time.perf_counter()
        outputs = await self.run(served, req.inputs)
        dt = (time.perf_counter() - t0) * 1e3
        content, extra, media = build_response(served.name, served.version, req, outputs)
        # queue + batch + session time, so a client can tell the network from the inference (the page's latency panel)
        return content, {**extra, "Server-Timing": f"infer;dur={dt:.3f}"}, media
