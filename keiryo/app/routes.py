"""``/app``: the page, its assets, its session and the model list, mounted on the inference server.

The page (``keiryo/app/static``, built from ``web/``) is served with cross-origin isolation (COOP/COEP) so
onnxruntime-web may use WebAssembly threads, and a content security policy that allows nothing but this
origin. ``/app/api/models`` lists the served models (one per registry alias) with what the page needs to feed
them; ``/app/api/models/{name}/versions/{version}/model`` hands the in-browser engine the model's bytes,
fetched from the registry and checked against its signed metadata (never an encrypted package's plaintext).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Request  # this module is imported only to build a server (keiryo app, serve --app)
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from keiryo.app.imaging import browser_support, image_spec
from keiryo.app.sessions import AppSessions
from keiryo.runtime.web import ISOLATION_HEADERS, STATIC
from keiryo.serve.errors import HTTPError

ISOLATION = {  # the web runtime's cross-origin isolation, plus what a page for people needs
    **ISOLATION_HEADERS,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self' blob:; connect-src 'self'; "
        "img-src 'self' data: blob:; media-src 'self' blob: mediastream:; style-src 'self'; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
}
MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
         ".wasm": "application/wasm", ".json": "application/json"}  # fmt: skip


def assets_missing() -> str | None:
    """Why the page cannot be served (its assets are not built), or None."""
    need = [STATIC / "index.html", STATIC / "app.js", STATIC / "vendor" / "ort-wasm-simd-threaded.wasm"]
    if all(p.is_file() for p in need):
        return None
    return f"the page's assets are not built in {STATIC}; run scripts/setup (npm ci && node build.mjs in web/)"


def describe(served_key: str, served: Any, size_bytes: int | None) -> dict[str, Any]:
    """One entry of the page's model chooser."""
    m = served.manifest
    spec, reason = image_spec(m)
    browser, browser_reason = browser_support(m)
    alias = served.ref.partition("@")[2] or "latest"
    entry: dict[str, Any] = {
        "id": served_key,
        "served": served_key,
        "name": served.name,
        "alias": alias,
        "version": served.version,
        "format": m.get("format"),
        "size_bytes": size_bytes,
        "eligible": spec is not None,
        "reason": reason,
        "browser": bool(browser and spec is not None),
        "browser_reason": browser_reason or reason,
        "spec": spec,
    }
    if spec is not None:
        entry.update(input=spec["input"], output=spec["output"], labels=spec["labels"])
    return entry


def page_routes(sessions: AppSessions | None, *, poll_s: float = 2.0) -> Callable[[Any, Any, Any], None]:
    """The ``mount(api, server, authorize)`` that adds ``/app`` to :func:`keiryo.serve.app.create_app`.
    ``sessions`` is None when the server asks no key (``--allow-anonymous``)."""

    def mount(api: Any, server: Any, authorize: Any) -> None:
        sizes: dict[tuple[str, str], int | None] = {}

        def authenticated(request: Request) -> bool:
            try:
                authorize(request.headers.get("authorization"))  # a session's cookie arrives here as the internal key
            except HTTPError:
                return False
            return True

        def need(request: Request) -> None:
            if not authenticated(request):
                raise HTTPError(401, "no valid session: sign in with an API key or the link keiryo app printed")

        def asset(path: Path, cache: str) -> Response:
            return FileResponse(path, media_type=MEDIA.get(path.suffix, "application/octet-stream"),
                                headers={**ISOLATION, "Cache-Control": cache})  # fmt: skip

        @api.get("/app", include_in_schema=False)
        async def app_root() -> Response:
            return RedirectResponse("/app/", status_code=308)

        @api.get("/app/", include_in_schema=False)
        async def page() -> Response:
            missing = assets_missing()
            if missing:
                raise HTTPError(503, missing)
            return asset(STATIC / "index.html", "no-cache")

        @api.get("/app/static/{rel:path}", include_in_schema=False)
        async def static(rel: str) -> Response:
            root = STATIC.resolve()
            path = (root / rel).resolve()
            # only plain files under static/, with a known type: no traversal, no listing, no dotfiles
            if (not path.is_relative_to(root) or not path.is_file() or path.suffix not in MEDIA
                    or any(p.startswith(".") for p in path.relative_to(root).parts)):  # fmt: skip
                raise HTTPError(404, f"no page asset {rel!r}")
            return asset(path, "public, max-age=86400" if path.parent.name == "vendor" else "no-cache")

        @api.get("/app/login", include_in_schema=False)
        async def login(code: str = "") -> Response:
            if sessions is None:
                return RedirectResponse("/app/", status_code=303)
            if not sessions.code_ok(code):
                raise HTTPError(401, "this login link is not valid (a restarted server prints a new one)")
            # 303 to /app/: the code leaves the address bar and the history
            return RedirectResponse("/app/", status_code=303, headers={"Set-Cookie": sessions.set_cookie(sessions.issue())})

        @api.get("/app/api/session", include_in_schema=False)
        async def session_state(request: Request) -> dict[str, Any]:
            return {"auth": sessions is not None, "authenticated": sessions is None or authenticated(request)}

        @api.post("/app/api/session", include_in_schema=False)
        async def session_start(request: Request) -> Response:
            if sessions is None:
                return JSONResponse({"authenticated": True})
            try:
                body = await request.json()
            except ValueError:
                body = None
            key = body.get("key") if isinstance(body, dict) else None
            if not isinstance(key, str) or not key:
                raise HTTPError(400, 'expected a JSON body {"key": "<API key>"}')
            authorize(f"Bearer {key}")  # 401 for a wrong key; the key is not kept anywhere
            return JSONResponse({"authenticated": True, "expires_in_s": sessions.ttl_s},
                                headers={"Set-Cookie": sessions.set_cookie(sessions.issue())})  # fmt: skip

        def size_of(served: Any) -> int | None:
            key = (served.name, served.version)
            if key not in sizes:
                try:
                    sizes[key] = server.registry.files(served.name, served.version)[served.manifest["model_file"]][0]
                except Exception:  # noqa: BLE001 - a size is informative; the listing must not fail for it
                    sizes[key] = None
            return sizes[key]

        @api.get("/app/api/models", include_in_schema=False)
        async def models(request: Request) -> dict[str, Any]:
            need(request)
            rows = [describe(key, served, size_of(served)) for key, served in sorted(server.models.items())]
            return {"models": rows, "poll_s": poll_s}

        @api.get("/app/api/models/{name}/versions/{version}/model", include_in_schema=False)
        async def model_file(request: Request, name: str, version: str) -> Response:
            need(request)
            served = server.get(name, version)
            ok, why = browser_support(served.manifest)
            if not ok:
                raise HTTPError(409, f"{name} {version}: not for the in-browser engine ({why})")
            rel = served.manifest["model_file"]
            trusted = await asyncio.to_thread(server.registry.files, served.name, served.version)
            # the bytes are checked against the signed length and hash again, as when the server loaded them
            data = await asyncio.to_thread(server.registry.fetch, served.name, served.version, rel, trusted[rel])
            headers = {**ISOLATION, "Cache-Control": "private, max-age=3600"}
            return Response(data, media_type="application/octet-stream", headers=headers)

    return mount
