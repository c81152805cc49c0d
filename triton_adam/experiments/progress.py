"""Progress display (rich) that the experiments share.

One bar per experiment, counted in training runs, on stderr so the command's
stdout stays free for the report path.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Tracker:
    """Hands out ``advance`` callables for named tasks."""

    def __init__(self, progress: Progress):
        self._progress = progress

    def task(self, description: str, total: int) -> Callable[[int], None]:
        """Add a bar; the returned function advances it by its argument (default 1)."""
        task_id = self._progress.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            self._progress.advance(task_id, n)

        return advance

    def log(self, message: str) -> None:
        """Print a line above the bars."""
        self._progress.console.print(message)


@contextmanager
def tracking(enabled: bool = True) -> Iterator[Tracker]:
    """Context manager yielding a :class:`Tracker`; ``enabled=False`` hides the bars."""
    console = Console(file=sys.stderr)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not enabled, transient=False) as progress:
        yield Tracker(progress)
