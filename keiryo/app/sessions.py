"""Short-lived, same-origin sessions for the page: the API key never reaches the browser.

A session is an HttpOnly, ``SameSite=Strict`` cookie holding ``EXPIRY.HMAC`` (HMAC-SHA256 under a secret made
when the server starts, so a restart ends every session). The page gets one by exchanging the login code
``keiryo app`` prints (``/app/login?code=...``, like a notebook server's token) or an API key typed into the page
(``POST /app/api/session``). :class:`SessionCookies` lets a request that carries a valid cookie through the
server's ordinary bearer-key check: it adds an internal key, known only to this process, to such requests.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

COOKIE = "keiryo_app"


class AppSessions:
    def __init__(self, ttl_s: float = 3600.0, *, secure: bool = False, login_code: str | None = None):
        self.ttl_s = ttl_s
        self.secure = secure
        self._secret = os.urandom(32)
        self.login_code = login_code or secrets.token_urlsafe(24)
        self.internal_key = secrets.token_urlsafe(32)  # the bearer key a session's requests carry inside the server

    def _sign(self, payload: str) -> str:
        return hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()

    def issue(self, now: float | None = None) -> str:
        exp = int((now if now is not None else time.time()) + self.ttl_s)
        return f"{exp}.{self._sign(str(exp))}"

    def valid(self, token: str | None, now: float | None = None) -> bool:
        if not token or "." not in token or len(token) > 128:
            return False
        exp, _, sig = token.partition(".")
        if not exp.isdigit() or not hmac.compare_digest(sig, self._sign(exp)):
            return False
        return int(exp) > (now if now is not None else time.time())

    def code_ok(self, code: str | None) -> bool:
        return bool(code) and hmac.compare_digest(str(code).encode(), self.login_code.encode())

    def set_cookie(self, token: str) -> str:
        secure = "; Secure" if self.secure else ""
        return f"{COOKIE}={token}; Max-Age={int(self.ttl_s)}; Path=/; HttpOnly; SameSite=Strict{secure}"

    def from_headers(self, cookie_header: str | None) -> str | None:
        """The session token in a ``Cookie`` header, if any."""
        for part in (cookie_header or "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == COOKIE:
                return v
        return None


class SessionCookies:
    """ASGI middleware: a request with a valid session cookie and no ``Authorization`` header is let through
    the server's key check with the internal key. Nothing else changes: a bad or expired cookie is simply
    not a key, so the request gets the server's own 401."""

    def __init__(self, app: Any, sessions: AppSessions):
        self.app, self.sessions = app, sessions
        self.server = getattr(app, "server", None)  # the wrapped Front's Server (settings, models), for callers that look
        self._auth = f"Bearer {sessions.internal_key}".encode("latin-1")

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            cookie = next((v for k, v in headers if k == b"cookie"), None)
            if cookie is not None and not any(k == b"authorization" for k, _ in headers):
                if self.sessions.valid(self.sessions.from_headers(cookie.decode("latin-1"))):
                    scope = {**scope, "headers": [*headers, (b"authorization", self._auth)]}
        await self.app(scope, receive, send)
