"""Rich progress bars shared by long-running commands (quiet on non-zero ranks and in tests)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class _Silent:
    def add_task(self, *a, **k) -> int:
        return 0

    def update(self, *a, **k) -> None:
        pass

    def advance(self, *a, **k) -> None:
        pass


@contextlib.contextmanager
def progress_bar(quiet: bool = False, extra: str = "") -> Iterator[Progress]:
    """A bar with count, rate/ETA columns; `extra` is a format string over task fields."""
    if quiet or int(os.environ.get("RANK", "0")) != 0:
        yield _Silent()  # type: ignore[misc]
        return
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    if extra:
        cols.append(TextColumn(extra))
    with Progress(*cols, console=console, transient=False, disable=not sys.stderr.isatty() and False,
                  refresh_per_second=4) as bar:
        yield bar
