"""``keiryo app``: the real-time page (draw, upload or film; server or in-browser engine) over a registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from keiryo._console import stdout_console as _console
from keiryo.errors import ConfigError


def app_command(
    registry: Annotated[
        Optional[str],
        typer.Option(
            "--registry",
            help="registry directory or http(s):// URL; default: the demo's digits model (made from `keiryo demo` in --demo-dir)",
        ),
    ] = None,
    public_key: Annotated[
        Optional[Path], typer.Option("--public-key", help="the signer's public key (needed with --registry)")
    ] = None,
    model: Annotated[
        Optional[list[str]], typer.Option("--model", "-m", help="package names to offer (default: every package; repeatable)")
    ] = None,
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    api_key: Annotated[
        Optional[list[str]],
        typer.Option("--api-key", envvar="KEIRYO_API_KEYS", help="bearer keys the page's sign-in accepts (repeatable)"),
    ] = None,
    allow_anonymous: Annotated[bool, typer.Option("--allow-anonymous", help="no sign-in: anyone who reaches the port")] = False,
    session_ttl_s: Annotated[float, typer.Option(min=10, help="how long a page session lasts")] = 3600.0,
    poll_s: Annotated[float, typer.Option(min=0.2, help="refresh the registry's signed metadata every N s")] = 2.0,
    threads: Annotated[int, typer.Option(min=1, help="intra-op threads per model session")] = 1,
    trusted_root: Annotated[
        Optional[Path], typer.Option("--trusted-root", envvar="KEIRYO_TRUSTED_ROOT", help="TUF root to trust")
    ] = None,
    tuf_cache: Annotated[Optional[Path], typer.Option("--tuf-cache", help="where trusted metadata is kept between runs")] = None,
    demo_dir: Annotated[Path, typer.Option("--demo-dir", help="the demo's output (run now if missing)")] = Path("keiryo-demo"),
) -> None:
    """Serve the real-time page at /app: draw a digit, upload an image or use the webcam, and see the top
    classes and where the time goes, on the server (OIP v2) or inside the browser (onnxruntime-web).

    Every package alias in the registry is offered (production, staging, ...); a promotion shows up on
    the page within --poll-s. The page signs in with the one-time link printed here or an API key, then
    holds a short-lived same-origin session: keys are never in the page."""
    from keiryo.app import AppSessions, assets_missing, create_page_app, registry_refs
    from keiryo.packages.remote import open_registry
    from keiryo.serve import ServeSettings, run_server

    missing = assets_missing()
    if missing:
        raise ConfigError(missing)
    if registry is None:
        if public_key is not None:
            raise ConfigError("--public-key goes with --registry (the demo registry has its own key)")
        from keiryo.app.demo import ensure_demo_registry

        _console().print(f"no --registry: serving the demo's digits model (registry under {demo_dir}/app)")
        root, public_key = ensure_demo_registry(demo_dir)
        registry = str(root)
    elif public_key is None:
        raise ConfigError("--registry needs --public-key: every package is verified against the signer's key")
    reg = open_registry(registry, trusted_root, tuf_cache)
    reg.refresh()
    refs = registry_refs(reg, model)
    settings = ServeSettings(
        models=refs,
        public_key=str(public_key),
        api_keys=[k for ks in (api_key or []) for k in ks.split(",") if k],
        allow_anonymous=allow_anonymous,
        threads=threads,
        poll_s=poll_s,
        trusted_root=str(trusted_root) if trusted_root else None,
        tuf_cache=str(tuf_cache) if tuf_cache else None,
    )
    sessions: list[AppSessions | None] = []

    def build(_: object, s: ServeSettings) -> object:
        app, sess = create_page_app(reg, s, session_ttl_s=session_ttl_s, poll_s=poll_s)
        sessions.append(sess)
        if sess is not None:
            url = f"http://{host}:{port}/app/login?code={sess.login_code}"
            _console().print(f"open {url}  (signs this browser in)", highlight=False, soft_wrap=True)
        else:
            _console().print(f"open http://{host}:{port}/app/", highlight=False, soft_wrap=True)
        return app

    run_server(registry, settings, host, port, build=build)
