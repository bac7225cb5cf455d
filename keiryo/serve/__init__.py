"""Open Inference Protocol v2 server over registry packages (``keiryo[serve]``).

The names below are imported on first use, so the small pieces other layers take from here (``protocol``,
``stdlib_http``: the serverless function, the device's endpoint) do not load the server's app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keiryo.serve.app import ServeSettings, create_app, run_server

__all__ = ["ServeSettings", "create_app", "run_server"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from keiryo.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'keiryo.serve' has no attribute {name!r}")
