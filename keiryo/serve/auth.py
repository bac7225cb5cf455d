"""API keys: :func:`authorizer` builds the one check every transport calls with the request's
``Authorization`` value (``Bearer KEY``); a refusal is an :class:`HTTPError` 401 (403 for a key that
is not an admin key on an admin endpoint)."""

from __future__ import annotations

import hmac
from typing import Protocol

from keiryo.serve.errors import HTTPError
from keiryo.serve.settings import ServeSettings


class Authorize(Protocol):
    def __call__(self, auth: str | None, *, admin: bool = False) -> None: ...


def key_ok(given: str | None, keys: list[str]) -> bool:
    if not given:
        return False
    ok = False
    for k in keys:  # compare with every key, in constant time, so timing says nothing about which matched
        ok |= hmac.compare_digest(given.encode(), k.encode())
    return ok


_key_ok = key_ok


def authorizer(settings: ServeSettings) -> Authorize:
    """``authorize(auth_header, admin=False)``: returns when the key may call, raises HTTPError otherwise."""
    api_keys = [*settings.api_keys, *settings.admin_keys]

    def authorize(auth: str | None, *, admin: bool = False) -> None:
        auth = auth or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        if admin:
            if not key_ok(token, settings.admin_keys):
                raise HTTPError(403 if token else 401, "admin key required", {"WWW-Authenticate": "Bearer"})
            return
        if settings.allow_anonymous or key_ok(token, api_keys):
            return
        raise HTTPError(401, "missing or invalid API key", {"WWW-Authenticate": "Bearer"})

    return authorize
