"""The FastAPI app behind the front (:func:`build_api`): health, metadata, the model-repository
extension, /metrics, the OpenAPI documentation, and the infer routes (served by the front on the
hot path; both call :meth:`Server.infer_rest`, so there is one inference path).

(No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at run time,
and ``Request`` is imported inside :func:`build_api` so that importing keiryo never imports fastapi.)
"""

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from keiryo.errors import KeiryoError, PackageNotFoundError
from keiryo.serve.auth import Authorize
from keiryo.serve.batching import QueueFull
from keiryo.serve.errors import HTTPError, error_body, status_of
from keiryo.serve.lifecycle import Server
from keiryo.serve.protocol import HEADER, ProtocolError


def build_api(server: Server, authorize: Authorize) -> Any:
    """The FastAPI app; its lifespan loads the models (:meth:`Server.start`), starts the gRPC endpoint when
    ``settings.grpc_port`` is set, and on exit stops it and drains the models."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from keiryo import __version__

    settings = server.settings

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await server.start()  # a package that fails verification stops the server from starting
        grpc_server = None
        try:
            if settings.grpc_port is not None:  # the gRPC endpoint shares this loop, the models and the batchers
                from keiryo.serve.grpc import start_grpc

                grpc_server = await start_grpc(server, authorize)
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(settings.request_timeout_s)  # in-flight calls finish first
            await server.stop()

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
        status = status_of(e)  # 500 for anything unexpected: logged with its traceback, not shown to the caller
        return Response(error_body(status, e), status, getattr(e, "headers", None), "application/json")

    # expected failures: handled by the exception middleware, answered with their status; the rest are bugs
    for exc in (HTTPError, ProtocolError, KeiryoError, QueueFull, TimeoutError, Exception):
        app.add_exception_handler(exc, _mapped)

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
        content, headers, media = await server.infer_rest(served, body, request.headers.get(HEADER))
        return Response(content=content, media_type=media, headers=headers)

    # -- model repository extension (admin) ----------------------------------------------------
    @app.post("/v2/repository/index")
    async def repo_index(request: Request) -> list[dict[str, Any]]:
        need(request, admin=True)
        return server.index()

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

    return app
