"""Open Inference Protocol v2 server over registry packages (``keiryo[serve]``)."""

from keiryo.serve.app import ServeSettings, create_app, run_server

__all__ = ["ServeSettings", "create_app", "run_server"]
