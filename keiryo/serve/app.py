"""``create_app(registry, settings)``: an Open Inference Protocol v2 (KServe V2) REST server over registry packages.

Endpoints are thin; every error leaves as ``{"error": ...}`` with the status chosen in :func:`_status_of`.
(No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at run time,
and ``Request`` is imported inside :func:`create_app` so that importing keiryo never imports fastapi.)
"""

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from pathlib import Path
from typing import Any

from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.errors import ConfigError, KeiryoError, PackageNotFoundError, RuntimeSessionError
from keiryo.packages.remote import TrustedRegistry, open_registry
from keiryo.serve.batching import QueueFull
from keiryo.serve.protocol import HEADER, NonFiniteOutput, ProtocolError, build_response, parse_request

access_log = logging.getLogger("keiryo.access")
_json_str: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
events_log = logging.getLogger("keiryo.serve")


class ServeSettings(KeiryoConfig):
    models: list[str] = Field(min_length=1, description="NAME or NAME@ALIAS from the registry")
    public_key: str = Field(description="the signer's public key (PEM): every package is verified against it")
    api_keys: list[str] = Field(default_factory=list, description="bearer keys for inference and metadata")
    admin_keys: list[str] = Field(default_factory=list, description="bearer keys for the model-repository endpoints")
    allow_anonymous: bool = Field(False, description="serve inference without a key (never the admin endpoints)")
    threads: int = Field(1, ge=1, description="intra-op threads of each model's session")
    max_batch_size: int = Field(32, ge=1, description="rows per batched run; 1 disables batching")
    max_queue_delay_ms: float = Field(2.0, ge=0, description="how long the first request waits for others")
    max_queue: int = Field(256, ge=1, description="requests waiting per model before 503")
    body_limit_bytes: int = Field(16 * 2**20, ge=1024)
    request_timeout_s: float = Field(10.0, gt=0)
    header_timeout_s: float = Field(10.0, gt=0, description="a connection must send complete request headers within this")
    body_timeout_s: float = Field(10.0, gt=0, description="longest wait for the next piece of a request body (408)")
    poll_s: float | None = Field(5.0, gt=0, description="refresh the registry's metadata this often (None: never)")
    trusted_root: str | None = Field(
        None, description="TUF root metadata to trust (default: the local registry's tuf/1.root.json)"
    )
    tuf_cache: str | None = Field(None, description="where the trusted metadata is kept between runs")
    decryption_key: str | None = Field(None, description="key file for encrypted packages (default $KEIRYO_DECRYPTION_KEY)")
    public_metrics: bool = Field(False, description="serve /metrics without an API key (e.g. a scraper on a private network)")
    public_docs: bool = Field(False, description="serve /docs and /openapi.json without an API key")
    server_name: str = "keiryo"

    def check(self) -> None:
        if not self.api_keys and not self.allow_anonymous:
            raise ConfigError("no API key given: pass --api-key (or KEIRYO_API_KEYS), or --allow-anonymous to serve without one")
        if any(len(k) < 16 for k in [*self.api_keys, *self.admin_keys]):
            raise ConfigError("API keys must be at least 16 characters")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _status_of(e: BaseException) -> int:
    if isinstance(e, HTTPError):
        return e.status
    if isinstance(e, ProtocolError):
        return 400
    if isinstance(e, PackageNotFoundError):
        return 404
    if isinstance(e, QueueFull | TimeoutError):
        return 503
    if isinstance(e, RuntimeSessionError | NonFiniteOutput):
        return 500  # the model failed on a valid request: the server's side, not the client's
    if isinstance(e, KeiryoError):
        return 400
    return 500


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("keiryo_requests", "HTTP requests", ["model", "endpoint", "status"], registry=r)
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
        self._children: dict[Any, Any] = {}

    def request(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        """Count a request (and time an inference); label children are cached, this runs on every request."""
        key = (model, endpoint, status)
        counter = self._children.get(key)
        if counter is None:
            counter = self._children[key] = self.requests.labels(model, endpoint, str(status))
        counter.inc()
        if endpoint == "infer" and model:
            hist = self._children.get(model)
            if hist is None:
                hist = self._children[model] = self.latency.labels(model)
            hist.observe(seconds)

    def batch_hooks(self, model: str) -> dict[str, Callable[..., None]]:
        return {"on_queue_time": self.queue.labels(model).observe, "on_batch": self.batch.labels(model).observe}


class Server:
    """The served models and their lifecycle: load, hot reload on alias moves, unload, drain."""

    def __init__(self, registry: TrustedRegistry, settings: ServeSettings):
        self.registry = registry
        self.settings = settings
        self.metrics = Metrics()
        self.models: dict[str, Any] = {}  # name -> ServedModel
        self.refs = {ref.partition("@")[0]: ref for ref in settings.models}
        self.ready = False
        self._lock = asyncio.Lock()

    def _batching(self) -> dict[str, Any]:
        s = self.settings
        return {"max_batch_size": s.max_batch_size, "max_queue_delay_ms": s.max_queue_delay_ms, "max_queue": s.max_queue}

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


def _access(rid: str, method: str, path: str, status: int, seconds: float, client: str | None) -> None:
    """One JSON access-log line, built by hand and handed to the ``keiryo.access`` logger's handlers
    without ``Logger.info``'s caller lookup: access logging was a quarter of a request's Python time
    (18 of 68 µs in-process), now about 9 µs. Handlers, filters and levels apply as usual."""
    q = _json_str
    line = (
        f'{{"request_id": {q(rid)}, "method": {q(method)}, "path": {q(path)}, "status": {status}, '
        f'"ms": {seconds * 1000:.3f}, "client": {q(client) if client else "null"}}}'
    )
    access_log.handle(access_log.makeRecord(access_log.name, logging.INFO, __file__, 0, line, (), None))


_DOCS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
_INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


def _error_body(status: int, e: BaseException) -> bytes:
    if isinstance(e, RuntimeSessionError | NonFiniteOutput):
        events_log.error("model run failed", exc_info=e)  # logged once with its traceback; the caller gets the reason
        message = str(e)
    elif status == 500:
        events_log.exception("internal error")  # a bug: logged with its traceback, not shown to the caller
        message = "internal error"
    else:
        message = str(e) or ("request timed out" if isinstance(e, TimeoutError) else type(e).__name__)
    return json.dumps({"error": message}).encode()


class Front:
    """The ASGI app uvicorn runs, in front of the FastAPI app.

    Around every HTTP request: a request id, the body limit (declared length and streamed bytes),
    the in-flight gauge, the request counter and latency histogram, and a JSON access log line.
    ``POST .../infer`` is served here directly (auth, body, parse, batcher, response): it is the hot
    path, and FastAPI's middleware stack, routing and dependency handling cost more per request
    than the rest of the server. Everything else, including the infer routes' OpenAPI
    documentation, is FastAPI's.
    """

    def __init__(self, api: Any, server: "Server", authorize: Callable[[str | None], None]):
        self.api, self.server, self.authorize = api, server, authorize
        self.limit = server.settings.body_limit_bytes
        st = server.settings
        # what tells an attacker about the server is behind the API key unless the operator opens it
        self.private = {*(() if st.public_metrics else ("/metrics",)), *(() if st.public_docs else _DOCS)}
        # request ids: a random per-process prefix and a counter (unique, without the getrandom
        # system call uuid4 makes per request; that was 12% of the event loop's time under load)
        self._ids = map(f"{os.urandom(6).hex()}-{{:x}}".format, itertools.count(1))

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

        async def counted_receive() -> Any:
            nonlocal seen, body_done
            if body_done:  # after the body only a disconnect can come: no deadline on waiting for it
                return await receive()
            try:
                async with asyncio.timeout(body_timeout):
                    message = await receive()
            except TimeoutError:
                raise HTTPError(408, f"request body stalled for over {body_timeout:g} s") from None
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
        infer = _INFER.fullmatch(path) if scope["method"] == "POST" else None
        metrics = self.server.metrics
        metrics.in_flight.inc()
        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                await _respond(send_with_id, 413, json.dumps({"error": f"request body over the limit of {limit} bytes"}).encode())
            elif path in self.private and not self._allowed(headers):
                e = HTTPError(401, "missing or invalid API key", {"WWW-Authenticate": "Bearer"})
                await _respond(send_with_id, 401, _error_body(401, e), extra=e.headers)
            elif infer is not None:
                await self._infer(headers, counted_receive, send_with_id, infer[1], infer[2])
            else:
                await self.api(scope, counted_receive, send_with_id)
        finally:
            metrics.in_flight.dec()
            dt = time.perf_counter() - t0
            parts = path.split("/")
            model = parts[3] if len(parts) > 3 and parts[2] == "models" else ""
            if model and model not in self.server.refs:
                model = "unknown"  # a label per name from the URL would let anyone grow /metrics without bound
            metrics.request(model, "infer" if infer is not None else "other", status, dt)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                _access(rid, scope["method"], path, status, dt, client[0] if client else None)

    def _allowed(self, headers: dict[bytes, bytes]) -> bool:
        try:
            self.authorize(headers.get(b"authorization", b"").decode("latin-1"))
        except HTTPError:
            return False
        return True

    async def _infer(
        self, headers: dict[bytes, bytes], receive: Callable[..., Any], send: Callable[..., Any], name: str, version: str | None
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
            content, extra, media = await infer(
                served,
                b"".join(chunks),
                header_length.decode("latin-1") if header_length is not None else None,
                self.server.settings.request_timeout_s,
            )
            await _respond(send, 200, content, media, extra)
        except Exception as e:
            status = _status_of(e)
            await _respond(send, status, _error_body(status, e), extra=getattr(e, "headers", None))


async def _respond(
    send: Callable[..., Any], status: int, body: bytes, media: str = "application/json", extra: dict[str, str] | None = None
) -> None:
    headers = [(b"content-type", media.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def infer(served: Any, body: bytes, header_length: str | None, timeout_s: float) -> tuple[bytes, dict[str, str], str]:
    """One inference request: parse, run through the model's batcher, build the response."""
    req = parse_request(body, header_length, served.inputs)
    async with asyncio.timeout(timeout_s):  # no extra task, unlike wait_for
        outputs = await served.batcher.submit(req.inputs)
    return build_response(served.name, served.version, req, outputs)


def _key_ok(given: str | None, keys: list[str]) -> bool:
    if not given:
        return False
    ok = False
    for k in keys:  # compare with every key, in constant time, so timing says nothing about which matched
        ok |= hmac.compare_digest(given.encode(), k.encode())
    return ok


def create_app(registry: TrustedRegistry | Any, settings: ServeSettings) -> Any:
    """The ASGI app (:class:`Front` over FastAPI). Models load at startup; ``/v2/health/ready`` is 200
    only once all verified and reproduced. ``registry``: a :class:`TrustedRegistry`, or a registry
    directory / URL / ``PackageStore`` opened as one with the settings' trusted root and cache."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from keiryo import __version__

    settings.check()
    if not isinstance(registry, TrustedRegistry):
        from keiryo.packages.store import PackageStore

        source = registry.root if isinstance(registry, PackageStore) else registry
        registry = open_registry(source, settings.trusted_root, settings.tuf_cache)
    server = Server(registry, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        for name in server.refs:
            await server.load(name)  # a package that fails verification stops the server from starting
        server.ready = True
        poller = asyncio.get_running_loop().create_task(server.poll()) if settings.poll_s else None
        yield
        server.ready = False
        if poller is not None:
            poller.cancel()
        await server.drain()

    app = FastAPI(title="keiryo inference server (Open Inference Protocol v2)", version=__version__, lifespan=lifespan)

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return error(400, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))

    async def _mapped(request: Request, e: Exception) -> Response:
        status = _status_of(e)  # 500 for anything unexpected: logged with its traceback, not shown to the caller
        return Response(_error_body(status, e), status, getattr(e, "headers", None), "application/json")

    # expected failures: handled by the exception middleware, answered with their status; the rest are bugs
    for exc in (HTTPError, ProtocolError, KeiryoError, QueueFull, TimeoutError, Exception):
        app.add_exception_handler(exc, _mapped)

    def authorize(auth: str | None, *, admin: bool = False) -> None:
        auth = auth or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        if admin:
            if not _key_ok(token, settings.admin_keys):
                raise HTTPError(403 if token else 401, "admin key required", {"WWW-Authenticate": "Bearer"})
            return
        if settings.allow_anonymous or _key_ok(token, [*settings.api_keys, *settings.admin_keys]):
            return
        raise HTTPError(401, "missing or invalid API key", {"WWW-Authenticate": "Bearer"})

    def need(request: Request, *, admin: bool = False) -> None:
        authorize(request.headers.get("authorization"), admin=admin)

    # -- health and metadata --------------------------------------------------------------------
    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Any:
        return {"ready": True} if server.ready else error(400, "not ready")

    @app.get("/v2")
    async def server_metadata(request: Request) -> dict[str, Any]:
        need(request)
        return {"name": settings.server_name, "version": __version__, "extensions": ["binary_tensor_data", "model_repository"]}

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(request: Request, name: str, version: str | None = None) -> Any:
        need(request)
        try:
            server.get(name, version)
        except PackageNotFoundError as e:
            return error(400, str(e))
        return {"name": name, "ready": True}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
        need(request)
        return dict(server.get(name, version).metadata())

    # -- inference: served by Front (see there); these routes document it and serve the FastAPI app alone
    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer_route(request: Request, name: str, version: str | None = None) -> Response:
        need(request)
        served = server.get(name, version)
        body = await request.body()
        content, headers, media = await infer(served, body, request.headers.get(HEADER), settings.request_timeout_s)
        return Response(content=content, media_type=media, headers=headers)

    # -- model repository extension (admin) ----------------------------------------------------
    @app.post("/v2/repository/index")
    async def repo_index(request: Request) -> list[dict[str, Any]]:
        need(request, admin=True)
        out = []
        for name, ref in sorted(server.refs.items()):
            m = server.models.get(name)
            out.append({"name": name, "version": m.version if m else "", "state": "READY" if m else "UNAVAILABLE", "ref": ref})
        return out

    @app.post("/v2/repository/models/{name}/load")
    async def repo_load(request: Request, name: str) -> dict[str, Any]:
        need(request, admin=True)
        # registry names only, never a path from the request; an operator asking for a load gets the
        # registry's current signed state, not what the last poll saw
        served = await server.load(name, refresh=True)
        return {"name": name, "version": served.version, "state": "READY"}

    @app.post("/v2/repository/models/{name}/unload")
    async def repo_unload(request: Request, name: str) -> dict[str, Any]:
        need(request, admin=True)
        await server.unload(name)
        return {"name": name, "state": "UNAVAILABLE"}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Front(app, server, authorize)


class TLSSettings(KeiryoConfig):
    certfile: str = Field(description="the server's certificate chain (PEM)")
    keyfile: str = Field(description="its private key (PEM)")
    ca_certs: str | None = Field(None, description="CA bundle: clients must present a certificate it signed (mTLS)")

    def uvicorn(self) -> dict[str, Any]:
        import ssl

        for f in (self.certfile, self.keyfile, self.ca_certs):
            if f is not None and not Path(f).is_file():
                raise ConfigError(f"{f}: TLS file not found")
        kw: dict[str, Any] = {"ssl_certfile": self.certfile, "ssl_keyfile": self.keyfile}
        if self.ca_certs:
            kw |= {"ssl_ca_certs": self.ca_certs, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return kw


def uvicorn_options(
    settings: ServeSettings, tls: TLSSettings | None = None, limit_concurrency: int | None = 1000
) -> dict[str, Any]:
    """uvicorn's settings for keiryo's server: drain time, connection deadlines and cap, TLS."""
    from keiryo.serve.connections import header_timeout_protocol

    return {
        "access_log": False,
        "timeout_graceful_shutdown": 30,
        "timeout_keep_alive": 5,  # idle keep-alive connections are closed
        "http": header_timeout_protocol(settings.header_timeout_s),  # and so are ones that never finish a header
        "limit_concurrency": limit_concurrency,  # connections + tasks past this get 503 instead of memory
        **(tls.uvicorn() if tls else {}),
    }


def run_server(
    store_root: str | Path | None,
    settings: ServeSettings,
    host: str,
    port: int,
    log_level: str = "info",
    *,
    tls: TLSSettings | None = None,
    limit_concurrency: int | None = 1000,
) -> None:
    """Run with uvicorn; SIGTERM drains in-flight requests before exiting.

    keiryo's log lines (one JSON access line per request) go to stderr from a background thread
    (``QueueHandler`` → ``QueueListener``): a write to a slow stderr pipe never blocks the event loop,
    and the write system calls leave the loop's thread (they were a fifth of its time under load)."""
    import queue
    import signal
    import sys
    from logging.handlers import QueueHandler, QueueListener

    import uvicorn

    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = QueueListener(records, logging.StreamHandler())  # the QueueHandler has formatted the line
    level = getattr(logging, log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", handlers=[QueueHandler(records)], force=True)
    listener.start()
    # uvicorn drains on SIGTERM, then raises the signal again for the handler that was there before
    # it: make that handler end the process through the ``finally`` below instead of killing it
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        app = create_app(store_root, settings)
        uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_options(settings, tls, limit_concurrency))
    finally:
        signal.signal(signal.SIGTERM, previous)
        listener.stop()  # writes out what is still queued
