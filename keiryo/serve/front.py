"""The ASGI app uvicorn runs (:class:`Front`), in front of the FastAPI app of :mod:`keiryo.serve.api`:
request ids, the body limit and read deadline, the in-flight gauge, request metrics, the JSON access
log, and the hot path ``POST .../infer`` served directly (through :meth:`Server.infer_rest`, the same
handler as the FastAPI route)."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from keiryo.serve.auth import Authorize
from keiryo.serve.deadlines import Deadlines
from keiryo.serve.errors import HTTPError, error_body, status_of
from keiryo.serve.lifecycle import Server
from keiryo.serve.protocol import HEADER

access_log = logging.getLogger("keiryo.access")
_json_str: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


_sink: Callable[[str], None] | None = None  # where access lines go when keiryo serve set up the logging (run.py)


def set_access_sink(sink: Callable[[str], None] | None) -> None:
    """Send access lines straight to ``sink`` (``keiryo serve``'s own log writer, when it is the only
    destination of the ``keiryo.access`` logger's records), or back through the logger (None)."""
    global _sink
    _sink = sink


def log_access(rid: str, method: str, path: str, status: int, seconds: float, client: str | None) -> None:
    """One JSON access-log line, built by hand and handed to the ``keiryo.access`` logger's handlers
    without ``Logger.info``'s caller lookup: access logging was a quarter of a request's Python time
    (18 of 68 µs in-process), then about 9 µs. Handlers, filters and levels apply as usual, except under
    ``keiryo serve``, whose log writer is the only handler: the line goes to it directly (no record, no
    formatter; about 1 µs)."""
    q = _json_str
    line = (
        f'{{"request_id": {q(rid)}, "method": {q(method)}, "path": {q(path)}, "status": {status}, '
        f'"ms": {seconds * 1000:.3f}, "client": {q(client) if client else "null"}}}'
    )
    if _sink is not None:
        _sink(line)
        return
    access_log.handle(access_log.makeRecord(access_log.name, logging.INFO, __file__, 0, line, (), None))


_DOCS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
_INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


class Front:
    """The ASGI app uvicorn runs, in front of the FastAPI app.

    Around every HTTP request: a request id, the body limit (declared length and streamed bytes),
    the in-flight gauge, the request counter and latency histogram, and a JSON access log line.
    ``POST .../infer`` is served here directly (auth, body, parse, batcher, response): it is the hot
    path, and FastAPI's middleware stack, routing and dependency handling cost more per request
    than the rest of the server. Everything else, including the infer routes' OpenAPI
    documentation, is FastAPI's.
    """

    def __init__(self, api: Any, server: Server, authorize: Authorize):
        self.api, self.server, self.authorize = api, server, authorize
        self.limit = server.settings.body_limit_bytes
        st = server.settings
        # what tells an attacker about the server is behind the API key unless the operator opens it
        self.private = {*(() if st.public_metrics else ("/metrics",)), *(() if st.public_docs else _DOCS)}
        # request ids: a random per-process prefix and a counter (unique, without the getrandom
        # system call uuid4 makes per request; that was 12% of the event loop's time under load)
        self._ids = map(f"{os.urandom(6).hex()}-{{:x}}".format, itertools.count(1))
        # body reads past body_timeout_s: one sweep per tick over the reads in progress (deadlines.py), not a
        # timer per read; the task of a stalled read is cancelled and answers 408
        self._stalled: set[Any] = set()

    def _stall(self, task: Any) -> None:
        self._stalled.add(task)
        task.cancel()

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)  # lifespan
            return
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or next(self._ids)
        t0 = time.perf_counter()
        status = 499  # what is logged when no answer was started: the client went away first
        seen = 0
        body_done = False
        limit = self.limit
        body_timeout = self.server.settings.body_timeout_s
        body_tick = Deadlines.tick_for(body_timeout)

        async def counted_receive() -> Any:
            nonlocal seen, body_done
            if body_done:  # after the body only a disconnect can come: no deadline on waiting for it
                return await receive()
            task = asyncio.current_task()
            deadlines = Deadlines.of(asyncio.get_running_loop(), body_tick)
            deadlines.watch(task, body_timeout, self._stall)
            try:
                message = await receive()
            except asyncio.CancelledError:
                if task not in self._stalled:
                    raise
                self._stalled.discard(task)
                task.uncancel()  # type: ignore[union-attr]
                raise HTTPError(408, f"request body stalled for over {body_timeout:g} s") from None
            finally:
                deadlines.forget(task)
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPError(413, f"request body over the limit of {limit} bytes")
            return message

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        path = scope["path"]
        one_write = (scope.get("extensions") or {}).get("keiryo.one_write")  # keiryo's HTTP protocol (connections.py)
        infer = _INFER.fullmatch(path) if scope["method"] == "POST" else None
        metrics = self.server.metrics
        metrics.per_request.in_flight += 1
        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                body = json.dumps({"error": f"request body over the limit of {limit} bytes"}).encode()
                await _respond(send_with_id, 413, body, one_write=one_write)
            elif path in self.private and not self._allowed(headers):
                e = HTTPError(401, "missing or invalid API key", {"WWW-Authenticate": "Bearer"})
                await _respond(send_with_id, 401, error_body(401, e), extra=e.headers, one_write=one_write)
            elif infer is not None:
                await self._infer(headers, counted_receive, send_with_id, infer[1], infer[2], one_write)
            else:
                await self.api(scope, counted_receive, send_with_id)
        finally:
            metrics.per_request.in_flight -= 1
            dt = time.perf_counter() - t0
            parts = path.split("/")
            model = parts[3] if len(parts) > 3 and parts[2] == "models" else ""
            if model:
                model = self.server.label(model)  # a label per name from the URL would let anyone grow /metrics
            metrics.request(model, "infer" if infer is not None else "other", status, dt)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                log_access(rid, scope["method"], path, status, dt, client[0] if client else None)

    def _allowed(self, headers: dict[bytes, bytes]) -> bool:
        try:
            self.authorize(headers.get(b"authorization", b"").decode("latin-1"))
        except HTTPError:
            return False
        return True

    async def _infer(
        self,
        headers: dict[bytes, bytes],
        receive: Callable[..., Any],
        send: Callable[..., Any],
        name: str,
        version: str | None,
        one_write: Any,
    ) -> None:
        try:
            self.authorize(headers.get(b"authorization", b"").decode("latin-1"))
            served = self.server.get(name, version)
            chunks = []
            while True:  # counted_receive enforces the body limit while the body streams in
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            header_length = headers.get(HEADER.encode())
            content, extra, media = await self.server.infer_rest(
                served, b"".join(chunks), header_length.decode("latin-1") if header_length is not None else None
            )
            await _respond(send, 200, content, media, extra, one_write)
        except Exception as e:
            status = status_of(e)
            await _respond(send, status, error_body(status, e), extra=getattr(e, "headers", None), one_write=one_write)


async def _respond(
    send: Callable[..., Any],
    status: int,
    body: bytes,
    media: str = "application/json",
    extra: dict[str, str] | None = None,
    one_write: Any = None,
) -> None:
    """Start and end a response. ``one_write``: keiryo's HTTP protocol's transport from the scope
    (connections.OneWrite): the head is held and leaves with the body, in one system call."""
    headers = [(b"content-type", media.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (extra or {}).items()]
    if one_write is not None:
        one_write.hold_next()
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
