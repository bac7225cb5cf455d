"""The ``keiryo`` command line: thin commands that build configs and call the library."""

from keiryo.cli.main import app, main

__all__ = ["app", "main"]
