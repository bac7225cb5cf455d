"""The rich consoles keiryo prints to: tables on stdout, progress and logs on stderr."""

from __future__ import annotations

import functools

from rich.console import Console


@functools.cache
def stderr_console() -> Console:
    return Console(stderr=True)


@functools.cache
def stdout_console() -> Console:
    # Tables are wide; when stdout is not a terminal (CI logs, pipes) do not squeeze them to 80 columns.
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 160))
