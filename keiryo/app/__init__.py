"""``keiryo app``: the real-time page on the inference server (see docs/app.md).

:func:`create_page_app` is :func:`keiryo.serve.app.create_app` with ``/app`` mounted and same-origin sessions
(:mod:`keiryo.app.sessions`); :func:`registry_refs` names one served model per registry alias, so the page's
chooser can offer ``production``, ``staging``, ... side by side and follow a promotion.
"""

from __future__ import annotations

from typing import Any

from keiryo.app.routes import assets_missing, page_routes
from keiryo.app.sessions import AppSessions, SessionCookies

__all__ = ["AppSessions", "assets_missing", "create_page_app", "registry_refs"]


def registry_refs(registry: Any, names: list[str] | None = None) -> list[str]:
    """``NAME@ALIAS=NAME@ALIAS`` for every alias of every package (or of ``names``) in the signed metadata;
    a package without aliases is served at its latest version as ``NAME``."""
    from keiryo.errors import PackageNotFoundError

    refs = []
    for name in names or registry.names():
        aliases = registry.aliases(name)
        refs += [f"{name}@{a}={name}@{a}" for a in aliases] or [name]
    if not refs:
        raise PackageNotFoundError(f"{registry.source}: the registry holds no package yet (keiryo registry push ...)")
    return refs


def create_page_app(
    registry: Any, settings: Any, *, session_ttl_s: float = 3600.0, poll_s: float = 2.0
) -> tuple[Any, AppSessions | None]:
    """(ASGI app, sessions): the server with ``/app``. Unless the server is anonymous, the page signs in with
    a login code or an API key and then holds a short-lived cookie (sessions is None when anonymous)."""
    from keiryo.serve.app import create_app

    sessions = None
    if not settings.allow_anonymous:
        sessions = AppSessions(session_ttl_s, secure=getattr(settings, "tls", None) is not None)
        settings = settings.model_copy(update={"api_keys": [*settings.api_keys, sessions.internal_key]})
    app = create_app(registry, settings, extra_routers=[page_routes(sessions, poll_s=poll_s)])
    return (SessionCookies(app, sessions) if sessions else app), sessions
