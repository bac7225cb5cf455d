"""The rich consoles keiryo prints to: tables on stdout, progress and logs on stderr."""

from __future__ import annotations

import functools
from typing import Any

from rich.console import Console


@functools.cache
def stderr_console() -> Console:
    return Console(stderr=True)


@functools.cache
def stdout_console() -> Console:
    # Tables are wide; when stdout is not a terminal (CI logs, pipes) do not squeeze them to 80 columns.
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 160))


def progress_bar(unit: str) -> Any:
    """A started rich progress bar on stderr: description, bar, done/total UNIT, elapsed, ETA and a status field."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=stderr_console(),
    )
    bar.start()
    return bar
