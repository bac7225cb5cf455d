"""``create_app(registry, settings)``: the Open Inference Protocol v2 server, assembled.

The rooms of ``keiryo/serve``: :mod:`~keiryo.serve.settings` (configuration), :mod:`~keiryo.serve.errors`
(the one status mapping), :mod:`~keiryo.serve.auth` (API keys), :mod:`~keiryo.serve.metrics`,
:mod:`~keiryo.serve.models` (a served model) and :mod:`~keiryo.serve.lifecycle` (load, reload, drain,
the one inference path), :mod:`~keiryo.serve.front` (the ASGI front, hot path), :mod:`~keiryo.serve.api`
(the FastAPI routes), :mod:`~keiryo.serve.run` (uvicorn). This module only puts them together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keiryo.packages.remote import TrustedRegistry, open_registry
from keiryo.serve.api import build_api
from keiryo.serve.auth import authorizer
from keiryo.serve.errors import HTTPError, _error_body, _status_of, error_body, status_of
from keiryo.serve.front import Front
from keiryo.serve.lifecycle import Server
from keiryo.serve.metrics import Metrics
from keiryo.serve.run import run_server
from keiryo.serve.settings import ServeSettings, TLSSettings, uvicorn_options

__all__ = [
    "Front",
    "HTTPError",
    "Metrics",
    "ServeSettings",
    "Server",
    "TLSSettings",
    "_error_body",
    "_status_of",
    "create_app",
    "error_body",
    "run_server",
    "status_of",
    "uvicorn_options",
]


def create_app(registry: TrustedRegistry | Any, settings: ServeSettings, *, extra_routers: Sequence[Any] = ()) -> Front:
    """The ASGI app (:class:`Front` over FastAPI). Models load at startup; ``/v2/health/ready`` is 200
    only once all verified and reproduced. ``registry``: a :class:`TrustedRegistry`, or a registry
    directory / URL / ``PackageStore`` opened as one with the settings' trusted root and cache.

    ``extra_routers``: the extension point for more endpoints. Each is a callable
    ``mount(api, server, authorize)`` called once the core routes are registered, with the FastAPI
    app, the :class:`Server` (models, metrics, :meth:`Server.run`) and ``authorize(auth_header,
    admin=False)``, which raises :class:`HTTPError` 401 (403: not an admin key) when the key may not call.
    """
    settings.check()
    if not isinstance(registry, TrustedRegistry):
        from keiryo.packages.store import PackageStore

        source = registry.root if isinstance(registry, PackageStore) else registry
        registry = open_registry(source, settings.trusted_root, settings.tuf_cache)
    server = Server(registry, settings)
    authorize = authorizer(settings)
    api = build_api(server, authorize)
    for mount in extra_routers:
        mount(api, server, authorize)
    return Front(api, server, authorize)
